"""Constants and helpers shared by tests (fixtures live in conftest.py): samples, signatures,
free ports, PostgreSQL databases made and dropped on the test server, and commands run in the
background."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from sqlalchemy import create_engine, delete, select, text, update
from sqlalchemy.orm import Session, undefer_group
from sqlalchemy.pool import NullPool
from werkzeug.serving import make_server

from relay.authentication import sign
from relay.db import get_db, utcnow
from relay.models import OutboxEvent, QueuedEvent, Status
from relay.outbox import leases

SAMPLES = Path(__file__).parent / "samples"
# For a test of what only PostgreSQL does (row locks held by concurrent transactions, NOTIFY, the
# single-statement path): `database_url`, and the app built on it, on PostgreSQL only.
POSTGRESQL_ONLY = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
PG_ADMIN_URL = os.environ.get(
    "RELAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
PROD_SECRET = "prod-secret-0123456789"
STAGING_SECRET = "staging-secret-9876543210"
BRAZE_URL = "https://rest.iad-01.braze.com"
PROD_KEY = "prod-braze-key-aaaa"
ADMIN_PASSWORD = "admin-password"  # the test settings' (conftest `make_settings`)
STAGING_KEY = "staging-braze-key-bbbb"


# Samples posted to a URL with a query: `reward_no_type.json` is a reshaped reward body without a
# type, for a webhook whose URL names it (README, "Reward events").
SAMPLE_QUERIES = {"reward_no_type.json": "?type=earned_reward"}


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def sample_url(name: str, environment: str) -> str:
    """Where a sample is posted: its environment's route, with the sample's query if any."""
    return f"/webhooks/extole/{environment}{SAMPLE_QUERIES.get(name, '')}"


def sample_json(name: str) -> Any:
    return json.loads(sample(name))


def signed(body: bytes, secret: str = PROD_SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Extole-Signature": sign(body, secret)}


def post_concurrently(app: Flask, bodies: list[bytes]) -> list[Any]:
    """Post each signed body to `production` from its own thread, all released at once by a
    barrier: the webhooks race through the receiver. Answers the responses in order."""
    barrier = threading.Barrier(len(bodies))
    answers: list[Any] = [None] * len(bodies)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        client = app.test_client()
        try:
            barrier.wait(timeout=30)
            answers[index] = client.post("/webhooks/extole/production", data=bodies[index],
                                         headers=signed(bodies[index]))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert all(not thread.is_alive() for thread in threads)
    return answers


def free_port() -> int:
    """A port of 127.0.0.1 nobody listens on at this moment: to serve on, or to find closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def create_database(prefix: str = "relay_test", *, migrated: bool = False,
                    admin_url: str = PG_ADMIN_URL) -> str:
    """A new, empty PostgreSQL database on the test server (migrated when asked); its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    if migrated:
        from relay import migrate

        migrate.upgrade(url)
    return url


def drop_database(url: str, admin_url: str = PG_ADMIN_URL) -> None:
    """Drop a database made by `create_database`, ending the sessions still connected to it."""
    name = url.rsplit("/", 1)[1]
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name})
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()


def set_schema_revision(url: str, revision: str | None) -> None:
    """Put a migrated database's recorded schema revision at `revision` (None: none recorded),
    as a newer relay (or a half-made database) would leave it."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            if revision is None:
                connection.execute(text("DELETE FROM alembic_version"))
            else:
                connection.execute(text("UPDATE alembic_version SET version_num = :revision"),
                                   {"revision": revision})
    finally:
        engine.dispose()


@contextlib.contextmanager
def fresh_database(prefix: str = "relay_test", *, migrated: bool = False) -> Iterator[str]:
    """`create_database` for the length of a `with` block, dropped afterwards whatever happens."""
    url = create_database(prefix, migrated=migrated)
    try:
        yield url
    finally:
        drop_database(url)


