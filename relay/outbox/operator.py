"""Operator actions: retry, replay, and bulk replay of the events matching a filter.

What an operator does from the admin page, its API or `relay events`. Each action puts events back
to pending, due now, with their history of attempts kept; an action the event's status does not
allow raises `InvalidTransition` (409 in the API, exit 4 on the command line).
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from relay import metrics
from relay.db import utcnow
from relay.exceptions import InvalidTransition
from relay.models import OutboxEvent, Status
from relay.outbox import leases
from relay.outbox.filters import EventFilter
from relay.outbox.queries import get_event

log = logging.getLogger(__name__)


def retry(session: Session, event_id: int) -> OutboxEvent:
    """A dead or retrying event becomes due now; its failure history is kept."""
    event = get_event(session, event_id)
    retrying = event.status == Status.PENDING and event.attempts > 0
    if event.status != Status.DEAD and not retrying:
        raise InvalidTransition(
            f"event {event_id} is {event.status}: only dead or retrying events can be retried"
        )
    _requeue(session, event, utcnow())
    return event


def replay(session: Session, event_id: int) -> OutboxEvent:
    """Send any deliverable event again, even if delivered, as a new delivery of the same row."""
    event = get_event(session, event_id)
    if event.status == Status.REJECTED:
        raise InvalidTransition(
            f"event {event_id} was rejected on receipt ({event.last_error}); it cannot be sent"
        )
    _requeue(session, event, utcnow())
    return event


def replay_matching(session: Session, event_filter: EventFilter) -> int:
    """Requeue every event matching the filter (dead ones unless it names another status);
    answers how many."""
    event_filter = _dead_by_default(event_filter)
    if event_filter.status == Status.REJECTED:
        raise InvalidTransition("rejected events cannot be sent")
    now = utcnow()
    ids = list(session.scalars(event_filter.apply(select(OutboxEvent.id))))
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        leases.requeue(session, chunk, now)
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(chunk))
            .values(**_requeue_values(now))
            .execution_options(synchronize_session=False)
        )
    if ids:
        log.info("requeued %d events (status=%s)", len(ids), event_filter.status)
        _count_transitions(session, ids, Status.PENDING)
    return len(ids)


def count_matching(session: Session, event_filter: EventFilter) -> int:
    """How many events `replay_matching` with the same filter would requeue, to confirm first."""
    query = _dead_by_default(event_filter).apply(select(func.count(OutboxEvent.id)))
    return int(session.scalar(query) or 0)


def _dead_by_default(event_filter: EventFilter) -> EventFilter:
    """Bulk replay is for dead events unless the filter names another status."""
    if event_filter.status:
        return event_filter
    return dataclasses.replace(event_filter, status=Status.DEAD.value)


def _requeue_values(now: datetime) -> dict[str, Any]:
    """The event's own columns; its queue row (due `now`, unleased) is `leases.requeue`'s."""
    return {
        "status": Status.PENDING.value,
        "attempts": 0,
        "first_failure_at": None,
        "updated_at": now,
    }


def _requeue(session: Session, event: OutboxEvent, now: datetime) -> None:
    leases.requeue(session, [event.id], now)  # the queue row first: the lock order
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
