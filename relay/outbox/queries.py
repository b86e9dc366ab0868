"""Read-only queries for the admin page, its API, the metrics and `relay events`.

Nothing here changes a row. Lists are keyset-paginated on id, so page N costs what page 1 costs
at any size; `event_json` is the one shape an event has in the API and on the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, undefer

from relay.db import iso_time, utcnow
from relay.exceptions import EventNotFound
from relay.extole import is_reconciled
from relay.models import (
    AttemptEvent,
    DeliveryAttempt,
    InboundRequest,
    OutboxEvent,
    ReconcileRun,
    Status,
)
from relay.outbox.filters import EventFilter

# What `event_json` shows of the event's queue row, loaded with a list in the same statement.
SHOWN = (undefer(OutboxEvent.next_attempt_at),)


def get_event(session: Session, event_id: int) -> OutboxEvent:
    """The event, or EventNotFound (404 in the API, exit 3 on the command line)."""
    event = session.get(OutboxEvent, event_id)
    if event is None:
        raise EventNotFound(f"no event with id {event_id}")
    return event


def oldest_pending_age(session: Session, now: datetime | None = None) -> float:
    """Seconds since the oldest pending event arrived (0 when none is pending)."""
    oldest = session.scalar(
        select(func.min(OutboxEvent.received_at)).where(OutboxEvent.status == Status.PENDING)
    )
    if oldest is None:
        return 0.0
    return max(0.0, ((now or utcnow()) - oldest).total_seconds())


def counts_by_status(session: Session) -> dict[str, int]:
    """Events per status, every status present (0 when it has none)."""
    counts = {status.value: 0 for status in Status}
    for status, count in session.execute(
        select(OutboxEvent.status, func.count()).group_by(OutboxEvent.status)
    ):
        counts[status] = count
    return counts


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
        "event_time": iso_time(event.event_time),
        "received_at": iso_time(event.received_at),
        "updated_at": iso_time(event.updated_at),
        "next_attempt_at": (iso_time(event.next_attempt_at) if event.status == Status.PENDING
                            else None),
        "delivered_at": iso_time(event.delivered_at),
        "last_error": event.last_error,
        "identity": event.identity,
        "reconciled": is_reconciled(event.extole_event_id),
    }


def list_events(session: Session, event_filter: EventFilter, *, limit: int = 50,
                cursor: int | None = None) -> tuple[list[OutboxEvent], int | None]:
    """Newest first, keyset-paginated on id so page N costs the same as page 1 at any size."""
    query = event_filter.apply(select(OutboxEvent).options(*SHOWN))
    if cursor is not None:
        query = query.where(OutboxEvent.id < cursor)
    events = list(session.scalars(query.order_by(OutboxEvent.id.desc()).limit(limit + 1)))
    next_cursor = events[limit - 1].id if len(events) > limit else None
    return events[:limit], next_cursor


def event_detail(session: Session, event_id: int) -> dict[str, Any]:
    """The event's whole story: payload, inbound request, identity, every Braze request and the
    campaign/Canvas triggers it started."""
    event = get_event(session, event_id)
    detail = event_json(event)
    detail.update(payload=event.payload, properties=event.properties,
                  attributes=event.attributes)
    inbound = session.get(InboundRequest, event.inbound_id) if event.inbound_id else None
    detail["inbound"] = None if inbound is None else {
        "id": inbound.id,
        "received_at": iso_time(inbound.received_at),
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
            "started_at": iso_time(attempt.started_at),
            "duration_ms": round(attempt.duration_ms, 1),
            "status_code": attempt.status_code,
            "request_body": attempt.request_body,
            "response_body": attempt.response_body,
            "error": attempt.error,
            "outcome": outcome,
        }
        for attempt, outcome in attempts
    ]
    # Here, not at the top: relay.triggers imports relay.metrics, which imports this module.
    from relay import triggers

    found, _ = triggers.list_triggers(session, event_id=event_id, limit=100)
    detail["triggers"] = [triggers.trigger_json(t) for t in reversed(found)]
    return detail




def reconciliation(session: Session, environments: Sequence[str]) -> dict[str, Any]:
    """Each environment's last reconciliation run (its fields null before the first) and when a
    run last succeeded, for the admin page and `/admin/api/stats`."""
    report: dict[str, Any] = {}
    successes = last_reconcile_success(session)
    for environment in environments:
        run = session.scalar(select(ReconcileRun).where(ReconcileRun.environment == environment)
                             .order_by(ReconcileRun.id.desc()).limit(1))
        if run is None:
            report[environment] = dict.fromkeys(
                ("last_run_at", "finished_at", "trigger", "window_start", "window_end", "seen",
                 "present", "backfilled", "errors", "error", "duration_ms", "last_success_at"))
            report[environment]["problems"] = []
            continue
        report[environment] = {
            "last_run_at": iso_time(run.started_at),
            "finished_at": iso_time(run.finished_at),
            "trigger": run.trigger,
            "window_start": iso_time(run.window_start),
            "window_end": iso_time(run.window_end),
            "seen": run.seen,
            "present": run.present,
            "backfilled": run.backfilled,
            "errors": run.errors,
            "error": run.error,
            "problems": run.problems or [],
            "duration_ms": round(run.duration_ms, 1),
            "last_success_at": iso_time(successes.get(environment)),
        }
    return report


def last_reconcile_success(session: Session) -> dict[str, datetime]:
    """When each environment's last successful run (one that read every page) finished."""
    return {environment: finished for environment, finished in session.execute(
        select(ReconcileRun.environment, func.max(ReconcileRun.finished_at))
        .where(ReconcileRun.error.is_(None)).group_by(ReconcileRun.environment))}
