"""End to end: the receiver, the delivery worker and the Braze sandbox on a real port.

Every sample ends in the right Braze profile, as the sandbox (strict where Braze is strict)
holds them; faults injected into the sandbox are survived the way the README says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import requests
from flask import Flask
from sqlalchemy import select, update
from sqlalchemy.orm import undefer_group

from relay import delivery
from relay.db import utcnow
from relay.models import OutboxEvent, QueuedEvent
from relay.settings import Settings
from relay.worker import Worker
from tests.support import sample, sample_json

ANN = "cust-1036950000"
BO = "bo.chen@example.org"


@pytest.fixture
def sandbox(sandbox_url: str) -> str:
    """The Braze sandbox on a free port (the shared `sandbox_url`); its base URL."""
    return sandbox_url


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture
def worker(app: Flask, sandbox: str, make_settings: Callable[..., Settings]) -> Iterator[Worker]:
    made = Worker(make_settings(braze_rest_endpoint=sandbox), app.extensions["relay.db"])
    yield made
    made.close()


def statuses(app: Flask) -> dict[str, str]:
    with app.extensions["relay.db"].session() as session:
        return {e.extole_event_id or str(e.id): e.status
                for e in session.scalars(select(OutboxEvent).options(undefer_group("queue")))}


def deliver_everything(app: Flask, worker: Worker, seconds: float = 30) -> None:
    """Drain until nothing is pending (the export limiter may hold events a moment)."""
    deadline = time.monotonic() + seconds
    while "pending" in statuses(app).values():
        assert time.monotonic() < deadline, statuses(app)
        worker.drain(max_seconds=10)
        time.sleep(0.05)


def profiles(http: requests.Session, sandbox: str, workspace: str) -> list[dict[str, Any]]:
    answer = http.get(f"{sandbox}/sandbox/profiles", timeout=10)
    answer.raise_for_status()
    return list(answer.json()["workspaces"].get(workspace, []))


def by_external_id(found: list[dict[str, Any]]) -> dict[str | None, dict[str, Any]]:
    return {p["external_id"]: p for p in found if p["external_id"]}


def names(profile: dict[str, Any]) -> list[str]:
    return [e["name"] for e in profile["events"]]


def test_every_sample_ends_in_the_right_braze_profile(
        post_webhook: Any, app: Flask, worker: Worker, sandbox: str,
        http: requests.Session) -> None:
    # The email-only sample first, while Braze knows nobody with that email: an alias.
    post_webhook(sample("referred_signed_up_email_only.json"))
    deliver_everything(app, worker)
    for name in ("reward_earned.json", "unsubscribed.json", "share_link_created.json",
                 "subscribed.json", "shared.json", "referred_converted.json", "batch.json",
                 "naive_time_awkward_properties.json", "invalid_no_identifier.json",
                 "invalid_no_type.json", "variant_custom_shape_basic_auth.json",
                 "variant_person_nested_extra_fields.json"):
        assert post_webhook(sample(name)).status_code == 200
    post_webhook(sample("staging_named_epoch_seconds.json"), "staging")
    deliver_everything(app, worker)

    stored = statuses(app)
    assert stored.pop("bad-0002") == "dead"  # no identifier
    assert stored.pop("bad-0001") == "rejected"  # no type
    assert set(stored.values()) == {"delivered"}

    production = profiles(http, sandbox, "prod")
    people = by_external_id(production)
    assert set(people) == {ANN, "cust-2200431", "cust-7007", "cust-3001", "4400123",
                           "p-2024-0001"}

    ann = people[ANN]
    assert ann["email"] == "ann.lee@example.com"
    assert ann["attributes"] == {"email": "ann.lee@example.com", "first_name": "Ann",
                                 "last_name": "Lee",
                                 "share_link": "https://refer.example.com/ann1",
                                 "email_subscribe": "unsubscribed"}
    # Posted out of order, applied in Extole event-time order.
    assert names(ann) == ["Created Share Link", "Shared", "Earned Reward", "Subscribed",
                          "Unsubscribed"]
    reward = ann["events"][2]
    assert reward["time"] == "2026-11-20T14:14:18.548Z"
    assert reward["properties"]["face_value"] == 50
    assert reward["properties"]["extole_event_id"] == "r7k2m9q4x1b8c3d5e6f0"

    assert people["cust-2200431"]["email"] == BO
    assert names(people["cust-2200431"]) == ["Referred Converted"]
    assert people["cust-2200431"]["events"][0]["properties"]["funnel"] == "friend"
    assert names(people["cust-7007"]) == ["Referred Converted"]
    assert people["cust-7007"]["attributes"] == {}
    assert len(people["cust-7007"]["events"][0]["properties"]["order_note"]) == 255
    assert names(people["cust-3001"]) == ["Shared", "reward_fulfilled"]
    assert people["cust-3001"]["email"] == "cy@example.net"
    assert people["4400123"]["attributes"] == {"email": "zed.kim@example.org",
                                               "first_name": "Zed", "phone": "+1 555 0100"}
    assert people["p-2024-0001"]["attributes"]["email_subscribe"] == "opted_in"

    # Alias-only profiles carrying the email, for the email-only events Braze did not know.
    aliases = {p["user_aliases"][0]["alias_name"]: p for p in production
               if not p["external_id"]}
    assert set(aliases) == {BO, "dee@example.net"}
    bo = aliases[BO]
    assert bo["user_aliases"] == [{"alias_name": BO, "alias_label": "email"}]
    assert (bo["email"], bo["attributes"]) == (BO, {"email": BO, "first_name": "Bo",
                                                    "last_name": "Chen"})
    assert names(bo) == ["Referred Signed Up"]
    assert names(aliases["dee@example.net"]) == ["Earned Reward"]

    [flo] = profiles(http, sandbox, "staging")
    assert (flo["external_id"], flo["email"]) == ("cust-5550001", "flo.ng@example.com")
    assert flo["attributes"]["share_link"] == "https://refer.example.com/flo"
    assert names(flo) == ["Created Share Link"]

    # Ann's subscription state was last set to unsubscribed, and nothing was dropped.
    log = http.get(f"{sandbox}/sandbox/requests", timeout=10).json()["requests"]
    states = [a["email_subscribe"] for r in log if r["path"] == "/users/track"
              for a in r["body"].get("attributes", [])
              if a.get("external_id") == ANN and "email_subscribe" in a]
    assert states == ["opted_in", "unsubscribed"]
    stats = http.get(f"{sandbox}/sandbox/stats", timeout=10).json()
    assert stats["events_dropped"] == 0
    assert set(stats["event_ids"].values()) == {1}
    assert set(stats["requests"]) == {"200", "201"}


def test_a_reward_as_extole_posts_it_arrives_once_with_its_coupon(
        post_webhook: Any, app: Flask, worker: Worker, sandbox: str,
        http: requests.Session) -> None:
    """Extole's reward webhook, body left as is, repeated as Extole repeats it: 200 every time,
    one `Reward Fulfilled` in Braze for the person, with the coupon code."""
    for _ in range(3):
        answer = post_webhook(sample("reward_fulfilled_coupon.json"))
        assert answer.status_code == 200
        deliver_everything(app, worker)
    [bo] = profiles(http, sandbox, "prod")
    assert (bo["user_aliases"], bo["email"]) == ([{"alias_name": BO, "alias_label": "email"}], BO)
    [reward] = bo["events"]
    assert (reward["name"], reward["time"]) == ("Reward Fulfilled", "2026-11-21T09:02:44.120Z")
    assert {k: reward["properties"][k] for k in ("coupon_code", "reward_state", "face_value",
                                                 "face_value_type")} == {
        "coupon_code": "FRIEND20-7QX4", "reward_state": "FULFILLED", "face_value": 20.0,
        "face_value_type": "PERCENT_OFF"}
    stats = http.get(f"{sandbox}/sandbox/stats", timeout=10).json()
    assert stats["event_ids"] == {"6d1f4a0b2c9e8d7f6a5b4c3d": 1}


def test_a_subscription_group_reaches_the_profile_and_a_malformed_one_is_dead(
        post_webhook: Any, app: Flask, worker: Worker, sandbox: str,
        http: requests.Session) -> None:
    post_webhook(sample("unsubscribed_group.json"))
    post_webhook({"type": "subscribed", "event_id": "bad-group", "partner_user_id": "p-2",
                  "event_time": "2026-11-22T18:31:00Z", "subscription_group_id": "newsletter"})
    deliver_everything(app, worker)
    people = by_external_id(profiles(http, sandbox, "prod"))
    pat = people["p-2024-0001"]
    assert pat["subscription_groups"] == {"a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d": "unsubscribed"}
    assert pat["attributes"]["email_subscribe"] == "unsubscribed"
    assert names(pat) == ["Unsubscribed"]
    # Braze refuses the attributes object naming no real group: the event that made it is dead
    # with Braze's message (its event object itself was accepted).
    stored = {e.extole_event_id: e for e in _events(app)}
    assert stored["un-5f6e7d8c9b0a"].status == "delivered"
    assert stored["bad-group"].status == "dead"
    assert "'subscription_group_id' must be a subscription group id (a UUID)" in (
        stored["bad-group"].last_error or "")


def _events(app: Flask) -> list[OutboxEvent]:
    with app.extensions["relay.db"].session() as session:
        return list(session.scalars(select(OutboxEvent).options(undefer_group("queue"))))


def test_a_failing_subscribed_still_leaves_ann_unsubscribed(
        post_webhook: Any, app: Flask, worker: Worker, sandbox: str,
        http: requests.Session) -> None:
    post_webhook([sample_json("subscribed.json"), sample_json("unsubscribed.json")])
    http.post(f"{sandbox}/sandbox/faults", json={"fail_rate": 1.0, "fail_status": 503},
              timeout=10).raise_for_status()
    worker.run_once()
    http.post(f"{sandbox}/sandbox/faults", json={"fail_rate": 0.0},
              timeout=10).raise_for_status()
    with app.extensions["relay.db"].session() as session:
        session.execute(update(QueuedEvent)
                        .values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    deliver_everything(app, worker)
    [ann] = profiles(http, sandbox, "prod")
    assert ann["attributes"]["email_subscribe"] == "unsubscribed"
    assert names(ann) == ["Subscribed", "Unsubscribed"]
    stats = http.get(f"{sandbox}/sandbox/stats", timeout=10).json()
    assert stats["requests"] == {"503": 1, "201": 2}


@pytest.mark.parametrize("mode", ["errors", "400"])
def test_events_braze_refuses_are_dead_and_the_rest_arrive(
        mode: str, post_webhook: Any, app: Flask, worker: Worker, sandbox: str,
        http: requests.Session) -> None:
    post_webhook([{"type": "shared", "event_id": f"rf-{n}",
                   "event_time": f"2026-11-20T10:00:{n:02d}Z",
                   "partner_user_id": f"cust-{n}"} for n in range(6)])
    http.post(f"{sandbox}/sandbox/faults", json={"refuse_event_ids": ["rf-2", "rf-4"],
                                                 "refuse_mode": mode},
              timeout=10).raise_for_status()
    deliver_everything(app, worker)
    stored = statuses(app)
    assert {k for k, v in stored.items() if v == "dead"} == {"rf-2", "rf-4"}
    assert {k for k, v in stored.items() if v == "delivered"} == {"rf-0", "rf-1", "rf-3",
                                                                  "rf-5"}
    people = by_external_id(profiles(http, sandbox, "prod"))
    assert set(people) == {"cust-0", "cust-1", "cust-3", "cust-5"}
    assert set(http.get(f"{sandbox}/sandbox/stats", timeout=10).json()["event_ids"]) == {
        "rf-0", "rf-1", "rf-3", "rf-5"}


def test_a_refused_key_pauses_and_delivery_resumes_when_the_sandbox_accepts_it(
        post_webhook: Any, app: Flask, worker: Worker, sandbox: str, http: requests.Session,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "KEY_PAUSE_SECONDS", 0.3)
    client = app.test_client()
    http.post(f"{sandbox}/sandbox/faults", json={"reject_keys": ["prod"]},
              timeout=10).raise_for_status()
    post_webhook(sample("reward_earned.json"))
    worker.run_once()
    assert statuses(app) == {"r7k2m9q4x1b8c3d5e6f0": "pending"}
    assert client.get("/readyz").get_json()["braze"]["production"] == "refused"
    http.post(f"{sandbox}/sandbox/faults", json={"reject_keys": []},
              timeout=10).raise_for_status()
    deliver_everything(app, worker)
    assert client.get("/readyz").get_json()["braze"]["production"] == "ok"
    assert names(by_external_id(profiles(http, sandbox, "prod"))[ANN]) == ["Earned Reward"]
