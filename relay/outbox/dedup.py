"""De-duplication keys: what makes two Extole events the same event.

An event has one or more keys (`keys_of`): first its event-id key (Extole's event id, or a
SHA-256 of the item when it has none: `Event.dedup_key`), and for a reward event also
`reward_key(reward_id, state)`, so that a webhook and a reconciled copy of the same reward state
meet. An event is a duplicate when ANY of its keys is already held in its environment; then none
of its keys is added. Keys live in their own narrow table (`dedup_keys`), which outlives the
events: retention purges an event but keeps its keys until its `received_at` +
RELAY_DEDUP_DAYS, so a request replayed after the purge is still a duplicate.

Concurrency (PostgreSQL): whoever inserts a key holds a transaction-scoped advisory lock on it
(`lock`), taken in one global order, from before its insert until its commit. So a transaction
that has locked its keys sees, in its next statement, every key anyone else stored: its check
(`held`) is exact, and its own inserts never wait on another transaction's row. PostgreSQL's
single-statement path (`relay.outbox.ingest.store_single`) takes the same locks inside its
statement. SQLite has one writer at a time: the check is exact once the transaction has
written.

Keys carry no personal data in the ordinary case: Extole's event ids and reward ids, a state, or
a hash of the item. A reshaped body may use a person's id as its event `id`, though; `relay
forget` deletes keys that mention the person like every other mention.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime

from sqlalchemy import Connection, insert, select

from relay import dialect
from relay.extole import Event
from relay.models import DedupKey

MAX_KEY_LENGTH = 255  # dedup_keys.key
REWARD_PREFIX = "reward:"


def keys_of(event: Event) -> tuple[str, ...]:
    """Every de-duplication key of one event, its event-id key first, each once.

    The one place that says which keys an event has: every path that stores events (the
    receiver's two, reconciliation's) asks here.
    """
    keys = [event.dedup_key]
    if event.reward_id and event.reward_state:  # a reward event (README, "Reward events")
        keys.append(reward_key(event.reward_id, event.reward_state))
    return tuple(dict.fromkeys(keys))


def reward_key(reward_id: str, state: str) -> str:
    """The key of one reward in one state: `reward:<reward_id>:<STATE>` (state upper case).

    A webhook and a reconciled copy of the same reward state share it, whatever their event ids.
    A reward id too long for the column is replaced by its SHA-256 (`reward:sha256:<hex>:…`).
    """
    state = state.strip().upper()
    reward_id = reward_id.strip()
    key = f"{REWARD_PREFIX}{reward_id}:{state}"
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha256(reward_id.encode("utf-8", "surrogatepass")).hexdigest()
        key = f"{REWARD_PREFIX}sha256:{digest}:{state}"[:MAX_KEY_LENGTH]
    return key


def lock_names(environment: str, keys: Iterable[str]) -> list[str]:
    """The advisory lock names of keys: the same strings on every path that inserts keys."""
    return [f"{environment} {key}" for key in keys]


def lock(connection: Connection, environment: str, keys: Iterable[str]) -> None:
    """Lock keys before checking and inserting them (PostgreSQL; SQLite: nothing to do).

    In a statement of its own: the statements after it see every key another holder stored.
    """
    dialect.lock_text_keys(connection, lock_names(environment, keys))


def held(connection: Connection, environment: str, keys: Collection[str]) -> set[str]:
    """Which of these keys the environment already holds.

    Each key is looked up by a subquery of its own on the whole primary key, as the single
    statement does (`relay.outbox.ingest`): PostgreSQL answers that from the index whatever it
    thinks of the table. `key IN (...)` was planned, while `dedup_keys` had no statistics yet
    (a new database, until autovacuum's first ANALYZE), as a scan of every key of the
    environment with the keys as a filter: each webhook cost more than the one before.
    """
    if not keys:
        return set()
    # Its plan, on a database never analysed, is tested (tests/integration/test_dedup.py).
    wanted = dialect.text_rows(connection, sorted(keys), "wanted")
    one = (select(DedupKey.key)
           .where(DedupKey.environment == environment, DedupKey.key == wanted.c.value)
           .scalar_subquery())
    return set(connection.scalars(select(wanted.c.value).where(one.is_not(None))))


class Claims:
    """The keys of one transaction's events: locked and checked once, added together.

    `is_duplicate(keys)` before each event's insert, `claim(keys, event_id)` once it is stored;
    `write()` at the end inserts every claimed key in one statement. Keys of events stored
    earlier in the same transaction count as held, so two items of one webhook sharing a key
    store one event.
    """

    def __init__(self, connection: Connection, environment: str,
                 keys_per_event: Iterable[Sequence[str]], received_at: datetime) -> None:
        self.connection = connection
        self.environment = environment
        self.received_at = received_at
        every = {key for keys in keys_per_event for key in keys}
        lock(connection, environment, every)
        self.taken = held(connection, environment, every)
        self.rows: list[dict[str, object]] = []

    def is_duplicate(self, keys: Iterable[str]) -> bool:
        return not self.taken.isdisjoint(keys)

    def claim(self, keys: Iterable[str], event_id: int) -> None:
        """The keys of a stored event: held from now on, written by `write`."""
        for key in keys:
            if key not in self.taken:
                self.taken.add(key)
                self.rows.append({"environment": self.environment, "key": key,
                                  "event_id": event_id, "received_at": self.received_at})

    def write(self) -> None:
        if self.rows:
            self.connection.execute(insert(DedupKey), self.rows)
            self.rows = []
