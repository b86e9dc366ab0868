"""campaign and Canvas triggers: one row per delivered event and target, sent at most once

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "triggers",
        sa.Column("id", BigId, nullable=False),
        sa.Column("event_id", BigId, nullable=False),
        sa.Column("environment", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("target_id", sa.String(length=64), nullable=False),
        sa.Column("recipient", Json, nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("due_at", sa.DateTime(), nullable=True),
        sa.Column("sends", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("attempt_id", BigId, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["event_id"], ["events.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["attempt_id"], ["delivery_attempts.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id", "kind", "target_id", name="uq_triggers_event_target"),
    )
    with op.batch_alter_table("triggers", schema=None) as batch_op:
        batch_op.create_index("ix_triggers_due", ["state", "due_at", "id"], unique=False)
        batch_op.create_index("ix_triggers_state_id", ["state", "id"], unique=False)
        batch_op.create_index("ix_triggers_lease_expires_at", ["lease_expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_triggers_attempt_id"), ["attempt_id"],
                              unique=False)
        batch_op.create_index(batch_op.f("ix_triggers_updated_at"), ["updated_at"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("triggers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_triggers_updated_at"))
        batch_op.drop_index(batch_op.f("ix_triggers_attempt_id"))
        batch_op.drop_index("ix_triggers_lease_expires_at")
        batch_op.drop_index("ix_triggers_state_id")
        batch_op.drop_index("ix_triggers_due")
    op.drop_table("triggers")
