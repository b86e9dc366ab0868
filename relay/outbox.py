"""The outbox: the only code that writes event status.

`store_webhook` commits the inbound log row and the outbox rows in one transaction; the unique
constraint on (environment, dedup_key) decides duplicates, so concurrent identical requests
cannot both insert. Claiming and marking for delivery live here too.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Select, and_, bindparam, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, aliased, defer

from relay import metrics
from relay.db import utcnow
from relay.eventmap import EventMap
from relay.exceptions import EventNotFound, InvalidTransition, RejectedEvent
from relay.extole import Event, item_value, normalise
from relay.models import InboundRequest, OutboxEvent, Status
from relay.retry import RetryPolicy

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "relay_events"
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


def dialect_insert(session: Session) -> Any:
    """INSERT with ON CONFLICT support for the session's database."""
    dialect = session.get_bind().dialect.name
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def store_webhook(
    session: Session,
    inbound: InboundRequest,
    items: Sequence[Any],
    environment: str,
    event_map: EventMap,
) -> Receipt:
    """Record the request and its events in the caller's transaction.

    The caller wakes the workers after the commit (`relay.notifier`): a NOTIFY inside this
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
            event = normalise(item, event_map, now)
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
    insert_event = _insert_event(connection.dialect.name)
    _lock_dedup_keys(connection, environment, [e.dedup_key for _, e, _ in prepared if e])
    for item, event, reason in prepared:
        if event is None:
            session.add(_rejected_row(item, environment, inbound.id, reason or "", now))
            session.flush()  # keeps the outbox ids in request order
            continue
        # One statement object, values as parameters: compiled once, not per webhook.
        new_id = connection.execute(
            insert_event, _event_row(event, environment, inbound.id, now)).scalar()
        if new_id is None:
            receipt.duplicates += 1
            continue
        receipt.accepted += 1
        receipt.ids.append(new_id)
        for note in event.trimmed:
            log.info("event %s (%s): %s", new_id, event.extole_event_id, note)
    if receipt.duplicates:
        inbound.accepted, inbound.duplicates = receipt.accepted, receipt.duplicates
        connection.execute(
            inbound_table.update().where(inbound_table.c.id == inbound.id)
            .values(accepted=receipt.accepted, duplicates=receipt.duplicates)
        )
    return receipt


_LOCK_KEYS = text(
    "SELECT count(pg_advisory_xact_lock(hashtextextended(key, 0))) "
    "FROM unnest(CAST(:keys AS text[])) AS key"
)


def _lock_dedup_keys(connection: Any, environment: str, keys: list[str]) -> None:
    """Lock a webhook's events in one global order before inserting any of them.

    The inserts go in request order (the receipt's ids follow the request); two webhooks
    sharing events in opposite orders would otherwise each hold a row the other one waits for:
    a deadlock. Transaction-scoped advisory locks, taken in sorted order, serialise them first.
    A single event needs none (it waits for at most one row and holds nothing else); SQLite
    has one writer at a time.
    """
    if len(keys) < 2 or connection.dialect.name != "postgresql":
        return
    connection.execute(_LOCK_KEYS, {"keys": sorted({f"{environment} {k}" for k in keys})})


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
                 event_map: EventMap) -> Receipt | None:
    """One usable event on PostgreSQL, both rows by one statement in autocommit mode.

    One round trip instead of four (BEGIN, insert, insert, COMMIT) and no session: the statement
    is atomic by itself. None when this path does not apply (SQLite, an unusable event: the
    general path records the rejection).
    """
    if engine.dialect.name != "postgresql":
        return None
    now = inbound.received_at
    try:
        event = normalise(item, event_map, now)
    except RejectedEvent:
        return None
    if event.email and len(event.email) > MAX_EMAIL_LENGTH:
        return None
    params = _event_row(event, environment, 0, now)
    del params["inbound_id"], params["attempts"]
    for column in ("payload", "attributes", "properties"):
        params[column] = json.dumps(params[column])
    for column in InboundRequest.__table__.columns:
        if column.key not in ("id", "accepted", "duplicates", "rejected"):
            value = getattr(inbound, column.key)
            params[f"i_{column.key}"] = json.dumps(value) if column.key == "headers" else value
    inbound_id, new_id = _execute_autocommit(engine, _STORE_ONE_SQL, params)
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
_STORE_ONE_SQL = str(_STORE_ONE_PG.compile(dialect=postgresql.psycopg.dialect()))


def _execute_autocommit(engine: Engine, sql: str, params: dict[str, Any]) -> tuple[Any, ...]:
    """One statement, committed by itself, on a pooled DBAPI connection; driver errors become
    SQLAlchemy's (a lost connection is invalidated), as if run through SQLAlchemy."""
    import psycopg

    try:
        pooled = engine.raw_connection()
    except psycopg.Error as error:  # the pool hands on the driver's connect error unwrapped
        raise DBAPIError.instance(None, None, error, psycopg.Error,
                                  connection_invalidated=True) from error
    try:
        dbapi = pooled.dbapi_connection
        dbapi.autocommit = True  # type: ignore[union-attr]
        try:
            with dbapi.cursor() as cursor:  # type: ignore[union-attr]
                cursor.execute(sql, params)
                row = cursor.fetchone()
        finally:
            if not dbapi.closed:  # type: ignore[union-attr]
                dbapi.autocommit = False  # type: ignore[union-attr]
    except psycopg.Error as error:
        lost = isinstance(error, psycopg.OperationalError)
        if lost:
            pooled.invalidate(error)
        raise DBAPIError.instance(sql, params, error, psycopg.Error, hide_parameters=True,
                                  connection_invalidated=lost) from error
    finally:
        pooled.close()
    return tuple(row)


_INSERT_INBOUND = InboundRequest.__table__.insert().returning(InboundRequest.__table__.c.id)
_INSERT_EVENT: dict[str, Any] = {}


def _insert_event(dialect: str) -> Any:
    """INSERT ... ON CONFLICT (environment, dedup_key) DO NOTHING RETURNING id, built once."""
    if dialect not in _INSERT_EVENT:
        table = OutboxEvent.__table__
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        _INSERT_EVENT[dialect] = (
            insert(table)
            .on_conflict_do_nothing(index_elements=["environment", "dedup_key"])
            .returning(table.c.id)
        )
    return _INSERT_EVENT[dialect]


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


# --- operator actions -----------------------------------------------------------------------


def get_event(session: Session, event_id: int) -> OutboxEvent:
    event = session.get(OutboxEvent, event_id)
    if event is None:
        raise EventNotFound(f"no event with id {event_id}")
    return event


def retry(session: Session, event_id: int) -> OutboxEvent:
    """A dead or retrying event becomes due now; its failure history is kept."""
    event = get_event(session, event_id)
    retrying = event.status == Status.PENDING and event.attempts > 0
    if event.status != Status.DEAD and not retrying:
        raise InvalidTransition(
            f"event {event_id} is {event.status}: only dead or retrying events can be retried"
        )
    _requeue(event, utcnow())
    return event


def replay(session: Session, event_id: int) -> OutboxEvent:
    """Send any deliverable event again, even if delivered, as a new delivery of the same row."""
    event = get_event(session, event_id)
    if event.status == Status.REJECTED:
        raise InvalidTransition(
            f"event {event_id} was rejected on receipt ({event.last_error}); it cannot be sent"
        )
    _requeue(event, utcnow())
    return event


def replay_matching(
    session: Session,
    *,
    status: str = Status.DEAD.value,
    environment: str | None = None,
    name: str | None = None,
    q: str | None = None,
    since: datetime | None = None,
) -> int:
    """Requeue every event matching an admin filter; answers how many."""
    if status == Status.REJECTED:
        raise InvalidTransition("rejected events cannot be sent")
    now = utcnow()
    query = filter_events(select(OutboxEvent.id), status=status, environment=environment,
                          name=name, q=q)
    if since is not None:
        query = query.where(OutboxEvent.received_at >= since)
    ids = list(session.scalars(query))
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(chunk))
            .values(**_requeue_values(now))
            .execution_options(synchronize_session=False)
        )
    if ids:
        log.info("requeued %d events (status=%s)", len(ids), status)
        _count_transitions(session, ids, Status.PENDING)
    return len(ids)


