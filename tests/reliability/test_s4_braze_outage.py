"""Scenario 4: Braze answers 503 to everything for 60 s, then recovers.

The backlog drains by itself once Braze is back, no event is dead, and the spacing between one
event's attempts grows as RELAY_RETRY_BASE=1 / RELAY_RETRY_MAX_DELAY=20 say: exponential with full
jitter, the n-th delay drawn from [0.5, min(20, 2^(n-1))] s (plus the worker's poll interval).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable

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
)
from tests.reliability.report import Row

pytestmark = pytest.mark.reliability

EVENTS = 300
OUTAGE = 60.0
BASE, MAX_DELAY = 1.0, 20.0
POLL = 0.5
SLACK = 3.0  # poll interval, claim and request time on a busy 2-core machine


def cap(n: int) -> float:
    """Upper bound of the delay after the n-th failure."""
    return min(MAX_DELAY, BASE * 2 ** (n - 1))


def test_braze_outage_backlog_drains_with_backoff(procs: Processes, database: tuple[str, Db],
                                                  report: Callable[[int, str], Row]) -> None:
    row = report(4, "Braze outage (503 for 60 s)")
    url, db = database
    tag = run_id()
    box = procs.sandbox()
    env = relay_env(url, box, RELAY_RETRY_BASE=BASE, RELAY_RETRY_MAX_DELAY=MAX_DELAY,
                    RELAY_POLL_INTERVAL=POLL)
    server = procs.server(env, workers=2)
    worker = procs.worker(env)

    box.faults(fail_rate=1.0, fail_status=503)
    outage_started = time.monotonic()
    events = [make_event(f"{tag}-e{i}", f"{tag}-p{i}", seq=i) for i in range(EVENTS)]
    acknowledged: dict[str, str] = {}
    with Clients(4) as clients:
        for start in range(0, EVENTS, 50):
            chunk = events[start:start + 50]
            answer = post_webhook(clients.session(), server.url, chunk)
            assert answer.status == 200 and answer.body["accepted"] == len(chunk), answer
            acknowledged.update((e["event_id"], "production") for e in chunk)
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - outage_started)))
    box.faults(fail_rate=0.0)
    healed = time.monotonic()
    during = db.counts()
    drain = wait_drained(db, 120, "the backlog to drain after Braze recovered")
    assert worker.alive(), worker.tail()

    result = audit(db, box, acknowledged)
    result.assert_complete()
    attempts = db.rows(
        "SELECT e.extole_event_id, a.started_at, a.status_code FROM attempt_events ae "
        "JOIN delivery_attempts a ON a.id = ae.attempt_id JOIN events e ON e.id = ae.event_id "
        "WHERE a.endpoint = '/users/track' ORDER BY a.started_at")
    per_event: dict[str, list[tuple[float, int | None]]] = defaultdict(list)
    for r in attempts:
        per_event[r.extole_event_id].append((r.started_at.timestamp(), r.status_code))
    gaps: dict[int, list[float]] = defaultdict(list)  # n -> delay after the n-th failure
    too_late: list[str] = []
    for event_id, tries in per_event.items():
        for n, ((t0, status), (t1, _)) in enumerate(zip(tries, tries[1:], strict=False), 1):
            assert status == 503, (event_id, tries)
            gaps[n].append(t1 - t0)
            if t1 - t0 > cap(n) + SLACK:
                too_late.append(f"{event_id} retry {n}: {t1 - t0:.1f} s > {cap(n)} s")
    means = {n: statistics.fmean(values) for n, values in sorted(gaps.items())
             if len(values) >= EVENTS // 2}
    failures = [len(t) - 1 for t in per_event.values()]
    dead = result.dead
    attempt_counts = {r.attempts for r in db.rows("SELECT attempts FROM events")}

    row.sent = row.acknowledged = len(acknowledged)
    row.delivered, row.dead, row.duplicates = result.delivered, dead, len(result.duplicates)
    row.drain_seconds = drain
    row.note(f"{EVENTS} events posted at the start of a {OUTAGE:.0f} s outage (every Braze "
             f"request answered 503); at its end: {during}")
    row.note(f"failed attempts per event: min {min(failures)}, median "
             f"{statistics.median(failures):.0f}, max {max(failures)}; backlog drained "
             f"{drain:.1f} s after Braze recovered (longest possible wait: {MAX_DELAY:.0f} s)")
    row.note("mean delay after the n-th failure (s) vs its cap min(20, 2^(n-1)): " + ", ".join(
        f"n={n}: {mean:.2f}/{cap(n):.0f}" for n, mean in means.items()))
    row.note(f"retries later than cap + {SLACK:.0f} s: {len(too_late)}")

    assert dead == 0 and result.delivered == EVENTS, db.counts()
    assert not result.duplicates, result.duplicates
    assert min(failures) >= 5, "the outage did not last long enough to show the backoff"
    assert not too_late, too_late[:10]
    ordered = list(means.values())
    assert len(ordered) >= 5, means
    # Caps 1, 2, 4, 8, 16: each mean delay above the previous one (the first two, whose draws
    # are both mostly the 0.5 s floor plus the poll interval, within noise of each other).
    assert ordered[1] > ordered[0] - 0.2, means
    assert all(a < b for a, b in zip(ordered[1:5], ordered[2:5], strict=False)), means
    assert ordered[4] > 4 * ordered[0], means  # the 5th delay is drawn from 16 s, the 1st from 1
    assert drain < MAX_DELAY + 15
    assert time.monotonic() - healed < MAX_DELAY + 30
    assert max(attempt_counts) >= 5
