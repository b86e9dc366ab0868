"""Campaign and Canvas triggers (README, "Campaign and Canvas triggers"): started once an event is
delivered, with the identifier it was delivered under and its properties; sent at most once.

Braze is the sandbox on a free port (strict as Braze, keeping every message it was asked to send),
or `responses` where a failure must be exact. Every test looks at what the sandbox received and at
the rows: a recipient never gets a second message unless an operator resends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from sqlalchemy import select, update
from sqlalchemy.orm import undefer_group

from relay import privacy, triggers
from relay.db import utcnow
from relay.models import AttemptEvent, DeliveryAttempt, OutboxEvent, QueuedEvent, Trigger
from relay.outbox import leases
from relay.settings import Settings
from relay.worker import Worker
from tests.support import BRAZE_URL, PROD_KEY, SAMPLES, free_port, post_ids, stored_events

CAMPAIGN = "cmp-5a1e-shared"
CANVAS = "cnv-77d0-signup"
COUPON_CAMPAIGN = "cmp-90c3-coupon"
EVENT_MAP = f"""
[events.shared]
braze_event = "Shared"
aliases = ["share", "extole_shared"]
campaign_id = "{CAMPAIGN}"

[events.referred_signed_up]
braze_event = "Referred Signed Up"
aliases = ["signed_up", "registered"]
canvas_id = "{CANVAS}"

[rewards.fulfilled]
braze_event = "Reward Fulfilled"
campaign_id = "{COUPON_CAMPAIGN}"
"""
TRIGGER = BRAZE_URL + "/campaigns/trigger/send"
TRACK = BRAZE_URL + "/users/track"


def shared(number: int, **extra: Any) -> dict[str, Any]:
    return {"type": "shared", "event_id": f"sh-{number:04d}",
            "event_time": f"2026-11-20T10:{number // 60 % 60:02d}:{number % 60:02d}Z",
            "partner_user_id": f"cust-{number}", "share_link": f"https://refer.example/{number}",
            "channel": "email", **extra}


@pytest.fixture
def event_map(tmp_path: Path) -> str:
    path = tmp_path / "events.toml"
    path.write_text(EVENT_MAP)
    return str(path)


@pytest.fixture
def worker_for(make_settings: Callable[..., Settings], make_worker: Callable[..., Worker],
               event_map: str) -> Callable[..., Worker]:
    """A worker whose event map starts the campaigns above, against Braze at `endpoint`."""

    def factory(endpoint: str = BRAZE_URL, **overrides: Any) -> Worker:
        return make_worker(make_settings(braze_rest_endpoint=endpoint, event_map=event_map,
                                         **overrides))

    return factory


def messages(sandbox: str, workspace: str = "prod") -> list[dict[str, Any]]:
    """Every message the sandbox was asked to send, in order, with its request's target."""
    answer = requests.get(f"{sandbox}/sandbox/triggers", timeout=10)
    answer.raise_for_status()
    found = []
    for request in answer.json()["workspaces"].get(workspace, []):
        target = request.get("campaign_id") or request.get("canvas_id")
        found.extend({"target": target, **message} for message in request["messages"])
    return found


def faults(sandbox: str, **values: Any) -> None:
    requests.post(f"{sandbox}/sandbox/faults", json=values, timeout=10).raise_for_status()


def stored_triggers(app: Flask) -> list[Trigger]:
    with app.extensions["relay.db"].session() as session:
        return list(session.scalars(select(Trigger).order_by(Trigger.id)))


def states(app: Flask) -> list[str]:
    return [t.state for t in stored_triggers(app)]


def make_due(app: Flask) -> None:
    """Time passes: every due trigger is due now (instead of sleeping until a reset)."""
    with app.extensions["relay.db"].session() as session:
        session.execute(update(Trigger).where(Trigger.state == "due")
                        .values(due_at=utcnow() - timedelta(seconds=1)))


