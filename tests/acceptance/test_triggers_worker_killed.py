"""A `relay worker` process killed (SIGKILL) while a campaign trigger request is in flight, then
restarted: no recipient gets two messages, and every trigger ends `sent` or `uncertain` (never sent
again by itself). Real processes: the worker and `relay sandbox`, on PostgreSQL, as in production.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from relay.models import Trigger
from tests.integration.test_workers import (  # noqa: F401 - fixtures
    engine,
    post_events,
    processes,
    sandbox,
    wait_for,
    worker_env,
)
from tests.support import POSTGRESQL_ONLY, Background

CAMPAIGN = "cmp-kill-9"
PEOPLE = 60  # two requests: 50 recipients, then 10
LATENCY_MS = 4000  # Braze takes this long to answer a trigger request: the kill lands inside it


def trigger_states(bind: Engine) -> dict[str, int]:
    with bind.connect() as connection:
        return dict(connection.execute(select(Trigger.state, func.count())
                                       .group_by(Trigger.state)).all())


def messages_per_recipient(base_url: str) -> Counter[str]:
    answer = requests.get(f"{base_url}/sandbox/triggers", timeout=10)
    answer.raise_for_status()
    return Counter(message["recipient"]["external_user_id"]
                   for request in answer.json()["workspaces"].get("prod", [])
                   for message in request["messages"])


@pytest.mark.slow
@POSTGRESQL_ONLY  # worker processes share the work (and NOTIFY) on PostgreSQL only
def test_a_worker_killed_mid_trigger_request_never_makes_a_second_message(
        database_url: str, engine: Engine, sandbox: str,  # noqa: F811 - fixtures
        processes: Background, client: FlaskClient, tmp_path: Path) -> None:  # noqa: F811
    event_map = tmp_path / "events.toml"
    event_map.write_text(f'[events.shared]\nbraze_event = "Shared"\ncampaign_id = "{CAMPAIGN}"\n')
    requests.post(f"{sandbox}/sandbox/faults", json={
        "latency_ms": LATENCY_MS, "fault_paths": ["/campaigns/trigger/send"]},
        timeout=10).raise_for_status()
    env = worker_env(database_url, sandbox, RELAY_EVENT_MAP=str(event_map),
                     RELAY_LEASE_SECONDS="10", BRAZE_CONNECT_TIMEOUT="1",
                     BRAZE_READ_TIMEOUT="10")
    post_events(client, [{"type": "shared", "event_id": f"k-{n:03d}",
                          "event_time": "2026-11-20T10:00:00Z",
                          "partner_user_id": f"cust-{n}"} for n in range(PEOPLE)])
    first = processes("worker", **env)
    wait_for(lambda: trigger_states(engine).get("sending", 0) > 0,
             lambda: (trigger_states(engine), processes.output(first)), 60)
    # `sending` is committed before the request leaves: give it a moment to reach the sandbox
    # (well inside the sandbox's LATENCY_MS), or a kill on a loaded host can land before it did.
    time.sleep(1.0)
    first.kill()  # SIGKILL while Braze is still answering the request
    first.wait(timeout=30)
    in_flight = trigger_states(engine)["sending"]
    assert in_flight == 50

    requests.post(f"{sandbox}/sandbox/faults", json={"latency_ms": 0},
                  timeout=10).raise_for_status()
    second = processes("worker", **env)
    # The restarted worker sends what was still due, and finds the dead worker's `sending`
    # triggers once their lease ran out: uncertain, not due.
    wait_for(lambda: not {"due", "sending"} & set(trigger_states(engine)),
             lambda: (trigger_states(engine), processes.output(second)), 90)
    time.sleep(2)  # a few more trigger runs: none of them may send anything again
    assert second.poll() is None, processes.output(second)
    assert trigger_states(engine) == {"uncertain": 50, "sent": PEOPLE - 50}

    received = messages_per_recipient(sandbox)
    assert max(received.values()) == 1  # no recipient got two messages
    with engine.connect() as connection:
        rows = connection.execute(select(Trigger.state, Trigger.recipient, Trigger.sends)).all()
    for state, recipient, sends in rows:
        assert sends == 1
        if state == "sent":
            assert received[recipient["external_user_id"]] == 1
    # The killed request did reach Braze (the sandbox finished it): exactly why it is uncertain.
    assert sum(received.values()) == PEOPLE
    assert "uncertain" in processes.output(second)
