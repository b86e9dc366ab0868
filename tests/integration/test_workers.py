"""Workers as they run: in the web process (`serve --with-worker`), woken by the receiver; and
real `relay worker` processes on one PostgreSQL against `relay sandbox` on a free port.

Two workers share 5,000 events and Braze receives each exactly once, each person's in event-time
order; a worker killed (-9) while Braze is answering loses nothing: after its lease expires the
batch in flight is sent again (at-least-once). Every wait is bounded and every process started
here is stopped in `finally`, by its own id.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine

from relay.models import OutboxEvent, QueuedEvent
from relay.scheduler import DELIVER_JOB, start_in_process
from relay.settings import Settings
from relay.wakeup import Waker
from relay.worker import Worker
from tests.support import (
    BRAZE_URL,
    POSTGRESQL_ONLY,
    PROD_KEY,
    PROD_SECRET,
    Background,
    free_port,
    sample,
    signed,
)

WAIT_SECONDS = 120.0
CLI = "from relay.cli import main; main()"


class FakeScheduler:
    """Records each time the waker asks for the delivery job to run now."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    def run_now(self) -> None:
        self.runs.append(DELIVER_JOB)


def test_a_wake_up_is_never_lost_whenever_it_arrives() -> None:
    waker, scheduler = Waker(), FakeScheduler()
    waker.attach(scheduler.run_now)
    waker.wake()  # idle: run the delivery job now
    assert scheduler.runs == [DELIVER_JOB]
    waker.begin()
    waker.wake()  # while draining: the drain looks again instead
    assert scheduler.runs == [DELIVER_JOB]
    assert waker.look_again() is True
    assert waker.look_again() is False
    waker.wake()  # after the drain's last look, before the run ends: the run goes on
    assert waker.finish() is False
    assert waker.finish() is True
    waker.wake()  # the run has ended: a new one
    assert scheduler.runs == [DELIVER_JOB, DELIVER_JOB]


def test_in_process_delivery_is_woken_by_the_receiver(
        make_settings: Callable[..., Settings], post_webhook: Any, app: Flask,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The poll is an hour away: only the receiver's wake-up can deliver within the wait.
    app.config["RELAY_SETTINGS"] = make_settings(poll_interval=3600.0)
    drained = threading.Event()
    drain = Worker.drain

    def observed(self: Worker, *args: Any, **kwargs: Any) -> int:
        try:
            return drain(self, *args, **kwargs)
        finally:
            drained.set()

    monkeypatch.setattr(Worker, "drain", observed)
    with responses.RequestsMock() as braze:
        braze.post(BRAZE_URL + "/users/track", json={"message": "success"}, status=201)
        worker = start_in_process(app)
        _, scheduler = app.extensions["relay.worker"]
        try:
            assert drained.wait(15)  # the first, immediate drain found nothing
            assert post_webhook(sample("reward_earned.json")).status_code == 200
            db = app.extensions["relay.db"]

            def delivered() -> bool:
                with db.session() as session:
                    return bool(session.scalar(select(func.count()).where(
                        OutboxEvent.status == "delivered")))

            wait_for(delivered, lambda: "no delivery after the wake-up", 15)
            assert len(braze.calls) == 1
        finally:
            scheduler.shutdown(wait=True)
            worker.close()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    made = create_engine(database_url)
    yield made
    made.dispose()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Background]:
    """`relay ARGS` processes of this test (the command line of this checkout), stopped at
    the end."""
    started = Background([sys.executable, "-c", CLI], base_env(), tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def base_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "BRAZE_", "EXTOLE_"))}
    env.update(values)
    return env


@pytest.fixture
def sandbox(processes: Background) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = processes("sandbox", "--port", str(port), "--api-key", f"prod={PROD_KEY}")
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"{url}/sandbox/stats", timeout=2).raise_for_status()
            break
        except requests.RequestException:
            assert proc.poll() is None, processes.output(proc)
            assert time.monotonic() < deadline, "the sandbox did not start"
            time.sleep(0.1)
    yield url


def worker_env(database_url: str, sandbox: str, **extra: str) -> dict[str, str]:
    """A worker's settings (on top of `base_env`)."""
    return {"RELAY_DATABASE_URL": database_url, "BRAZE_REST_ENDPOINT": sandbox,
            "BRAZE_API_KEY": PROD_KEY, "RELAY_POLL_INTERVAL": "0.2",
            "RELAY_WORKER_BATCH_SIZE": "100", **extra}


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return dict(connection.execute(select(OutboxEvent.status, func.count())
                                       .group_by(OutboxEvent.status)).all())


def wait_for(condition: Callable[[], bool], what: Callable[[], Any],
             seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what()}"
        time.sleep(0.2)


def post_events(client: FlaskClient, items: list[dict[str, Any]]) -> None:
    """Through the receiver, in arrays of 100."""
    for start in range(0, len(items), 100):
        raw = json.dumps(items[start:start + 100]).encode()
        answer = client.post("/webhooks/extole/production", data=raw,
                             headers=signed(raw, PROD_SECRET))
        assert answer.status_code == 200
        assert answer.get_json()["accepted"] == len(items[start:start + 100])


def stats(sandbox: str) -> dict[str, Any]:
    answer = requests.get(f"{sandbox}/sandbox/stats", timeout=10)
    answer.raise_for_status()
    return dict(answer.json())