def trigger_attempts(app: Flask) -> list[DeliveryAttempt]:
    with app.extensions["relay.db"].session() as session:
        return list(session.scalars(select(DeliveryAttempt).where(
            DeliveryAttempt.endpoint.in_(["/campaigns/trigger/send", "/canvas/trigger/send"]))
            .order_by(DeliveryAttempt.id)))


# -- sent once, to the right person, with the event's properties -------------------------------

def test_a_delivered_event_starts_its_campaign_once_with_its_properties(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    [event_id] = post_ids(post_webhook, shared(1))
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=10)
    assert worker.send_triggers() == 1
    assert worker.send_triggers() == 0  # nothing more is due: never a second request
    [trigger] = stored_triggers(app)
    assert (trigger.event_id, trigger.kind, trigger.target_id, trigger.state, trigger.sends,
            trigger.recipient) == (event_id, "campaign", CAMPAIGN, "sent", 1,
                                   {"external_user_id": "cust-1"})
    [event] = stored_events(app)
    assert messages(sandbox_url) == [{
        "target": CAMPAIGN, "recipient": {"external_user_id": "cust-1"},
        "properties": event.properties, "profile_found": True}]
    assert event.properties is not None
    assert event.properties["extole_event_id"] == "sh-0001"
    assert event.properties["channel"] == "email"
    # Recorded like /users/track requests, linked to the event, shown on its page.
    [attempt] = trigger_attempts(app)
    assert json.loads(attempt.request_body or "") == {
        "campaign_id": CAMPAIGN,
        "recipients": [{"external_user_id": "cust-1", "trigger_properties": event.properties}]}
    assert attempt.status_code == 201 and attempt.error is None
    assert json.loads(attempt.response_body or "")["message"] == "success"
    with app.extensions["relay.db"].session() as session:
        assert session.execute(select(AttemptEvent.event_id, AttemptEvent.outcome).where(
            AttemptEvent.attempt_id == attempt.id)).all() == [(event_id, "trigger sent")]


def test_an_email_only_event_starts_its_canvas_under_the_alias_it_was_delivered_under(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    post_ids(post_webhook, {"type": "signed_up", "event_id": "su-1",
                            "event_time": "2026-11-20T10:00:00Z", "email": "Dee@Example.net",
                            "coupon_code": "WELCOME-10"})
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=10)
    worker.send_triggers()
    alias = {"alias_name": "dee@example.net", "alias_label": "email"}
    [trigger] = stored_triggers(app)
    assert (trigger.kind, trigger.target_id, trigger.state, trigger.recipient) == (
        "canvas", CANVAS, "sent", {"user_alias": alias})
    [message] = messages(sandbox_url)
    assert message["target"] == CANVAS
    assert message["recipient"] == {"user_alias": alias}
    assert message["properties"]["coupon_code"] == "WELCOME-10"
    assert message["profile_found"] is True  # the alias profile delivery created
    [attempt] = trigger_attempts(app)
    assert "canvas_entry_properties" in json.loads(attempt.request_body or "")["recipients"][0]


def test_a_fulfilled_reward_sends_one_message_carrying_its_coupon_code(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    """The issue's "done when": Extole's own FULFILLED body (a reward event, named by
    `[rewards.fulfilled]`), a campaign configured for that state. Posted again, under its own
    event id or another one (the same reward in the same state), it starts nothing more."""
    body = json.loads((SAMPLES / "reward_fulfilled_coupon.json").read_text())
    [event_id] = post_ids(post_webhook, body)
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=10)
    worker.send_triggers()
    worker.send_triggers()
    [message] = messages(sandbox_url)
    assert message["target"] == COUPON_CAMPAIGN
    assert message["recipient"] == {"user_alias": {"alias_name": "bo.chen@example.org",
                                                   "alias_label": "email"}}
    assert message["properties"]["coupon_code"] == "FRIEND20-7QX4"
    assert message["properties"]["reward_state"] == "FULFILLED"
    [trigger] = stored_triggers(app)
    assert (trigger.event_id, trigger.kind, trigger.target_id, trigger.state) == (
        event_id, "campaign", COUPON_CAMPAIGN, "sent")
    [attempt] = trigger_attempts(app)
    [recipient] = json.loads(attempt.request_body or "")["recipients"]
    assert recipient["trigger_properties"]["coupon_code"] == "FRIEND20-7QX4"
    assert recipient["trigger_properties"]["reward_state"] == "FULFILLED"

    for again in (body, {**body, "event_id": "6d1f4a0b2c9e8d7f6a5b4cff"}):
        answer = post_webhook(again)
        assert answer.status_code == 200
        assert (answer.get_json()["accepted"], answer.get_json()["duplicates"]) == (0, 1)
    worker.drain(max_seconds=10)
    worker.send_triggers()
    assert len(messages(sandbox_url)) == 1
    assert states(app) == ["sent"] and len(stored_events(app)) == 1


