"""de-duplication keys that outlive their events (dedup_keys), filled from the stored events

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 09:00:00

Until now the unique constraint on events (environment, dedup_key) alone decided duplicates, so a
request replayed after retention purged its event was accepted again. `dedup_keys` holds every
key of every stored event (today the event-id key, which is `events.dedup_key`; a reward event
adds `reward:<reward_id>:<STATE>`), is the table that decides duplicates, and keeps a purged
event's keys until its `received_at` + RELAY_DEDUP_DAYS. Every existing event with a key gets its
row here, so nothing stored before the upgrade can come in twice after it: its event-id key, and
for a reward event (a `reward_id` property and a type that names a reward state, or
`earned_reward`/`reward_earned` for EARNED) its reward key too, so that reconciliation does not
store again a reward state received before the upgrade. Where several existing events hold the same
reward state (stored before the rule existed), the oldest keeps the key.

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

import hashlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

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
    _backfill_reward_keys()


# Frozen copies of the rule as this revision knows it (README, "Reward events"); a migration does
# not follow later changes of the application's code.
_REWARD_STATES = ("EARNED", "FULFILLED", "SENT", "REDEEMED", "FAILED", "FAILED_FULFILLMENT",
                  "CANCELED", "REVOKED", "EXPIRED")
_EARNED_TYPES = ("earned_reward", "reward_earned")
_BATCH = 1000


def _type_key(extole_type: str) -> str:
    return re.sub(r"[\s_\-]+", "", extole_type).casefold()


_STATE_BY_KEY = {_type_key(state): state for state in _REWARD_STATES}
_STATE_BY_KEY.update({_type_key(t): "EARNED" for t in _EARNED_TYPES})


def _reward_key(reward_id: str, state: str) -> str:
    key = f"reward:{reward_id}:{state}"
    if len(key) > 255:
        digest = hashlib.sha256(reward_id.encode("utf-8", "surrogatepass")).hexdigest()
        key = f"reward:sha256:{digest}:{state}"[:255]
    return key


def _stored_events(connection: sa.Connection, events: sa.TableClause) -> Iterator[Any]:
    """Stored events in id order, a batch at a time (a large outbox never sits in memory)."""
    after = 0
    while True:
        rows = connection.execute(
            sa.select(events.c.id, events.c.environment, events.c.extole_type,
                      events.c.properties, events.c.received_at)
            .where(events.c.id > after, events.c.dedup_key.is_not(None))
            .order_by(events.c.id).limit(_BATCH)
        ).all()
        if not rows:
            return
        yield from rows
        after = rows[-1].id


def _backfill_reward_keys() -> None:
    connection = op.get_bind()
    events = sa.table("events", sa.column("id", sa.Integer), sa.column("environment", sa.String),
                      sa.column("extole_type", sa.String), sa.column("dedup_key", sa.String),
                      sa.column("properties", sa.JSON), sa.column("received_at", sa.DateTime))
    keys = sa.table("dedup_keys", sa.column("environment", sa.String), sa.column("key", sa.String),
                    sa.column("event_id", sa.Integer), sa.column("received_at", sa.DateTime))
    # Event-id keys never start with "reward:" in practice; the check below keeps the backfill
    # safe even if one did.
    taken = {(row.environment, row.key) for row in connection.execute(
        sa.select(keys.c.environment, keys.c.key).where(keys.c.key.like("reward:%")))}
    pending: list[dict[str, Any]] = []
    for row in _stored_events(connection, events):
        state = _STATE_BY_KEY.get(_type_key(row.extole_type or ""))
        properties = row.properties if isinstance(row.properties, dict) else {}
        reward_id = properties.get("reward_id")
        if state is None or isinstance(reward_id, bool) or not isinstance(reward_id, str | int):
            continue
        reward_id = str(reward_id).strip()
        if not reward_id:
            continue
        key = _reward_key(reward_id, state)
        if (row.environment, key) in taken:
            continue
        taken.add((row.environment, key))
        pending.append({"environment": row.environment, "key": key, "event_id": row.id,
                        "received_at": row.received_at})
        if len(pending) >= _BATCH:
            connection.execute(sa.insert(keys), pending)
            pending = []
    if pending:
        connection.execute(sa.insert(keys), pending)


def downgrade() -> None:
    with op.batch_alter_table("dedup_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_dedup_keys_event_id_received_at")
    op.drop_table("dedup_keys")
