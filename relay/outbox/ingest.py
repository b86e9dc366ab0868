"""Ingest: a webhook's events into the outbox, with its inbound log row, in one transaction.

`store_webhook` writes the inbound log row, the outbox rows, their de-duplication keys and their
delivery queue rows (`relay.outbox.leases`) in the caller's transaction. The keys decide
duplicates (`relay.outbox.dedup`): an event is a duplicate when any of its keys is held in its
environment, also after the original was purged, and a duplicate adds none of its keys.
`store_single` is the fast path for Extole's usual webhook (one event, on PostgreSQL): all rows
in one autocommitted statement. `store_events` stores events that came another way
(reconciliation) through the same de-duplicating insert. Nothing here sends anything: the
receiver wakes the workers after the commit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

from relay import dialect
from relay.eventmap import EventMap
from relay.exceptions import RejectedEvent
from relay.extole import Event, item_value, normalise
from relay.models import InboundRequest, OutboxEvent, QueuedEvent, Status
from relay.outbox import dedup, leases

log = logging.getLogger(__name__)

MAX_EMAIL_LENGTH = 320
# Rejections listed in the answer; `rejected_count` gives the total. A batch of unusable items
# must not make an answer as large as the request.
LISTED_REJECTIONS = 100


@dataclass
class Receipt:
    """What the receiver answers: counts, the first rejections and the new outbox ids."""

    accepted: int = 0
    duplicates: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    rejected_count: int = 0
    ids: list[int] = field(default_factory=list)

    def reject(self, index: int, reason: str) -> None:
        self.rejected_count += 1
        if len(self.rejected) < LISTED_REJECTIONS:
            self.rejected.append({"index": index, "error": reason})

    def as_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "rejected_count": self.rejected_count,
            "ids": self.ids,
        }


def store_webhook(
    session: Session,
    inbound: InboundRequest,
    items: Sequence[Any],
    environment: str,
    event_map: EventMap,
    *,
    default_type: str | None = None,
    external_id_from: str = "partner_user_id",
) -> Receipt:
    """Record the request and its events in the caller's transaction.

    `default_type` and `external_id_from` are passed to `normalise` (the webhook URL's `type`
    parameter and RELAY_EXTERNAL_ID).

    The caller wakes the workers after the commit (`relay.wakeup`): a NOTIFY inside this
    transaction would serialise every commit on PostgreSQL's notification queue lock.
    The receiver tries `store_single` first: Extole's usual webhook, one event, on PostgreSQL.
    """
    now = inbound.received_at
    receipt = Receipt()
    # Normalised first, so the inbound row goes in with its final counts in the usual case
    # (an UPDATE follows only when a duplicate turns up).
    prepared: list[tuple[Any, Event | None, str | None]] = []
    for index, item in enumerate(items):
        try:
            event = normalise(item, event_map, now, default_type=default_type,
                              external_id_from=external_id_from)
            if event.email and len(event.email) > MAX_EMAIL_LENGTH:
                raise RejectedEvent(f"email is longer than {MAX_EMAIL_LENGTH} characters")
        except RejectedEvent as rejection:
            reason = str(rejection)
            receipt.reject(index, reason)
            prepared.append((item, None, reason))
            continue
        prepared.append((item, event, None))
    inbound.accepted = len(prepared) - receipt.rejected_count
    inbound.duplicates = 0
    inbound.rejected = receipt.rejected_count
    # Core, not the ORM's unit of work: this is the hot path of every webhook.
    connection = session.connection()
    inbound_table = InboundRequest.__table__
    inbound.id = connection.execute(
        _INSERT_INBOUND,
        {c.key: getattr(inbound, c.key) for c in inbound_table.columns if c.key != "id"},
    ).scalar_one()
    # Every key of every event locked (in one global order) and looked up once, before any insert.
    claims = dedup.Claims(connection, environment,
                          (dedup.keys_of(e) for _, e, _ in prepared if e), now)
    rejected_rows = []
    queued: list[dict[str, Any]] = []
    for item, usable, why in prepared:
        if usable is None:
            rejected_rows.append(_rejected_row(item, environment, inbound.id, why or "", now))
            continue
        new_id = _insert_one(connection, claims, usable, environment, inbound.id, now, queued)
        if new_id is None:
            receipt.duplicates += 1
            continue
        receipt.accepted += 1
        receipt.ids.append(new_id)
        for note in usable.trimmed:
            log.info("event %s (%s): %s", new_id, usable.extole_event_id, note)
    claims.write()
    _enqueue(connection, queued)
    if rejected_rows:
        # One multi-row INSERT for all of them (up to RELAY_MAX_ITEMS), in request order; the
        # accepted events' ids, the only ones the answer names, stay in request order too.
        connection.execute(OutboxEvent.__table__.insert(), rejected_rows)
    if receipt.duplicates:
        inbound.accepted, inbound.duplicates = receipt.accepted, receipt.duplicates
        connection.execute(
            inbound_table.update().where(inbound_table.c.id == inbound.id)
            .values(accepted=receipt.accepted, duplicates=receipt.duplicates)
        )
    return receipt


def store_events(session: Session, environment: str, events: Sequence[Event],
                 now: datetime, inbound_id: int | None = None) -> list[int | None]:
    """Usable events that did not come as a webhook (reconciliation's copies of Extole's
    rewards), in the caller's transaction, through the same de-duplication as the receiver's:
    the outbox id of each stored event, None for each duplicate.

    Two overlapping runs, or a run and a late webhook, store each key once: whoever locks a
    key second finds it held.
    """
    connection = session.connection()
    claims = dedup.Claims(connection, environment, (dedup.keys_of(e) for e in events), now)
    queued: list[dict[str, Any]] = []
    ids = [_insert_one(connection, claims, event, environment, inbound_id, now, queued)
           for event in events]
    claims.write()
    _enqueue(connection, queued)
    return ids


def _insert_one(connection: Connection, claims: dedup.Claims, event: Event, environment: str,
                inbound_id: int | None, now: datetime,
                queued: list[dict[str, Any]]) -> int | None:
    """One usable event unless one of its keys is held: its new id, else None. Its queue row
    (due now) is added to `queued`, for `_enqueue`."""
    keys = dedup.keys_of(event)
    if claims.is_duplicate(keys):
        return None
    # One statement object, values as parameters: compiled once, not per webhook. Its ON
    # CONFLICT is the events' own constraint on the event-id key, which agrees with the keys
    # (see migration 0004); a conflict there is a duplicate too, never a second copy.
    new_id: int | None = connection.execute(
        _insert_event(connection), _event_row(event, environment, inbound_id, now)).scalar()
    if new_id is not None:
        claims.claim(keys, new_id)
        queued.append(leases.queue_row(new_id, environment, event.person_key,
                                       event.event_time.replace(tzinfo=None), now))
    return new_id


def _enqueue(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """The new events' queue rows, in one statement (README, "The delivery queue")."""
    if rows:
        connection.execute(QueuedEvent.__table__.insert(), rows)