def test_events_of_other_types_and_undelivered_events_start_nothing(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    post_ids(post_webhook, {"type": "referred_converted", "event_id": "cv-1",
                            "event_time": "2026-11-20T10:00:00Z", "partner_user_id": "c-1"},
             {"type": "shared", "event_id": "sh-dead", "event_time": "2026-11-20T10:00:00Z"})
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=10)
    worker.send_triggers()
    assert {e.extole_event_id: e.status for e in stored_events(app)} == {
        "cv-1": "delivered", "sh-dead": "dead"}
    assert stored_triggers(app) == []
    assert messages(sandbox_url) == []


def test_a_staging_event_skipped_for_lack_of_a_key_starts_none(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    post_ids(post_webhook, shared(1), environment="staging")
    worker = worker_for(sandbox_url, braze_staging_api_key=None)
    worker.drain(max_seconds=10)
    worker.send_triggers()
    assert [e.status for e in stored_events(app)] == ["skipped"]
    assert stored_triggers(app) == []
    assert messages(sandbox_url, "staging") == [] and messages(sandbox_url) == []


def test_a_staging_event_is_triggered_with_the_staging_key(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    post_ids(post_webhook, shared(1), environment="staging")
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=10)
    worker.send_triggers()
    assert [m["recipient"] for m in messages(sandbox_url, "staging")] == [
        {"external_user_id": "cust-1"}]
    assert messages(sandbox_url) == []


def test_a_replayed_event_does_not_start_its_campaign_again(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str, client: Any) -> None:
    [event_id] = post_ids(post_webhook, shared(1))
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=10)
    worker.send_triggers()
    answer = client.post(f"/admin/api/events/{event_id}/replay",
                         headers={"Content-Type": "application/json"},
                         auth=("admin", "admin-password"))
    assert answer.status_code == 200
    worker.drain(max_seconds=10)
    worker.send_triggers()
    assert [e.status for e in stored_events(app)] == ["delivered"]
    assert len(messages(sandbox_url)) == 1 and states(app) == ["sent"]


def test_the_trigger_waits_for_relay_trigger_delay(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    post_ids(post_webhook, shared(1))
    worker = worker_for(sandbox_url, trigger_delay=3600.0)
    worker.drain(max_seconds=10)
    assert worker.send_triggers() == 0
    [trigger] = stored_triggers(app)
    [event] = stored_events(app)
    assert trigger.state == "due" and trigger.due_at is not None
    assert event.delivered_at is not None
    assert trigger.due_at - event.delivered_at == timedelta(hours=1)
    assert messages(sandbox_url) == []
    make_due(app)
    assert worker.send_triggers() == 1
    assert len(messages(sandbox_url)) == 1


def test_due_triggers_of_one_target_go_out_fifty_recipients_a_request(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    for start in range(0, 120, 60):
        post_ids(post_webhook, *(shared(n) for n in range(start, start + 60)))
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=30)
    assert worker.send_triggers() == 3
    bodies = [json.loads(a.request_body or "") for a in trigger_attempts(app)]
    assert [len(b["recipients"]) for b in bodies] == [50, 50, 20]
    got = [m["recipient"]["external_user_id"] for m in messages(sandbox_url)]
    assert sorted(got) == sorted(f"cust-{n}" for n in range(120))  # each person once
    assert set(states(app)) == {"sent"}
    assert {t.sends for t in stored_triggers(app)} == {1}


def test_each_target_gets_its_own_requests(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    post_ids(post_webhook, shared(1), shared(2),
             {"type": "signed_up", "event_id": "su-1", "event_time": "2026-11-20T10:00:00Z",
              "partner_user_id": "cust-9"})
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=10)
    assert worker.send_triggers() == 2
    by_target: dict[str, list[str]] = {}
    for message in messages(sandbox_url):
        by_target.setdefault(message["target"], []).append(
            message["recipient"]["external_user_id"])
    assert by_target == {CAMPAIGN: ["cust-1", "cust-2"], CANVAS: ["cust-9"]}


# -- failures: back to due only when nothing reached Braze -----------------------------------

@pytest.fixture
def braze() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TRACK, json={"message": "success"}, status=201)
        yield mock


