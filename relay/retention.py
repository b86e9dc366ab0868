"""Retention: delete what the relay no longer needs after RELAY_RETENTION_DAYS.

Delivered and skipped events (by `received_at`) with their campaign/Canvas triggers, the Braze
requests that carried only such events, inbound log rows no kept event refers to (refused requests
included), the per-minute counts of refused requests, identity cache answers long expired, and
reconciliation runs (by `finished_at`) except each environment's last run and last successful run,
which the admin page and the `relay_reconcile_last_success_timestamp_seconds` gauge show (an alert
on that gauge must keep its series however long an environment has been failing).
Dead, pending and rejected events stay until an operator handles them, with their inbound row and
attempts; so does a delivered event whose trigger is still due, being sent or uncertain (it waits
for the operator's resend or drop).
A purged event's de-duplication keys stay behind (`relay.outbox.dedup`) until its `received_at`
+ RELAY_DEDUP_DAYS, so a request replayed after the purge is still a duplicate; then they go too.

Work is done in batches, each its own short transaction, so the receiver and the workers never
wait long behind a purge; every delete re-checks its condition, so a row that changed between the
select and the delete (an operator replaying a delivered event) is left alone.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, false, select, tuple_, update
from sqlalchemy.orm import InstrumentedAttribute, aliased
from sqlalchemy.sql.elements import ColumnElement

from relay import dialect
from relay.db import Database, rowcount, utcnow
from relay.models import (
    AttemptEvent,
    DedupKey,
    DeliveryAttempt,
    IdentityCache,
    InboundRequest,
    OutboxEvent,
    ReconcileRun,
    RefusedRequestCount,
    Status,
    Trigger,
    TriggerState,
)

log = logging.getLogger(__name__)

PURGEABLE = (Status.DELIVERED.value, Status.SKIPPED.value)
# Triggers in these states still need the event (its properties, the operator's decision).
OPEN_TRIGGERS = (TriggerState.DUE.value, TriggerState.SENDING.value, TriggerState.UNCERTAIN.value)
DEFAULT_BATCH_SIZE = 1000


def purge(
    db: Database,
    retention_days: int,
    *,
    dedup_days: int,
    now: datetime | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, int]:
    """Delete rows older than `retention_days`, and the keys of purged events older than
    `dedup_days`; answers how many rows of each table went."""
    if retention_days < 1 or dedup_days < 1:
        raise ValueError("retention_days and dedup_days must be at least 1")
    now = now or utcnow()
    cutoff = now - timedelta(days=retention_days)
    counts = {"events": 0, "triggers": 0, "delivery_attempts": 0, "inbound_requests": 0,
              "identity_cache": 0, "refused_request_counts": 0, "reconcile_runs": 0,
              "dedup_keys": 0}
    while True:
        events, purged_triggers, attempts = _purge_events(db, cutoff, batch_size)
        counts["events"] += events
        counts["triggers"] += purged_triggers
        counts["delivery_attempts"] += attempts
        if events == 0:  # nothing left (or what was found changed meanwhile): done
            break
    while n := _purge_orphan_attempts(db, cutoff, batch_size):
        counts["delivery_attempts"] += n
    while n := _purge_inbound(db, cutoff, batch_size):
        counts["inbound_requests"] += n
    while n := _purge_identity_cache(db, cutoff, batch_size):
        counts["identity_cache"] += n
    while n := _purge_refused_counts(db, cutoff, batch_size):
        counts["refused_request_counts"] += n
    while n := _purge_reconcile_runs(db, cutoff, batch_size):
        counts["reconcile_runs"] += n
    while n := _purge_dedup_keys(db, now - timedelta(days=dedup_days), batch_size):
        counts["dedup_keys"] += n
    if any(counts.values()):
        log.info("purged rows older than %s (%d days; keys of purged events: %d days): %s",
                 cutoff.date(), retention_days, dedup_days,
                 ", ".join(f"{name} {n}" for name, n in counts.items()))
    return counts


def _purgeable_event(cutoff: datetime) -> ColumnElement[bool]:
    open_trigger = exists().where(Trigger.event_id == OutboxEvent.id,
                                  Trigger.state.in_(OPEN_TRIGGERS))
    return ((OutboxEvent.status.in_(PURGEABLE)) & (OutboxEvent.received_at < cutoff)
            & ~open_trigger)


def _purge_events(db: Database, cutoff: datetime, batch_size: int) -> tuple[int, int, int]:
    """One batch of events with their triggers, their links and the attempts that carried
    nothing else."""
    with db.session() as session:
        # The batch is locked before anything of it goes (PostgreSQL: its rows, skipping those
        # another transaction holds; SQLite: the write lock), so an operator's replay cannot slip
        # in between the trigger delete and the event delete: a replayed event whose finished
        # trigger was gone would start its campaign a second time.
        dialect.take_write_lock(session, OutboxEvent, false())
        ids = list(session.scalars(dialect.for_update(
            select(OutboxEvent.id).where(_purgeable_event(cutoff))
            .order_by(OutboxEvent.id).limit(batch_size), session, skip_locked=True)
        ))
        if not ids:
            return 0, 0, 0
        # Finished triggers go with their event (explicitly: never relying on the pragma); an
        # open one keeps its event, checked again by the delete below.
        purged_triggers = rowcount(session.execute(
            delete(Trigger).where(Trigger.event_id.in_(ids),
                                  ~Trigger.state.in_(OPEN_TRIGGERS))))
        attempt_ids = list(session.scalars(
            select(AttemptEvent.attempt_id).where(AttemptEvent.event_id.in_(ids)).distinct()
        ))
        deleted = list(session.scalars(
            delete(OutboxEvent).where(OutboxEvent.id.in_(ids), _purgeable_event(cutoff))
            .returning(OutboxEvent.id)
        ))
        # Also done by ON DELETE CASCADE / SET NULL; explicit so it never depends on the pragma.
        if deleted:
            session.execute(delete(AttemptEvent).where(AttemptEvent.event_id.in_(deleted)))
            # The keys stay, now on their own: a replay is still a duplicate (_purge_dedup_keys).
            session.execute(update(DedupKey).where(DedupKey.event_id.in_(deleted))
                            .values(event_id=None))
        attempts = 0
        if attempt_ids:
            attempts = rowcount(session.execute(
                delete(DeliveryAttempt).where(
                    DeliveryAttempt.id.in_(attempt_ids),
                    ~exists().where(AttemptEvent.attempt_id == DeliveryAttempt.id),
                )
            ))
        return len(deleted), purged_triggers, attempts


def _purge_orphan_attempts(db: Database, cutoff: datetime, batch_size: int) -> int:
    """Old Braze requests linked to no event at all (e.g. identity lookups recorded alone)."""
    unlinked = ~exists().where(AttemptEvent.attempt_id == DeliveryAttempt.id)
    return _purge_batch(db, DeliveryAttempt, DeliveryAttempt.started_at < cutoff, unlinked,
                        batch_size)


def _purge_inbound(db: Database, cutoff: datetime, batch_size: int) -> int:
    """Old inbound rows that no kept event refers to (a dead event keeps its raw request)."""
    unreferenced = ~exists().where(OutboxEvent.inbound_id == InboundRequest.id)
    return _purge_batch(db, InboundRequest, InboundRequest.received_at < cutoff, unreferenced,
                        batch_size)


def _purge_reconcile_runs(db: Database, cutoff: datetime, batch_size: int) -> int:
    """Runs that finished before `cutoff`, except each environment's last run (by id, as the
    admin page and the reconciliation schedule read it) and last successful one (by
    `finished_at`, as the admin page and the last-success gauge read it)."""
    later = aliased(ReconcileRun)
    superseded = exists().where(later.environment == ReconcileRun.environment,
                                later.id > ReconcileRun.id)
    later_success = exists().where(later.environment == ReconcileRun.environment,
                                   later.error.is_(None),
                                   later.finished_at > ReconcileRun.finished_at)
    unused = superseded & (ReconcileRun.error.is_not(None) | later_success)
    return _purge_batch(db, ReconcileRun, ReconcileRun.finished_at < cutoff, unused, batch_size)


def _purge_batch(db: Database,
                 model: type[DeliveryAttempt] | type[InboundRequest] | type[ReconcileRun],
                 old: ColumnElement[bool], unused: ColumnElement[bool], batch_size: int) -> int:
    """One batch of old rows nothing uses; `unused` is checked again as they are deleted."""
    with db.session() as session:
        ids = list(session.scalars(
            select(model.id).where(old, unused).order_by(model.id).limit(batch_size)
        ))
        if not ids:
            return 0
        return rowcount(session.execute(delete(model).where(model.id.in_(ids), unused)))


def _purge_by_key(db: Database, model: type[Any], key: tuple[InstrumentedAttribute[Any], ...],
                  condition: ColumnElement[bool], batch_size: int) -> int:
    """One batch of rows of a table keyed by several columns (no id to page by): the keys of up
    to `batch_size` rows meeting `condition`, then those rows, `condition` checked again."""
    with db.session() as session:
        keys = [tuple(row) for row in session.execute(
            select(*key).where(condition).limit(batch_size))]
        if not keys:
            return 0
        return rowcount(session.execute(
            delete(model).where(tuple_(*key).in_(keys), condition)))


def _purge_identity_cache(db: Database, cutoff: datetime, batch_size: int) -> int:
    """Answers that expired longer ago than the retention period: unusable, yet personal data."""
    return _purge_by_key(db, IdentityCache, (IdentityCache.environment, IdentityCache.email),
                         IdentityCache.expires_at < cutoff, batch_size)


def _purge_dedup_keys(db: Database, cutoff: datetime, batch_size: int) -> int:
    """Keys of purged events received before `cutoff` (now - RELAY_DEDUP_DAYS): a request that
    old is no longer recognised as a replay. A key whose event is still kept stays with it."""
    return _purge_by_key(db, DedupKey, (DedupKey.environment, DedupKey.key),
                         DedupKey.event_id.is_(None) & (DedupKey.received_at < cutoff),
                         batch_size)


def _purge_refused_counts(db: Database, cutoff: datetime, batch_size: int) -> int:
    """Counts of refused requests for minutes older than the retention period."""
    return _purge_by_key(db, RefusedRequestCount,
                         (RefusedRequestCount.minute, RefusedRequestCount.remote_addr),
                         RefusedRequestCount.minute < cutoff, batch_size)