# Every row in one statement. The ids are drawn first; the advisory locks on the event's keys
# are taken (as every writer of keys does, `relay.outbox.dedup`) before the keys are inserted;
# the keys go in unless one is already held, each ON CONFLICT DO NOTHING; the event only when
# all of its keys were new; then the inbound row with its final counts.
#
# Each key is looked up by a subquery of its own, an equality on the whole primary key, which
# the planner answers from the index whatever it thinks of the table. (`key = ANY(:keys)` was
# planned, while the table had no statistics yet, e.g. for the first minute of a fresh
# database, as a scan of every key of the environment: each webhook cost more than the last.)
#
# All or nothing with several keys: the statement's snapshot is taken before it may wait for a
# lock, so its NOT EXISTS can miss a key that a concurrent holder committed meanwhile; ON
# CONFLICT still sees that key (it checks the index, not the snapshot) and skips it, and the
# keys that did go in then name an event that was not inserted. Their foreign key, checked at
# the end of the statement, refuses the whole statement: nothing stays, and `store_prepared`
# hands the event to the transaction path, whose check is exact. One key cannot be half stored.
# Non-deferred foreign keys are checked at the end of the statement, after every insert.
# (The f-string splices a constant of relay.dialect; every value is a bound parameter.)
_STORE_ONE_PG = text(f"""
WITH ids AS (
    SELECT nextval(pg_get_serial_sequence('inbound_requests', 'id')) AS inbound_id,
           nextval(pg_get_serial_sequence('events', 'id')) AS event_id
), locks AS (
    {dialect.LOCK_TEXT_KEYS_SQL}
), new_keys AS (
    INSERT INTO dedup_keys (environment, key, event_id, received_at)
    SELECT CAST(:environment AS varchar), key, ids.event_id, CAST(:received_at AS timestamp)
    FROM ids, unnest(CAST(:keys AS varchar[])) AS key
    WHERE (SELECT locked FROM locks) IS NOT NULL
      AND NOT EXISTS (SELECT FROM unnest(CAST(:keys AS varchar[])) AS wanted (key)
                      WHERE (SELECT true FROM dedup_keys AS held
                             WHERE held.environment = CAST(:environment AS varchar)
                               AND held.key = wanted.key))
    ORDER BY key
    ON CONFLICT (environment, key) DO NOTHING
    RETURNING key
), event AS (
    INSERT INTO events (id, environment, dedup_key, extole_event_id, extole_type, braze_event,
                        external_id, email, person_key, event_time, payload, attributes,
                        properties, status, attempts, inbound_id, received_at, updated_at)
    SELECT ids.event_id, CAST(:environment AS varchar), CAST(:dedup_key AS varchar),
           CAST(:extole_event_id AS varchar), CAST(:extole_type AS varchar),
           CAST(:braze_event AS varchar), CAST(:external_id AS varchar), CAST(:email AS varchar),
           CAST(:person_key AS varchar), CAST(:event_time AS timestamp),
           CAST(:payload AS jsonb), CAST(:attributes AS jsonb), CAST(:properties AS jsonb),
           CAST(:status AS varchar), 0, ids.inbound_id, CAST(:received_at AS timestamp),
           CAST(:updated_at AS timestamp)
    FROM ids
    WHERE (SELECT count(*) FROM new_keys) = cardinality(CAST(:keys AS varchar[]))
    ON CONFLICT (environment, dedup_key) DO NOTHING
    RETURNING id
), queued AS (
    INSERT INTO delivery_queue (event_id, environment, person_key, event_time, next_attempt_at)
    SELECT id, CAST(:environment AS varchar), CAST(:person_key AS varchar),
           CAST(:event_time AS timestamp), CAST(:received_at AS timestamp)
    FROM event
), stored AS (
    INSERT INTO inbound_requests (id, received_at, environment, method, path, remote_addr,
                                  headers, body, body_size, status_code, outcome, auth_method,
                                  error, accepted, duplicates, rejected)
    SELECT ids.inbound_id, CAST(:i_received_at AS timestamp), CAST(:i_environment AS varchar),
           CAST(:i_method AS varchar), CAST(:i_path AS varchar),
           CAST(:i_remote_addr AS varchar), CAST(:i_headers AS jsonb), CAST(:i_body AS bytea),
           CAST(:i_body_size AS integer), CAST(:i_status_code AS integer),
           CAST(:i_outcome AS varchar), CAST(:i_auth_method AS varchar),
           CAST(:i_error AS text), (SELECT count(*) FROM event), 1 - (SELECT count(*) FROM event),
           0
    FROM ids
    RETURNING id
)
SELECT (SELECT id FROM stored) AS inbound_id, (SELECT id FROM event) AS event_id
""")  # noqa: S608


