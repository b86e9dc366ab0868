"""Shared pieces of the benchmarks: databases, processes, payloads, statistics, results.

Every benchmark creates its own PostgreSQL database on 127.0.0.1:5432 (user postgres) and drops
it at the end, or uses a SQLite file in a temporary directory. Servers, workers and the Braze
stand-in run as child processes on 127.0.0.1 ports picked at random; every run is bounded in time
and count, and each child is ended by its own pid when the run finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS_DIR = BENCH / "results"
PYTHON = sys.executable
PG_ADMIN_URL = os.environ.get(
    "RELAY_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
PROD_SECRET = "bench-prod-secret-0123456789"
BRAZE_KEY = "bench-braze-key"


# --- databases ---------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_database(prefix: str = "relay_bench", revision: str = "head") -> Iterator[str]:
    """A fresh PostgreSQL database migrated to `revision`, dropped afterwards (even after an
    error)."""
    from relay import migrate

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate.upgrade(url, revision)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def sqlite_database(revision: str = "head") -> Iterator[str]:
    from relay import migrate

    with tempfile.TemporaryDirectory(prefix="relay-bench-") as directory:
        url = f"sqlite:///{directory}/relay.db"
        migrate.upgrade(url, revision)
        yield url


@contextlib.contextmanager
def database(kind: str, revision: str = "head") -> Iterator[str]:
    with (postgres_database(revision=revision) if kind == "postgresql"
          else sqlite_database(revision)) as url:
        yield url


def scalar(url: str, sql: str, **params: Any) -> Any:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(sql), params).scalar()
    finally:
        engine.dispose()


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relay_env(url: str, braze_url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment of a relay process: only what the benchmark sets (no .env is read)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "BRAZE_", "EXTOLE_", "PROMETHEUS_"))}
    env.update({
        "RELAY_DATABASE_URL": url,
        "EXTOLE_WEBHOOK_SECRET": PROD_SECRET,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    })
    if braze_url:
        env.update({"BRAZE_REST_ENDPOINT": braze_url, "BRAZE_API_KEY": BRAZE_KEY})
    env.update(extra)
    return env


class Child:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.workdir = Path(tempfile.mkdtemp(prefix=f"relay-bench-{name}-"))
        self.log_path = self.workdir / "output.log"
        self._log = self.log_path.open("wb")
        self.started = time.time()
        self.process = subprocess.Popen(
            list(argv), env=env, cwd=str(cwd or self.workdir), stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, needle: str, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.output():
                return time.time()
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not print {needle!r}:\n{self.output()[-3000:]}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._log.close()
        if not os.environ.get("RELAY_BENCH_KEEP_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()


def wait_http(port: int, path: str = "/healthz", timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
                if answer.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}{path}")


def gunicorn(name: str, app: str, port: int, env: dict[str, str]) -> Child:
    """The production server: gunicorn with config/gunicorn.conf.py, as the README documents."""
    env = {**env, "RELAY_BIND": f"127.0.0.1:{port}"}
    child = Child(name, [str(Path(PYTHON).parent / "gunicorn"), "-c",
                         str(ROOT / "config" / "gunicorn.conf.py"), "--chdir", str(ROOT), app],
                  env=env)
    try:
        wait_http(port, "/healthz")
    except RuntimeError:
        output = child.output()[-3000:]
        child.stop()
        raise RuntimeError(f"{name} did not start:\n{output}") from None
    return child


def standin(port: int, max_objects: int = 75, receipts: bool = False) -> Child:
    argv = [PYTHON, "-m", "bench.standin", "--port", str(port), "--max-objects", str(max_objects)]
    child = Child("braze-standin", argv + (["--receipts"] if receipts else []),
                  env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_http(port, "/stats")
    return child


def worker(env: dict[str, str]) -> Child:
    """`relay worker`, as its own process (run_worker until the CLI command exists)."""
    code = ("from relay.settings import load_settings; from relay.scheduler import run_worker; "
            "run_worker(load_settings())")
    return Child("worker", [PYTHON, "-c", code], env=env)


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes (those still alive)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / _TICKS


def postgres_backends(url: str) -> list[int]:
    """Server process ids of the connections to this benchmark's database."""
    name = url.rsplit("/", 1)[1]
    engine = create_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as connection:
            return [int(p) for p in connection.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = :name"), {"name": name}
            ).scalars()]
    finally:
        engine.dispose()


class CpuMeter:
    """CPU seconds used by some processes, and by PostgreSQL's backends for one database."""

    def __init__(self, pids: Sequence[int], url: str | None = None) -> None:
        self.pids = list(pids)
        self.url = url if url and url.startswith("postgresql") else None
        self.start = time.monotonic()
        self.process_start = cpu_seconds(self.pids)
        self.db_start = {p: cpu_seconds([p]) for p in
                         (postgres_backends(self.url) if self.url else [])}

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.start
        process = cpu_seconds(self.pids) - self.process_start
        db = 0.0
        if self.url:
            # Backends that connected meanwhile count whole; any that left meanwhile are lost.
            db = sum(cpu_seconds([p]) - self.db_start.get(p, 0.0)
                     for p in postgres_backends(self.url))
        return {"wall_s": wall, "process_cpu_s": process, "db_cpu_s": db,
                "load_average": os.getloadavg()[0]}


def get_json(port: int, path: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return json.loads(answer.read())


def post_json(port: int, path: str, body: Any = None) -> Any:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


# --- payloads ----------------------------------------------------------------------------------


def reward_event(n: int, run: str) -> dict[str, Any]:
    """An Extole reward event like tests/samples/reward_earned.json, unique per (run, n)."""
    return {
        "type": "reward_earned",
        "event_id": f"{run}-{n}",
        "event_time": "2026-11-20T14:14:18.548Z",
        "reward_id": f"rw{n:022d}",
        "reward_supplier_name": "Advocate Account Credit",
        "reward_supplier_id": "71b0c2d3e4f5061728394a5b",
        "partner_reward_supplier_id": "Advocate Account Credit",
        "reward_supplier_type": "CUSTOM_REWARD",
        "person_id": str(6816411215104951917 + n),
        "partner_user_id": f"cust-{n % 50000}",
        "face_value": 50,
        "face_value_type": "USD",
        "data": {
            "recipient_email": f"person{n % 50000}@example.com",
            "journey_name": "refer-a-friend",
            "rewardee_role": "ADVOCATE",
            "earned_event_value": "120.00",
        },
        "message": None,
        "schema_version": 1,
    }


def signed_body(n: int, run: str) -> tuple[bytes, str]:
    from relay.authentication import sign

    body = json.dumps(reward_event(n, run), separators=(",", ":")).encode()
    return body, sign(body, PROD_SECRET)


# --- statistics and results --------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values)}


def machine() -> dict[str, Any]:
    pg_version = None
    with contextlib.suppress(Exception):
        pg_version = scalar(PG_ADMIN_URL, "SHOW server_version")
    return {"cores": os.cpu_count(), "python": platform.python_version(),
            "postgresql": pg_version, "sqlite": __import__("sqlite3").sqlite_version,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_before": os.getloadavg()[0]}


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    data = {"benchmark": name, "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
