"""The outbox: the only code that writes event status.

`store_webhook` commits the inbound log row and the outbox rows in one transaction; the unique
constraint on (environment, dedup_key) decides duplicates, so concurrent identical requests
cannot both insert. Claiming and marking for delivery live here too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from relay import metrics
from relay.db import utcnow
from relay.eventmap import EventMap
from relay.exceptions import EventNotFound, InvalidTransition, RejectedEvent
from relay.extole import Event, item_value, normalise
from relay.models import InboundRequest, OutboxEvent, Status

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


def _insert(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def store_webhook(
    session: Session,
    inbound: InboundRequest,
    items: Sequence[Any],
    environment: str,
    event_map: EventMap,
) -> Receipt:
    """Record the request and its events in the caller's transaction."""
    now = inbound.received_at
    session.add(inbound)
    session.flush()
    receipt = Receipt()
    insert = _insert(session)
    for index, item in enumerate(items):
        try:
            event = normalise(item, event_map, now)
            if event.email and len(event.email) > MAX_EMAIL_LENGTH:
                raise RejectedEvent(f"email is longer than {MAX_EMAIL_LENGTH} characters")
        except RejectedEvent as rejection:
            reason = str(rejection)
            receipt.rejected.append({"index": index, "error": reason})
            session.add(_rejected_row(item, environment, inbound.id, reason, now))
            continue
        row = _event_row(event, environment, inbound.id, now)
        statement = (
            insert(OutboxEvent)
            .values(**row)
            .on_conflict_do_nothing(index_elements=["environment", "dedup_key"])
            .returning(OutboxEvent.id)
        )
        new_id = session.execute(statement).scalar()
        if new_id is None:
            receipt.duplicates += 1
            continue
        receipt.accepted += 1
        receipt.ids.append(new_id)
        for note in event.trimmed:
            log.info("event %s (%s): %s", new_id, event.extole_event_id, note)
    session.flush()
    inbound.accepted = receipt.accepted
    inbound.duplicates = receipt.duplicates
    inbound.rejected = len(receipt.rejected)
    if receipt.accepted and session.get_bind().dialect.name == "postgresql":
        # Delivered to listening workers only when this transaction commits.
        session.execute(text("SELECT pg_notify(:channel, :env)"),
                        {"channel": NOTIFY_CHANNEL, "env": environment})
    return receipt


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