@dataclass
class SingleRow:
    """One single-event webhook, normalised, as the parameters of PostgreSQL's one statement:
    stored alone (`store_prepared`) or with others in one transaction (`store_group`)."""

    inbound: InboundRequest
    event: Event
    environment: str
    params: dict[str, Any]


def prepare_single(engine: Engine, inbound: InboundRequest, item: Any, environment: str,
                   event_map: EventMap, *, default_type: str | None = None,
                   external_id_from: str = "partner_user_id") -> SingleRow | None:
    """The statement's parameters for one usable event on PostgreSQL; None when the
    single-statement path does not apply (SQLite, an unusable event: the general path records
    the rejection)."""
    if not dialect.is_postgresql(engine):
        return None
    now = inbound.received_at
    try:
        event = normalise(item, event_map, now, default_type=default_type,
                          external_id_from=external_id_from)
    except RejectedEvent:
        return None
    if event.email and len(event.email) > MAX_EMAIL_LENGTH:
        return None
    params = _event_row(event, environment, 0, now)
    del params["inbound_id"], params["attempts"]
    for name in ("payload", "attributes", "properties"):
        params[name] = json.dumps(params[name])
    for column in InboundRequest.__table__.columns:
        if column.key not in ("id", "accepted", "duplicates", "rejected"):
            value = getattr(inbound, column.key)
            params[f"i_{column.key}"] = json.dumps(value) if column.key == "headers" else value
    keys = list(dedup.keys_of(event))
    params["keys"], params["lock_names"] = keys, dedup.lock_names(environment, keys)
    return SingleRow(inbound, event, environment, params)


