"""Every failure path of delivery: statuses, attempts, next attempt times, last errors and the
recorded Braze requests; waits that never count toward RELAY_RETRY_MAX_AGE; expired leases."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.orm import undefer_group

from relay import braze_state, delivery, scheduler
from relay.db import utcnow
from relay.exceptions import DatabaseUnavailable
from relay.models import AttemptEvent, DeliveryAttempt, EnvironmentState, OutboxEvent, QueuedEvent
from relay.outbox import leases
from relay.retry import RetryPolicy
from relay.settings import Settings
from relay.worker import Worker
from tests.support import (
    BRAZE_URL,
    POSTGRESQL_ONLY,
    events_by_extole_id,
    sample,
    sample_json,
    write_events,
)

TRACK = BRAZE_URL + "/users/track"
SUCCESS = {"message": "success"}
SLACK = timedelta(seconds=2)  # clock reads between the test and the code under test

Answer = tuple[int, Any, dict[str, str]]


class FakeBraze:
    """/users/track answering from a queue (status, body or exception, headers), then 201."""

    def __init__(self, mock: responses.RequestsMock) -> None:
        self.mock = mock
        self.lock = threading.Lock()
        self.answers: deque[Answer | Callable[[dict[str, Any]], Answer]] = deque()
        self.log: list[tuple[int | None, dict[str, Any]]] = []

    def __call__(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        body = json.loads(request.body or b"{}")
        with self.lock:
            answer = self.answers.popleft() if self.answers else (201, SUCCESS, {})
            status, payload, headers = answer(body) if callable(answer) else answer
            self.log.append((None if isinstance(payload, Exception) else status, body))
        if isinstance(payload, Exception):
            raise payload
        return status, headers, json.dumps(payload)

    def sent_ids(self) -> list[list[str]]:
        return [[e["properties"]["extole_event_id"] for e in body["events"]]
                for _, body in self.log]


@pytest.fixture
def braze() -> Iterator[FakeBraze]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        fake = FakeBraze(mock)
        mock.add_callback(responses.POST, TRACK, callback=fake)
        yield fake


def event(app: Flask, extole_event_id: str) -> OutboxEvent:
    with app.extensions["relay.db"].session() as session:
        return session.scalars(select(OutboxEvent).options(undefer_group("queue")).where(
            OutboxEvent.extole_event_id == extole_event_id)).one()


def recorded(app: Flask, extole_event_id: str) -> list[tuple[int | None, str | None, str | None]]:
    """(HTTP status, outcome, error) of every Braze request recorded for the event."""
    with app.extensions["relay.db"].session() as session:
        return [tuple(row) for row in session.execute(
            select(DeliveryAttempt.status_code, AttemptEvent.outcome, DeliveryAttempt.error)
            .join(AttemptEvent, AttemptEvent.attempt_id == DeliveryAttempt.id)
            .join(OutboxEvent, OutboxEvent.id == AttemptEvent.event_id)
            .where(OutboxEvent.extole_event_id == extole_event_id)
            .order_by(DeliveryAttempt.id))]


def set_event(app: Flask, extole_event_id: str, **values: Any) -> None:
    with app.extensions["relay.db"].session() as session:
        ids = session.scalars(select(OutboxEvent.id)
                              .where(OutboxEvent.extole_event_id == extole_event_id)).all()
        write_events(session, ids, values)


def env_state(app: Flask, environment: str = "production") -> EnvironmentState | None:
    with app.extensions["relay.db"].session() as session:
        return session.get(EnvironmentState, environment)


def shared(number: int, seconds: int = 0) -> dict[str, Any]:
    return {"type": "shared", "event_id": f"f-{number}",
            "event_time": f"2026-11-20T10:00:{seconds or number:02d}Z",
            "partner_user_id": f"cust-{number}"}


REWARD = "r7k2m9q4x1b8c3d5e6f0"


# -- 429 ---------------------------------------------------------------------------------------

def test_429_waits_until_the_reset_without_counting_an_attempt(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("reward_earned.json"))
    reset = int(time.time()) + 120
    braze.answers.append((429, {"message": "Rate limit exceeded"},
                          {"X-RateLimit-Limit": "3000", "X-RateLimit-Remaining": "0",
                           "X-RateLimit-Reset": str(reset)}))
    worker = make_worker()
    assert worker.run_once() == 1
    reset_at = datetime.fromtimestamp(reset, UTC).replace(tzinfo=None)
    stored = event(app, REWARD)
    assert (stored.status, stored.attempts, stored.first_failure_at) == ("pending", 0, None)
    assert stored.next_attempt_at == reset_at
    assert stored.lease_owner is None
    assert "rate limit" in (stored.last_error or "")
    assert recorded(app, REWARD) == [(429, "rate limited", "HTTP 429: Rate limit exceeded")]
    # The environment waits as a whole: nothing is claimed, nothing sent, until the reset.
    state = env_state(app)
    assert state is not None and state.rate_limited_until == reset_at
    with app.extensions["relay.db"].session() as session:
        assert braze_state.blocked_until(session, "production") == reset_at
    post_webhook(sample("subscribed.json"))
    assert worker.run_once() == 0
    assert len(braze.log) == 1


def test_429_with_only_retry_after_waits_that_long(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("reward_earned.json"))
    braze.answers.append((429, {"message": "slow down"}, {"Retry-After": "40"}))
    before = utcnow()
    make_worker().run_once()
    stored = event(app, REWARD)
    assert stored.attempts == 0
    assert before + timedelta(seconds=40) <= stored.next_attempt_at <= utcnow() + timedelta(
        seconds=40)


# -- 5xx, timeouts, connection errors -----------------------------------------------------------

@pytest.mark.parametrize(("answer", "status", "error"), [
    ((500, {"message": "Internal Server Error"}, {}), 500, "HTTP 500: Internal Server Error"),
    ((503, {"message": "Service Unavailable"}, {}), 503, "HTTP 503: Service Unavailable"),
    ((504, {}, {}), 504, "HTTP 504"),
    ((0, requests.exceptions.ReadTimeout("read timed out"), {}), None, "timeout"),
    ((0, requests.exceptions.ConnectTimeout("connect timed out"), {}), None, "timeout"),
    ((0, requests.exceptions.ConnectionError("connection refused"), {}), None,
     "connection error"),
])
def test_outages_count_an_attempt_and_back_off_within_the_cap(
        answer: Answer, status: int | None, error: str, post_webhook: Any, braze: FakeBraze,
        app: Flask, make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("reward_earned.json"))
    braze.answers.extend([answer, answer])
    worker = make_worker()
    before = utcnow()
    worker.run_once()
    after = utcnow()
    stored = event(app, REWARD)
    assert (stored.status, stored.attempts) == ("pending", 1)
    assert before <= stored.first_failure_at <= after
    # Full jitter: somewhere from now to now + RELAY_RETRY_BASE (5 s) for the first failure.
    assert before <= stored.next_attempt_at <= after + timedelta(seconds=5)
    assert error in (stored.last_error or "")
    [(recorded_status, outcome, recorded_error)] = recorded(app, REWARD)
    assert (recorded_status, outcome) == (status, "failed")
    assert error in (recorded_error or "")

    set_event(app, REWARD, next_attempt_at=utcnow())
    before = utcnow()
    worker.run_once()
    after = utcnow()
    again = event(app, REWARD)
    assert (again.status, again.attempts) == ("pending", 2)
    assert again.first_failure_at == stored.first_failure_at
    assert before <= again.next_attempt_at <= after + timedelta(seconds=10)
    assert len(recorded(app, REWARD)) == 2

    set_event(app, REWARD, next_attempt_at=utcnow())
    worker.run_once()
    done = event(app, REWARD)
    assert (done.status, done.attempts, done.last_error) == ("delivered", 2, None)


def test_failures_spanning_the_max_age_make_the_event_dead(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("reward_earned.json"))
    worker = make_worker(make_settings(retry_max_age=600))
    braze.answers.extend([(503, {"message": "Service Unavailable"}, {})] * 3)
    worker.run_once()
    first = event(app, REWARD).first_failure_at
    # 599 s of failures: one more try, due at the latest at the deadline.
    set_event(app, REWARD, first_failure_at=utcnow() - timedelta(seconds=599),
              next_attempt_at=utcnow())
    worker.run_once()
    stored = event(app, REWARD)
    assert (stored.status, stored.attempts) == ("pending", 2)
    assert stored.next_attempt_at <= stored.first_failure_at + timedelta(seconds=600)
    # Past the deadline the next failure is the last.
    set_event(app, REWARD, first_failure_at=utcnow() - timedelta(seconds=601),
              next_attempt_at=utcnow())
    worker.run_once()
    dead = event(app, REWARD)
    assert (dead.status, dead.attempts, dead.lease_owner) == ("dead", 3, None)
    assert dead.last_error is not None
    assert dead.last_error.startswith("Braze answered HTTP 503: Service Unavailable")
    assert re.search(r"\(gave up after 3 attempts over 60\d s\)$", dead.last_error)
    assert [r[:2] for r in recorded(app, REWARD)] == [(503, "failed")] * 3
    assert first is not None
    assert worker.run_once() == 0


# -- 400: split the batch until the refused events are isolated ---------------------------------

def refuse(event_id: str, message: str = "Invalid event") -> Callable[[dict[str, Any]], Answer]:
    def answer(body: dict[str, Any]) -> Answer:
        ids = [e["properties"]["extole_event_id"] for e in body["events"]]
        return (400, {"message": message}, {}) if event_id in ids else (201, SUCCESS, {})

    return answer


def test_a_400_batch_is_split_until_the_refused_event_is_isolated(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook([shared(n) for n in (1, 2, 3, 4)])
    braze.answers.extend([refuse("f-3", "Invalid 'properties' on event")] * 5)
    make_worker().run_once()
    assert braze.sent_ids() == [["f-1", "f-2", "f-3", "f-4"], ["f-1", "f-2"], ["f-3", "f-4"],
                                ["f-3"], ["f-4"]]
    stored = events_by_extole_id(app)
    assert {k: (e.status, e.attempts) for k, e in stored.items()} == {
        "f-1": ("delivered", 0), "f-2": ("delivered", 0), "f-3": ("dead", 0),
        "f-4": ("delivered", 0)}
    assert stored["f-3"].last_error == (
        "Braze refused the request (HTTP 400): Invalid 'properties' on event")
    assert [r[:2] for r in recorded(app, "f-3")] == [(400, "split"), (400, "split"),
                                                     (400, "dead")]
    assert [r[:2] for r in recorded(app, "f-4")] == [(400, "split"), (400, "split"),
                                                     (201, "delivered")]
    assert [r[:2] for r in recorded(app, "f-1")] == [(400, "split"), (201, "delivered")]


def test_a_400_naming_objects_kills_those_and_resends_the_rest_at_once(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook([shared(n) for n in (1, 2, 3)])
    braze.answers.append((400, {"message": "bad events", "errors": [
        {"type": "'name' is required", "input_array": "events", "index": 1}]}, {}))
    make_worker().run_once()
    assert braze.sent_ids() == [["f-1", "f-2", "f-3"], ["f-1", "f-3"]]
    stored = events_by_extole_id(app)
    assert {k: e.status for k, e in stored.items()} == {
        "f-1": "delivered", "f-2": "dead", "f-3": "delivered"}
    assert stored["f-2"].last_error == "Braze refused the events object: 'name' is required"
    assert [r[:2] for r in recorded(app, "f-2")] == [(400, "dead")]


# -- 201 with per-object errors --------------------------------------------------------------

def test_a_201_with_errors_kills_exactly_the_named_events_in_a_mixed_batch(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook([
        # Two events reach cust-9 (one through its email): one attributes object, two sources.
        {"type": "shared", "event_id": "m-a", "event_time": "2026-11-20T10:00:03Z",
         "partner_user_id": "cust-9", "email": "zed@example.com", "first_name": "Zed"},
        {"type": "signed_up", "event_id": "m-b", "event_time": "2026-11-20T10:00:04Z",
         "email": "zed@example.com", "last_name": "Zee"},
        {"type": "shared", "event_id": "m-c", "event_time": "2026-11-20T10:00:01Z",
         "partner_user_id": "cust-10", "email": "c@example.com"},
        {"type": "shared", "event_id": "m-d", "event_time": "2026-11-20T10:00:02Z",
         "partner_user_id": "cust-11", "email": "d@example.com"},
        {"type": "shared", "event_id": "m-e", "event_time": "2026-11-20T10:00:00Z",
         "partner_user_id": "cust-12"},
    ])
    flagged: dict[str, int] = {}

    def answer(body: dict[str, Any]) -> Answer:
        flagged["attributes"] = next(i for i, a in enumerate(body["attributes"])
                                     if a.get("external_id") == "cust-9")
        flagged["events"] = next(i for i, e in enumerate(body["events"])
                                 if e["properties"]["extole_event_id"] == "m-c")
        return 201, {"message": "success", "attributes_processed": 2, "events_processed": 4,
                     "errors": [{"type": "'email' is not a valid email address",
                                 "input_array": "attributes", "index": flagged["attributes"]},
                                {"type": "'time' is required", "input_array": "events",
                                 "index": flagged["events"]}]}, {}

    braze.mock.post(BRAZE_URL + "/users/export/ids",
                    json={"message": "success", "users": [{"external_id": "cust-9"}]})
    braze.answers.append(answer)
    make_worker().run_once()
    [body] = [b for _, b in braze.log]
    # Indexes as sent: cust-9's attributes object is not the first, m-c's event is not either.
    assert flagged == {"attributes": 2, "events": 1}
    assert [a.get("external_id") for a in body["attributes"]] == ["cust-10", "cust-11", "cust-9"]
    assert [e["properties"]["extole_event_id"] for e in body["events"]] == [
        "m-e", "m-c", "m-d", "m-a", "m-b"]
    stored = events_by_extole_id(app)
    assert {k: e.status for k, e in stored.items()} == {
        "m-a": "dead", "m-b": "dead", "m-c": "dead", "m-d": "delivered", "m-e": "delivered"}
    message = "Braze refused the attributes object: 'email' is not a valid email address"
    assert stored["m-a"].last_error == stored["m-b"].last_error == message
    assert stored["m-c"].last_error == "Braze refused the events object: 'time' is required"
    assert all(e.attempts == 0 for e in stored.values())
    assert [r[:2] for r in recorded(app, "m-c")] == [(201, "dead")]
    assert [r[:2] for r in recorded(app, "m-d")] == [(201, "delivered")]


def test_errors_with_unusable_indexes_mark_nobody_dead(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook([shared(1), shared(2)])
    braze.answers.append((201, {"message": "success", "errors": [
        {"type": "x", "input_array": "events", "index": 7},
        {"type": "x", "input_array": "events", "index": -1},
        {"type": "x", "input_array": "events", "index": True},
        {"type": "x", "input_array": "purchases", "index": 0},
        {"type": "x"}]}, {}))
    make_worker().run_once()
    assert {e.status for e in events_by_extole_id(app).values()} == {"delivered"}


# -- 401 / 403: the environment pauses and resumes by itself ------------------------------------

@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_pauses_the_environment_and_delivery_resumes_by_itself(
        status: int, post_webhook: Any, braze: FakeBraze, app: Flask, client: FlaskClient,
        monkeypatch: pytest.MonkeyPatch, make_worker: Callable[..., Worker]) -> None:
    monkeypatch.setattr(delivery, "KEY_PAUSE_SECONDS", 60.0)
    post_webhook(sample("reward_earned.json"))
    braze.answers.append((status, {"message": "Invalid API key: aaaa"}, {}))
    worker = make_worker()
    worker.run_once()
    stored = event(app, REWARD)
    assert (stored.status, stored.attempts, stored.first_failure_at) == ("pending", 0, None)
    assert f"HTTP {status}" in (stored.last_error or "")
    assert recorded(app, REWARD) == [(status, "key refused",
                                      f"HTTP {status}: Invalid API key: aaaa")]
    state = env_state(app)
    assert state is not None and state.key_state == "refused"
    assert state.paused_until is not None
    assert stored.next_attempt_at == state.paused_until
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["braze"]["production"] == "refused"
    assert ready.get_json()["braze"]["staging"] == "ok"

    # Paused: nothing is claimed, but staging, whose key works, still delivers.
    post_webhook(sample("staging_named_epoch_seconds.json"), "staging")
    assert worker.run_once() == 1
    assert braze.log[-1][1]["events"][0]["properties"]["extole_event_id"] == "st-77aa88bb99cc"
    assert worker.run_once() == 0
    assert len(braze.log) == 2

    # A minute later (simulated): the pause is over, the worker probes the key by itself.
    with app.extensions["relay.db"].session() as session:
        session.execute(update(EnvironmentState).values(
            paused_until=utcnow() - timedelta(seconds=1)))
    set_event(app, REWARD, next_attempt_at=utcnow())
    assert worker.run_once() == 1
    resumed = event(app, REWARD)
    assert (resumed.status, resumed.attempts) == ("delivered", 0)
    assert client.get("/readyz").get_json()["braze"]["production"] == "ok"
    state = env_state(app)
    assert state is not None and (state.key_state, state.paused_until) == ("ok", None)


def test_any_answer_past_the_key_check_ends_the_refusal(
        post_webhook: Any, braze: FakeBraze, app: Flask, client: FlaskClient,
        monkeypatch: pytest.MonkeyPatch, make_worker: Callable[..., Worker]) -> None:
    # The key works again, but the first batch after the pause is refused event by event:
    # Braze checked the key all the same, so the banner must not keep saying "refused".
    monkeypatch.setattr(delivery, "KEY_PAUSE_SECONDS", 0.2)
    post_webhook(sample("reward_earned.json"))
    braze.answers.append((401, {"message": "Invalid API key"}, {}))
    worker = make_worker()
    worker.run_once()
    assert client.get("/readyz").get_json()["braze"]["production"] == "refused"
    braze.answers.append((400, {"message": "Invalid event"}, {}))
    deadline = time.monotonic() + 10
    while event(app, REWARD).status == "pending" and time.monotonic() < deadline:
        worker.run_once()
        time.sleep(0.05)
    assert event(app, REWARD).status == "dead"
    assert client.get("/readyz").get_json()["braze"]["production"] == "ok"


@POSTGRESQL_ONLY  # SQLite serialises writers: delivery's transactions start with a write
def test_only_one_of_two_concurrent_resumes_credits_the_refusal(app: Flask) -> None:
    db = app.extensions["relay.db"]
    with db.session() as session:
        braze_state.mark_refused(session, "production", "HTTP 401", 0)
        session.execute(update(EnvironmentState).values(
            updated_at=utcnow() - timedelta(seconds=60)))
    answers: list[float] = []
    with db.session() as first:
        answers.append(braze_state.mark_ok(first, "production"))

        def second() -> None:
            with db.session() as session:
                answers.append(braze_state.mark_ok(session, "production"))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=0.5)  # blocked on the first one's row lock
        assert thread.is_alive()
    thread.join(timeout=10)
    assert len(answers) == 2 and answers[0] >= 60 and answers[1] == 0.0


# -- waiting never counts toward RELAY_RETRY_MAX_AGE ----------------------------------------------

def fail_once(post_webhook: Any, braze: FakeBraze, app: Flask, worker: Worker,
              event_id: str = REWARD) -> datetime:
    """One counted failure; answers the event's first_failure_at."""
    braze.answers.append((503, {"message": "Service Unavailable"}, {}))
    worker.run_once()
    stored = event(app, event_id)
    assert stored.attempts == 1 and stored.first_failure_at is not None
    set_event(app, event_id, next_attempt_at=utcnow())
    return stored.first_failure_at


