"""Scenario 5: a rate-limit storm: Braze suddenly allows 20 requests per 3 s, answering 429 beyond.

Two workers are draining a backlog at full speed when the limit is imposed. No attempt is counted
for a 429 (every event ends delivered with `attempts` 0, no event twice), and the relay's request
rate converges to the limit (measured from the sandbox's own log of requests): each client paces
itself from X-RateLimit-Remaining minus its own requests in flight, so one worker alone stays
under the limit, and several workers exceed it only by what the others have in flight (their
view of `remaining` is one answer old); every window is used.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime

import pytest

from tests.reliability.harness import (
    Clients,
    Db,
    Processes,
    audit,
    make_event,
    post_webhook,
    relay_env,
    run_id,
    wait_drained,
    wait_until,
)
from tests.reliability.report import Row

pytestmark = pytest.mark.reliability

EVENTS = 1500
MAX_OBJECTS = 5  # one request per 5 events
LIMIT, WINDOW = 20, 3.0
WORKERS, THREADS = 2, 4
IN_FLIGHT = WORKERS * THREADS
STORM_AFTER = 50  # delivered at full speed before the limit is imposed
ALONE_EVENTS = 500


def windows(times: list[tuple[float, int]]) -> list[Counter[int]]:
    """Replay the sandbox's fixed windows: one starts at the first request past the last one."""
    result: list[Counter[int]] = []
    start = None
    for moment, status in times:
        if start is None or moment >= start + WINDOW:
            start = moment
            result.append(Counter())
        result[-1][status] += 1
    return result


