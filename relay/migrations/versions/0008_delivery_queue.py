"""a narrow delivery queue: claims and leases leave the wide events row

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 10:00:00

`delivery_queue` holds one row per pending event (due time, lease owner, lease expiry, and copies
of the event's environment, person key and event time for the per-person order check), so a
claim, a lease renewal and a sweep rewrite a row of about a hundred bytes instead of the event's
whole row (README, "The delivery queue"). The pending events already stored are queued with
their due time and lease as they were; then `events` loses `next_attempt_at`, `lease_owner`,
`lease_expires_at` and the two indexes only the claim and the sweep used.

SQLite drops the columns with ALTER TABLE ... DROP COLUMN (3.35 and newer), not by copying the
table: a copy would drop the old `events` table, and with foreign keys on, that deletes through
the keys pointing at it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "delivery_queue",
        sa.Column("event_id", BigId, autoincrement=False, nullable=False),
        sa.Column("environment", sa.String(length=16), nullable=False),
        sa.Column("person_key", sa.String(length=330), nullable=True),
        sa.Column("event_time", sa.DateTime(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["event_id"], ["events.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.execute(
        "INSERT INTO delivery_queue (event_id, environment, person_key, event_time, "
        "next_attempt_at, lease_owner, lease_expires_at) "
        "SELECT id, environment, person_key, event_time, "
        "COALESCE(next_attempt_at, received_at), lease_owner, lease_expires_at "
        "FROM events WHERE status = 'pending'")
    op.create_index("ix_delivery_queue_due", "delivery_queue", ["next_attempt_at", "event_id"])
    op.create_index("ix_delivery_queue_person", "delivery_queue",
                    ["environment", "person_key", "event_time", "event_id"])
    op.create_index("ix_delivery_queue_lease_expires_at", "delivery_queue",
                    ["lease_expires_at"])
    op.drop_index("ix_events_due", table_name="events")
    op.drop_index("ix_events_lease_expires_at", table_name="events")
    for column in ("next_attempt_at", "lease_owner", "lease_expires_at"):
        op.drop_column("events", column)


def downgrade() -> None:
    op.add_column("events", sa.Column("next_attempt_at", sa.DateTime(), nullable=True))
    op.add_column("events", sa.Column("lease_owner", sa.String(length=64), nullable=True))
    op.add_column("events", sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
    for column in ("next_attempt_at", "lease_owner", "lease_expires_at"):
        op.execute(
            f"UPDATE events SET {column} = (SELECT q.{column} FROM delivery_queue AS q "  # noqa: S608
            "WHERE q.event_id = events.id)")
    op.create_index("ix_events_lease_expires_at", "events", ["lease_expires_at"])
    op.create_index("ix_events_due", "events", ["status", "next_attempt_at", "id"])
    op.drop_table("delivery_queue")
