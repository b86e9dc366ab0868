"""Real processes for the reliability scenarios: gunicorn, relay worker, relay sandbox, PostgreSQL.

Everything here is bounded: every wait has a deadline, every process started is tracked by its id
and killed (with its process group) when the scenario ends, whatever happened. A process is reaped
only after its group was signalled, so a group id is never one the system could have reused.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from relay.authentication import sign
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RELAY = str(BIN / "relay")
PYTHON = sys.executable


def _pg_bin() -> Path:
    """initdb and pg_ctl: RELAY_PG_BIN, else the newest /usr/lib/postgresql/<version>/bin."""
    if os.environ.get("RELAY_PG_BIN"):
        return Path(os.environ["RELAY_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()

PROD_SECRET = "reliability-prod-secret-5f1c"
STAGING_SECRET = "reliability-staging-secret-9a2e"
PROD_KEY = "reliability-prod-braze-key"
STAGING_KEY = "reliability-staging-braze-key"
ADMIN_USER = "admin"
ADMIN_PASSWORD = "reliability-admin-password"
SECRET_KEY = "reliability-session-secret-key"
SECRETS = {"production": PROD_SECRET, "staging": STAGING_SECRET}

# Variables of ours a developer's shell may carry; the processes get exactly what a scenario sets.
_OURS = ("RELAY_", "BRAZE_", "EXTOLE_", "PROMETHEUS_MULTIPROC_DIR")


class Timeout(AssertionError):
    """A bounded wait ran out: the scenario fails with what it was waiting for."""


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.2) -> Any:
    """Poll `predicate` until it answers something truthy, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except (requests.RequestException, OSError) as error:
            last = error
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise Timeout(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        """Still running; an exited process is left unreaped (its id stays ours)."""
        if self.popen.returncode is not None:
            return False
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return info is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def children(self) -> list[int]:
        """Direct children (gunicorn's worker processes), from /proc."""
        found: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                found.extend(int(p) for p in (task / "children").read_text().split())
            except OSError:
                continue
        return sorted(found)


def rss_kib(pid: int, *, peak: bool = False) -> int:
    """Resident memory of a process now, or its peak so far (`peak`: VmHWM)."""
    field = "VmHWM:" if peak else "VmRSS:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def base_env(**values: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in values.items() if v is not None})
    return env


def worker_command() -> list[str]:
    """`relay worker` once the CLI has it; until then the same function through python -c."""
    probe = subprocess.run([RELAY, "worker", "--help"], capture_output=True, timeout=60,
                           cwd=tempfile.gettempdir(), env=base_env())
    if probe.returncode == 0:
        return [RELAY, "worker"]
    return [PYTHON, "-c", "from relay.settings import load_settings; "
            "from relay.scheduler import run_worker; run_worker(load_settings())"]


class Processes:
    """Starts processes in their own session and guarantees they are all gone at `close()`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self._worker_argv: list[str] | None = None
        self._count = 0

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> Proc:
        self._count += 1
        log_path = self.workdir / f"{self._count:02d}-{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(list(argv), cwd=self.workdir, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        proc = Proc(name, list(argv), popen, log_path)
        self.procs.append(proc)
        return proc

    def sandbox(self, *flags: str) -> Sandbox:
        port = free_port()
        proc = self.start("sandbox", [RELAY, "sandbox", "--port", str(port),
                                      "--api-key", f"production={PROD_KEY}",
                                      "--api-key", f"staging={STAGING_KEY}", *flags], base_env())
        box = Sandbox(f"http://127.0.0.1:{port}", proc)
        wait_until(lambda: proc.alive() and box.get("/sandbox/faults").ok or self._dead(proc),
                   30, "the sandbox to answer")
        return box

    def server(self, env: dict[str, str], workers: int = 2, threads: int = 8,
               with_worker: bool = False, name: str = "server") -> Server:
        port = free_port()
        argv = [RELAY, "serve", "--port", str(port), "--workers", str(workers),
                "--threads", str(threads)]
        if with_worker:
            argv.append("--with-worker")
        proc = self.start(name, argv, env)
        server = Server(f"http://127.0.0.1:{port}", port, proc)

        def ready() -> bool:
            self._dead(proc)
            answer = requests.get(server.url + "/readyz", timeout=5)
            return answer.status_code == 200 and len(proc.children()) == workers

        wait_until(ready, 60, f"{name} to be ready")
        return server

    def worker(self, env: dict[str, str], name: str = "worker") -> Proc:
        return self.workers(env, [name])[0]

    def workers(self, env: dict[str, str], names: Sequence[str]) -> list[Proc]:
        """Start `relay worker` processes together, then wait until each has started."""
        if self._worker_argv is None:
            self._worker_argv = worker_command()
        started = [self.start(name, self._worker_argv, env) for name in names]
        for proc in started:
            wait_until(lambda p=proc: self._dead(p) or " started on " in p.log(), 60,
                       f"{proc.name} to start")
        return started

    def _dead(self, proc: Proc) -> bool:
        if not proc.alive():
            self.stop(proc)
            raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                                 f"{proc.tail()}")
        return False

    def kill9(self, proc: Proc) -> None:
        """`kill -9` of that one process (not its group: a worker has no children)."""
        if proc.popen.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.popen.wait(timeout=30)

    def stop(self, proc: Proc, timeout: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after `timeout`, then reaped.

        The leader is reaped last: until then its id cannot be reused, so signalling the
        group can only reach processes this scenario started.
        """
        if proc.popen.returncode is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while proc.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(proc.pid, signal.SIGKILL)
        proc.popen.wait(timeout=30)

    def close(self) -> None:
        for proc in reversed(self.procs):
            with suppress(Exception):
                self.stop(proc, timeout=10.0)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Our processes lead their own session, so the group id is the pid we started."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# --- HTTP ends ---------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    port: int
    proc: Proc

    def workers(self) -> list[int]:
        return self.proc.children()


@dataclass
class Sandbox:
    url: str
    proc: Proc

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=30)

    def faults(self, **values: Any) -> dict[str, Any]:
        answer = requests.post(self.url + "/sandbox/faults", json=values, timeout=10)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def stats(self) -> dict[str, Any]:
        return dict(self.get("/sandbox/stats").json())

    def event_counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.stats()["event_ids"].items()}

    def requests_log(self) -> list[dict[str, Any]]:
        return list(self.get("/sandbox/requests").json()["requests"])


