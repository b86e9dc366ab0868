"""Nobody without the secret can fill the disk: a real `relay serve` (gunicorn) on PostgreSQL.

Unauthenticated 1 MiB requests of every kind (no credentials, a wrong Bearer or Basic secret, a
wrong signature, an unknown environment) grow the database by a few kilobytes, not by their
bodies, while genuine signed webhooks keep getting 200. Bounded here (FLOOD requests); the
reliability scenario 10 sends 1,000 (README, "Refused requests").
"""

from __future__ import annotations

import base64
import itertools
import os
import random
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from relay.authentication import sign
from tests.support import PROD_SECRET, Background, free_port, fresh_database, signed

pytestmark = pytest.mark.slow

RELAY = Path(sys.executable).parent / "relay"
FLOOD = 100  # beyond RELAY_REFUSED_LOG_RATE (60): some logged one by one, the rest counted
MIB = 1024 * 1024
LIMIT_BYTES = 1_000_000
# Incompressible, as an attacker would choose: PostgreSQL compresses what it stores.
BODY = random.Random(13).randbytes(MIB)
KINDS = {
    "no credentials": ("production", {}),
    "wrong bearer": ("production", {"Authorization": "Bearer not-the-secret"}),
    "wrong basic": ("production", {"Authorization": "Basic "
                                   + base64.b64encode(b"extole:wrong").decode()}),
    "wrong signature": ("production", {"X-Extole-Signature": sign(BODY, "not-the-secret")}),
    "unknown environment": ("qa", {"X-Extole-Signature": sign(BODY, PROD_SECRET)}),
}


def database_bytes(url: str) -> int:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return int(connection.execute(
                text("SELECT pg_database_size(current_database())")).scalar_one())
    finally:
        engine.dispose()


def test_unauthenticated_flood_grows_the_database_by_kilobytes(tmp_path: Path,
                                                               postgres_server: None) -> None:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RELAY_", "BRAZE_", "EXTOLE_", "PROMETHEUS_"))}
    with fresh_database("relay_flood", migrated=True) as url:
        background = Background([str(RELAY)], {**base, "RELAY_DATABASE_URL": url,
                                               "EXTOLE_WEBHOOK_SECRET": PROD_SECRET}, tmp_path)
        try:
            port = free_port()
            server = background("serve", "--port", str(port), "--workers", "2",
                                "--threads", "4")
            base_url = f"http://127.0.0.1:{port}"
            background.wait_for(f"{base_url}/healthz", server)
            # One genuine webhook first: the tables' first pages are not the flood's doing.
            first = b'{"type": "shared", "event_id": "genuine-first", "partner_user_id": "c"}'
            assert requests.post(f"{base_url}/webhooks/extole/production", data=first,
                                 headers=signed(first), timeout=60).status_code == 200
            before = database_bytes(url)
            answers: Counter[tuple[str, int | str]] = Counter()
            genuine: list[int] = []
            done = threading.Event()

            def attack(kind: str) -> None:
                environment, headers = KINDS[kind]
                try:
                    status: int | str = requests.post(
                        f"{base_url}/webhooks/extole/{environment}", data=BODY, timeout=60,
                        headers={"Content-Type": "application/json", **headers}).status_code
                except requests.ConnectionError:
                    # A body the server refused unread: gunicorn drains 64 KiB of it, then
                    # closes the connection, perhaps before the client has read the answer.
                    status = "connection closed"
                answers[(kind, status)] += 1

            def post_genuine() -> None:
                for n in itertools.count():
                    if done.is_set() and n >= 5:
                        return
                    body = (f'{{"type": "shared", "event_id": "genuine-{n}", '
                            f'"partner_user_id": "cust-{n}"}}').encode()
                    genuine.append(requests.post(f"{base_url}/webhooks/extole/production",
                                                 data=body, headers=signed(body),
                                                 timeout=60).status_code)
                    done.wait(0.1)  # a steady trickle, not a second flood

            with ThreadPoolExecutor(5) as pool:
                steady = pool.submit(post_genuine)
                kinds = itertools.islice(itertools.cycle(KINDS), FLOOD)
                flood = [pool.submit(attack, kind) for kind in kinds]
                for future in flood:
                    future.result(timeout=300)
                done.set()
                steady.result(timeout=300)
            after = database_bytes(url)
        finally:
            background.stop_all()

    refused = {status for _, status in answers}
    assert refused <= {401, 404, "connection closed"}, answers
    assert {kind for kind, status in answers if status == "connection closed"} <= {
        "no credentials", "wrong bearer", "wrong basic"}, answers  # only bodies never read
    assert answers[("unknown environment", 404)] == FLOOD // len(KINDS)
    assert answers[("wrong signature", 401)] == FLOOD // len(KINDS)
    assert genuine and set(genuine) == {200}, genuine
    # Before the fix every refused request kept its body: FLOOD MiB.
    assert after - before < LIMIT_BYTES, (before, after, answers)