class Background:
    """Commands one test starts in the background (`background("serve", "--port", ...)`), each
    logging to its own file; `stop_all` ends those still running (SIGTERM, then SIGKILL), by
    their own process ids."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.command, self.env, self.cwd = command, env, cwd
        self.started: list[tuple[subprocess.Popen[str], Path]] = []

    def __call__(self, *args: str, **settings: str) -> subprocess.Popen[str]:
        log = self.cwd / f"{args[0]}-{len(self.started)}.log"
        with log.open("w") as handle:
            process = subprocess.Popen([*self.command, *args], cwd=self.cwd,
                                       env={**self.env, **settings}, stdout=handle,
                                       stderr=subprocess.STDOUT, text=True)
        self.started.append((process, log))
        return process

    def output(self, process: subprocess.Popen[str]) -> str:
        """What the process has written so far (stdout and stderr)."""
        log = next(log for started, log in self.started if started is process)
        return log.read_text("utf-8", "replace")

    def wait_for(self, url: str, process: subprocess.Popen[str], timeout: float = 30) -> None:
        """Until `url` answers (any status); fails at once when the process has ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert process.poll() is None, self.output(process)
            try:
                requests.get(url, timeout=2)
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise AssertionError(f"{url} did not answer within {timeout} s: {self.output(process)}")

    @staticmethod
    def stop(process: subprocess.Popen[str], timeout: float = 30) -> int:
        """SIGTERM, then the exit code (SIGKILL after `timeout` seconds)."""
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def stop_all(self, timeout: float = 30) -> None:
        """SIGTERM to every one still running at once, then wait for each (SIGKILL after
        `timeout` seconds)."""
        running = [process for process, _ in self.started if process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def served_sandbox(config: Any = None) -> Iterator[tuple[str, Flask]]:
    """`relay sandbox` served by werkzeug on a free port, in a thread, for a `with` block: its
    base URL and its app (whose test client reaches /sandbox/faults without a socket)."""
    import threading

    from werkzeug.serving import make_server

    from relay.sandbox import SandboxConfig, create_sandbox_app

    app = create_sandbox_app(config or SandboxConfig(api_keys=[f"prod={PROD_KEY}",
                                                               f"staging={STAGING_KEY}"]))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="sandbox", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", app
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


# --- what the app stored ------------------------------------------------------------------------


def stored_events(app: Flask) -> list[OutboxEvent]:
    """Every outbox row, in id order."""
    with get_db(app).session() as session:
        return list(session.scalars(select(OutboxEvent).options(undefer_group("queue"))
                                     .order_by(OutboxEvent.id)))


def events_by_extole_id(app: Flask) -> dict[str, OutboxEvent]:
    """Every outbox row by Extole event id (`#<id>` for a rejected item that had none)."""
    return {e.extole_event_id or f"#{e.id}": e for e in stored_events(app)}


def stored_event(app: Flask, event_id: int) -> OutboxEvent:
    with get_db(app).session() as session:
        found = session.get(OutboxEvent, event_id, options=[undefer_group("queue")])
        assert found is not None, f"no event {event_id}"
        return found


QUEUE_COLUMNS = ("next_attempt_at", "lease_owner", "lease_expires_at")


def update_event(app: Flask, event_id: int, **values: Any) -> None:
    """Set columns of one outbox row directly (a status, a time in the past)."""
    with get_db(app).session() as session:
        write_events(session, [event_id], values)


def write_events(session: Session, ids: Sequence[int], values: dict[str, Any]) -> None:
    """Set columns of outbox events directly, keeping the delivery queue as the relay keeps it
    (README, "The delivery queue"): `next_attempt_at` and the lease go to the queue row; a status
    other than pending takes the event off the queue, pending puts it on (due now)."""
    own = {k: v for k, v in values.items() if k not in QUEUE_COLUMNS}
    queued = {k: v for k, v in values.items() if k in QUEUE_COLUMNS}
    if own:
        session.execute(update(OutboxEvent).where(OutboxEvent.id.in_(ids)).values(**own))
    status = own.get("status")
    if status is not None and status != Status.PENDING.value:
        session.execute(delete(QueuedEvent).where(QueuedEvent.event_id.in_(ids)))
        return
    if status == Status.PENDING.value:
        leases.requeue(session, ids, utcnow())
    queued = {k: v for k, v in queued.items() if not (k == "next_attempt_at" and v is None)}
    if queued:
        session.execute(update(QueuedEvent).where(QueuedEvent.event_id.in_(ids)).values(**queued))


def post_ids(post_webhook: Callable[..., Any], *events: dict[str, Any],
             environment: str = "production") -> list[int]:
    """Post events in one webhook through the `post_webhook` fixture; their new outbox ids."""
    answer = post_webhook(list(events), environment)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return list(answer.json["ids"])


@contextlib.contextmanager
def serving(app: Flask) -> Iterator[str]:
    """Serve a WSGI app (the sandbox) on a free port of 127.0.0.1 from a thread, for the length
    of a `with` block; its base URL."""
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- the admin pages ----------------------------------------------------------------------------


def form_token(html: str) -> str:
    """The CSRF token of the (first) form on a page."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF field in the form"
    return match.group(1)


def login(client: Any, password: str = ADMIN_PASSWORD, **kwargs: Any) -> Any:
    """Sign the test client in through the login form (with its CSRF token)."""
    token = form_token(client.get("/admin/login", **kwargs).text)
    return client.post("/admin/login", data={"username": "admin", "password": password,
                                             "csrf_token": token}, **kwargs)