def trigger_calls(mock: responses.RequestsMock) -> list[dict[str, Any]]:
    return [json.loads(c.request.body) for c in mock.calls if c.request.url == TRIGGER]


def test_a_429_returns_the_trigger_to_due_until_the_reset_then_it_is_sent_once(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        braze: responses.RequestsMock) -> None:
    post_ids(post_webhook, shared(1))
    reset = int(utcnow().timestamp()) + 600
    braze.post(TRIGGER, json={"message": "Rate limit exceeded"}, status=429,
               headers={"X-RateLimit-Reset": str(reset)})
    braze.post(TRIGGER, json={"dispatch_id": "d-1", "message": "success"}, status=201)
    worker = worker_for()
    worker.drain(max_seconds=10)
    assert worker.send_triggers() == 1
    [trigger] = stored_triggers(app)
    assert trigger.state == "due" and trigger.due_at is not None
    assert trigger.due_at >= utcnow() + timedelta(seconds=500)  # Braze's reset, not at once
    assert "rate limit" in (trigger.last_error or "")
    assert worker.send_triggers() == 0  # still waiting
    make_due(app)
    assert worker.send_triggers() == 0  # the client remembers Braze's reset too
    later = worker_for()  # ... which has passed for a worker started after it
    assert later.send_triggers() == 1
    assert [t.state for t in stored_triggers(app)] == ["sent"]
    assert len(trigger_calls(braze)) == 2
    assert [a.status_code for a in trigger_attempts(app)] == [429, 201]


def test_a_connection_that_could_not_be_opened_returns_the_trigger_to_due(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    """Nothing reached Braze: the trigger is due again and later sent once."""
    post_ids(post_webhook, shared(1))
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=10)
    closed = worker_for(f"http://127.0.0.1:{free_port()}", braze_connect_timeout=2.0)
    assert closed.send_triggers() == 1
    [trigger] = stored_triggers(app)
    assert trigger.state == "due"
    assert "connection error" in (trigger.last_error or "")
    [attempt] = trigger_attempts(app)
    assert attempt.status_code is None and "connection error" in (attempt.error or "")
    make_due(app)
    worker.send_triggers()
    assert states(app) == ["sent"] and len(messages(sandbox_url)) == 1