def test_a_rate_limit_wait_is_credited_to_the_failure_clock(
        post_webhook: Any, braze: FakeBraze, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("reward_earned.json"))
    worker = make_worker()
    first = fail_once(post_webhook, braze, app, worker)
    reset = int(time.time()) + 300
    braze.answers.append((429, {"message": "Rate limit exceeded"},
                          {"X-RateLimit-Reset": str(reset)}))
    before = utcnow()
    worker.run_once()
    stored = event(app, REWARD)
    wait = datetime.fromtimestamp(reset, UTC).replace(tzinfo=None) - before
    assert stored.attempts == 1
    assert first + wait - SLACK <= stored.first_failure_at <= first + wait + SLACK


def test_a_key_pause_is_credited_once_to_every_retrying_event(
        post_webhook: Any, braze: FakeBraze, app: Flask, monkeypatch: pytest.MonkeyPatch,
        make_worker: Callable[..., Worker]) -> None:
    monkeypatch.setattr(delivery, "KEY_PAUSE_SECONDS", 300.0)
    post_webhook(sample("reward_earned.json"))
    worker = make_worker()
    first = fail_once(post_webhook, braze, app, worker)
    braze.answers.append((401, {"message": "Invalid API key"}, {}))
    worker.run_once()  # the key is refused: paused for 300 s
    assert event(app, REWARD).attempts == 1
    # Five minutes later (simulated): the pause is over and a new event probes the key.
    with app.extensions["relay.db"].session() as session:
        session.execute(update(EnvironmentState).values(
            paused_until=utcnow() - timedelta(seconds=1),
            updated_at=utcnow() - timedelta(seconds=300)))
    post_webhook(sample("referred_converted.json"))
    assert worker.run_once() == 1
    assert event(app, "rc00112233445566778").status == "delivered"
    stored = event(app, REWARD)
    assert (stored.status, stored.attempts) == ("pending", 1)
    # Refused for 300 s: the failure clock moved by 300 s, not twice that.
    shift = stored.first_failure_at - first
    assert timedelta(seconds=300) - SLACK <= shift <= timedelta(seconds=300) + SLACK