def store_single(engine: Engine, inbound: InboundRequest, item: Any, environment: str,
                 event_map: EventMap, *, default_type: str | None = None,
                 external_id_from: str = "partner_user_id") -> Receipt | None:
    """One usable event on PostgreSQL: its inbound row, its keys and itself by one statement in
    autocommit mode (`prepare_single`, then `store_prepared`).

    One round trip instead of six (BEGIN, insert, lock, check, insert, insert, COMMIT) and no
    session: the statement is atomic by itself. None when this path does not apply (SQLite, an
    unusable event: the general path records the rejection; an event whose keys met a
    concurrent webhook halfway: the general path decides it exactly).
    """
    row = prepare_single(engine, inbound, item, environment, event_map,
                         default_type=default_type, external_id_from=external_id_from)
    return None if row is None else store_prepared(engine, row)


def store_prepared(engine: Engine, row: SingleRow,
                   running: dialect.Running | None = None) -> Receipt | None:
    """A prepared single event by its own autocommitted statement; None when its keys met a
    concurrent webhook halfway (the general path decides it exactly). `running`: as for
    `relay.dialect.execute_autocommit`."""
    try:
        inbound_id, new_id = dialect.execute_autocommit(engine, _STORE_ONE_SQL, row.params,
                                                        running)
    except IntegrityError as error:
        if not dialect.is_foreign_key_violation(error):
            raise
        # Half of its keys were new, half held by a concurrent webhook: the statement stored
        # nothing; the transaction path decides exactly.
        log.info("event %s: keys met a concurrent webhook, storing it in a transaction",
                 row.event.extole_event_id)
        return None
    return receipt_of(row, inbound_id, new_id)