@pytest.mark.parametrize("fault", [
    {"fail_rate": 1.0, "fail_status": 500},
    {"fail_rate": 1.0, "fail_status": 503},
    {"latency_ms": 1500},
])
def test_a_5xx_or_a_timeout_makes_the_trigger_uncertain_and_only_a_resend_sends_it_again(
        fault: dict[str, Any], post_webhook: Any, app: Flask,
        worker_for: Callable[..., Worker], sandbox_url: str) -> None:
    post_ids(post_webhook, shared(1))
    worker = worker_for(sandbox_url, braze_read_timeout=0.5)
    worker.drain(max_seconds=10)
    faults(sandbox_url, fault_paths=["/campaigns/trigger/send"], **fault)
    assert worker.send_triggers() == 1
    [trigger] = stored_triggers(app)
    assert trigger.state == "uncertain"
    assert "Braze may have sent the message" in (trigger.last_error or "")
    faults(sandbox_url, fail_rate=0.0, latency_ms=0)
    for _ in range(3):  # never sent again by itself
        assert worker.send_triggers() == 0
    # A timeout's request reached Braze anyway (the sandbox answers late): one message so far.
    before = 1 if "latency_ms" in fault else 0
    deadline = time.monotonic() + 30
    while len(messages(sandbox_url)) < before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(messages(sandbox_url)) == before
    with app.extensions["relay.db"].session() as session:
        triggers.resend(session, trigger.id)
    assert worker.send_triggers() == 1
    assert worker.send_triggers() == 0
    assert len(messages(sandbox_url)) == before + 1
    [trigger] = stored_triggers(app)
    assert (trigger.state, trigger.sends) == ("sent", 2)


def test_a_4xx_fails_the_trigger_with_brazes_message(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        braze: responses.RequestsMock) -> None:
    post_ids(post_webhook, shared(1))
    braze.post(TRIGGER, json={"message": "campaign_id is not an API-triggered campaign"},
               status=400)
    worker = worker_for()
    worker.drain(max_seconds=10)
    worker.send_triggers()
    assert worker.send_triggers() == 0
    [trigger] = stored_triggers(app)
    assert trigger.state == "failed"
    assert "campaign_id is not an API-triggered campaign" in (trigger.last_error or "")
    assert len(trigger_calls(braze)) == 1


def test_a_braze_id_cannot_be_a_recipient(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        braze: responses.RequestsMock) -> None:
    post_ids(post_webhook, {"type": "shared", "event_id": "sh-1", "email": "eve@example.com",
                            "event_time": "2026-11-20T10:00:00Z"})
    braze.post(BRAZE_URL + "/users/export/ids",
               json={"message": "success", "users": [{"braze_id": "5f0a"}]})
    worker = worker_for()
    worker.drain(max_seconds=10)
    worker.send_triggers()
    [trigger] = stored_triggers(app)
    assert (trigger.state, trigger.last_error, trigger.recipient) == (
        "failed", "no recipient id", None)
    assert trigger_calls(braze) == []


def test_a_worker_that_died_while_sending_leaves_the_trigger_uncertain(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    """The claim committed `sending` and the request; the process never recorded an answer."""
    post_ids(post_webhook, shared(1))
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=10)
    with app.extensions["relay.db"].session() as session:
        ready = triggers.sendable_environments(session, worker.settings, ["production"])
    claimed, _, _ = worker.triggers.claim(ready)
    assert claimed is not None  # ... and the worker dies here, its request maybe sent
    assert states(app) == ["sending"]
    assert worker.send_triggers() == 0  # its lease still runs: nothing resends it
    with app.extensions["relay.db"].session() as session:
        session.execute(update(Trigger).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert worker.send_triggers() == 0
    [trigger] = stored_triggers(app)
    assert trigger.state == "uncertain" and trigger.last_error == triggers.WORKER_LOST
    [attempt] = trigger_attempts(app)
    assert attempt.status_code is None and attempt.error == triggers.WORKER_LOST
    assert json.loads(attempt.request_body or "")["campaign_id"] == CAMPAIGN
    assert messages(sandbox_url) == []


def test_metrics_count_trigger_transitions(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str, client: Any) -> None:
    def sample(state: str) -> float:
        for line in client.get("/metrics").get_data(as_text=True).splitlines():
            if line.startswith(f'relay_triggers_total{{environment="production",state="{state}"}}'):
                return float(line.split()[-1])
        return 0.0

    before = {state: sample(state) for state in ("due", "sending", "sent")}
    post_ids(post_webhook, shared(1))
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=10)
    worker.send_triggers()
    assert {state: sample(state) - before[state] for state in before} == {
        "due": 1, "sending": 1, "sent": 1}


