"""Leases and marks: what the delivery worker does to the outbox, the only writer of its status.

Claims and leases live in the narrow `delivery_queue` table (README, "The delivery queue"), one
row per pending event: a claim and a lease renewal rewrite that row, not the event's, and the
event's row is written once, when its status changes (or a failure is recorded), by the same
transaction that deletes or reschedules its queue row.

A worker claims a batch of due events under a lease (`claim_due`), keeps the lease while it sends
them (`renew_leases`), then records Braze's answer: `mark_delivered`, `mark_dead`, `mark_failed`
(a counted failure, backed off), `release` (a wait that counts no attempt). Marks change only the
events the worker still holds, so one whose lease expired changes, logs and counts nothing; every
other write of a worker about its events asks `held_by` first, in its own transaction. Leases
of dead workers are swept (`sweep_expired_leases`) so their events come back (at-least-once).
`relay forget` holds leases too (`fence`, `unfence`): the person's events wait while it erases,
and a worker that held one before writes nothing about it afterwards.

Lock order: the queue rows first (`held_by`, `fence`, `requeue`), then the events' rows, in every
transaction that writes both, so none of them can deadlock with another.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, false, func, or_, select, update
from sqlalchemy.orm import Session, aliased, defer

from relay import attributes as person_attributes
from relay import dialect, metrics
from relay.db import rowcount, utcnow
from relay.models import OutboxEvent, QueuedEvent, Status
from relay.retry import RetryPolicy

log = logging.getLogger(__name__)

CLAIM_LOCK_KEY = 0x72656C6179  # "relay": serialises claimers so the per-person check sees leases


def queue_row(event_id: int, environment: str, person_key: str | None,
              event_time: datetime | None, due: datetime) -> dict[str, Any]:
    """The queue row of a pending event (every path that makes an event pending writes one)."""
    return {"event_id": event_id, "environment": environment, "person_key": person_key,
            "event_time": event_time, "next_attempt_at": due, "lease_owner": None,
            "lease_expires_at": None}


def requeue(session: Session, ids: Sequence[int], due: datetime) -> None:
    """Queue these events again, due at `due`, with no lease (an operator's retry or replay).

    Written before the events' rows (the lock order above). An event still queued keeps its
    row, rescheduled and unleased: a worker delivering it then finds it no longer held and
    writes nothing about it (`held_by`); the event goes out again, as the operator asked.
    """
    if not ids:
        return
    table = QueuedEvent.__table__
    events = OutboxEvent.__table__
    source = select(events.c.id, events.c.environment, events.c.person_key,
                    events.c.event_time, bindparam("due", due, type_=table.c.next_attempt_at.type),
                    bindparam("no_owner", None, type_=table.c.lease_owner.type),
                    bindparam("no_expiry", None, type_=table.c.lease_expires_at.type)
                    ).where(events.c.id.in_(list(ids)))
    statement = dialect.insert(session, table).from_select(
        ["event_id", "environment", "person_key", "event_time", "next_attempt_at",
         "lease_owner", "lease_expires_at"], source)
    session.execute(statement.on_conflict_do_update(
        index_elements=["event_id"],
        set_={"next_attempt_at": statement.excluded.next_attempt_at, "lease_owner": None,
              "lease_expires_at": None}))


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
    (by Extole event time) of the same person is still queued, so a retried `Subscribed`
    can never land after a later `Unsubscribed`. PostgreSQL claims with FOR UPDATE SKIP LOCKED
    under a transaction-scoped advisory lock; SQLite with one atomic UPDATE ... RETURNING.
    Both write the queue rows only; the events' rows are read.
    """
    if not environments:
        return []
    now = now or utcnow()
    candidate = aliased(QueuedEvent, name="candidate")
    earlier = aliased(QueuedEvent, name="earlier")
    held_back = (
        select(earlier.event_id)
        .where(
            earlier.environment == candidate.environment,
            earlier.person_key == candidate.person_key,
            or_(
                earlier.event_time < candidate.event_time,
                and_(earlier.event_time == candidate.event_time,
                     earlier.event_id < candidate.event_id),
            ),
        )
        .exists()
    )
    due = (
        select(candidate.event_id)
        .where(
            candidate.next_attempt_at <= now,
            or_(candidate.lease_expires_at.is_(None), candidate.lease_expires_at <= now),
            candidate.environment.in_(list(environments)),
            ~held_back,
        )
        .order_by(candidate.next_attempt_at, candidate.event_id)
        .limit(limit)
    )
    dialect.lock_key(session, CLAIM_LOCK_KEY)
    due = dialect.for_update(due, session, skip_locked=True)
    ids = list(session.scalars(
        update(QueuedEvent)
        .where(QueuedEvent.event_id.in_(due.scalar_subquery()))
        .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(QueuedEvent.event_id)
        .execution_options(synchronize_session=False)
    ))
    if not ids:
        return []
    events = [e for e in session.scalars(
        select(OutboxEvent).where(OutboxEvent.id.in_(ids))
        # Delivery never reads the raw payload: it is neither sent back nor decoded.
        .options(defer(OutboxEvent.payload, raiseload=True)))
        if e.status == Status.PENDING.value]
    if len(events) < len(ids):
        # A queue row whose event is no longer pending (written around the relay, by hand):
        # the status is the truth, so the row goes; nothing is sent.
        stale = set(ids) - {e.id for e in events}
        session.execute(delete(QueuedEvent).where(QueuedEvent.event_id.in_(stale)))
        log.warning("%d queued events were not pending (%s): taken off the queue", len(stale),
                    ", ".join(str(i) for i in sorted(stale)[:10]))
    events.sort(key=lambda e: (e.event_time or now, e.id))
    return events


def held_by(session: Session, owner: str, ids: Sequence[int]) -> set[int]:
    """Which of these events this worker still holds the lease on, locked until the caller's
    transaction ends.

    Every write a worker makes about its events (marks, Braze requests recorded, identity
    answers cached) checks here first, in the same transaction: an event whose lease was taken
    from it (expired and claimed again, or fenced by `relay forget`) gets nothing written, so
    a forgotten person's data cannot come back from a delivery that was in flight. The queue
    rows are locked (FOR UPDATE, in id order: no new conflicts; nothing references them);
    SQLite takes its write lock first, so nobody commits between this answer and the writes.
    """
    if not ids:
        return set()
    dialect.take_write_lock(session, QueuedEvent, false())
    query = (select(QueuedEvent.event_id)
             .where(QueuedEvent.event_id.in_(list(ids)), QueuedEvent.lease_owner == owner)
             .order_by(QueuedEvent.event_id))
    return set(session.scalars(dialect.for_update(query, session)))


def _guarded_update(session: Session, owner: str, rows: list[dict[str, Any]],
                    shared: dict[str, Any] | None = None) -> set[int]:
    """Apply `shared` values and each row's own to the events this worker still holds the lease
    on; answers their ids (their queue rows locked: the caller deletes or reschedules them).

    So the caller logs and counts only what it changed: a worker whose lease expired (another
    one owns the event now) changes nothing. Rows with no values of their own (only "row_id")
    are changed by one set-based statement.
    """
    if not rows:
        return set()
    table = OutboxEvent.__table__
    held = held_by(session, owner, [r["row_id"] for r in rows])
    if len(held) < len(rows):
        log.warning("%d of %d events were no longer leased by %s: left to their new owner",
                    len(rows) - len(held), len(rows), owner)
    shared = shared or {}
    plain = [r["row_id"] for r in rows if r["row_id"] in held and len(r) == 1]
    if plain:
        session.execute(table.update().where(table.c.id.in_(plain)).values(shared))
    own = [r for r in rows if r["row_id"] in held and len(r) > 1]
    if own:
        columns = [key for key in own[0] if key != "row_id"]
        statement = (
            table.update()
            .where(table.c.id == bindparam("row_id"))
            .values({**shared, **{column: bindparam(f"v_{column}") for column in columns}})
        )
        session.connection().execute(statement, [
            {"row_id": r["row_id"], **{f"v_{c}": r[c] for c in columns}} for r in own])
    return held


def _dequeue(session: Session, ids: Sequence[int] | set[int]) -> None:
    """Their status changed from pending: off the queue (rows `held_by` locked)."""
    if ids:
        session.execute(delete(QueuedEvent).where(QueuedEvent.event_id.in_(list(ids))))


def _reschedule(session: Session, due: dict[int, datetime]) -> None:
    """Still pending, due later, leased by nobody (rows `held_by` locked)."""
    if not due:
        return
    table = QueuedEvent.__table__
    times = set(due.values())
    if len(times) == 1:
        session.execute(table.update().where(table.c.event_id.in_(list(due)))
                        .values(next_attempt_at=times.pop(), lease_owner=None,
                                lease_expires_at=None))
        return
    session.connection().execute(
        table.update().where(table.c.event_id == bindparam("row_id"))
        .values(next_attempt_at=bindparam("due"), lease_owner=None, lease_expires_at=None),
        [{"row_id": row_id, "due": moment} for row_id, moment in due.items()])


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
                   identities: dict[int, dict[str, Any]], now: datetime | None = None
                   ) -> list[OutboxEvent]:
    """Mark the events this worker still holds delivered; answers those (the others belong to
    another worker now, which records its own delivery)."""
    now = now or utcnow()
    # Usually the identity is the event's own external_id: written by SQL from the row itself,
    # so the whole chunk is one statement with no per-row values.
    table = OutboxEvent.__table__
    shared = {"status": Status.DELIVERED.value, "delivered_at": now, "last_error": None,
              "updated_at": now,
              "identity": dialect.json_object(session, "external_id", table.c.external_id)}
    held = _guarded_update(session, owner, [
        {"row_id": e.id} if e.external_id and identities.get(e.id) == {"external_id": e.external_id}
        else {"row_id": e.id, "identity": identities.get(e.id)}
        for e in events
    ], shared)
    _dequeue(session, held)
    delivered = [e for e in events if e.id in held]
    _transition(delivered, Status.DELIVERED)
    return delivered