def _requeue_values(now: datetime) -> dict[str, Any]:
    return {
        "status": Status.PENDING.value,
        "attempts": 0,
        "next_attempt_at": now,
        "first_failure_at": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": now,
    }


def _requeue(event: OutboxEvent, now: datetime) -> None:
    previous = event.status
    for key, value in _requeue_values(now).items():
        setattr(event, key, value)
    log.info("event %s (%s): %s -> pending (operator)", event.id, event.extole_event_id, previous)
    metrics.EVENTS.labels(event.environment, Status.PENDING.value).inc()


def _count_transitions(session: Session, ids: list[int], status: Status) -> None:
    rows = session.execute(
        select(OutboxEvent.environment, func.count())
        .where(OutboxEvent.id.in_(ids[:10000]))
        .group_by(OutboxEvent.environment)
    )
    for environment, count in rows:
        metrics.EVENTS.labels(environment, status.value).inc(count)


def filter_events(
    query: Select[Any],
    *,
    status: str | None = None,
    environment: str | None = None,
    name: str | None = None,
    q: str | None = None,
) -> Select[Any]:
    """The admin's filters: exact matches only, so every filter is served by an index."""
    if status:
        query = query.where(OutboxEvent.status == status)
    if environment:
        query = query.where(OutboxEvent.environment == environment)
    if name:
        query = query.where(OutboxEvent.braze_event == name)
    if q:
        needle = q.strip()
        query = query.where(
            or_(
                OutboxEvent.email == needle.lower(),
                OutboxEvent.external_id == needle,
                OutboxEvent.extole_event_id == needle,
            )
        )
    return query


