"""Per-person order: a retried earlier event never lands after a later one, late events send no
stale attributes, and concurrent workers never claim the same event."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from sqlalchemy import update

from relay.db import utcnow
from relay.models import QueuedEvent
from relay.settings import Settings
from relay.worker import Worker
from tests.support import BRAZE_URL, events_by_extole_id, sample, sample_json

TRACK = BRAZE_URL + "/users/track"
SUCCESS = {"message": "success"}
ANN = "cust-1036950000"


class FakeBraze:
    """/users/track answering from a queue of (status, body) answers, then 201; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: deque[tuple[int, dict[str, Any]]] = deque()
        self.log: list[tuple[int, dict[str, Any]]] = []

    def __call__(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        body = json.loads(request.body or b"{}")
        with self.lock:
            status, answer = self.answers.popleft() if self.answers else (201, SUCCESS)
            self.log.append((status, body))
        return status, {}, json.dumps(answer)

    def event_ids(self, status: int | None = 201) -> list[str]:
        return [e["properties"]["extole_event_id"] for s, body in self.log
                if status is None or s == status for e in body["events"]]


@pytest.fixture
def braze() -> Iterator[FakeBraze]:
    fake = FakeBraze()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.POST, TRACK, callback=fake)
        yield fake


def make_due(app: Flask) -> None:
    """Let the retry time pass (instead of sleeping through it)."""
    with app.extensions["relay.db"].session() as session:
        session.execute(update(QueuedEvent)
                        .values(next_attempt_at=utcnow() - timedelta(seconds=1)))


