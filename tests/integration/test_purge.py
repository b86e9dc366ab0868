"""Retention: what `retention.purge` deletes, what it keeps, and that it works in batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from relay import retention
from relay.db import Database
from relay.models import (
    AttemptEvent,
    DedupKey,
    DeliveryAttempt,
    IdentityCache,
    InboundRequest,
    OutboxEvent,
    ReconcileRun,
    RefusedRequestCount,
    Trigger,
)
from relay.outbox import queries
from tests.support import POSTGRESQL_ONLY

NOW = datetime(2027, 3, 1, 12, 0, 0)
OLD = NOW - timedelta(days=31)
RECENT = NOW - timedelta(days=29)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


def inbound(session: Session, received_at: datetime) -> int:
    row = InboundRequest(received_at=received_at, environment="production", method="POST",
                         path="/webhooks/extole/production", headers={}, body=b"{}", body_size=2,
                         status_code=200, outcome="accepted")
    session.add(row)
    session.flush()
    return row.id


def event(session: Session, status: str, received_at: datetime, inbound_id: int | None = None,
          name: str = "") -> int:
    row = OutboxEvent(environment="production", dedup_key=name or None, extole_event_id=name,
                      status=status, attempts=0, payload={"type": "shared"},
                      received_at=received_at, updated_at=received_at, inbound_id=inbound_id)
    session.add(row)
    session.flush()
    return row.id


def attempt(session: Session, started_at: datetime, *event_ids: int) -> int:
    row = DeliveryAttempt(environment="production", endpoint="/users/track",
                          started_at=started_at, duration_ms=12.0, status_code=201,
                          request_body="{}", response_body="{}")
    session.add(row)
    session.flush()
    for event_id in event_ids:
        session.add(AttemptEvent(attempt_id=row.id, event_id=event_id, outcome="delivered"))
    session.flush()
    return row.id


def ids(db: Database, model: Any) -> set[Any]:
    with db.session() as session:
        if model is IdentityCache:
            return set(session.scalars(select(IdentityCache.email)))
        if model is AttemptEvent:
            return {tuple(r) for r in session.execute(
                select(AttemptEvent.attempt_id, AttemptEvent.event_id))}
        return set(session.scalars(select(model.id)))


def test_purge_deletes_old_delivered_and_skipped_with_their_attempts_and_inbound(
        db: Database) -> None:
    with db.session() as s:
        old_in, kept_in, recent_in, refused_in = (inbound(s, OLD), inbound(s, OLD),
                                                  inbound(s, RECENT), inbound(s, OLD))
        delivered = event(s, "delivered", OLD, old_in, "delivered-old")
        skipped = event(s, "skipped", OLD, old_in, "skipped-old")
        dead = event(s, "dead", OLD, kept_in, "dead-old")
        pending = event(s, "pending", OLD, kept_in, "pending-old")
        rejected = event(s, "rejected", OLD, old_in, "")
        fresh = event(s, "delivered", RECENT, recent_in, "delivered-recent")
        only_purged = attempt(s, OLD, delivered, skipped)
        shared = attempt(s, OLD, delivered, dead)
        fresh_attempt = attempt(s, RECENT, fresh)
        orphan_old, orphan_recent = attempt(s, OLD), attempt(s, RECENT)
        s.add_all([
            IdentityCache(environment="production", email="gone@example.com", found=True,
                          external_id="x", expires_at=OLD - timedelta(hours=1)),
            IdentityCache(environment="production", email="fresh@example.com", found=False,
                          expires_at=NOW + timedelta(hours=1)),
        ])

    counts = retention.purge(db, 30, dedup_days=400, now=NOW)

    assert counts == {"events": 2, "triggers": 0, "delivery_attempts": 2,
                      "inbound_requests": 1, "identity_cache": 1, "refused_request_counts": 0,
                      "reconcile_runs": 0, "dedup_keys": 0}
    assert ids(db, OutboxEvent) == {dead, pending, rejected, fresh}
    assert ids(db, DeliveryAttempt) == {shared, fresh_attempt, orphan_recent}
    assert orphan_old not in ids(db, DeliveryAttempt) and only_purged not in ids(db,
                                                                                  DeliveryAttempt)
    assert ids(db, AttemptEvent) == {(shared, dead), (fresh_attempt, fresh)}
    # The old inbound row still referenced by the rejected event stays with it.
    assert ids(db, InboundRequest) == {old_in, kept_in, recent_in}
    assert refused_in not in ids(db, InboundRequest)
    assert ids(db, IdentityCache) == {"fresh@example.com"}


def test_a_second_purge_finds_nothing(db: Database) -> None:
    with db.session() as s:
        event(s, "delivered", OLD, inbound(s, OLD), "a")
    assert retention.purge(db, 30, dedup_days=400, now=NOW)["events"] == 1
    assert retention.purge(db, 30, dedup_days=400, now=NOW) == {
        "events": 0, "triggers": 0, "delivery_attempts": 0, "inbound_requests": 0,
        "identity_cache": 0, "refused_request_counts": 0, "reconcile_runs": 0, "dedup_keys": 0}


def test_inbound_row_goes_once_its_last_event_is_purged(db: Database) -> None:
    with db.session() as s:
        shared_in = inbound(s, OLD)
        event(s, "delivered", OLD, shared_in, "first")
        dead = event(s, "dead", OLD, shared_in, "second")
    retention.purge(db, 30, dedup_days=400, now=NOW)
    assert shared_in in ids(db, InboundRequest)
    with db.session() as s:
        s.get(OutboxEvent, dead).status = "delivered"  # an operator replayed it, it went through
    assert retention.purge(db, 30, dedup_days=400, now=NOW)["inbound_requests"] == 1
    assert ids(db, InboundRequest) == set() and ids(db, OutboxEvent) == set()


def count_transactions(db: Database, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the sessions (transactions) `db` opens from now on; answers how to read the count."""
    opened = 0
    session = db.session

    @contextlib.contextmanager
    def counted() -> Iterator[Session]:
        nonlocal opened
        opened += 1
        with session() as s:
            yield s

    monkeypatch.setattr(db, "session", counted)
    return lambda: opened