def oldest_pending_age(session: Session, now: datetime | None = None) -> float:
    oldest = session.scalar(
        select(func.min(OutboxEvent.received_at)).where(OutboxEvent.status == Status.PENDING)
    )
    if oldest is None:
        return 0.0
    return max(0.0, ((now or utcnow()) - oldest).total_seconds())


def counts_by_status(session: Session) -> dict[str, int]:
    counts = {status.value: 0 for status in Status}
    for status, count in session.execute(
        select(OutboxEvent.status, func.count()).group_by(OutboxEvent.status)
    ):
        counts[status] = count
    return counts



# --- reading, for the admin page, its API and the command line --------------------------------


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="milliseconds") + "Z" if moment else None


def event_json(event: OutboxEvent) -> dict[str, Any]:
    """An event as the admin API and `relay events` show it."""
    return {
        "id": event.id,
        "environment": event.environment,
        "extole_event_id": event.extole_event_id,
        "extole_type": event.extole_type,
        "braze_event": event.braze_event,
        "status": event.status,
        "attempts": event.attempts,
        "external_id": event.external_id,
        "email": event.email,
        "event_time": _iso(event.event_time),
        "received_at": _iso(event.received_at),
        "updated_at": _iso(event.updated_at),
        "next_attempt_at": _iso(event.next_attempt_at) if event.status == Status.PENDING else None,
        "delivered_at": _iso(event.delivered_at),
        "last_error": event.last_error,
        "identity": event.identity,
    }


def list_events(
    session: Session,
    *,
    status: str | None = None,
    environment: str | None = None,
    name: str | None = None,
    q: str | None = None,
    limit: int = 50,
    cursor: int | None = None,
) -> tuple[list[OutboxEvent], int | None]:
    """Newest first, keyset-paginated on id so page N costs the same as page 1 at any size."""
    query = filter_events(select(OutboxEvent), status=status, environment=environment,
                          name=name, q=q)
    if cursor is not None:
        query = query.where(OutboxEvent.id < cursor)
    events = list(session.scalars(query.order_by(OutboxEvent.id.desc()).limit(limit + 1)))
    next_cursor = events[limit - 1].id if len(events) > limit else None
    return events[:limit], next_cursor