class Clients:
    """A thread pool whose threads each keep one `requests.Session` (closed at the end)."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="client")
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        current = getattr(self._local, "session", None)
        if current is None:
            current = requests.Session()
            self._local.session = current
            with self._lock:
                self._sessions.append(current)
        return current

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        with self._lock:
            for session in self._sessions:
                session.close()

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass
class Answer:
    status: int | None  # None: no HTTP answer (connection refused or reset)
    body: Any = None
    error: str | None = None
    at: float = field(default_factory=time.monotonic)


def post_webhook(session: requests.Session, base_url: str, body: Any,
                 environment: str = "production", secret: str | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 30.0) -> Answer:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    if headers is None:
        headers = {"Content-Type": "application/json",
                   "X-Extole-Signature": sign(raw, secret or SECRETS[environment])}
    try:
        answer = session.post(f"{base_url}/webhooks/extole/{environment}", data=raw,
                              headers=headers, timeout=timeout)
    except requests.RequestException as error:
        return Answer(None, error=f"{type(error).__name__}: {error}"[:300])
    try:
        parsed: Any = answer.json()
    except ValueError:
        parsed = answer.text[:300]
    return Answer(answer.status_code, parsed)


# --- events ------------------------------------------------------------------------------------

BASE_TIME = datetime(2026, 11, 20, 12, 0, 0, tzinfo=UTC)


def make_event(event_id: str, person: str, seq: int = 0, *, email: bool = False,
               extole_type: str = "reward_earned") -> dict[str, Any]:
    """A flat Extole event; `seq` orders one person's events (it is the event time in ms)."""
    moment = BASE_TIME + timedelta(milliseconds=seq)
    event: dict[str, Any] = {
        "type": extole_type,
        "event_id": event_id,
        "event_time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "partner_user_id": person,
        "reward_id": f"reward-{event_id}",
        "face_value": 10,
        "face_value_type": "USD",
        "data": {"journey_name": "refer-a-friend", "seq": seq},
    }
    if email:
        event["email"] = f"{person}@example.com"
    return event