def test_rate_limit_storm(database: tuple[str, Db], procs: Processes,
                          report: Callable[[int, str], Row]) -> None:
    row = report(5, "Rate-limit storm (20 requests / 3 s, 429)")
    url, db = database
    tag = run_id()
    box = procs.sandbox()
    env = relay_env(url, box, BRAZE_MAX_OBJECTS=MAX_OBJECTS, RELAY_WORKER_THREADS=THREADS,
                    RELAY_WORKER_BATCH_SIZE=200)
    server = procs.server(env, workers=2)

    events = [make_event(f"{tag}-e{i}", f"{tag}-p{i}", seq=i) for i in range(EVENTS)]
    acknowledged: dict[str, str] = {}
    with Clients(2) as clients:
        for start in range(0, EVENTS, 100):
            chunk = events[start:start + 100]
            answer = post_webhook(clients.session(), server.url, chunk)
            assert answer.status == 200 and answer.body["accepted"] == len(chunk), answer
            acknowledged.update((e["event_id"], "production") for e in chunk)
    workers = procs.workers(env, [f"worker-{n}" for n in range(WORKERS)])
    wait_until(lambda: db.counts().get("delivered", 0) >= STORM_AFTER, 60,
               "full-speed delivery before the storm", interval=0.05)
    box.faults(rate_limit=f"{LIMIT}/{WINDOW:g}s")
    imposed_at = datetime.now().timestamp()
    before = db.counts().get("delivered", 0)
    drain = wait_drained(db, 240, "the backlog to drain under the rate limit")
    assert all(w.alive() for w in workers), "a worker died"

    result = audit(db, box, acknowledged)
    result.assert_complete()
    log = [r for r in box.requests_log() if r["path"] == "/users/track"]
    times = sorted(
        (datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp(), r["status"])
        for r in log)
    unlimited = [s for t, s in times if t < imposed_at]
    limited = [(t, s) for t, s in times if t >= imposed_at]
    per_window = windows(limited)
    steady = per_window[1:-1] or per_window  # the storm's first window and the partial last one
    span = limited[-1][0] - limited[0][0]
    statuses = Counter(s for _, s in limited)
    attempts = Counter(r.attempts for r in db.rows("SELECT attempts FROM events"))
    rate_limited = db.scalar(
        "SELECT count(DISTINCT a.id) FROM delivery_attempts a JOIN attempt_events ae "
        "ON ae.attempt_id = a.id WHERE a.status_code = 429 AND ae.outcome = 'rate limited'")
    steady_rate = statistics.fmean(w.total() for w in steady) / WINDOW
    accepted_rate = statistics.fmean(w[201] for w in steady) / WINDOW
    limit_rate = LIMIT / WINDOW
    unlimited_rate = len(unlimited) / max(0.001, imposed_at - times[0][0])

    row.sent = row.acknowledged = len(acknowledged)
    row.delivered, row.dead, row.duplicates = result.delivered, result.dead, len(result.duplicates)
    row.drain_seconds = drain
    row.note(f"{WORKERS} workers × {THREADS} threads, {MAX_OBJECTS} events per request; "
             f"{before} events delivered at full speed ({unlimited_rate:.0f} requests/s) before "
             f"the limit was imposed")
    row.note(f"under the limit: {dict(statuses)} in {span:.1f} s, {len(per_window)} windows of "
             f"{WINDOW:g} s; requests per window (201+429): " + " ".join(
                 f"{w[201]}+{w[429]}" for w in per_window))
    row.note(f"steady state (windows 2..n-1): {steady_rate:.2f} requests/s of which "
             f"{accepted_rate:.2f} accepted, limit {limit_rate:.2f}/s; 429s per window: mean "
             f"{statistics.fmean(w[429] for w in steady):.1f}, max {max(w[429] for w in steady)} "
             f"(bound: {IN_FLIGHT} requests in flight)")
    row.note(f"attempts per event: {dict(attempts)}; 429 answers recorded as 'rate limited' "
             f"without an attempt: {rate_limited}")

    assert result.delivered == EVENTS and result.dead == 0
    assert not result.duplicates, f"sent twice: {result.duplicates}"
    assert statuses[429] > 0, "no 429 at all: the storm did not happen"
    assert set(statuses) <= {201, 429}, statuses
    assert attempts == {0: EVENTS}, f"429s were counted as attempts: {attempts}"
    assert rate_limited == statuses[429], "a 429 was not recorded"
    assert unlimited_rate > 3 * limit_rate, "the relay was not faster than the limit before"
    # Converged: after the first window, a window holds the limit plus at most what the other
    # worker had in flight on average, never more than all threads; and the window is used.
    others = (WORKERS - 1) * THREADS
    assert max(w.total() for w in steady) <= LIMIT + IN_FLIGHT, steady
    assert steady_rate <= (LIMIT + others) / WINDOW, steady_rate
    assert accepted_rate >= 0.75 * limit_rate, accepted_rate

    # One worker alone: under the limit.
    procs.stop(workers[1])
    time.sleep(WINDOW + 0.5)  # let the sandbox's window expire so the replay lines up
    alone_from = datetime.now().timestamp()
    more = [make_event(f"{tag}-f{i}", f"{tag}-q{i}", seq=i) for i in range(ALONE_EVENTS)]
    with Clients(1) as clients:
        for start in range(0, ALONE_EVENTS, 100):
            chunk = more[start:start + 100]
            answer = post_webhook(clients.session(), server.url, chunk)
            assert answer.status == 200 and answer.body["accepted"] == len(chunk), answer
            acknowledged.update((e["event_id"], "production") for e in chunk)
    alone_drain = wait_drained(db, 120, "the second backlog to drain with one worker")
    assert workers[0].alive(), workers[0].tail()
    alone = sorted(
        (datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp(), r["status"])
        for r in box.requests_log() if r["path"] == "/users/track")
    alone = [(t, s) for t, s in alone if t >= alone_from]
    alone_windows = windows(alone)
    alone_statuses = Counter(s for _, s in alone)
    full = alone_windows[:-1] or alone_windows
    result = audit(db, box, acknowledged)
    result.assert_complete()
    row.sent = row.acknowledged = len(acknowledged)
    row.delivered, row.dead, row.duplicates = result.delivered, result.dead, len(result.duplicates)
    row.drain_seconds = drain + alone_drain
    row.note(f"one worker alone, {ALONE_EVENTS} more events: {dict(alone_statuses)} in "
             f"{len(alone_windows)} windows: " + " ".join(
                 f"{w[201]}+{w[429]}" for w in alone_windows))
    assert not result.duplicates and result.dead == 0
    assert alone_statuses[429] <= 1, alone_statuses
    assert all(w.total() <= LIMIT for w in alone_windows[1:]), alone_windows
    assert statistics.fmean(w[201] for w in full) >= 0.75 * LIMIT, full
