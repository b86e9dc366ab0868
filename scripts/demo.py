"""`make demo`: relay and the sandbox (Braze, and Extole's rewards API) side by side.

Starts `relay sandbox` and `relay serve --with-worker` on free local ports with a throwaway
SQLite database, posts each sample webhook of tests/samples (the staging ones to staging; rewards
as Extole's reward webhooks post them, and a reshaped reward body to `?type=earned_reward`), then
gives the sandbox's Extole a page of rewards, one of them in a state whose webhook never came, and
runs `relay reconcile`: it backfills what only reconciliation can bring in. It waits for delivery,
then prints how each event ended (reconciled ones marked) and what each Braze profile now holds.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, text

from relay.authentication import sign

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "samples"
# A reshaped reward body without a type: its webhook URL names the type (README, "Reward events").
QUERIES = {"reward_no_type.json": "?type=earned_reward"}
RELAY = str(Path(sys.executable).parent / "relay")
TIMEOUT = 60.0
REWARDS_PAGE = "extole_rewards_page.json"  # Extole's rewards API answer, not a webhook
EXTOLE_TOKEN = secrets.token_hex(16)  # the sandbox accepts it for program production


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"demo: {url} did not come up")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="relay-demo-"))
    sandbox_port, relay_port = free_port(), free_port()
    env = {
        **os.environ,
        "RELAY_DATABASE_URL": f"sqlite:///{workdir}/demo.db",
        "BRAZE_REST_ENDPOINT": f"http://127.0.0.1:{sandbox_port}",
        "BRAZE_API_KEY": "demo-production-key",
        "BRAZE_STAGING_API_KEY": "demo-staging-key",
        "EXTOLE_WEBHOOK_SECRET": secrets.token_hex(16),
        "EXTOLE_STAGING_WEBHOOK_SECRET": secrets.token_hex(16),
        "RELAY_POLL_INTERVAL": "0.5",
        "EXTOLE_API_TOKEN": EXTOLE_TOKEN,
        "EXTOLE_API_URL": f"http://127.0.0.1:{sandbox_port}",
        "RELAY_RECONCILE_INTERVAL": "0",  # the demo runs `relay reconcile` itself
        "RELAY_LOG_FORMAT": "text",
    }
    processes: list[subprocess.Popen[bytes]] = []
    log = open(workdir / "demo.log", "wb")  # noqa: SIM115 - closed in finally
    try:
        subprocess.run([RELAY, "db", "upgrade"], env=env, check=True, cwd=workdir,
                       stdout=subprocess.DEVNULL)
        processes.append(subprocess.Popen(
            [RELAY, "sandbox", "--port", str(sandbox_port),
             "--api-key", "production=demo-production-key",
             "--api-key", "staging=demo-staging-key",
             "--extole-token", f"production={EXTOLE_TOKEN}"],
            env=env, cwd=workdir, stdout=log, stderr=log))
        processes.append(subprocess.Popen(
            [RELAY, "serve", "--port", str(relay_port), "--workers", "1", "--with-worker"],
            env=env, cwd=workdir, stdout=log, stderr=log))
        deadline = time.monotonic() + TIMEOUT
        wait_for(f"http://127.0.0.1:{sandbox_port}/sandbox/stats", deadline)
        wait_for(f"http://127.0.0.1:{relay_port}/healthz", deadline)
        print(f"relay on :{relay_port}, Braze sandbox on :{sandbox_port}, data in {workdir}\n")
        for path in sorted(SAMPLES.glob("*.json")):
            if path.name == REWARDS_PAGE:
                continue
            environment = "staging" if "staging" in path.name else "production"
            secret = env["EXTOLE_STAGING_WEBHOOK_SECRET" if environment == "staging"
                         else "EXTOLE_WEBHOOK_SECRET"]
            body = path.read_bytes()
            query = QUERIES.get(path.name, "")
            answer = requests.post(
                f"http://127.0.0.1:{relay_port}/webhooks/extole/{environment}{query}", data=body,
                headers={"Content-Type": "application/json",
                         "X-Extole-Signature": sign(body, secret)}, timeout=10)
            print(f"POST {path.name + query:<40} -> {environment:<10} {answer.status_code} "
                  f"{answer.text.strip()}")
        reconcile(env, workdir, sandbox_port)
        engine = create_engine(env["RELAY_DATABASE_URL"])
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                pending = connection.execute(text(
                    "SELECT count(*) FROM events WHERE status = 'pending' AND attempts = 0 "
                    "AND (last_error IS NULL OR last_error NOT LIKE 'waiting%')")).scalar()
            if not pending:
                break
            time.sleep(0.5)
        time.sleep(1.0)
        print("\nEvents:")
        with engine.connect() as connection:
            for row in connection.execute(text(
                    "SELECT id, environment, extole_event_id, braze_event, status, last_error "
                    "FROM events ORDER BY id")):
                reason = f"  ({row.last_error})" if row.last_error else ""
                extole_id = row.extole_event_id or "-"
                if extole_id.startswith("reconciled:"):  # only reconciliation brought it in
                    extole_id = "reconciled " + extole_id.split(":")[1][:8] + "…:" + \
                        extole_id.split(":")[2]
                print(f"  #{row.id:<3} {row.environment:<10} {extole_id:<28} "
                      f"{row.braze_event or '-':<20} {row.status}{reason}")
        engine.dispose()
        profiles = requests.get(f"http://127.0.0.1:{sandbox_port}/sandbox/profiles",
                                timeout=10).json()
        print("\nBraze profiles now:")
        for workspace, people in profiles.get("workspaces", {}).items():
            print(f"  workspace {workspace}:")
            for person in people:
                print("    " + describe(person))
        return 0
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def reconcile(env: dict[str, str], workdir: Path, sandbox_port: int) -> None:
    """Extole's rewards API lists the rewards of the sample page, the first one now SENT: its
    FULFILLED webhook was posted above, its SENT one never came. `relay reconcile` (over a window
    reaching back to the samples' dates) backfills what is missing."""
    page = json.loads((SAMPLES / REWARDS_PAGE).read_text("utf-8"))
    answer = requests.post(f"http://127.0.0.1:{sandbox_port}/sandbox/extole/rewards", json=page,
                           timeout=10)
    answer.raise_for_status()
    print(f"\nExtole's rewards API now lists {len(page)} rewards: "
          + ", ".join(f"{r['reward_id'][:8]}… {r['state']}" for r in page))
    oldest = min(reward["created_at"] for reward in page)[:10] + "T00:00:00Z"
    print(f"$ relay reconcile --since {oldest}")
    result = subprocess.run([RELAY, "reconcile", "--since", oldest], env=env, cwd=workdir,
                            capture_output=True, text=True, timeout=60)
    print("  " + result.stdout.strip().replace("\n", "\n  "))
    if result.returncode:
        print(result.stderr.strip().splitlines()[-1])


def describe(profile: dict[str, Any]) -> str:
    who = profile.get("external_id") or (
        "alias " + json.dumps(profile.get("user_aliases")) if profile.get("user_aliases")
        else profile.get("braze_id"))
    events = ", ".join(e.get("name", "?") for e in profile.get("events", []))
    attributes = json.dumps(profile.get("attributes", {}), sort_keys=True)
    email = profile.get("email") or "-"
    groups = profile.get("subscription_groups") or {}
    shown = f" subscription_groups={json.dumps(groups, sort_keys=True)}" if groups else ""
    return f"{who} <{email}> attributes={attributes}{shown} events=[{events}]"


if __name__ == "__main__":
    sys.exit(main())