def run_id() -> str:
    return uuid.uuid4().hex[:8]


class Trickle:
    """Genuine signed webhooks posted one at a time, `pause` apart, from a thread while a scenario
    attacks the receiver: the evidence that real traffic keeps being served. Each answer's status
    and time goes to `answers`, each acknowledged event id to `acknowledged` (for `audit`).
    Event n is `<tag>-genuine-<n>` of person `<tag>-<person><n % people>`."""

    def __init__(self, base_url: str, tag: str, acknowledged: dict[str, str], *, person: str,
                 people: int, pause: float) -> None:
        self.base_url, self.tag, self.acknowledged = base_url, tag, acknowledged
        self.person, self.people, self.pause = person, people, pause
        self.answers: list[tuple[int | None, float]] = []
        self._running = threading.Event()
        self._first = 0
        self._thread = threading.Thread(target=self._run, name="genuine")

    def post(self, session: requests.Session, n: int) -> None:
        """Post event n now, in the calling thread."""
        event_id = f"{self.tag}-genuine-{n}"
        started = time.monotonic()
        answer = post_webhook(session, self.base_url,
                              make_event(event_id, f"{self.tag}-{self.person}{n % self.people}",
                                         n))
        self.answers.append((answer.status, time.monotonic() - started))
        if answer.status == 200:
            self.acknowledged[event_id] = "production"

    def start(self, first: int = 0) -> None:
        """Post events first, first + 1, ... from the thread until `stop`."""
        self._first = first
        self._running.set()
        self._thread.start()

    def stop(self) -> None:
        self._running.clear()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        with requests.Session() as session:
            for n in itertools.count(self._first):
                if not self._running.is_set():
                    return
                self.post(session, n)
                time.sleep(self.pause)


# --- databases ---------------------------------------------------------------------------------


