"""Ingest: a webhook's events into the outbox, with its inbound log row, in one transaction.

`store_webhook` commits the inbound log row and the outbox rows in the caller's transaction; the
unique constraint on (environment, dedup_key) decides duplicates, so concurrent identical
requests cannot both insert. `store_single` is the fast path for Extole's usual webhook (one
event, on PostgreSQL): both rows in one autocommitted statement. Nothing here sends anything: the
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
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

from relay import dialect
from relay.eventmap import EventMap
from relay.exceptions import RejectedEvent
from relay.extole import Event, item_value, normalise
from relay.models import InboundRequest, OutboxEvent, Status

log = logging.getLogger(__name__)

MAX_EMAIL_LENGTH = 320


@dataclass
class Receipt:
    """What the receiver answers: counts, per-item rejections and the new outbox ids."""

    accepted: int = 0
    duplicates: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
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
            receipt.rejected.append({"index": index, "error": reason})
            prepared.append((item, None, reason))
            continue
        prepared.append((item, event, None))
    inbound.accepted = len(prepared) - len(receipt.rejected)
    inbound.duplicates = 0
    inbound.rejected = len(receipt.rejected)
    # Core, not the ORM's unit of work: this is the hot path of every webhook.
    connection = session.connection()
    inbound_table = InboundRequest.__table__
    inbound.id = connection.execute(
        _INSERT_INBOUND,
        {c.key: getattr(inbound, c.key) for c in inbound_table.columns if c.key != "id"},
    ).scalar_one()
    insert_event = _insert_event(connection)
    _lock_dedup_keys(connection, environment, [e.dedup_key for _, e, _ in prepared if e])
    for item, usable, why in prepared:
        if usable is None:
            session.add(_rejected_row(item, environment, inbound.id, why or "", now))
            session.flush()  # keeps the outbox ids in request order
            continue
        # One statement object, values as parameters: compiled once, not per webhook.
        new_id = connection.execute(
            insert_event, _event_row(usable, environment, inbound.id, now)).scalar()
        if new_id is None:
            receipt.duplicates += 1
            continue
        receipt.accepted += 1
        receipt.ids.append(new_id)
        for note in usable.trimmed:
            log.info("event %s (%s): %s", new_id, usable.extole_event_id, note)
    if receipt.duplicates:
        inbound.accepted, inbound.duplicates = receipt.accepted, receipt.duplicates
        connection.execute(
            inbound_table.update().where(inbound_table.c.id == inbound.id)
            .values(accepted=receipt.accepted, duplicates=receipt.duplicates)
        )
    return receipt


def _lock_dedup_keys(connection: Connection, environment: str, keys: list[str]) -> None:
    """Lock a webhook's events in one global order before inserting any of them.

    The inserts go in request order (the receipt's ids follow the request); two webhooks
    sharing events in opposite orders would otherwise each hold a row the other one waits for:
    a deadlock. Transaction-scoped advisory locks, taken in sorted order, serialise them first.
    A single event needs none (it waits for at most one row and holds nothing else); SQLite
    has one writer at a time.
    """
    if len(keys) > 1:
        dialect.lock_text_keys(connection, (f"{environment} {key}" for key in keys))


# Both rows in one statement: the inbound id is drawn first, the event inserted (or found to be
# a duplicate), then the inbound row with its final counts. Non-deferred foreign keys are checked
# at the end of the statement, after both inserts.
_STORE_ONE_PG = text("""
WITH inbound AS (
    SELECT nextval(pg_get_serial_sequence('inbound_requests', 'id')) AS id
), event AS (
    INSERT INTO events (environment, dedup_key, extole_event_id, extole_type, braze_event,
                        external_id, email, person_key, event_time, payload, attributes,
                        properties, status, attempts, next_attempt_at, inbound_id, received_at,
                        updated_at)
    SELECT CAST(:environment AS varchar), CAST(:dedup_key AS varchar),
           CAST(:extole_event_id AS varchar), CAST(:extole_type AS varchar),
           CAST(:braze_event AS varchar), CAST(:external_id AS varchar), CAST(:email AS varchar),
           CAST(:person_key AS varchar), CAST(:event_time AS timestamp),
           CAST(:payload AS jsonb), CAST(:attributes AS jsonb), CAST(:properties AS jsonb),
           CAST(:status AS varchar), 0, CAST(:next_attempt_at AS timestamp), inbound.id,
           CAST(:received_at AS timestamp), CAST(:updated_at AS timestamp)
    FROM inbound
    ON CONFLICT (environment, dedup_key) DO NOTHING
    RETURNING id
), stored AS (
    INSERT INTO inbound_requests (id, received_at, environment, method, path, remote_addr,
                                  headers, body, body_size, status_code, outcome, auth_method,
                                  error, accepted, duplicates, rejected)
    SELECT inbound.id, CAST(:i_received_at AS timestamp), CAST(:i_environment AS varchar),
           CAST(:i_method AS varchar), CAST(:i_path AS varchar),
           CAST(:i_remote_addr AS varchar), CAST(:i_headers AS jsonb), CAST(:i_body AS bytea),
           CAST(:i_body_size AS integer), CAST(:i_status_code AS integer),
           CAST(:i_outcome AS varchar), CAST(:i_auth_method AS varchar),
           CAST(:i_error AS text), (SELECT count(*) FROM event), 1 - (SELECT count(*) FROM event),
           0
    FROM inbound
    RETURNING id
)
SELECT (SELECT id FROM stored) AS inbound_id, (SELECT id FROM event) AS event_id
""")


def store_single(engine: Engine, inbound: InboundRequest, item: Any, environment: str,
                 event_map: EventMap, *, default_type: str | None = None,
                 external_id_from: str = "partner_user_id") -> Receipt | None:
    """One usable event on PostgreSQL, both rows by one statement in autocommit mode.

    One round trip instead of four (BEGIN, insert, insert, COMMIT) and no session: the statement
    is atomic by itself. None when this path does not apply (SQLite, an unusable event: the
    general path records the rejection).
    """
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
    inbound_id, new_id = dialect.execute_autocommit(engine, _STORE_ONE_SQL, params)
    inbound.id = inbound_id
    receipt = Receipt()
    if new_id is None:
        receipt.duplicates = 1
    else:
        receipt.accepted = 1
        receipt.ids.append(new_id)
        for note in event.trimmed:
            log.info("event %s (%s): %s", new_id, event.extole_event_id, note)
    inbound.accepted, inbound.duplicates, inbound.rejected = receipt.accepted, receipt.duplicates, 0
    return receipt


# The driver's own parameter style: executed on the DBAPI cursor (prepared by psycopg after a few
# uses), skipping SQLAlchemy's per-statement machinery, which cost more CPU than the database.
_STORE_ONE_SQL = dialect.driver_sql(_STORE_ONE_PG)


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


def _event_row(event: Event, environment: str, inbound_id: int, now: datetime) -> dict[str, Any]:
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
        "next_attempt_at": now,
        "inbound_id": inbound_id,
        "received_at": now,
        "updated_at": now,
    }


def _rejected_row(
    item: Any, environment: str, inbound_id: int, reason: str, now: datetime
) -> OutboxEvent:
    event_id = item_value(item, "event_id") if isinstance(item, dict) else None
    if event_id is None and isinstance(item, dict):
        event_id = item_value(item, "id")
    return OutboxEvent(
        environment=environment,
        dedup_key=None,
        extole_event_id=str(event_id)[:255] if isinstance(event_id, str | int) else None,
        payload=item,
        status=Status.REJECTED.value,
        attempts=0,
        last_error=reason,
        inbound_id=inbound_id,
        received_at=now,
        updated_at=now,
    )