def event_detail(session: Session, event_id: int) -> dict[str, Any]:
    """The event's whole story: payload, inbound request, identity and every Braze request."""
    from relay.models import AttemptEvent, DeliveryAttempt

    event = get_event(session, event_id)
    detail = event_json(event)
    detail.update(payload=event.payload, properties=event.properties,
                  attributes=event.attributes)
    inbound = session.get(InboundRequest, event.inbound_id) if event.inbound_id else None
    detail["inbound"] = None if inbound is None else {
        "id": inbound.id,
        "received_at": _iso(inbound.received_at),
        "method": inbound.method,
        "path": inbound.path,
        "remote_addr": inbound.remote_addr,
        "headers": inbound.headers,
        "body": (inbound.body or b"").decode("utf-8", "replace"),
        "status_code": inbound.status_code,
        "outcome": inbound.outcome,
        "auth_method": inbound.auth_method,
    }
    attempts = session.execute(
        select(DeliveryAttempt, AttemptEvent.outcome)
        .join(AttemptEvent, AttemptEvent.attempt_id == DeliveryAttempt.id)
        .where(AttemptEvent.event_id == event_id)
        .order_by(DeliveryAttempt.id)
    )
    detail["attempts_log"] = [
        {
            "id": attempt.id,
            "endpoint": attempt.endpoint,
            "started_at": _iso(attempt.started_at),
            "duration_ms": round(attempt.duration_ms, 1),
            "status_code": attempt.status_code,
            "request_body": attempt.request_body,
            "response_body": attempt.response_body,
            "error": attempt.error,
            "outcome": outcome,
        }
        for attempt, outcome in attempts
    ]
    return detail


# --- claiming and marking, for the delivery worker ---------------------------------------------

CLAIM_LOCK_KEY = 0x72656C6179  # "relay": serialises claimers so the per-person check sees leases


def claim_due(
    session: Session,
    owner: str,
    *,
    environments: Sequence[str],
    limit: int,
    lease_seconds: float,
    now: datetime | None = None,
) -> list[OutboxEvent]:
    """Lease a batch of due events in one short transaction.

    Only the head of each person's line is claimable: an event waits while an earlier event
    (by Extole event time) of the same person is still pending, so a retried `Subscribed`
    can never land after a later `Unsubscribed`. PostgreSQL claims with FOR UPDATE SKIP LOCKED
    under a transaction-scoped advisory lock; SQLite with one atomic UPDATE ... RETURNING.
    """
    if not environments:
        return []
    now = now or utcnow()
    candidate = aliased(OutboxEvent, name="candidate")
    earlier = aliased(OutboxEvent, name="earlier")
    held_back = (
        select(earlier.id)
        .where(
            earlier.environment == candidate.environment,
            earlier.person_key == candidate.person_key,
            earlier.status == Status.PENDING.value,
            or_(
                earlier.event_time < candidate.event_time,
                and_(earlier.event_time == candidate.event_time, earlier.id < candidate.id),
            ),
        )
        .exists()
    )
    due = (
        select(candidate.id)
        .where(
            candidate.status == Status.PENDING.value,
            candidate.next_attempt_at <= now,
            or_(candidate.lease_expires_at.is_(None), candidate.lease_expires_at <= now),
            candidate.environment.in_(list(environments)),
            ~held_back,
        )
        .order_by(candidate.next_attempt_at, candidate.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK_KEY})
        due = due.with_for_update(skip_locked=True)
    statement = (
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(due.scalar_subquery()))
        .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(OutboxEvent)
        # Delivery never reads the raw payload: it is neither sent back nor decoded.
        .options(defer(OutboxEvent.payload, raiseload=True))
        .execution_options(synchronize_session=False)
    )
    events = list(session.scalars(statement))
    events.sort(key=lambda e: (e.event_time or now, e.id))
    return events