def test_stored_event_properties_reach_braze_as_they_were_delivered(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    """The trigger carries the properties /users/track carried, nothing else."""
    post_ids(post_webhook, shared(1, face_value=20, note=None))
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=10)
    worker.send_triggers()
    with app.extensions["relay.db"].session() as session:
        track = session.scalars(select(DeliveryAttempt.request_body).where(
            DeliveryAttempt.endpoint == "/users/track")).one()
        event = session.scalars(select(OutboxEvent).options(undefer_group("queue"))).one()
    [message] = messages(sandbox_url)
    assert message["properties"] == json.loads(track or "")["events"][0]["properties"]
    assert message["properties"] == event.properties
    assert "note" not in message["properties"]
    assert PROD_KEY  # the production key's workspace received it (messages() reads "prod")


# -- leases and forget --------------------------------------------------------------------------

def test_a_worker_that_lost_its_lease_starts_no_trigger(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker],
        sandbox_url: str) -> None:
    """Triggers are created in the delivered mark's transaction, which writes only for events
    whose lease the worker still holds: a worker that stalled past its lease while `relay
    forget` took the event over and erased its person starts nothing for them when it wakes."""
    post_ids(post_webhook, shared(1), shared(2))
    worker = worker_for(sandbox_url)
    db = app.extensions["relay.db"]
    with db.session() as session:
        claimed = leases.claim_due(session, worker.owner, environments=["production"],
                                   limit=10, lease_seconds=120)
    assert len(claimed) == 2
    with db.session() as session:
        session.execute(update(QueuedEvent).where(QueuedEvent.event_id.in_(
            select(OutboxEvent.id).where(OutboxEvent.extole_event_id == "sh-0001")))
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert privacy.forget(db, external_id="cust-1").counts["events"] == 1

    worker.delivery.deliver(claimed)  # it wakes up with her event in memory

    [trigger] = stored_triggers(app)
    assert trigger.recipient == {"external_user_id": "cust-2"}
    # Her event waits as forget left it (no identifier: it can no longer be delivered).
    assert [(e.external_id, e.status) for e in stored_events(app)] == [
        (None, "pending"), ("cust-2", "delivered")]
    worker.send_triggers()
    assert [m["recipient"] for m in messages(sandbox_url)] == [{"external_user_id": "cust-2"}]


@pytest.mark.parametrize("forgotten", [("cust-1",), ("cust-1", "cust-2")])
def test_forget_while_a_trigger_request_is_in_flight_writes_nothing_of_them_back(
        post_webhook: Any, app: Flask, worker_for: Callable[..., Worker], sandbox_url: str,
        forgotten: tuple[str, ...]) -> None:
    """`relay forget` deletes the person's triggers, also one being sent: the answer that
    arrives afterwards is recorded without their recipient object (the request erased whole
    when it named only forgotten people), so their data does not come back."""
    post_ids(post_webhook, shared(1), shared(2))
    worker = worker_for(sandbox_url)
    worker.drain(max_seconds=10)
    claimed, _, _ = worker.triggers.claim(["production"])
    assert claimed is not None and len(claimed.triggers) == 2
    db = app.extensions["relay.db"]
    for external_id in forgotten:
        assert privacy.forget(db, external_id=external_id).counts["triggers"] == 1

    worker.triggers.send(claimed)  # what was in flight reaches Braze, as it would have anyway

    assert len(messages(sandbox_url)) == 2
    [attempt] = trigger_attempts(app)
    assert attempt.status_code == 201
    for external_id in forgotten:
        assert external_id not in (attempt.request_body or "")
        assert external_id not in (attempt.response_body or "")
    if len(forgotten) == 2:
        assert stored_triggers(app) == []
        assert attempt.request_body == attempt.response_body == privacy.ERASED_BODY.decode()
    else:
        [trigger] = stored_triggers(app)
        assert (trigger.recipient, trigger.state) == ({"external_user_id": "cust-2"}, "sent")
        assert json.loads(attempt.request_body or "")["recipients"] == [
            privacy.ERASED_OBJECT,
            {"external_user_id": "cust-2", "trigger_properties": stored_events(app)[1].properties}]