def store_group(engine: Engine, rows: Sequence[SingleRow],
                running: dialect.Running | None = None) -> list[Receipt]:
    """Several prepared single events in ONE transaction with one commit: each by the same
    statement as alone, in the given order, so a later one sees an earlier one's keys (two
    webhooks of one group carrying one event: the first is stored, the second is a duplicate),
    exactly as if they had been stored one after another.

    Every key of the group is locked first, in the one global order (`relay.dialect`), so two
    groups, or a group and another writer, cannot deadlock on keys they lock in different
    orders. All or nothing: any error (including a statement refused for keys that met a
    concurrent webhook halfway) rolls the whole group back and is raised; the caller then
    stores its members one by one. `running`: as for `relay.dialect.execute_in_one_transaction`.
    """
    lock_names = sorted({name for row in rows for name in row.params["lock_names"]})
    results = dialect.execute_in_one_transaction(
        engine, _LOCK_SQL, {"lock_names": lock_names}, _STORE_ONE_SQL,
        [row.params for row in rows], running)
    return [receipt_of(row, inbound_id, new_id)
            for row, (inbound_id, new_id) in zip(rows, results, strict=True)]


def receipt_of(row: SingleRow, inbound_id: int, new_id: int | None) -> Receipt:
    """The answer for a stored single event (`new_id` None: it was a duplicate)."""
    row.inbound.id = inbound_id
    receipt = Receipt()
    if new_id is None:
        receipt.duplicates = 1
    else:
        receipt.accepted = 1
        receipt.ids.append(new_id)
        for note in row.event.trimmed:
            log.info("event %s (%s): %s", new_id, row.event.extole_event_id, note)
    row.inbound.accepted, row.inbound.duplicates, row.inbound.rejected = (
        receipt.accepted, receipt.duplicates, 0)
    return receipt


# The driver's own parameter style: executed on the DBAPI cursor (prepared by psycopg after a few
# uses), skipping SQLAlchemy's per-statement machinery, which cost more CPU than the database.
_STORE_ONE_SQL = dialect.driver_sql(_STORE_ONE_PG)
_LOCK_SQL = dialect.driver_sql(text(dialect.LOCK_TEXT_KEYS_SQL))


_INSERT_INBOUND = InboundRequest.__table__.insert().returning(InboundRequest.__table__.c.id)
_INSERT_EVENT: dict[str, ReturningInsert[Any]] = {}


def _insert_event(connection: Connection) -> ReturningInsert[Any]:
    """INSERT ... ON CONFLICT (environment, dedup_key) DO NOTHING RETURNING id, built once."""
    kind = dialect.name(connection)
    if kind not in _INSERT_EVENT:
        table = OutboxEvent.__table__
        _INSERT_EVENT[kind] = (
            dialect.insert(kind, table)
            .on_conflict_do_nothing(index_elements=["environment", "dedup_key"])
            .returning(table.c.id)
        )
    return _INSERT_EVENT[kind]


def _event_row(event: Event, environment: str, inbound_id: int | None,
               now: datetime) -> dict[str, Any]:
    return {
        "environment": environment,
        "dedup_key": event.dedup_key,
        "extole_event_id": event.extole_event_id,
        "extole_type": event.extole_type,
        "braze_event": event.braze_event,
        "external_id": event.external_id,
        "email": event.email,
        "person_key": event.person_key,
        "event_time": event.event_time.replace(tzinfo=None),
        "payload": event.payload,
        "attributes": event.attributes,
        "properties": event.properties,
        "status": Status.PENDING.value,
        "attempts": 0,
        "inbound_id": inbound_id,
        "received_at": now,
        "updated_at": now,
    }


def _rejected_row(
    item: Any, environment: str, inbound_id: int, reason: str, now: datetime
) -> dict[str, Any]:
    event_id = item_value(item, "event_id") if isinstance(item, dict) else None
    if event_id is None and isinstance(item, dict):
        event_id = item_value(item, "id")
    return {
        "environment": environment,
        "dedup_key": None,
        "extole_event_id": str(event_id)[:255] if isinstance(event_id, str | int) else None,
        "payload": item,
        "status": Status.REJECTED.value,
        "attempts": 0,
        "last_error": reason,
        "inbound_id": inbound_id,
        "received_at": now,
        "updated_at": now,
    }