def _guarded_update(session: Session, owner: str, rows: list[dict[str, Any]],
                    shared: dict[str, Any] | None = None) -> set[int]:
    """Apply `shared` values and each row's own, only to rows this worker still holds the lease
    on; answers their ids.

    The rows still held are locked first, so the caller logs and counts only what it changed:
    a worker whose lease expired (another one owns the event now) changes nothing. Rows with no
    values of their own (only "row_id") are changed by one set-based statement.
    """
    if not rows:
        return set()
    table = OutboxEvent.__table__
    held_query = select(table.c.id).where(table.c.id.in_([r["row_id"] for r in rows]),
                                          table.c.lease_owner == owner)
    if session.get_bind().dialect.name == "postgresql":
        # FOR NO KEY UPDATE: the lock the UPDATE itself takes, so this adds no new conflicts
        # (FOR UPDATE would also block foreign-key checks of rows referencing these events).
        held_query = held_query.order_by(table.c.id).with_for_update(key_share=True)
    held = set(session.scalars(held_query))
    if len(held) < len(rows):
        log.warning("%d of %d events were no longer leased by %s: left to their new owner",
                    len(rows) - len(held), len(rows), owner)
    shared = shared or {}
    plain = [r["row_id"] for r in rows if r["row_id"] in held and len(r) == 1]
    if plain:
        session.execute(table.update()
                        .where(table.c.id.in_(plain), table.c.lease_owner == owner)
                        .values(shared))
    own = [r for r in rows if r["row_id"] in held and len(r) > 1]
    if own:
        columns = [key for key in own[0] if key != "row_id"]
        statement = (
            table.update()
            .where(table.c.id == bindparam("row_id"), table.c.lease_owner == owner)
            .values({**shared, **{column: bindparam(f"v_{column}") for column in columns}})
        )
        session.connection().execute(statement, [
            {"row_id": r["row_id"], **{f"v_{c}": r[c] for c in columns}} for r in own])
    return held


def _transition(events: Sequence[OutboxEvent], status: Status, note: str = "") -> None:
    for event in events:
        log.info("event %s (%s): %s -> %s%s", event.id, event.extole_event_id, event.status,
                 status.value, f" ({note})" if note else "")
    counts: dict[str, int] = {}
    for event in events:
        counts[event.environment] = counts.get(event.environment, 0) + 1
    for environment, count in counts.items():
        metrics.EVENTS.labels(environment, status.value).inc(count)


def mark_delivered(session: Session, owner: str, events: Sequence[OutboxEvent],
                   identities: dict[int, dict[str, Any]], now: datetime | None = None) -> None:
    now = now or utcnow()
    # Usually the identity is the event's own external_id: written by SQL from the row itself,
    # so the whole chunk is one statement with no per-row values.
    table = OutboxEvent.__table__
    build = (func.jsonb_build_object if session.get_bind().dialect.name == "postgresql"
             else func.json_object)
    shared = {"status": Status.DELIVERED.value, "delivered_at": now, "lease_owner": None,
              "lease_expires_at": None, "last_error": None, "updated_at": now,
              "identity": build("external_id", table.c.external_id)}
    held = _guarded_update(session, owner, [
        {"row_id": e.id} if e.external_id and identities.get(e.id) == {"external_id": e.external_id}
        else {"row_id": e.id, "identity": identities.get(e.id)}
        for e in events
    ], shared)
    _transition([e for e in events if e.id in held], Status.DELIVERED)


def mark_dead(session: Session, owner: str, reasons: dict[int, str],
              events: Sequence[OutboxEvent], identities: dict[int, dict[str, Any]] | None = None,
              now: datetime | None = None) -> None:
    now = now or utcnow()
    dead = [e for e in events if e.id in reasons]
    held = _guarded_update(session, owner, [
        {"row_id": e.id, "status": Status.DEAD.value, "last_error": reasons[e.id][:2000],
         "identity": (identities or {}).get(e.id, e.identity), "lease_owner": None,
         "lease_expires_at": None, "updated_at": now}
        for e in dead
    ])
    for event in dead:
        if event.id in held:
            _transition([event], Status.DEAD, reasons[event.id][:200])