def mark_dead(session: Session, owner: str, reasons: dict[int, str],
              events: Sequence[OutboxEvent], identities: dict[int, dict[str, Any]] | None = None,
              now: datetime | None = None) -> None:
    now = now or utcnow()
    dead = [e for e in events if e.id in reasons]
    held = _guarded_update(session, owner, [
        {"row_id": e.id, "status": Status.DEAD.value, "last_error": reasons[e.id][:2000],
         "identity": (identities or {}).get(e.id, e.identity), "updated_at": now}
        for e in dead
    ])
    _dequeue(session, held)
    for event in dead:
        if event.id in held:
            _transition([event], Status.DEAD, reasons[event.id][:200])


def mark_failed(session: Session, owner: str, events: Sequence[OutboxEvent], error: str,
                policy: RetryPolicy, now: datetime | None = None,
                rng: random.Random | None = None) -> tuple[list[int], list[int]]:
    """A counted failure: back off, or become dead once the failures span RELAY_RETRY_MAX_AGE."""
    now = now or utcnow()
    rows, retrying, dead = [], [], []
    retry_at: dict[int, datetime] = {}
    for event in events:
        attempts = (event.attempts or 0) + 1
        first = event.first_failure_at or now
        decision = policy.decide(attempts, first, now, rng)
        row: dict[str, Any] = {"row_id": event.id, "attempts": attempts, "first_failure_at": first,
                               "updated_at": now}
        if decision.dead:
            age = int((now - first).total_seconds())
            reason = f"{error} (gave up after {attempts} attempts over {age} s)"
            row.update(status=Status.DEAD.value, last_error=reason[:2000])
            dead.append(event)
        else:
            row.update(status=Status.PENDING.value, last_error=error[:2000])
            retry_at[event.id] = decision.retry_at or now
            retrying.append(event)
        rows.append(row)
    held = _guarded_update(session, owner, rows)
    retrying = [e for e in retrying if e.id in held]
    dead = [e for e in dead if e.id in held]
    _reschedule(session, {e.id: retry_at[e.id] for e in retrying})
    _dequeue(session, [e.id for e in dead])
    for event in retrying:
        log.info("event %s (%s): attempt %d failed, retry at %s: %s", event.id,
                 event.extole_event_id, (event.attempts or 0) + 1,
                 retry_at[event.id].isoformat(timespec="seconds"), error[:200])
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
        {"row_id": e.id,
         "first_failure_at": e.first_failure_at + wait if e.first_failure_at else None,
         "last_error": reason[:2000], "updated_at": now}
        for e in events
    ])
    _reschedule(session, dict.fromkeys(held, until))
    if held:
        log.info("%d events wait until %s without counting an attempt: %s", len(held),
                 until.isoformat(timespec="seconds"), reason[:200])