# -- leases: a worker that dies between Braze's answer and the commit ----------------------------

def test_events_of_a_worker_that_died_before_committing_are_sent_again(
        post_webhook: Any, braze: FakeBraze, app: Flask, monkeypatch: pytest.MonkeyPatch,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    settings = make_settings(lease_seconds=30)
    post_webhook([shared(1), shared(2)])
    dying = make_worker(settings)

    def crash(*_args: Any, **_kwargs: Any) -> None:
        raise DatabaseUnavailable("simulated: the worker died before recording Braze's answer")

    monkeypatch.setattr(leases, "mark_delivered", crash)
    dying.drain(max_seconds=5)
    monkeypatch.undo()
    assert braze.sent_ids() == [["f-1", "f-2"]]  # Braze has them
    leased = events_by_extole_id(app)
    assert {(e.status, e.lease_owner) for e in leased.values()} == {("pending", dying.owner)}
    assert all(e.lease_expires_at is not None for e in leased.values())

    survivor = make_worker(settings)
    assert survivor.run_once() == 0  # the lease still holds
    # Thirty seconds later (simulated): the lease has expired; the sweeper frees the events.
    with app.extensions["relay.db"].session() as session:
        session.execute(update(QueuedEvent).values(
            lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert scheduler.sweep_leases(survivor.db) == 2
    assert {e.lease_owner for e in events_by_extole_id(app).values()} == {None}
    assert survivor.run_once() == 2
    # At-least-once: the batch in flight at the crash is sent a second time.
    assert braze.sent_ids() == [["f-1", "f-2"], ["f-1", "f-2"]]
    stored = events_by_extole_id(app)
    assert {(e.status, e.lease_owner, e.attempts) for e in stored.values()} == {
        ("delivered", None, 0)}


def test_a_worker_whose_lease_expired_cannot_overwrite_the_new_owner(
        post_webhook: Any, app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.outbox")
    post_webhook([shared(1)])
    db = app.extensions["relay.db"]
    start = utcnow()
    with db.session() as session:
        [old] = leases.claim_due(session, "old-worker", environments=["production"], limit=10,
                                 lease_seconds=30, now=start)
    with db.session() as session:
        assert leases.claim_due(session, "new-worker", environments=["production"], limit=10,
                                lease_seconds=30, now=start + timedelta(seconds=10)) == []
    with db.session() as session:
        [new] = leases.claim_due(session, "new-worker", environments=["production"], limit=10,
                                 lease_seconds=30, now=start + timedelta(seconds=31))
    assert new.id == old.id
    with db.session() as session:
        leases.mark_dead(session, "old-worker", {old.id: "late answer"}, [old])
        leases.mark_delivered(session, "old-worker", [old], {})
        assert leases.mark_failed(session, "old-worker", [old], "late failure",
                                  RetryPolicy(1, 60, 3600)) == ([], [])
    assert (event(app, "f-1").status, event(app, "f-1").lease_owner) == ("pending", "new-worker")
    # The late worker logs no transition it did not make, only that the lease was lost.
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if "->" in line or "retry at" in line]
    assert lines.count("1 of 1 events were no longer leased by old-worker: left to their new "
                       "owner") == 3
    with db.session() as session:
        leases.mark_delivered(session, "new-worker", [new], {new.id: {"external_id": "cust-1"}})
    assert event(app, "f-1").status == "delivered"
    assert sample_json("reward_earned.json")  # the samples stay readable for other tests