def mark_failed(session: Session, owner: str, events: Sequence[OutboxEvent], error: str,
                policy: RetryPolicy, now: datetime | None = None,
                rng: random.Random | None = None) -> tuple[list[int], list[int]]:
    """A counted failure: back off, or become dead once the failures span RELAY_RETRY_MAX_AGE."""
    now = now or utcnow()
    rows, retrying, dead = [], [], []
    for event in events:
        attempts = (event.attempts or 0) + 1
        first = event.first_failure_at or now
        decision = policy.decide(attempts, first, now, rng)
        row: dict[str, Any] = {"row_id": event.id, "attempts": attempts, "first_failure_at": first,
                               "lease_owner": None, "lease_expires_at": None, "updated_at": now}
        if decision.dead:
            age = int((now - first).total_seconds())
            reason = f"{error} (gave up after {attempts} attempts over {age} s)"
            row.update(status=Status.DEAD.value, next_attempt_at=None, last_error=reason[:2000])
            dead.append(event)
        else:
            row.update(status=Status.PENDING.value, next_attempt_at=decision.retry_at,
                       last_error=error[:2000])
            retrying.append(event)
        rows.append(row)
    held = _guarded_update(session, owner, rows)
    retrying = [e for e in retrying if e.id in held]
    dead = [e for e in dead if e.id in held]
    for event in retrying:
        log.info("event %s (%s): attempt %d failed, retry at %s: %s", event.id,
                 event.extole_event_id, (event.attempts or 0) + 1,
                 next(r["next_attempt_at"] for r in rows if r["row_id"] == event.id), error[:200])
    for event in retrying:
        metrics.EVENTS.labels(event.environment, "retrying").inc()
    _transition(dead, Status.DEAD, error[:200])
    return [e.id for e in retrying], [e.id for e in dead]


def release(session: Session, owner: str, events: Sequence[OutboxEvent], until: datetime,
            reason: str, now: datetime | None = None, *, credit_wait: bool = True) -> None:
    """Give events back without counting an attempt (rate limit, refused key, export limiter).

    The wait is added to `first_failure_at`, so it never counts toward RELAY_RETRY_MAX_AGE;
    `credit_wait=False` when the caller credits the wait otherwise (a refused key: the whole
    refusal is credited once, by `shift_failure_clock`, when the key works again).
    """
    now = now or utcnow()
    wait = max(until - now, timedelta(0)) if credit_wait else timedelta(0)
    held = _guarded_update(session, owner, [
        {"row_id": e.id, "next_attempt_at": until, "lease_owner": None, "lease_expires_at": None,
         "first_failure_at": e.first_failure_at + wait if e.first_failure_at else None,
         "last_error": reason[:2000], "updated_at": now}
        for e in events
    ])
    if held:
        log.info("%d events wait until %s without counting an attempt: %s", len(held),
                 until.isoformat(timespec="seconds"), reason[:200])


