"""de-duplication keys that outlive their events (dedup_keys), filled from the stored events

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 09:00:00

Until now the unique constraint on events (environment, dedup_key) alone decided duplicates, so a
request replayed after retention purged its event was accepted again. `dedup_keys` holds every
key of every stored event (today the event-id key, which is `events.dedup_key`; a reward event
adds `reward:<reward_id>:<STATE>`), is the table that decides duplicates, and keeps a purged
event's keys until its `received_at` + RELAY_DEDUP_DAYS. Every existing event with a key gets its
row here, so nothing stored before the upgrade can come in twice after it.

The events keep their own unique constraint on (environment, dedup_key):
- dropping it on SQLite rebuilds the events table (copy, DROP, rename), and with foreign keys on
  (as relay runs SQLite) that DROP deletes the attempt links of every event through their
  ON DELETE CASCADE: a migration must not risk the history it upgrades;
- it costs nothing new: every insert maintains it today, and the event-id key of a stored event
  is in both places by construction (its keys are never deleted while it exists; `relay forget`
  rewrites both), so the two never disagree; if they ever did (an event written by a relay that
  predates this table), the event's insert finds the conflict and the event is a duplicate
  rather than a second copy.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dedup_keys",
        sa.Column("environment", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column(
            "event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["event_id"], ["events.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("environment", "key"),
    )
    with op.batch_alter_table("dedup_keys", schema=None) as batch_op:
        batch_op.create_index("ix_dedup_keys_event_id_received_at", ["event_id", "received_at"],
                              unique=False)
    # The keys of the events stored so far: their event-id key (unique per environment by the
    # events' own constraint, so no conflict here). Rejected items have none.
    op.execute(
        "INSERT INTO dedup_keys (environment, key, event_id, received_at) "
        "SELECT environment, dedup_key, id, received_at FROM events "
        "WHERE dedup_key IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("dedup_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_dedup_keys_event_id_received_at")
    op.drop_table("dedup_keys")
