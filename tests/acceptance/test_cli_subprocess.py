"""The installed `relay` command in real processes: what an operator types, and what they see."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from relay.authentication import sign
from tests.support import PROD_SECRET, Background, free_port, sample

pytestmark = pytest.mark.slow

RELAY = Path(sys.executable).parent / "relay"
COMMANDS = ["check-config", "db", "events", "forget", "init", "purge", "reconcile", "sandbox",
            "serve", "triggers", "worker"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The machine's environment without any relay setting, a fresh SQLite file and TMPDIR."""
    (tmp_path / "tmp").mkdir()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RELAY_", "BRAZE_", "EXTOLE_", "PROMETHEUS_"))}
    return {**base, "TMPDIR": str(tmp_path / "tmp"), "EXTOLE_WEBHOOK_SECRET": PROD_SECRET,
            "RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/relay.db"}


@pytest.fixture
def relay(env: dict[str, str], tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(RELAY), *args], capture_output=True, text=True,
                              env={**env, **extra}, cwd=tmp_path, timeout=120)

    return run


@pytest.fixture
def spawn(env: dict[str, str], tmp_path: Path) -> Iterator[Background]:
    """`relay ARGS` in the background; whatever is still running at the end is stopped."""
    background = Background([str(RELAY)], env, tmp_path)
    yield background
    background.stop_all()


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (Linux's /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    if len(address) == 8:
                        found.add(socket.inet_ntop(socket.AF_INET,
                                                   bytes.fromhex(address)[::-1]))
                    else:
                        found.add(socket.inet_ntop(socket.AF_INET6, b"".join(
                            bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8))))
    return found


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = requests.get(url, timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_help_lists_every_command(relay: Callable[..., Any]) -> None:
    result = relay("--help")
    assert result.returncode == 0
    listed = result.stdout.split("Commands:")[1].strip().splitlines()
    assert [line.split()[0] for line in listed] == COMMANDS


def test_db_upgrade_on_a_new_sqlite_file(relay: Callable[..., Any], tmp_path: Path) -> None:
    result = relay("db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("database at ")
    assert (tmp_path / "relay.db").is_file()
    assert "(newest)" in relay("db", "current").stdout


def test_invalid_setting_prints_one_line_and_exits_2(relay: Callable[..., Any]) -> None:
    for command in (["events", "list"], ["serve"], ["worker"], ["check-config"]):
        result = relay(*command, RELAY_LOG_FORMAT="xml")
        assert result.returncode == 2, command
        assert result.stderr.splitlines() == [
            "relay: invalid setting: RELAY_LOG_FORMAT: must be one of text, json, got 'xml'"]
        assert result.stdout == ""


SERVE_PROBE = """
import sys, relay.server
def probe(*args, **kwargs):
    print("prometheus_client" in sys.modules)
relay.server.serve = probe
from relay.cli import cli
cli.main(["serve"], prog_name="relay", standalone_mode=False)
"""


def test_serve_reaches_gunicorn_before_prometheus_is_loaded(env: dict[str, str],
                                                            tmp_path: Path) -> None:
    """prometheus-client picks single- or multi-process mode when first imported, so nothing on
    the way to `relay.server.serve` (which sets the mode up) may import it."""
    result = subprocess.run([sys.executable, "-c", SERVE_PROBE], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def post(port: int, body: bytes) -> int:
    headers = {"Content-Type": "application/json", "X-Extole-Signature": sign(body, PROD_SECRET),
               "Connection": "close"}
    return requests.post(f"http://127.0.0.1:{port}/webhooks/extole/production", data=body,
                         headers=headers, timeout=10).status_code


def test_serve_with_two_workers_then_events_list(relay: Callable[..., Any],
                                                 spawn: Background,
                                                 tmp_path: Path) -> None:
    assert relay("db", "upgrade").returncode == 0
    port = free_port()
    server = spawn("serve", "--port", str(port), "--workers", "2", "--threads", "2")
    spawn.wait_for(f"http://127.0.0.1:{port}/healthz", server)
    bodies = [json.dumps({"type": "shared", "event_id": f"acc-{n}", "partner_user_id": f"c{n}",
                          "event_time": "2026-11-20T10:00:00Z"}).encode() for n in range(16)]
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda body: post(port, body), bodies)) == {200}
    assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200

    # Whichever worker answers the scrape, it reports what every worker counted.
    for _ in range(6):
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        assert samples[("relay_webhooks_received_total", frozenset(
            {("environment", "production"), ("outcome", "accepted")}))] == 16
        assert samples[("relay_outbox_events", frozenset({("status", "pending")}))] == 16
    [metrics_dir] = (tmp_path / "tmp").glob("relay-metrics-*")
    assert list(metrics_dir.glob("counter_*.db")), "workers are not in multiprocess mode"

    listing = relay("events", "list", "--limit", "5")
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split()[:5] == ["id", "received", "(UTC)", "env", "status"]
    assert [row.split()[0] for row in rows[:5]] == ["16", "15", "14", "13", "12"]
    assert all(" production  pending " in row for row in rows[:5])
    assert rows[-1] == "more: add --before 12"

    assert spawn.stop(server) == 0
    assert not metrics_dir.exists()


def test_worker_delivers_exposes_metrics_and_stops_on_sigterm(
        relay: Callable[..., Any], spawn: Background, env: dict[str, str]) -> None:
    from relay import create_app
    from relay.db import get_db
    from relay.settings import Settings

    assert relay("db", "upgrade").returncode == 0
    app = create_app(Settings(database_url=env["RELAY_DATABASE_URL"],
                              extole_webhook_secret=PROD_SECRET), TESTING=True)
    for name in ("reward_earned.json", "subscribed.json", "batch.json"):
        body = sample(name)
        response = app.test_client().post("/webhooks/extole/production", data=body, headers={
            "Content-Type": "application/json", "X-Extole-Signature": sign(body, PROD_SECRET)})
        assert response.status_code == 200
    get_db(app).dispose()

    braze_port, metrics_port = free_port(), free_port()
    braze = spawn("sandbox", "--port", str(braze_port))
    spawn.wait_for(f"http://127.0.0.1:{braze_port}/sandbox/profiles", braze)
    worker = spawn("worker", "--metrics-port", str(metrics_port),
                   BRAZE_REST_ENDPOINT=f"http://127.0.0.1:{braze_port}",
                   BRAZE_API_KEY="acceptance-key", BRAZE_EXPORT_RATE="1000/minute")
    spawn.wait_for(f"http://127.0.0.1:{metrics_port}/metrics", worker)
    assert listening_addresses(metrics_port) == {"127.0.0.1"}  # not every interface

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listing = relay("events", "list", "--status", "delivered").stdout
        if len(listing.splitlines()) == 6:  # header and five events
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"not delivered: {relay('events', 'list').stdout}\n"
                             f"{spawn.output(worker)}")
    samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    delivered = ("relay_events_total", frozenset({("environment", "production"),
                                                  ("status", "delivered")}))
    assert samples[delivered] == 5

    assert spawn.stop(worker) == 0
    log = spawn.output(worker)
    assert "stopped" in log and "Traceback" not in log
    assert "acceptance-key" not in log


def test_worker_metrics_host_chooses_the_address(relay: Callable[..., Any],
                                                 spawn: Background) -> None:
    assert relay("db", "upgrade").returncode == 0
    port = free_port()
    worker = spawn("worker", "--metrics-port", str(port), "--metrics-host", "127.0.0.2")
    spawn.wait_for(f"http://127.0.0.2:{port}/metrics", worker)
    assert listening_addresses(port) == {"127.0.0.2"}
    assert spawn.stop(worker) == 0