class Db:
    """The test's own view of a scenario's database (no pooling: nothing lingers)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url, poolclass=NullPool,
                                            connect_args={"connect_timeout": 5})

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(text(sql), params))

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as connection:
            return connection.execute(text(sql), params).scalar()

    def size(self) -> int:
        """Bytes the database takes on disk (PostgreSQL's own figure; WAL not included)."""
        return int(self.scalar("SELECT pg_database_size(current_database())"))

    def counts(self) -> dict[str, int]:
        return {status: int(n) for status, n in
                self.rows("SELECT status, count(*) FROM events GROUP BY status")}

    def dispose(self) -> None:
        self.engine.dispose()


class PrivatePostgres:
    """A PostgreSQL instance of our own (initdb + pg_ctl in a temporary directory) to stop at will.

    The machine's shared server is never touched. As root, the cluster belongs to the `postgres`
    user (initdb refuses root).
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="relay-private-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.admin_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 120) -> None:
        done = subprocess.run([*self.as_user, *argv], capture_output=True, timeout=timeout,
                              cwd=self.dir)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {done.stdout.decode()[-2000:]}"
                                 f"{done.stderr.decode()[-2000:]}")

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8", "--locale", "C")

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
                   "-c max_connections=200")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o",
                  options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "immediate") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60",
                  "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# --- the final audit ---------------------------------------------------------------------------


@dataclass
class Audit:
    """Every acknowledged event, delivered or explained; what Braze received, and how often."""

    acknowledged: int
    delivered: int
    dead: int
    explained_other: int
    duplicates: dict[str, int]
    missing: list[str]
    unexplained: list[str]
    delivered_not_received: list[str]
    rows: dict[str, dict[str, Any]]

    def assert_complete(self) -> None:
        assert not self.missing, f"acknowledged but not in the outbox: {self.missing[:20]}"
        assert not self.unexplained, f"neither delivered nor explained: {self.unexplained[:20]}"
        assert not self.delivered_not_received, (
            f"delivered in the database, never received by Braze: "
            f"{self.delivered_not_received[:20]}")


def audit(db: Db, box: Sandbox, acknowledged: dict[str, str]) -> Audit:
    """`acknowledged`: extole event id -> environment, for every event answered 2xx."""
    rows: dict[str, dict[str, Any]] = {}
    sendable = Counter[str]()  # rows Braze may legitimately have received, per Extole event id
    for row in db.rows("SELECT extole_event_id, environment, status, last_error, attempts, id "
                       "FROM events WHERE status <> 'rejected'"):
        rows[f"{row.environment}/{row.extole_event_id}"] = dict(row._mapping)
        if row.status in ("delivered", "dead"):
            sendable[row.extole_event_id] += 1
    received = box.event_counts()
    missing, unexplained, not_received = [], [], []
    delivered = dead = other = 0
    for event_id, environment in acknowledged.items():
        row = rows.get(f"{environment}/{event_id}")
        if row is None:
            missing.append(event_id)
        elif row["status"] == "delivered":
            delivered += 1
            if received.get(event_id, 0) < 1:
                not_received.append(event_id)
        elif row["status"] == "dead" and row["last_error"]:
            dead += 1
        elif row["status"] == "skipped" and row["last_error"]:
            other += 1
        else:
            unexplained.append(f"{event_id}: {row['status']} ({row['last_error']})")
    # The sandbox counts per Extole event id across environments: a duplicate is an id Braze
    # received more often than there are rows (one per environment) that were sent.
    duplicates = {k: v for k, v in received.items() if v > max(1, sendable[k])}
    return Audit(len(acknowledged), delivered, dead, other, duplicates, missing, unexplained,
                 not_received, rows)


def wait_drained(db: Db, timeout: float, what: str = "the outbox to drain",
                 expected: int | None = None) -> float:
    """Wait until no event is pending (and, if given, `expected` events exist); seconds taken."""
    started = time.monotonic()

    def drained() -> bool:
        counts = db.counts()
        total = sum(counts.values())
        return counts.get("pending", 0) == 0 and (expected is None or total >= expected)

    wait_until(drained, timeout, what, interval=0.5)
    return time.monotonic() - started


def relay_env(database_url: str, box: Sandbox | None, **overrides: Any) -> dict[str, str]:
    values: dict[str, Any] = {
        "RELAY_DATABASE_URL": database_url,
        "EXTOLE_WEBHOOK_SECRET": PROD_SECRET,
        "EXTOLE_STAGING_WEBHOOK_SECRET": STAGING_SECRET,
        "RELAY_ADMIN_USER": ADMIN_USER,
        "RELAY_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "RELAY_SECRET_KEY": SECRET_KEY,
        "RELAY_RETRY_BASE": 1,
        "RELAY_RETRY_MAX_DELAY": 20,
        "RELAY_LEASE_SECONDS": 10,
        "RELAY_POLL_INTERVAL": 0.5,
    }
    if box is not None:
        values.update(BRAZE_REST_ENDPOINT=box.url, BRAZE_API_KEY=PROD_KEY,
                      BRAZE_STAGING_API_KEY=STAGING_KEY)
    values.update(overrides)
    return base_env(**values)


def seeded(seed: int) -> random.Random:
    return random.Random(seed)


def order_violations(box: Sandbox, workspace: str = "production") -> tuple[int, list[str]]:
    """Per Braze profile, events must arrive in Extole event-time order: (profiles, violations)."""
    profiles = box.get("/sandbox/profiles").json()["workspaces"].get(workspace, [])
    violations = []
    for profile in profiles:
        times = [event["time"] for event in profile["events"]]
        for earlier, later in zip(times, times[1:], strict=False):
            if later < earlier:
                violations.append(f"{profile.get('external_id')}: {later} after {earlier}")
                break
    return len(profiles), violations


_CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
_CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


def admin_login(session: requests.Session, base_url: str) -> str:
    """Sign in through the login form as a browser would; answers the page's CSRF token."""
    form = session.get(f"{base_url}/admin/login", timeout=30)
    assert form.status_code == 200, form.status_code
    token = _CSRF_FIELD.search(form.text)
    assert token, "no CSRF field on the login form"
    answer = session.post(f"{base_url}/admin/login", timeout=30, allow_redirects=False, data={
        "username": ADMIN_USER, "password": ADMIN_PASSWORD, "csrf_token": token.group(1),
        "next": "/admin/"})
    assert answer.status_code == 302, (answer.status_code, answer.text[:300])
    page = session.get(f"{base_url}/admin/", timeout=30)
    assert page.status_code == 200, page.status_code
    meta = _CSRF_META.search(page.text)
    assert meta, "no csrf-token meta tag on the admin page"
    return meta.group(1)
