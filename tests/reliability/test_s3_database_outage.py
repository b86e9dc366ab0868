"""Scenario 3: PostgreSQL stops for 10 s while webhooks are being posted.

On a private PostgreSQL instance (initdb + pg_ctl in a temporary directory; the machine's server
is never touched). During the outage the receiver answers 503 (so Extole retries), never a 2xx for
an event it did not commit and never a 500; it recovers by itself when PostgreSQL is back; every
event it acknowledged is stored, and once the refused ones are posted again (as Extole would),
every event is delivered.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import requests

from tests.reliability.harness import (
    Answer,
    Clients,
    Db,
    PrivatePostgres,
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
from tests.support import create_database

pytestmark = pytest.mark.reliability

CLIENTS = 4
PAUSE = 0.05  # between one client's posts
BEFORE = 5.0  # posting before the outage
OUTAGE = 10.0
AFTER = 5.0  # posting after the first 2xx that follows the outage


def test_database_outage_during_posting(procs: Processes,
                                        report: Callable[[int, str], Row]) -> None:
    row = report(3, "Database outage (10 s, private PostgreSQL)")
    tag = run_id()
    pg = PrivatePostgres()
    db: Db | None = None
    try:
        pg.init()
        pg.start()
        url = create_database("relay_rel", migrated=True, admin_url=pg.admin_url)
        db = Db(url)
        box = procs.sandbox()
        env = relay_env(url, box)
        server = procs.server(env, workers=2)
        worker = procs.worker(env)
        pids = (server.proc.pid, server.workers(), worker.pid)

        answers: list[tuple[str, Answer]] = []
        lock = threading.Lock()
        stop = threading.Event()
        counter = iter(range(10**6))

        def client() -> None:
            session = clients.session()
            deadline = time.monotonic() + 120
            while not stop.is_set() and time.monotonic() < deadline:
                with lock:
                    number = next(counter)
                event = make_event(f"{tag}-e{number}", f"{tag}-p{number}", seq=number)
                answer = post_webhook(session, server.url, event, timeout=20)
                with lock:
                    answers.append((event["event_id"], answer))
                time.sleep(PAUSE)

        readiness: list[tuple[str, int, str]] = []
        with Clients(CLIENTS) as clients:
            futures = [clients.pool.submit(client) for _ in range(CLIENTS)]
            time.sleep(BEFORE)
            pg.stop("immediate")
            down_at = time.monotonic()
            time.sleep(1.0)
            ready = requests.get(server.url + "/readyz", timeout=10)
            readiness.append(("during", ready.status_code, ready.json().get("reason", "")))
            time.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))
            up_at = time.monotonic()
            pg.start()
            started_at = time.monotonic()

            def recovered() -> bool:
                with lock:
                    return any(a.status == 200 and a.at > started_at for _, a in answers)

            wait_until(recovered, 60, "the receiver to accept again after the outage")
            recovery = time.monotonic() - started_at
            time.sleep(AFTER)
            stop.set()
            for future in futures:
                future.result(timeout=60)
        ready = requests.get(server.url + "/readyz", timeout=10)
        readiness.append(("after", ready.status_code, ""))

        statuses = Counter(a.status for _, a in answers)
        during = Counter(a.status for _, a in answers if down_at + 0.5 < a.at < up_at)
        acknowledged = {event_id: "production" for event_id, a in answers if a.status == 200}
        refused = [event_id for event_id, a in answers if a.status == 503]
        stored = {r.extole_event_id for r in db.rows("SELECT extole_event_id FROM events")}
        missing = sorted(set(acknowledged) - stored)
        stored_though_refused = sorted(set(refused) & stored)

        # Extole retries what was not acknowledged: the relay must now take every one of them.
        retried = Counter[str]()
        with Clients(CLIENTS) as clients:
            for event_id in refused:
                number = int(event_id.rsplit("-e", 1)[1])
                event = make_event(event_id, f"{tag}-p{number}", seq=number)
                answer = post_webhook(clients.session(), server.url, event)
                retried[str(answer.status)] += 1
                if answer.status == 200:
                    acknowledged[event_id] = "production"
        drain = wait_drained(db, 180, "every event to be delivered after the outage",
                             expected=len(acknowledged))
        result = audit(db, box, acknowledged)
        same_pids = (server.proc.pid, server.workers(), worker.pid) == pids

        row.sent = len(answers) + len(refused)
        row.acknowledged = len(acknowledged)
        row.delivered, row.dead = result.delivered, result.dead
        row.duplicates = len(result.duplicates)
        row.drain_seconds = drain
        row.note(f"{len(answers)} posts from {CLIENTS} clients across the outage; answers: "
                 f"{dict(statuses)}; while PostgreSQL was down: {dict(during)}")
        row.note(f"receiver accepted again {recovery:.1f} s after PostgreSQL was restarted; "
                 f"/readyz during the outage: {readiness[0][1]} ({readiness[0][2][:90]}), "
                 f"after: {readiness[1][1]}")
        row.note(f"acknowledged but missing from the database: {len(missing)}; answered 503 yet "
                 f"committed (Extole's retry is then a duplicate): {len(stored_though_refused)}")
        row.note(f"the {len(refused)} refused events posted again: {dict(retried)}; "
                 f"server and worker PIDs unchanged: {same_pids}")
        row.note(f"Braze received {len(result.duplicates)} events twice (answers that could not "
                 f"be recorded while the database was down are sent again: at-least-once)")

        assert set(statuses) <= {200, 503}, f"unexpected answers: {statuses}"
        assert during and set(during) == {503}, f"while down: {during}"
        assert not missing, f"acknowledged, not stored: {missing[:10]}"
        assert readiness[0][1] == 503 and readiness[1][1] == 200, readiness
        assert dict(retried) == {"200": len(refused)}, retried
        assert recovery < 30
        assert worker.alive() and server.proc.alive(), "a process died"
        result.assert_complete()
        assert result.delivered == len(acknowledged) and result.dead == 0
        assert db.scalar("SELECT count(*) FROM events") == len(acknowledged)
        # At-least-once: only answers Braze gave while their recording failed go out again,
        # at most the batches being delivered at the time (two lanes of RELAY_WORKER_BATCH_SIZE).
        assert len(result.duplicates) <= 2 * 500, result.duplicates
    finally:
        if db is not None:
            db.dispose()
        procs.close()
        pg.destroy()
