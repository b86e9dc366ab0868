"""Identity resolution: external_id, else email through the cache or Braze's export (external_id
preferred, else braze_id), else a new alias; the export limiter; Braze's email identifier;
RELAY_EXTERNAL_ID=email."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import responses
from flask import Flask
from sqlalchemy import select, update

from relay import create_app
from relay.db import utcnow
from relay.models import IdentityCache, QueuedEvent, RateLimiter
from relay.settings import Rate, Settings
from relay.worker import Worker
from tests.support import (
    BRAZE_URL,
    PROD_KEY,
    STAGING_KEY,
    events_by_extole_id,
    sample,
    signed,
)

TRACK = BRAZE_URL + "/users/track"
EXPORT = BRAZE_URL + "/users/export/ids"
SUCCESS = {"message": "success"}
BO = "bo.chen@example.org"
BO_ALIAS = {"alias_name": BO, "alias_label": "email"}
SIGNED_UP = "rs5566778899aabbccdd"
# Tests of the cache, not of the limiter: lookups are never held back (the default, 250 per
# minute, lets one through every quarter second).
UNLIMITED = Rate(1_000_000, 1.0)


@pytest.fixture
def braze() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TRACK, json=SUCCESS, status=201)
        yield mock


def found(mock: responses.RequestsMock, *users: dict[str, Any], status: int = 200) -> None:
    mock.post(EXPORT, json={"message": "success", "users": list(users),
                            "invalid_user_ids": []}, status=status)


def calls(mock: responses.RequestsMock, url: str) -> list[dict[str, Any]]:
    return [json.loads(c.request.body) for c in mock.calls if c.request.url == url]


def cache(app: Flask) -> list[IdentityCache]:
    with app.extensions["relay.db"].session() as session:
        return list(session.scalars(select(IdentityCache).order_by(IdentityCache.email)))


def email_only(number: int, email: str = BO, **extra: Any) -> dict[str, Any]:
    return {"type": "signed_up", "event_id": f"eo-{number}",
            "event_time": f"2026-11-21T09:00:{number:02d}Z", "email": email, **extra}


def test_found_with_an_external_id_is_addressed_by_it(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    # Several users share the email: the first that has an external_id wins.
    found(braze, {"braze_id": "b-0"}, {"external_id": "cust-2200431", "braze_id": "b-1"},
          {"external_id": "cust-other", "braze_id": "b-2"})
    post_webhook(sample("referred_signed_up_email_only.json"))
    make_worker().drain(max_seconds=10)
    assert calls(braze, EXPORT) == [{"email_address": BO,
                                     "fields_to_export": ["external_id", "braze_id"]}]
    [body] = calls(braze, TRACK)
    assert body["attributes"] == [{"external_id": "cust-2200431", "email": BO,
                                   "first_name": "Bo", "last_name": "Chen"}]
    assert [e["external_id"] for e in body["events"]] == ["cust-2200431"]
    assert "user_alias" not in json.dumps(body)
    stored = events_by_extole_id(app)[SIGNED_UP]
    assert (stored.status, stored.identity) == ("delivered", {"external_id": "cust-2200431"})
    [row] = cache(app)
    assert (row.environment, row.email, row.found, row.external_id, row.braze_id) == (
        "production", BO, True, "cust-2200431", "b-1")


def test_found_without_an_external_id_is_addressed_by_braze_id(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    found(braze, {"braze_id": "5f0c2d3e4f5a6b7c8d9e0f1a"})
    post_webhook(sample("referred_signed_up_email_only.json"))
    make_worker().drain(max_seconds=10)
    [body] = calls(braze, TRACK)
    ident = {"braze_id": "5f0c2d3e4f5a6b7c8d9e0f1a"}
    assert body["attributes"] == [{**ident, "email": BO, "first_name": "Bo", "last_name": "Chen"}]
    assert body["events"][0] == {**ident, "name": "Referred Signed Up",
                                 "time": "2026-11-21T08:30:00.000Z",
                                 "properties": body["events"][0]["properties"]}
    assert events_by_extole_id(app)[SIGNED_UP].identity == ident


def test_not_found_creates_an_alias_only_profile_carrying_the_email(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    found(braze)
    post_webhook(sample("referred_signed_up_email_only.json"))
    make_worker().drain(max_seconds=10)
    [body] = calls(braze, TRACK)
    assert body["attributes"] == [{"user_alias": BO_ALIAS, "_update_existing_only": False,
                                   "email": BO, "first_name": "Bo", "last_name": "Chen"}]
    assert body["events"][0]["user_alias"] == BO_ALIAS
    assert events_by_extole_id(app)[SIGNED_UP].identity == {"user_alias": BO_ALIAS}
    [row] = cache(app)
    assert (row.found, row.external_id, row.braze_id) == (False, None, None)


def test_the_second_event_for_an_email_uses_the_cache(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    found(braze, {"external_id": "cust-77", "braze_id": "b-77"})
    post_webhook([email_only(1)])
    make_worker().drain(max_seconds=10)
    post_webhook([email_only(2, email="  Bo.Chen@Example.ORG ")])  # the same person
    make_worker().drain(max_seconds=10)  # another worker, another batch: the cache is shared
    assert len(calls(braze, EXPORT)) == 1
    bodies = calls(braze, TRACK)
    assert len(bodies) == 2
    assert [b["events"][0]["external_id"] for b in bodies] == ["cust-77", "cust-77"]
    assert {e.status for e in events_by_extole_id(app).values()} == {"delivered"}


def test_an_expired_answer_is_looked_up_again(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    found(braze)
    worker = make_worker(make_settings(identity_ttl=900, braze_export_rate=UNLIMITED))
    before = utcnow()
    post_webhook([email_only(1)])
    worker.drain(max_seconds=10)
    [row] = cache(app)
    assert before + timedelta(seconds=900) <= row.expires_at <= utcnow() + timedelta(seconds=900)
    post_webhook([email_only(2)])
    worker.drain(max_seconds=10)
    assert len(calls(braze, EXPORT)) == 1
    # Past RELAY_IDENTITY_TTL: Braze is asked again, and now knows the person.
    with app.extensions["relay.db"].session() as session:
        session.execute(update(IdentityCache).values(expires_at=utcnow() - timedelta(seconds=1)))
    braze.replace(responses.POST, EXPORT,
                  json={"message": "success", "users": [{"external_id": "cust-new"}]})
    post_webhook([email_only(3)])
    worker.drain(max_seconds=10)
    assert len(calls(braze, EXPORT)) == 2
    assert calls(braze, TRACK)[-1]["events"][0]["external_id"] == "cust-new"
    [row] = cache(app)
    assert (row.found, row.external_id) == (True, "cust-new")


def test_a_zero_ttl_looks_every_event_up(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    found(braze)
    worker = make_worker(make_settings(identity_ttl=0, braze_export_rate=UNLIMITED))
    for number in (1, 2):
        post_webhook([email_only(number)])
        worker.drain(max_seconds=10)
    assert len(calls(braze, EXPORT)) == 2


def test_caches_are_per_environment_and_use_that_environments_key(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    found(braze, {"external_id": "cust-77"})
    post_webhook([email_only(1)], "production")
    make_worker().drain(max_seconds=10)
    post_webhook([email_only(2)], "staging")
    make_worker().drain(max_seconds=10)
    exports = [c.request.headers["Authorization"] for c in braze.calls
               if c.request.url == EXPORT]
    assert exports == [f"Bearer {PROD_KEY}", f"Bearer {STAGING_KEY}"]
    assert [(r.environment, r.email) for r in cache(app)] in (
        [("production", BO), ("staging", BO)], [("staging", BO), ("production", BO)])


def test_email_identity_sends_brazes_email_identifier_and_never_exports(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("referred_signed_up_email_only.json"))
    post_webhook(sample("reward_earned.json"))  # has an external_id: addressed by it
    make_worker(make_settings(braze_email_identity="email")).drain(max_seconds=10)
    assert calls(braze, EXPORT) == []
    [body] = calls(braze, TRACK)
    # The email identifies the email-only event's object; the other keeps its email attribute.
    assert body["attributes"] == [
        {"external_id": "cust-1036950000", "email": "ann.lee@example.com"},
        {"email": BO, "first_name": "Bo", "last_name": "Chen"},
    ]
    assert [{k: v for k, v in e.items() if k != "properties"} for e in body["events"]] == [
        {"external_id": "cust-1036950000", "name": "Earned Reward",
         "time": "2026-11-20T14:14:18.548Z"},
        {"email": BO, "name": "Referred Signed Up", "time": "2026-11-21T08:30:00.000Z"},
    ]
    assert events_by_extole_id(app)[SIGNED_UP].identity == {"email": BO}


def test_external_id_from_email_addresses_everyone_by_email_without_any_lookup(
        braze: responses.RequestsMock, make_settings: Callable[..., Settings]) -> None:
    """RELAY_EXTERNAL_ID=email: the normalised email is the external_id (as Extole's own Braze
    integration offers); partner_user_id becomes a property; no /users/export/ids request."""
    settings = make_settings(external_id_from="email")
    app = create_app(settings, TESTING=True)
    worker = Worker(settings, app.extensions["relay.db"])
    try:
        client = app.test_client()
        for name in ("referred_signed_up_email_only.json", "reward_fulfilled_coupon.json",
                     "reward_earned.json", "invalid_no_identifier.json"):
            body = sample(name)
            assert client.post("/webhooks/extole/production", data=body,
                               headers=signed(body)).status_code == 200
        worker.drain(max_seconds=10)
        assert calls(braze, EXPORT) == []
        # Bo's two events are one person's: in event-time order, one request each.
        first, second = calls(braze, TRACK)
        assert first["attributes"] == [
            {"external_id": "ann.lee@example.com", "email": "ann.lee@example.com"},
            {"external_id": BO, "email": BO, "first_name": "Bo", "last_name": "Chen"},
        ]
        assert second["attributes"] == [{"external_id": BO, "email": BO}]
        assert [(e["external_id"], e["name"], e["properties"].get("partner_user_id"))
                for body in (first, second) for e in body["events"]] == [
            ("ann.lee@example.com", "Earned Reward", "cust-1036950000"),
            (BO, "Referred Signed Up", None),
            (BO, "Reward Fulfilled", None),
        ]
        stored = events_by_extole_id(app)
        assert stored[SIGNED_UP].identity == {"external_id": BO}
        assert (stored[SIGNED_UP].external_id, stored[SIGNED_UP].person_key) == (BO, "id:" + BO)
        # Without an email there is no external_id either: dead, no identifier.
        assert (stored["bad-0002"].status, stored["bad-0002"].last_error) == (
            "dead", "no identifier")
    finally:
        worker.close()
        app.extensions["relay.db"].dispose()


def test_no_identifier_is_dead_without_asking_braze(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("invalid_no_identifier.json"))
    make_worker().drain(max_seconds=10)
    assert len(braze.calls) == 0
    [stored] = events_by_extole_id(app).values()
    assert (stored.status, stored.last_error, stored.attempts, stored.lease_owner) == (
        "dead", "no identifier", 0, None)


# -- the export limiter ---------------------------------------------------------------------------

def test_the_export_limiter_makes_events_wait_without_attempts_and_never_kills_them(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    found(braze)
    settings = make_settings(braze_export_rate=Rate(2, 60.0), retry_max_age=1)
    post_webhook([email_only(n, email=f"p{n}@example.com") for n in (1, 2, 3)])
    worker = make_worker(settings)
    before = utcnow()
    worker.drain(max_seconds=10)
    assert len(calls(braze, EXPORT)) == 1
    stored = events_by_extole_id(app)
    assert stored["eo-1"].status == "delivered"
    for waiting in (stored["eo-2"], stored["eo-3"]):
        assert (waiting.status, waiting.attempts, waiting.first_failure_at) == ("pending", 0, None)
        assert "BRAZE_EXPORT_RATE" in (waiting.last_error or "")
        # One call per minute left in the bucket: about a minute from now.
        assert before + timedelta(seconds=50) <= waiting.next_attempt_at
        assert waiting.next_attempt_at <= utcnow() + timedelta(seconds=61)

    # Another worker sharing the database shares the budget.
    with app.extensions["relay.db"].session() as session:
        session.execute(update(QueuedEvent).values(next_attempt_at=utcnow()))
    make_worker(settings).drain(max_seconds=10)
    assert len(calls(braze, EXPORT)) == 1
    assert {e.status for k, e in events_by_extole_id(app).items() if k != "eo-1"} == {"pending"}
    assert all(e.attempts == 0 for e in events_by_extole_id(app).values())

    # A minute later (simulated), the next lookup goes through.
    with app.extensions["relay.db"].session() as session:
        session.execute(update(RateLimiter).values(tokens=1.0))
        session.execute(update(QueuedEvent).values(next_attempt_at=utcnow()))
    worker.drain(max_seconds=10)
    assert len(calls(braze, EXPORT)) == 2
    assert sorted(e.status for e in events_by_extole_id(app).values()) == ["delivered", "delivered",
                                                              "pending"]


def test_an_export_limiter_wait_is_credited_to_the_failure_clock(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    braze.post(EXPORT, json={"message": "Service Unavailable"}, status=503)
    settings = make_settings(braze_export_rate=Rate(2, 60.0))
    post_webhook([email_only(1)])
    worker = make_worker(settings)
    worker.drain(max_seconds=10)
    failed = events_by_extole_id(app)["eo-1"]
    assert (failed.status, failed.attempts) == ("pending", 1)
    assert "HTTP 503" in (failed.last_error or "")
    assert failed.first_failure_at is not None
    with app.extensions["relay.db"].session() as session:
        session.execute(update(QueuedEvent).values(next_attempt_at=utcnow()))
    before = utcnow()
    worker.drain(max_seconds=10)  # the bucket is empty: about a minute to wait
    waiting = events_by_extole_id(app)["eo-1"]
    assert waiting.attempts == 1
    wait = waiting.next_attempt_at - before
    shift = waiting.first_failure_at - failed.first_failure_at
    assert wait - timedelta(seconds=2) <= shift <= wait + timedelta(seconds=2)
    assert shift >= timedelta(seconds=50)


def test_export_answers_other_than_200(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    # 400: Braze cannot look the address up; treated as unknown, so an alias is created.
    braze.post(EXPORT, json={"message": "Invalid email"}, status=400)
    post_webhook([email_only(1)])
    worker = make_worker(make_settings(braze_export_rate=UNLIMITED))
    worker.drain(max_seconds=10)
    assert events_by_extole_id(app)["eo-1"].identity == {"user_alias": BO_ALIAS}
    assert events_by_extole_id(app)["eo-1"].status == "delivered"

    # 429 on the export: the events wait without an attempt; tracking is not paused.
    reset = int(utcnow().timestamp()) + 3600  # utcnow is naive UTC
    braze.replace(responses.POST, EXPORT, json={"message": "Rate limit exceeded"}, status=429,
                  headers={"X-RateLimit-Reset": str(reset)})
    post_webhook([email_only(2, email="new@example.com"), {
        "type": "shared", "event_id": "x-1", "event_time": "2026-11-21T09:00:00Z",
        "partner_user_id": "cust-1"}])
    worker.drain(max_seconds=10)
    stored = events_by_extole_id(app)
    assert (stored["eo-2"].status, stored["eo-2"].attempts) == ("pending", 0)
    assert "export rate limit" in (stored["eo-2"].last_error or "")
    assert stored["x-1"].status == "delivered"