@pytest.mark.slow
@POSTGRESQL_ONLY  # worker processes share the work (and NOTIFY) on PostgreSQL only
def test_two_worker_processes_deliver_5000_events_exactly_once(
        database_url: str, engine: Engine, sandbox: str, processes: Background,
        client: FlaskClient) -> None:
    requests.post(f"{sandbox}/sandbox/faults", json={"latency_ms": 5},
                  timeout=10).raise_for_status()
    env = worker_env(database_url, sandbox)
    workers = [processes("worker", **env) for _ in (1, 2)]
    people, per_person = 1000, 5
    post_events(client, [
        {"type": "shared", "event_id": f"w-{p:04d}-{n}",
         "event_time": f"2026-11-20T{10 + n:02d}:{p // 60 % 60:02d}:{p % 60:02d}Z",
         "partner_user_id": f"cust-{p}", "first_name": f"v{n}"}
        for n in range(per_person) for p in range(people)])  # each person's events in turns

    wait_for(lambda: counts(engine).get("delivered", 0) == people * per_person,
             lambda: counts(engine))
    assert all(w.poll() is None for w in workers)
    assert counts(engine) == {"delivered": people * per_person}
    seen = stats(sandbox)
    assert seen["events_received"] == people * per_person
    assert seen["events_dropped"] == 0
    assert len(seen["event_ids"]) == people * per_person
    assert set(seen["event_ids"].values()) == {1}
    # Both processes took part, and between them marked each event delivered once.
    delivered = [processes.output(w).count("-> delivered") for w in workers]
    assert all(n > 0 for n in delivered), delivered
    assert sum(delivered) == people * per_person

    # Each person's events reached Braze in event-time order; the last one's attributes won.
    profiles = requests.get(f"{sandbox}/sandbox/profiles", timeout=30).json()
    found = profiles["workspaces"]["prod"]
    assert len(found) == people
    for profile in found:
        times = [e["time"] for e in profile["events"]]
        assert times == sorted(times) and len(times) == per_person
        assert profile["attributes"] == {"first_name": f"v{per_person - 1}"}

    # SIGTERM: each worker finishes what it is doing and exits cleanly.
    for proc in workers:
        proc.terminate()
    for proc in workers:
        assert proc.wait(timeout=30) == 0
        assert "stopped" in processes.output(proc).splitlines()[-1]


@pytest.mark.slow
@POSTGRESQL_ONLY  # worker processes share the work (and NOTIFY) on PostgreSQL only
def test_a_worker_killed_mid_request_loses_nothing(
        database_url: str, engine: Engine, sandbox: str, processes: Background,
        client: FlaskClient) -> None:
    requests.post(f"{sandbox}/sandbox/faults", json={"latency_ms": 3000},
                  timeout=10).raise_for_status()
    env = worker_env(database_url, sandbox, RELAY_LEASE_SECONDS="10")
    doomed = processes("worker", **env)
    post_events(client, [{"type": "shared", "event_id": f"k-{p}",
                          "event_time": "2026-11-20T10:00:00Z",
                          "partner_user_id": f"cust-{p}"} for p in range(10)])

    def leased() -> int:
        with engine.connect() as connection:
            return int(connection.scalar(select(func.count()).where(
                QueuedEvent.lease_owner.is_not(None))) or 0)

    wait_for(lambda: leased() == 10, lambda: (counts(engine), processes.output(doomed)), 60)
    time.sleep(1.5)  # the request is in flight: the sandbox answers after 3 s
    doomed.kill()
    doomed.wait(timeout=15)
    assert counts(engine) == {"pending": 10}
    assert leased() == 10

    requests.post(f"{sandbox}/sandbox/faults", json={"latency_ms": 0},
                  timeout=10).raise_for_status()
    survivor = processes("worker", **env)
    wait_for(lambda: counts(engine).get("delivered", 0) == 10,
             lambda: (counts(engine), processes.output(survivor)), 60)
    assert survivor.poll() is None
    # At-least-once: Braze processed the killed worker's request too, so each event twice.
    seen = stats(sandbox)
    assert set(seen["event_ids"]) == {f"k-{p}" for p in range(10)}
    assert set(seen["event_ids"].values()) == {2}


@pytest.mark.slow
@POSTGRESQL_ONLY  # worker processes share the work (and NOTIFY) on PostgreSQL only
def test_a_worker_process_is_woken_by_the_receivers_notify(
        database_url: str, engine: Engine, sandbox: str, processes: Background,
        client: FlaskClient) -> None:
    # The poll is an hour away: only PostgreSQL's NOTIFY can wake the worker within the wait.
    post_events(client, [{"type": "shared", "event_id": "n-0",
                          "event_time": "2026-11-20T10:00:00Z", "partner_user_id": "cust-0"}])
    worker = processes("worker", **worker_env(database_url, sandbox, RELAY_POLL_INTERVAL="3600"))
    # Its first run, at start, delivers what was there; then it idles, listening.
    wait_for(lambda: counts(engine) == {"delivered": 1}, lambda: processes.output(worker), 60)
    wait_for(lambda: "listening for new events" in processes.output(worker),
             lambda: processes.output(worker), 30)
    time.sleep(1.0)  # let that first run end: what follows is the wake-up's doing
    post_events(client, [{"type": "shared", "event_id": "n-1",
                          "event_time": "2026-11-20T10:00:01Z", "partner_user_id": "cust-1"}])
    wait_for(lambda: counts(engine) == {"delivered": 2}, lambda: processes.output(worker), 30)
    assert set(stats(sandbox)["event_ids"]) == {"n-0", "n-1"}
