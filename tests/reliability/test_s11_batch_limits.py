"""Scenario 11: the largest batches one request may carry, against the real gunicorn receiver.

Before issue 13, a 1 MiB body of 524,000 unusable items (`[0,0,...]`) took 92 s, answered with
36 MB, took the process to ~400 MB and made most concurrent genuine webhooks time out. Now an array
over RELAY_MAX_ITEMS (1000) gets 413 and stores nothing but its inbound log entry (no body), a
batch of 1000 unusable items is stored by one insert and answered with the first 100 rejections
and their count, and genuine webhooks posted meanwhile get 200 and are delivered. Answer times,
answer sizes and the gunicorn workers' memory are measured.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.reliability.harness import (
    Db,
    Processes,
    Trickle,
    audit,
    make_event,
    post_webhook,
    relay_env,
    rss_kib,
    run_id,
    wait_drained,
)
from tests.reliability.report import Row

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

MAX_ITEMS = 1000
MAX_BATCHES = 20  # max-size batches of unusable items posted while genuine webhooks trickle in
BATCH_THREADS = 4
GENUINE_PAUSE = 0.05


def unusable(tag: str, count: int) -> list[dict[str, Any]]:
    """Items without an event type: each is stored as `rejected`."""
    return [{"event_id": f"{tag}-u{n}", "note": "no type"} for n in range(count)]


def timed_post(session: requests.Session, url: str, body: Any) -> tuple[Any, float, int]:
    started = time.monotonic()
    answer = post_webhook(session, url, body, timeout=120)
    return answer, time.monotonic() - started, len(json.dumps(answer.body))


def test_batch_limits(database: tuple[str, Db], procs: Processes,
                      report: Callable[[int, str], Row]) -> None:
    row = report(11, "Largest batches (1,000 items; 1,001 and 524,000 refused)")
    url, db = database
    tag = run_id()
    box = procs.sandbox()
    env = relay_env(url, box)
    server = procs.server(env, workers=2, threads=8)
    procs.worker(env)
    acknowledged: dict[str, str] = {}
    rss_start = {pid: rss_kib(pid) for pid in server.workers()}

    with requests.Session() as http:
        # One max-size batch of unusable items, alone.
        single, single_seconds, single_bytes = timed_post(http, server.url,
                                                          unusable(f"{tag}-one", MAX_ITEMS))
        rejected_before = db.scalar("SELECT count(*) FROM events WHERE status = 'rejected'")
        events_before = db.scalar("SELECT count(*) FROM events")
        # One item too many, then the body: 1 MiB of 524,000 unusable items.
        over, over_seconds, _ = timed_post(http, server.url, unusable(f"{tag}-over",
                                                                      MAX_ITEMS + 1))
        huge_body = b"[" + b",".join([b"0"] * 524_000) + b"]"
        huge, huge_seconds, _ = timed_post(http, server.url, huge_body)
        events_after_refusals = db.scalar("SELECT count(*) FROM events")
        refused_rows = db.rows("SELECT status_code, outcome, body IS NULL AS no_body, "
                               "body_sha256 IS NOT NULL AS hashed, body_size "
                               "FROM inbound_requests WHERE status_code = 413 ORDER BY id")
        # A max-size batch of usable events: accepted, then delivered.
        usable = [make_event(f"{tag}-ok-{n}", f"{tag}-p{n % 50}", n) for n in range(MAX_ITEMS)]
        accepted, accepted_seconds, _ = timed_post(http, server.url, usable)
        if accepted.status == 200:
            acknowledged.update({event["event_id"]: "production" for event in usable})

    # Max-size batches of unusable items from several clients, genuine webhooks meanwhile.
    steady = Trickle(server.url, tag, acknowledged, person="g", people=10, pause=GENUINE_PAUSE)
    genuine = steady.answers
    batches: list[tuple[int | None, float]] = []
    lock = threading.Lock()

    def batch_client(numbers: list[int]) -> None:
        with requests.Session() as session:
            for number in numbers:
                answer, seconds, _ = timed_post(session, server.url,
                                                unusable(f"{tag}-b{number}", MAX_ITEMS))
                with lock:
                    batches.append((answer.status, seconds))

    started = time.monotonic()
    clients = [threading.Thread(target=batch_client, args=(list(range(i, MAX_BATCHES,
                                                                       BATCH_THREADS)),))
               for i in range(BATCH_THREADS)]
    steady.start()
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=600)
    steady.stop()
    busy_seconds = time.monotonic() - started
    rss_end = {pid: rss_kib(pid) for pid in server.workers()}
    rss_peak = {pid: rss_kib(pid, peak=True) for pid in server.workers()}
    drain = wait_drained(db, 180, "the accepted events to be delivered")

    result = audit(db, box, acknowledged)
    rejected_total = db.scalar("SELECT count(*) FROM events WHERE status = 'rejected'")
    batch_statuses = Counter(status for status, _ in batches)
    batch_times = sorted(seconds for _, seconds in batches)
    genuine_statuses = Counter(status for status, _ in genuine)
    genuine_times = sorted(seconds for _, seconds in genuine)
    body = single.body if isinstance(single.body, dict) else {}

    row.sent = 3 * MAX_ITEMS + 1 + 524_000 + MAX_BATCHES * MAX_ITEMS + len(genuine)
    row.acknowledged = len(acknowledged)
    row.delivered = result.delivered
    row.dead = result.dead
    row.duplicates = len(result.duplicates)
    row.drain_seconds = drain
    row.note(f"{MAX_ITEMS} unusable items in one request: {single.status} in "
             f"{single_seconds * 1000:.0f} ms, answer {single_bytes} bytes (rejected listed "
             f"{len(body.get('rejected', []))}, rejected_count {body.get('rejected_count')}); "
             f"{rejected_before} rejected rows stored")
    row.note(f"{MAX_ITEMS + 1} items: {over.status} {over.body} in {over_seconds * 1000:.0f} ms; "
             f"1 MiB of 524,000 items: {huge.status} {huge.body} in "
             f"{huge_seconds * 1000:.0f} ms; events stored by both: "
             f"{events_after_refusals - events_before}; their inbound rows (status, outcome, "
             f"no body, hashed, size): {[tuple(r) for r in refused_rows]}")
    usable_delivered = sum(result.rows.get(f"production/{event['event_id']}", {}).get("status")
                           == "delivered" for event in usable)
    row.note(f"{MAX_ITEMS} usable events in one request: {accepted.status} in "
             f"{accepted_seconds * 1000:.0f} ms; delivered: {usable_delivered}")
    row.note(f"{MAX_BATCHES} batches of {MAX_ITEMS} unusable items from {BATCH_THREADS} clients "
             f"in {busy_seconds:.1f} s: answers {dict(batch_statuses)}, time median "
             f"{statistics.median(batch_times) * 1000:.0f} ms, max "
             f"{batch_times[-1] * 1000:.0f} ms; rejected rows in all: {rejected_total}")
    row.note(f"genuine webhooks meanwhile: {len(genuine)}, answers {dict(genuine_statuses)}, "
             f"time median {statistics.median(genuine_times) * 1000:.0f} ms, max "
             f"{genuine_times[-1] * 1000:.0f} ms")
    row.note("gunicorn worker RSS (MiB) start → end (peak): " + ", ".join(
        f"{rss_start.get(p, 0) // 1024} → {rss_end[p] // 1024} ({rss_peak[p] // 1024})"
        for p in rss_end))

    assert single.status == 200, single.body
    assert body["rejected_count"] == MAX_ITEMS and len(body["rejected"]) == 100
    assert rejected_before == MAX_ITEMS
    assert over.status == 413 and over.body == {
        "error": f"body has {MAX_ITEMS + 1} items, more than RELAY_MAX_ITEMS ({MAX_ITEMS})"}
    assert huge.status == 413, huge.body
    assert events_after_refusals == events_before
    assert [(r.no_body, r.hashed) for r in refused_rows] == [(True, True), (True, True)]
    assert accepted.status == 200 and accepted.body["accepted"] == MAX_ITEMS
    assert set(batch_statuses) == {200}, batch_statuses
    assert rejected_total == MAX_ITEMS * (1 + MAX_BATCHES)
    assert set(genuine_statuses) == {200}, genuine_statuses
    result.assert_complete()
    assert not result.duplicates, result.duplicates