def skip_unconfigured(session: Session, environment: str, reason: str, limit: int = 1000,
                      now: datetime | None = None) -> int:
    """Events of an environment without a Braze key are stored and marked skipped, never sent."""
    now = now or utcnow()
    ids = list(session.scalars(dialect.for_update(
        select(QueuedEvent.event_id).where(QueuedEvent.environment == environment)
        .order_by(QueuedEvent.event_id).limit(limit), session, skip_locked=True)))
    if not ids:
        return 0
    session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(ids), OutboxEvent.status == Status.PENDING.value)
        .values(status=Status.SKIPPED.value, last_error=reason, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    _dequeue(session, ids)
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
            [{"row_id": row_id, "first": first + shift} for row_id, first in rows
             if first is not None],
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
    held = dialect.for_update(
        select(QueuedEvent.event_id)
        .where(QueuedEvent.event_id.in_(list(ids)), QueuedEvent.lease_owner == owner),
        session, skip_locked=True)
    result = session.execute(
        update(QueuedEvent)
        .where(QueuedEvent.event_id.in_(held.scalar_subquery()))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


def sweep_expired_leases(session: Session, now: datetime | None = None) -> int:
    """Clear leases of workers that died; their events are claimable again (at-least-once).

    Rows a worker is recording an outcome for are skipped, not waited for (it locks them one by
    one in id order; this statement would lock in scan order).
    """
    now = now or utcnow()
    expired = dialect.for_update(
        select(QueuedEvent.event_id)
        .where(QueuedEvent.lease_expires_at.is_not(None), QueuedEvent.lease_expires_at < now),
        session, skip_locked=True)
    result = session.execute(
        update(QueuedEvent)
        .where(QueuedEvent.event_id.in_(expired.scalar_subquery()))
        .values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    swept = rowcount(result)
    if swept:
        log.warning("%d events came back from expired leases", swept)
    return swept


def fence(session: Session, owner: str, ids: Sequence[int], seconds: float,
          now: datetime | None = None) -> dict[int, tuple[str, datetime]]:
    """Lease these events to `owner` (not a worker: `relay forget`), so no worker claims them,
    except those under another holder's live lease: answered as {id: (holder, until)}.

    Only queued (pending) events can be claimed or held, so only their queue rows are leased.
    One already being delivered is left to its worker, whose marks end its lease. A lease that
    expired (its worker died or stalled) is taken over: that worker's later writes find the
    event no longer held (`held_by`) and write nothing. The rows are locked, and SQLite's
    write lock taken, before they are read.
    """
    if not ids:
        return {}
    now = now or utcnow()
    dialect.take_write_lock(session, QueuedEvent, false())
    rows = session.execute(dialect.for_update(
        select(QueuedEvent.event_id, QueuedEvent.lease_owner, QueuedEvent.lease_expires_at)
        .where(QueuedEvent.event_id.in_(list(ids))).order_by(QueuedEvent.event_id), session))
    queued = []
    busy = {}
    for row_id, holder, until in rows:
        if holder is not None and holder != owner and until is not None and until > now:
            busy[row_id] = (holder, until)
        else:
            queued.append(row_id)
    if queued:
        session.execute(
            update(QueuedEvent).where(QueuedEvent.event_id.in_(queued))
            .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=seconds))
            .execution_options(synchronize_session=False))
    return busy


def unfence(session: Session, owner: str) -> int:
    """End every lease `owner` holds (what `fence` took): the events are claimable again."""
    result = session.execute(
        update(QueuedEvent).where(QueuedEvent.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False))
    return rowcount(result)


def newer_delivered_attributes(session: Session, environment: str,
                               oldest: dict[str, datetime]) -> dict[str, dict[str, datetime]]:
    """Per person, per attribute: the newest event time of a delivered event that set it.

    Each subscription group is an attribute of its own (`relay.attributes.keys`).

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
        for name in person_attributes.keys(attributes):
            if name not in per_person or per_person[name] < moment:
                per_person[name] = moment
    return newest