def test_unsubscribed_waits_for_a_failing_subscribed_and_is_sent_last(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook([sample_json("subscribed.json"), sample_json("unsubscribed.json")])
    braze.answers.append((503, {"message": "Service Unavailable"}))
    worker = make_worker()

    assert worker.run_once() == 1  # only the head of ann's line is claimable
    stored = events_by_extole_id(app)
    assert (stored["sb1234abcd5678ef9012"].status, stored["sb1234abcd5678ef9012"].attempts) == (
        "pending", 1)
    assert stored["us1234abcd5678ef9013"].attempts == 0

    # Unsubscribed is due, but waits while Subscribed waits for its retry; others flow.
    post_webhook(sample("referred_converted.json"))
    assert worker.drain(max_seconds=10) == 1
    assert braze.event_ids(status=None) == [
        "sb1234abcd5678ef9012", "rc00112233445566778"]

    make_due(app)
    worker.drain(max_seconds=10)
    ann_requests = [(status, body) for status, body in braze.log
                    if body["events"][0].get("external_id") == ANN]
    assert [(status, body["events"][0]["name"]) for status, body in ann_requests] == [
        (503, "Subscribed"), (201, "Subscribed"), (201, "Unsubscribed")]
    subscribe_states = [body["attributes"][0]["email_subscribe"] for _, body in ann_requests]
    assert subscribe_states == ["opted_in", "opted_in", "unsubscribed"]
    stored = events_by_extole_id(app)
    assert {e.status for e in stored.values()} == {"delivered"}
    assert stored["sb1234abcd5678ef9012"].attempts == 1
    assert stored["sb1234abcd5678ef9012"].delivered_at < stored[
        "us1234abcd5678ef9013"].delivered_at


def test_an_earlier_event_arriving_after_a_later_one_sends_no_stale_attributes(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("unsubscribed.json"))
    make_worker().drain(max_seconds=10)
    post_webhook(sample("subscribed.json"))  # Extole delivered it late
    make_worker().drain(max_seconds=10)
    late = braze.log[-1][1]
    # Braze already has unsubscribed and the email from the later event: only the event goes.
    assert late == {"events": [{"external_id": ANN, "name": "Subscribed",
                                "time": "2026-11-22T08:00:00.000Z",
                                "properties": {"list": "marketing",
                                               "extole_event_id": "sb1234abcd5678ef9012"}}]}
    assert {e.status for e in events_by_extole_id(app).values()} == {"delivered"}


def test_a_late_event_still_sends_the_attributes_no_later_event_set(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("reward_earned.json"))  # 14:14, carries the email only
    make_worker().drain(max_seconds=10)
    post_webhook(sample("share_link_created.json"))  # 14:02, arrives late
    make_worker().drain(max_seconds=10)
    late = braze.log[-1][1]
    # The email is stale (the 14:14 event set it); names and share link are news to Braze.
    assert late["attributes"] == [{"external_id": ANN, "first_name": "Ann", "last_name": "Lee",
                                   "share_link": "https://refer.example.com/ann1"}]
    assert [e["name"] for e in late["events"]] == ["Created Share Link"]


GROUP_A = "aaaaaaaa-0000-4000-8000-000000000001"
GROUP_B = "bbbbbbbb-0000-4000-8000-000000000002"


def subscription(event_id: str, extole_type: str, minute: int, group: str) -> dict[str, Any]:
    return {"type": extole_type, "event_id": event_id, "partner_user_id": ANN,
            "event_time": f"2026-11-22T08:{minute:02d}:00Z", "subscription_group_id": group}


def test_each_subscription_group_is_its_own_attribute_for_late_events(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook(subscription("g-late", "unsubscribed", 30, GROUP_A))
    make_worker().drain(max_seconds=10)
    # Extole delivered two earlier subscriptions late: group A's state is already newer in
    # Braze (and so is email_subscribe); group B's is news.
    post_webhook(subscription("g-early-a", "subscribed", 10, GROUP_A))
    make_worker().drain(max_seconds=10)
    post_webhook(subscription("g-early-b", "subscribed", 20, GROUP_B))
    make_worker().drain(max_seconds=10)
    assert [body.get("attributes") for _, body in braze.log] == [
        [{"external_id": ANN, "email_subscribe": "unsubscribed", "subscription_groups": [
            {"subscription_group_id": GROUP_A, "subscription_state": "unsubscribed"}]}],
        None,
        [{"external_id": ANN, "subscription_groups": [
            {"subscription_group_id": GROUP_B, "subscription_state": "subscribed"}]}],
    ]
    assert [e["name"] for _, body in braze.log for e in body["events"]] == [
        "Unsubscribed", "Subscribed", "Subscribed"]


def test_one_persons_events_go_in_event_time_order_whatever_the_arrival_order(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    for name in ("unsubscribed.json", "reward_earned.json", "subscribed.json",
                 "share_link_created.json", "shared.json"):
        post_webhook(sample(name))
    make_worker().drain(max_seconds=10)
    assert [body["events"][0]["name"] for _, body in braze.log] == [
        "Created Share Link", "Shared", "Earned Reward", "Subscribed", "Unsubscribed"]
    # One event of the person per request: each request applies its attributes in turn.
    assert all(len(body["events"]) == 1 for _, body in braze.log)
    assert braze.log[-1][1]["attributes"][0]["email_subscribe"] == "unsubscribed"


def test_a_dead_earlier_event_does_not_hold_the_person_back(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook([sample_json("subscribed.json"), sample_json("unsubscribed.json")])
    braze.answers.append((201, {"message": "success", "errors": [
        {"type": "bad event", "input_array": "events", "index": 0}]}))
    make_worker().drain(max_seconds=10)
    stored = events_by_extole_id(app)
    assert stored["sb1234abcd5678ef9012"].status == "dead"
    assert stored["us1234abcd5678ef9013"].status == "delivered"


def test_two_workers_in_threads_never_claim_the_same_event(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    people, per_person = 60, 4
    items = [{"type": "shared", "event_id": f"t-{p:03d}-{n}",
              "event_time": f"2026-11-20T10:{p % 60:02d}:{n:02d}Z",
              "partner_user_id": f"cust-{p}", "email": f"p{p}@example.com",
              "first_name": f"v{n}"}
             for p in range(people) for n in range(per_person)]
    random.Random(11).shuffle(items)
    post_webhook(items)
    settings = make_settings(worker_batch_size=15, worker_threads=2)
    workers = [make_worker(settings), make_worker(settings)]
    errors: list[BaseException] = []

    def run(worker: Worker) -> None:
        try:
            for _ in range(200):
                if worker.drain(max_seconds=20) == 0 and all(
                        e.status == "delivered" for e in events_by_extole_id(app).values()):
                    return
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    sent = Counter(braze.event_ids())
    assert len(sent) == people * per_person
    assert set(sent.values()) == {1}
    assert {e.status for e in events_by_extole_id(app).values()} == {"delivered"}
    # Each person's events reached Braze in event-time order, whichever worker sent them.
    order: dict[str, list[str]] = {}
    for event_id in braze.event_ids():
        order.setdefault(event_id[:5], []).append(event_id)
    assert all(ids == sorted(ids) for ids in order.values())
