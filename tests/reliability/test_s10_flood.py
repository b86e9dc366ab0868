"""Scenario 10: 1,000 unauthenticated 1 MiB requests against the real gunicorn receiver.

Issue 13's "done when": the database grows by under 1 MB (before the fix every refused request
kept its body: a gigabyte) and genuine signed webhooks keep getting 200 meanwhile, and are
delivered. The flood mixes every way to be refused: no credentials, a wrong Bearer token, wrong
Basic credentials (all three refused before the body is read), a wrong signature and an unknown
environment (the body is read, hashed and dropped); the bodies are random bytes, which
PostgreSQL cannot compress. Traffic to 127.0.0.1 only; bounded in count and time.
"""

from __future__ import annotations

import base64
import itertools
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import requests

from relay.authentication import sign
from tests.reliability.harness import (
    PROD_SECRET,
    Clients,
    Db,
    Processes,
    Trickle,
    audit,
    relay_env,
    rss_kib,
    run_id,
    wait_drained,
)
from tests.reliability.report import Row

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

REQUESTS = 1000
MIB = 1024 * 1024
CLIENT_THREADS = 8
GENUINE_PAUSE = 0.05  # seconds between one genuine webhook's answer and the next request
LIMIT_BYTES = 1_000_000
BODY = random.Random(10).randbytes(MIB)
KINDS: dict[str, tuple[str, dict[str, str]]] = {
    "no credentials": ("production", {}),
    "wrong bearer": ("production", {"Authorization": "Bearer not-the-secret"}),
    "wrong basic": ("production", {"Authorization": "Basic "
                                   + base64.b64encode(b"extole:not-the-secret").decode()}),
    "wrong signature": ("production", {"X-Extole-Signature": sign(BODY, "not-the-secret")}),
    "unknown environment": ("qa", {"X-Extole-Signature": sign(BODY, PROD_SECRET)}),
}
READ_KINDS = {"wrong signature", "unknown environment"}


def log_bytes(db: Db) -> int:
    """What the inbound log and the refused-request counts take, indexes and TOAST included."""
    return int(db.scalar("SELECT pg_total_relation_size('inbound_requests') "
                         "+ pg_total_relation_size('refused_request_counts')"))


def test_unauthenticated_flood(database: tuple[str, Db], procs: Processes,
                               report: Callable[[int, str], Row]) -> None:
    row = report(10, "Unauthenticated flood (1,000 × 1 MiB)")
    url, db = database
    tag = run_id()
    box = procs.sandbox()
    env = relay_env(url, box)
    server = procs.server(env, workers=2, threads=8)
    procs.worker(env)
    genuine_ids: dict[str, str] = {}
    trickle = Trickle(server.url, tag, genuine_ids, person="p", people=20, pause=GENUINE_PAUSE)
    genuine = trickle.answers

    with requests.Session() as session:  # the tables' first pages are not the flood's doing
        trickle.post(session, 0)
    wait_drained(db, 60, "the first genuine event to be delivered")
    size_before, log_before = db.size(), log_bytes(db)
    rss_before = {pid: rss_kib(pid) for pid in server.workers()}
    answers: Counter[tuple[str, int | str]] = Counter()
    lock = threading.Lock()

    def attack(kind: str, clients: Clients) -> None:
        environment, headers = KINDS[kind]
        try:
            # A new connection each: after a body refused unread gunicorn closes the
            # connection, and a request sent on it would never reach the relay.
            status: int | str = clients.session().post(
                f"{server.url}/webhooks/extole/{environment}", data=BODY, timeout=60,
                headers={"Content-Type": "application/json", "Connection": "close",
                         **headers}).status_code
        except requests.ConnectionError:
            # Refused unread: gunicorn drains 64 KiB of the body, then closes the connection,
            # sometimes before the client has read the answer.
            status = "connection closed"
        with lock:
            answers[(kind, status)] += 1

    started = time.monotonic()
    trickle.start(first=1)
    try:
        with Clients(CLIENT_THREADS) as clients:
            kinds = itertools.islice(itertools.cycle(KINDS), REQUESTS)
            futures = [clients.pool.submit(attack, kind, clients) for kind in kinds]
            for future in futures:
                future.result(timeout=600)
    finally:
        trickle.stop()
    flood_seconds = time.monotonic() - started
    size_after, log_after = db.size(), log_bytes(db)
    rss_after = {pid: rss_kib(pid) for pid in server.workers()}
    drain = wait_drained(db, 120, "the genuine events to be delivered")

    result = audit(db, box, genuine_ids)
    logged = db.scalar("SELECT count(*) FROM inbound_requests WHERE status_code <> 200")
    kept_bodies = db.scalar("SELECT count(*) FROM inbound_requests WHERE status_code <> 200 "
                            "AND body IS NOT NULL")
    counted = db.rows("SELECT minute, refused, logged, status_401, status_404 "
                      "FROM refused_request_counts ORDER BY minute")
    statuses = Counter(status for status, _ in genuine)
    latencies = sorted(seconds for _, seconds in genuine)
    growth = size_after - size_before

    def per_kind(kind: str) -> dict[int | str, int]:
        return dict(sorted(((s, n) for (k, s), n in answers.items() if k == kind), key=str))

    row.sent = REQUESTS + len(genuine)
    row.acknowledged = len(genuine_ids)
    row.delivered = result.delivered
    row.dead = result.dead
    row.duplicates = len(result.duplicates)
    row.drain_seconds = drain
    row.note(f"{REQUESTS} refused requests of {MIB} random bytes each ({REQUESTS} MiB) from "
             f"{CLIENT_THREADS} clients in {flood_seconds:.1f} s "
             f"({REQUESTS / flood_seconds:.0f} requests/s); answers per kind: "
             + "; ".join(f"{kind} {per_kind(kind)}" for kind in KINDS))
    row.note(f"database size {size_before / 1e6:.2f} MB before, {size_after / 1e6:.2f} MB after: "
             f"grew by {growth / 1e3:.0f} kB (limit {LIMIT_BYTES / 1e6:.0f} MB; before the fix "
             f"each refused request kept its 1 MiB body), of which the inbound log and the "
             f"refused-request counts {(log_after - log_before) / 1e3:.0f} kB (the rest: the "
             f"genuine events, their inbound rows and Braze requests)")
    row.note(f"inbound log: {logged} refused requests logged one by one (bodies kept: "
             f"{kept_bodies}); counted per minute: "
             + ", ".join(f"{r.minute:%H:%M} refused {r.refused}, logged {r.logged} "
                         f"(401: {r.status_401}, 404: {r.status_404})" for r in counted))
    row.note(f"genuine signed webhooks during the flood: {len(genuine)}, answers {dict(statuses)}; "
             f"answer time median {statistics.median(latencies) * 1000:.0f} ms, max "
             f"{latencies[-1] * 1000:.0f} ms; delivered {result.delivered} of "
             f"{len(genuine_ids)}")
    row.note("gunicorn worker RSS (MiB) before → after the flood: " + ", ".join(
        f"{rss_before.get(p, 0) // 1024} → {rss_after[p] // 1024}" for p in rss_after))

    assert growth < LIMIT_BYTES, (size_before, size_after)
    assert kept_bodies == 0
    assert sum(r.refused for r in counted) == REQUESTS
    assert logged == sum(r.logged for r in counted)
    refused = {status for _, status in answers}
    assert refused <= {401, 404, "connection closed"}, answers
    assert not {k for k, s in answers if s == "connection closed"} & READ_KINDS, answers
    assert set(statuses) == {200}, statuses
    result.assert_complete()
    assert not result.duplicates, result.duplicates
