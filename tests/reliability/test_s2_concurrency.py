"""Scenario 2: two receivers and two workers on one PostgreSQL, 10,000 events posted concurrently.

1,000 of the events (10%) are posted twice at the same moment, by two client threads, one copy to
each receiver. Exactly one outbox row per event id, exactly one `accepted` per id (the other copy is
acknowledged as a duplicate), and Braze receives every event exactly once while both workers share
the work (no kill here, so no batch is ever in flight twice).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.reliability.harness import (
    Answer,
    Clients,
    Db,
    Processes,
    audit,
    make_event,
    post_webhook,
    relay_env,
    run_id,
    seeded,
    wait_drained,
)
from tests.reliability.report import Row

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

EVENTS = 10_000
DUPLICATED = 1_000
PEOPLE = 2_500
CLIENT_THREADS = 24
SEED = 2


def test_two_receivers_two_workers_duplicates_at_once(
        procs: Processes, database: tuple[str, Db], report: Callable[[int, str], Row]) -> None:
    row = report(2, "Two receivers, two workers, one PostgreSQL")
    url, db = database
    rng = seeded(SEED)
    tag = run_id()
    box = procs.sandbox()
    env = relay_env(url, box)
    receivers = [procs.server(env, workers=2, name="receiver-a"),
                 procs.server(env, workers=2, name="receiver-b")]
    workers = procs.workers(env, ["worker-a", "worker-b"])

    events = [make_event(f"{tag}-e{i}", f"{tag}-p{i % PEOPLE}", seq=i) for i in range(EVENTS)]
    duplicated = set(rng.sample(range(EVENTS), DUPLICATED))
    # Units of work: a single post, or a pair of posts released together by a barrier.
    units: list[list[tuple[int, int, threading.Barrier | None]]] = []
    for i in range(EVENTS):
        if i in duplicated:
            barrier = threading.Barrier(2)
            units.append([(i, 0, barrier), (i, 1, barrier)])
        else:
            units.append([(i, rng.randrange(2), None)])
    rng.shuffle(units)
    tasks = [task for unit in units for task in unit]
    answers: dict[tuple[int, int], Answer] = {}
    lock = threading.Lock()
    met = Counter[str]()

    def post(task: tuple[int, int, threading.Barrier | None], clients: Clients) -> None:
        index, copy, barrier = task
        if barrier is not None:
            try:
                barrier.wait(timeout=10)
                met["together"] += 1
            except threading.BrokenBarrierError:
                met["alone"] += 1
        answer = post_webhook(clients.session(), receivers[copy].url, events[index])
        with lock:
            answers[(index, copy)] = answer

    started = time.monotonic()
    with Clients(CLIENT_THREADS) as clients:
        futures = [clients.pool.submit(post, task, clients) for task in tasks]
        for future in futures:
            future.result(timeout=600)
    posting = time.monotonic() - started
    drain = wait_drained(db, 600, "10,000 events to be delivered", expected=EVENTS)
    assert all(w.alive() for w in workers), "a worker died"

    statuses = Counter(a.status for a in answers.values())
    accepted = Counter[int]()
    duplicates = Counter[int]()
    acknowledged: dict[str, str] = {}
    for (index, _copy), answer in answers.items():
        if answer.status == 200:
            body: dict[str, Any] = answer.body
            accepted[index] += body["accepted"]
            duplicates[index] += body["duplicates"]
            acknowledged[events[index]["event_id"]] = "production"
    rows_per_id = db.rows("SELECT extole_event_id, count(*) AS n FROM events "
                          "GROUP BY extole_event_id HAVING count(*) > 1")
    total_rows = db.scalar("SELECT count(*) FROM events")
    result = audit(db, box, acknowledged)
    result.assert_complete()
    received = box.stats()["events_received"]
    sent_by = [w.log().count("braze POST /users/track") for w in workers]

    row.sent, row.acknowledged = len(tasks), sum(1 for a in answers.values() if a.status == 200)
    row.delivered, row.dead, row.duplicates = result.delivered, result.dead, len(result.duplicates)
    row.drain_seconds = drain
    row.note(f"{EVENTS} events, {DUPLICATED} of them posted twice at once ({met['together']} "
             f"copies released together by a barrier, {met['alone']} alone), one copy per "
             f"receiver; {CLIENT_THREADS} client threads; answers: {dict(statuses)}")
    row.note(f"posting took {posting:.1f} s ({len(tasks) / posting:.0f} requests/s over two "
             f"receivers × 2 gunicorn workers); drained {drain:.1f} s after the last answer")
    row.note(f"outbox rows: {total_rows}, event ids with more than one row: {len(rows_per_id)}; "
             f"ids accepted twice: {sum(1 for n in accepted.values() if n > 1)}")
    row.note(f"Braze received {received} event objects; requests per worker: {sent_by}")

    assert statuses == {200: len(tasks)}, statuses
    assert total_rows == EVENTS and not rows_per_id, rows_per_id[:10]
    assert all(accepted[i] == 1 for i in range(EVENTS)), "an event was accepted twice or never"
    assert sum(duplicates.values()) == DUPLICATED
    assert all(duplicates[i] == 1 for i in duplicated)
    assert result.delivered == EVENTS and result.dead == 0
    assert not result.duplicates, f"Braze received these more than once: {result.duplicates}"
    assert received == EVENTS
    assert all(n > 0 for n in sent_by), f"one worker did nothing: {sent_by}"
