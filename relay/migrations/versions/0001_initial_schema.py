"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26 06:52:36.326501
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("environment", sa.String(length=16), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("request_body", sa.Text(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("delivery_attempts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_delivery_attempts_started_at"), ["started_at"], unique=False
        )

    op.create_table(
        "environment_state",
        sa.Column("environment", sa.String(length=16), nullable=False),
        sa.Column("key_state", sa.String(length=16), nullable=False),
        sa.Column("paused_until", sa.DateTime(), nullable=True),
        sa.Column("rate_limited_until", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("environment"),
    )
    op.create_table(
        "identity_cache",
        sa.Column("environment", sa.String(length=16), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("external_id", sa.String(length=255), nullable=True),
        sa.Column("braze_id", sa.String(length=64), nullable=True),
        sa.Column("found", sa.Boolean(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("environment", "email"),
    )
    with op.batch_alter_table("identity_cache", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_identity_cache_expires_at"), ["expires_at"], unique=False
        )

    op.create_table(
        "inbound_requests",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("environment", sa.String(length=32), nullable=False),
        sa.Column("method", sa.String(length=10), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=True),
        sa.Column(
            "headers",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "body", sa.LargeBinary().with_variant(postgresql.BYTEA(), "postgresql"), nullable=True
        ),
        sa.Column("body_size", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("auth_method", sa.String(length=16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("duplicates", sa.Integer(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("inbound_requests", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_inbound_requests_received_at"), ["received_at"], unique=False
        )

    op.create_table(
        "rate_limiters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("environment", sa.String(length=16), nullable=False),
        sa.Column("dedup_key", sa.String(length=255), nullable=True),
        sa.Column("extole_event_id", sa.String(length=255), nullable=True),
        sa.Column("extole_type", sa.String(length=255), nullable=True),
        sa.Column("braze_event", sa.String(length=255), nullable=True),
        sa.Column("external_id", sa.String(length=255), nullable=True),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("person_key", sa.String(length=330), nullable=True),
        sa.Column("event_time", sa.DateTime(), nullable=True),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "attributes",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "properties",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "identity",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("first_failure_at", sa.DateTime(), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "inbound_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["inbound_id"], ["inbound_requests.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("environment", "dedup_key", name="uq_events_environment_dedup_key"),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_braze_event_id", ["braze_event", "id"], unique=False)
        batch_op.create_index("ix_events_due", ["status", "next_attempt_at", "id"], unique=False)
        batch_op.create_index("ix_events_email", ["email"], unique=False)
        batch_op.create_index("ix_events_environment_id", ["environment", "id"], unique=False)
        batch_op.create_index("ix_events_external_id", ["external_id"], unique=False)
        batch_op.create_index("ix_events_extole_event_id", ["extole_event_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_events_inbound_id"), ["inbound_id"], unique=False)
        batch_op.create_index("ix_events_lease_expires_at", ["lease_expires_at"], unique=False)
        batch_op.create_index(
            "ix_events_person", ["environment", "person_key", "event_time", "id"], unique=False
        )
        batch_op.create_index("ix_events_received_at", ["received_at"], unique=False)
        batch_op.create_index("ix_events_status_id", ["status", "id"], unique=False)

    op.create_table(
        "attempt_events",
        sa.Column(
            "attempt_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(["attempt_id"], ["delivery_attempts.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["event_id"], ["events.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("attempt_id", "event_id"),
    )
    with op.batch_alter_table("attempt_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_attempt_events_event_id"), ["event_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("attempt_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_attempt_events_event_id"))

    op.drop_table("attempt_events")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_status_id")
        batch_op.drop_index("ix_events_received_at")
        batch_op.drop_index("ix_events_person")
        batch_op.drop_index("ix_events_lease_expires_at")
        batch_op.drop_index(batch_op.f("ix_events_inbound_id"))
        batch_op.drop_index("ix_events_extole_event_id")
        batch_op.drop_index("ix_events_external_id")
        batch_op.drop_index("ix_events_environment_id")
        batch_op.drop_index("ix_events_email")
        batch_op.drop_index("ix_events_due")
        batch_op.drop_index("ix_events_braze_event_id")

    op.drop_table("events")
    op.drop_table("rate_limiters")
    with op.batch_alter_table("inbound_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_inbound_requests_received_at"))

    op.drop_table("inbound_requests")
    with op.batch_alter_table("identity_cache", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_identity_cache_expires_at"))

    op.drop_table("identity_cache")
    op.drop_table("environment_state")
    with op.batch_alter_table("delivery_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_delivery_attempts_started_at"))

    op.drop_table("delivery_attempts")