def skip_unconfigured(session: Session, environment: str, reason: str, limit: int = 1000,
                      now: datetime | None = None) -> int:
    """Events of an environment without a Braze key are stored and marked skipped, never sent."""
    now = now or utcnow()
    ids = list(session.scalars(
        select(OutboxEvent.id)
        .where(OutboxEvent.environment == environment, OutboxEvent.status == Status.PENDING.value)
        .limit(limit)
    ))
    if not ids:
        return 0
    session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(ids), OutboxEvent.status == Status.PENDING.value)
        .values(status=Status.SKIPPED.value, last_error=reason, lease_owner=None,
                lease_expires_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    log.info("%d %s events skipped: %s", len(ids), environment, reason)
    metrics.EVENTS.labels(environment, Status.SKIPPED.value).inc(len(ids))
    return len(ids)


def shift_failure_clock(session: Session, environment: str, seconds: float) -> int:
    """Credit a pause to every retrying event of an environment (it never counts as failing)."""
    rows = session.execute(
        select(OutboxEvent.id, OutboxEvent.first_failure_at).where(
            OutboxEvent.environment == environment,
            OutboxEvent.status == Status.PENDING.value,
            OutboxEvent.first_failure_at.is_not(None),
        )
    ).all()
    shift = timedelta(seconds=seconds)
    table = OutboxEvent.__table__
    if rows:
        session.connection().execute(
            table.update().where(table.c.id == bindparam("row_id"))
            .values(first_failure_at=bindparam("first")),
            [{"row_id": row_id, "first": first + shift} for row_id, first in rows],
        )
    return len(rows)


def renew_leases(session: Session, owner: str, ids: Sequence[int], lease_seconds: float,
                 now: datetime | None = None) -> int:
    """Extend the leases this worker still holds on the events it is delivering.

    Rows locked by a transaction recording their outcome are skipped, never waited for: the
    renewal then cannot deadlock with it (an UPDATE of many rows locks them in scan order while
    that transaction locks its rows one by one), and those rows are being finished anyway.
    """
    now = now or utcnow()
    held = (
        select(OutboxEvent.id)
        .where(OutboxEvent.id.in_(list(ids)), OutboxEvent.lease_owner == owner,
               OutboxEvent.status == Status.PENDING.value)
        .with_for_update(skip_locked=True)
    )
    result = session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(held.scalar_subquery()))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)


def sweep_expired_leases(session: Session, now: datetime | None = None) -> int:
    """Clear leases of workers that died; their events are claimable again (at-least-once)."""
    now = now or utcnow()
    result = session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.lease_expires_at.is_not(None), OutboxEvent.lease_expires_at < now)
        .values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount:
        log.warning("%d events came back from expired leases", result.rowcount)
    return int(result.rowcount or 0)


def newer_delivered_attributes(session: Session, environment: str,
                               oldest: dict[str, datetime]) -> dict[str, dict[str, datetime]]:
    """Per person, per attribute: the newest event time of a delivered event that set it.

    Only delivered events newer than `oldest[person]` (the oldest event about to be sent for
    that person) matter: theirs are the values an older event must not overwrite.
    """
    if not oldest:
        return {}
    delivered = (OutboxEvent.environment == environment,
                 OutboxEvent.status == Status.DELIVERED.value)
    # Usually nobody has a newer delivered event: one cheap grouped query says so.
    latest = session.execute(
        select(OutboxEvent.person_key, func.max(OutboxEvent.event_time))
        .where(*delivered, OutboxEvent.person_key.in_(list(oldest)))
        .group_by(OutboxEvent.person_key)
    )
    behind = {key: oldest[key] for key, moment in latest
              if key is not None and moment is not None and moment > oldest[key]}
    if not behind:
        return {}
    rows = session.execute(
        select(OutboxEvent.person_key, OutboxEvent.event_time, OutboxEvent.attributes)
        .where(*delivered, OutboxEvent.person_key.in_(list(behind)),
               OutboxEvent.event_time > min(behind.values()))
    )
    newest: dict[str, dict[str, datetime]] = {}
    for key, moment, attributes in rows:
        if key is None or moment is None or moment <= behind[key]:
            continue
        per_person = newest.setdefault(key, {})
        for name in attributes or {}:
            if name not in per_person or per_person[name] < moment:
                per_person[name] = moment
    return newest


# --- counting, for the admin's bulk replay confirmation ----------------------------------------


def count_matching(
    session: Session,
    *,
    status: str = Status.DEAD.value,
    environment: str | None = None,
    name: str | None = None,
    q: str | None = None,
    since: datetime | None = None,
) -> int:
    """How many events `replay_matching` with the same filter would requeue, to confirm first."""
    query = filter_events(select(func.count(OutboxEvent.id)), status=status,
                          environment=environment, name=name, q=q)
    if since is not None:
        query = query.where(OutboxEvent.received_at >= since)
    return int(session.scalar(query) or 0)