def test_purge_works_in_short_batches(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    with db.session() as s:
        for n in range(7):
            event(s, "delivered", OLD, inbound(s, OLD), f"e{n}")
        for _ in range(3):
            attempt(s, OLD)
    transactions = count_transactions(db, monkeypatch)
    counts = retention.purge(db, 30, dedup_days=400, now=NOW, batch_size=3)
    assert counts == {"events": 7, "triggers": 0, "delivery_attempts": 3,
                      "inbound_requests": 7, "identity_cache": 0, "refused_request_counts": 0,
                      "reconcile_runs": 0, "dedup_keys": 0}
    # events 3+3+1 then an empty look; attempts 3 + empty; inbound 3+3+1 + empty; cache empty;
    # refused counts empty; reconciliation runs empty; keys empty (these events have no keys).
    assert transactions() == 4 + 2 + 4 + 1 + 1 + 1 + 1


def test_purge_uses_received_at_and_the_default_clock(db: Database) -> None:
    from relay.db import utcnow

    with db.session() as s:
        event(s, "delivered", utcnow() - timedelta(days=8), None, "eight-days")
        event(s, "delivered", utcnow() - timedelta(days=6), None, "six-days")
    assert retention.purge(db, 7, dedup_days=400)["events"] == 1
    with db.session() as s:
        assert s.scalar(select(OutboxEvent.extole_event_id)) == "six-days"
        assert s.scalar(select(func.count()).select_from(OutboxEvent)) == 1


def test_purge_refuses_a_retention_below_one_day(db: Database) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        retention.purge(db, 0, dedup_days=400)
    with pytest.raises(ValueError, match="at least 1"):
        retention.purge(db, 30, dedup_days=0)


def keys_left(db: Database) -> set[tuple[str, int | None]]:
    with db.session() as session:
        return {(k.key, k.event_id) for k in session.scalars(select(DedupKey))}


def test_purged_events_leave_their_keys_until_dedup_days_after_receipt(db: Database) -> None:
    with db.session() as s:
        old = event(s, "delivered", OLD, None, "old")
        ancient = event(s, "delivered", NOW - timedelta(days=500), None, "ancient")
        dead = event(s, "dead", NOW - timedelta(days=500), None, "dead")
        s.add_all([DedupKey(environment="production", key=name, event_id=event_id,
                            received_at=received)
                   for name, event_id, received in (
                       ("old", old, OLD), ("ancient", ancient, NOW - timedelta(days=500)),
                       ("dead", dead, NOW - timedelta(days=500)),
                       ("reward:rw-9:EARNED", old, OLD),
                       ("left-behind", None, NOW - timedelta(days=401)),
                       ("recent-left-behind", None, NOW - timedelta(days=399)))])

    counts = retention.purge(db, 30, dedup_days=400, now=NOW)

    assert (counts["events"], counts["dedup_keys"]) == (2, 2)
    # The old event's keys outlive it; the ancient one's went with it (past 400 days), as did
    # an earlier purged event's; the dead event keeps its key however old.
    assert keys_left(db) == {("old", None), ("reward:rw-9:EARNED", None), ("dead", dead),
                             ("recent-left-behind", None)}
    later = retention.purge(db, 30, dedup_days=400, now=OLD + timedelta(days=401))
    assert later["dedup_keys"] == 3
    assert keys_left(db) == {("dead", dead)}


def test_expired_keys_go_in_batches(db: Database) -> None:
    with db.session() as s:
        s.add_all([DedupKey(environment="production", key=f"k{n}", event_id=None,
                            received_at=NOW - timedelta(days=401)) for n in range(7)])
    counts = retention.purge(db, 30, dedup_days=400, now=NOW, batch_size=3)
    assert counts["dedup_keys"] == 7 and keys_left(db) == set()


def trigger(session: Session, event_id: int, state: str, attempt_id: int | None = None) -> int:
    row = Trigger(event_id=event_id, environment="production", kind="campaign",
                  target_id="cmp-1", recipient={"external_user_id": "c-1"}, state=state,
                  sends=1, attempt_id=attempt_id, created_at=OLD, updated_at=OLD)
    session.add(row)
    session.flush()
    return row.id


def test_sent_triggers_go_with_their_events_and_open_ones_keep_theirs(db: Database) -> None:
    """Retention purges sent (failed, dropped) triggers with their delivered events; an event
    whose trigger is still due, being sent or uncertain waits for it."""
    with db.session() as s:
        finished = {state: event(s, "delivered", OLD, None, f"finished-{state}")
                    for state in ("sent", "failed", "dropped")}
        held = {state: event(s, "delivered", OLD, None, f"open-{state}")
                for state in ("due", "sending", "uncertain")}
        carried = attempt(s, OLD, finished["sent"])
        for state, event_id in {**finished, **held}.items():
            trigger(s, event_id, state, carried if state == "sent" else None)
    counts = retention.purge(db, 30, dedup_days=400, now=NOW)
    assert (counts["events"], counts["triggers"], counts["delivery_attempts"]) == (3, 3, 1)
    assert ids(db, OutboxEvent) == set(held.values())
    with db.session() as s:
        assert sorted(s.scalars(select(Trigger.state))) == ["due", "sending", "uncertain"]
    with db.session() as s:  # the operator drops the uncertain one: its event can go
        s.execute(Trigger.__table__.update().where(Trigger.state == "uncertain")
                  .values(state="dropped"))
    assert retention.purge(db, 30, dedup_days=400, now=NOW)["triggers"] == 1
    assert ids(db, OutboxEvent) == {held["due"], held["sending"]}


def test_purge_deletes_counts_of_refused_requests_past_retention(db: Database) -> None:
    """Refused requests' inbound rows go with the other unreferenced ones; their per-minute
    counts go on the same schedule."""
    with db.session() as s:
        for minute, address in ((OLD, "192.0.2.1"), (OLD, "192.0.2.2"), (RECENT, "192.0.2.1")):
            s.add(RefusedRequestCount(minute=minute, remote_addr=address, refused=70, logged=60,
                                      status_400=0, status_401=70, status_404=0, status_413=0,
                                      status_503=0))
    counts = retention.purge(db, 30, dedup_days=400, now=NOW, batch_size=1)
    assert counts["refused_request_counts"] == 2
    with db.session() as s:
        assert [(r.minute, r.remote_addr) for r in s.scalars(select(RefusedRequestCount))] == [
            (RECENT, "192.0.2.1")]


def reconcile_run(session: Session, environment: str, finished_at: datetime,
                  error: str | None = None) -> int:
    row = ReconcileRun(environment=environment, trigger="worker",
                       started_at=finished_at - timedelta(minutes=1), finished_at=finished_at,
                       window_start=finished_at - timedelta(days=2), window_end=finished_at,
                       seen=3, present=3, backfilled=0, errors=0, error=error, problems=None,
                       duration_ms=60000.0)
    session.add(row)
    session.flush()
    return row.id


def test_old_reconcile_runs_go_but_each_environment_keeps_its_last_run_and_last_success(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs that finished before the retention period go, in batches, except what the admin
    page and the last-success gauge read: each environment's last run, and its last successful
    one even when that is old (an environment failing for weeks keeps the gauge its alert
    needs)."""
    with db.session() as s:
        gone = {reconcile_run(s, "production", OLD - timedelta(days=10)),
                reconcile_run(s, "production", OLD - timedelta(days=1)),
                reconcile_run(s, "production", OLD, error="Extole unavailable")}
        recent_success = reconcile_run(s, "production", RECENT)
        last = reconcile_run(s, "production", RECENT + timedelta(hours=1), error="refused token")
        staging_success = reconcile_run(s, "staging", OLD - timedelta(days=20))
        gone.add(reconcile_run(s, "staging", OLD - timedelta(days=10), error="refused token"))
        staging_last = reconcile_run(s, "staging", OLD, error="refused token")
    with db.session() as s:
        shown = queries.reconciliation(s, ["production", "staging"])
        successes = queries.last_reconcile_success(s)
    transactions = count_transactions(db, monkeypatch)
    counts = retention.purge(db, 30, dedup_days=400, now=NOW, batch_size=3)

    assert counts["reconcile_runs"] == 4
    assert transactions() == 6 + 3  # an empty look at each other table; runs 3, 1, empty look
    assert ids(db, ReconcileRun) == {recent_success, last, staging_success, staging_last}
    assert not gone & ids(db, ReconcileRun)
    with db.session() as s:  # the admin page and the gauge show what they showed before
        assert queries.reconciliation(s, ["production", "staging"]) == shown
        assert queries.last_reconcile_success(s) == successes
    assert shown["production"]["error"] == "refused token"
    assert shown["staging"]["last_success_at"] is not None
    assert retention.purge(db, 30, dedup_days=400, now=NOW)["reconcile_runs"] == 0
    # Years later nothing new came: still the last run and the last success of each.
    later = retention.purge(db, 30, dedup_days=400, now=NOW + timedelta(days=900))
    assert later["reconcile_runs"] == 0
    assert ids(db, ReconcileRun) == {recent_success, last, staging_success, staging_last}


def test_an_environment_whose_last_run_succeeded_keeps_that_run_alone(db: Database) -> None:
    with db.session() as s:
        for days in (60, 50, 40):
            reconcile_run(s, "production", NOW - timedelta(days=days))
        newest = reconcile_run(s, "production", OLD)
    assert retention.purge(db, 30, dedup_days=400, now=NOW)["reconcile_runs"] == 3
    assert ids(db, ReconcileRun) == {newest}


@POSTGRESQL_ONLY
def test_an_event_another_transaction_holds_keeps_its_finished_trigger(db: Database) -> None:
    """The purge locks its batch before deleting anything of it: an event an operator's replay
    holds at that moment is left whole (its sent trigger with it), so the replayed event cannot
    start its campaign a second time; the next purge takes both."""
    with db.session() as s:
        busy = event(s, "delivered", OLD, None, "busy")
        free = event(s, "delivered", OLD, None, "free")
        trigger(s, busy, "sent")
        trigger(s, free, "sent")
    with db.engine.connect() as other, other.begin():
        other.execute(select(OutboxEvent.id).where(OutboxEvent.id == busy).with_for_update())
        counts = retention.purge(db, 30, dedup_days=400, now=NOW)
        assert (counts["events"], counts["triggers"]) == (1, 1)
        with db.session() as s:
            assert list(s.scalars(select(Trigger.event_id))) == [busy]
    counts = retention.purge(db, 30, dedup_days=400, now=NOW)
    assert (counts["events"], counts["triggers"]) == (1, 1)
    assert ids(db, OutboxEvent) == set()
