"""The admin JSON API (README, "Admin page"): every route, its auth, CSRF and validation, on
SQLite and PostgreSQL. Database state is asserted, not only status codes."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import inspect

from relay import braze_state, create_app
from relay.db import get_db, utcnow
from relay.exceptions import DatabaseUnavailable
from relay.models import AttemptEvent, DeliveryAttempt
from relay.outbox import queries
from relay.settings import Settings
from tests.support import post_ids, stored_event, update_event

PASSWORD = "admin-password"  # conftest's make_settings
EVENT_KEYS = {"id", "environment", "extole_event_id", "extole_type", "braze_event", "status",
              "attempts", "external_id", "email", "event_time", "received_at", "next_attempt_at",
              "last_error"}


def basic(user: str = "admin", password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def login(client: FlaskClient) -> str:
    """Sign in through the form; answers the session's CSRF token."""
    page = client.get("/admin/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    answer = client.post("/admin/login", data={"username": "admin", "password": PASSWORD,
                                               "csrf_token": token})
    assert answer.status_code == 302
    live = client.get("/admin/").text
    return re.search(r'name="csrf-token" content="([^"]+)"', live).group(1)  # type: ignore[union-attr]


def reward(**overrides: Any) -> dict[str, Any]:
    # Each its own reward: one reward in one state is one event (README, "Duplicates").
    event = {"type": "reward_earned", "event_id": f"ev-{uuid.uuid4().hex[:12]}",
             "event_time": "2026-11-20T14:14:18Z", "partner_user_id": "cust-1",
             "email": "Ann.Lee@Example.com", "reward_id": f"r-{uuid.uuid4().hex[:12]}",
             "face_value": 50}
    event.update(overrides)
    return event


def make_dead(app: Flask, event_id: int, error: str = "Braze refused: bad attribute") -> None:
    now = utcnow()
    update_event(app, event_id, status="dead", attempts=3, next_attempt_at=None, last_error=error,
                 first_failure_at=now - timedelta(hours=1), updated_at=now)


# --- authentication -----------------------------------------------------------------------------

API_READS = ["/admin/api/events", "/admin/api/events/1", "/admin/api/stats", "/admin/stream"]
API_WRITES = ["/admin/api/events/1/retry", "/admin/api/events/1/replay", "/admin/api/replay"]


@pytest.mark.parametrize("path", API_READS + API_WRITES)
def test_api_without_credentials_is_401_json(client: FlaskClient, path: str) -> None:
    answer = (client.post(path, json={}) if path in API_WRITES else client.get(path))
    assert answer.status_code == 401
    assert "sign in" in answer.json["error"]
    assert answer.headers["WWW-Authenticate"] == 'Basic realm="relay admin"'


def test_page_fetches_get_401_without_a_basic_challenge(client: FlaskClient) -> None:
    answer = client.get("/admin/api/stats", headers={"X-Requested-With": "fetch"})
    assert answer.status_code == 401
    assert "WWW-Authenticate" not in answer.headers


@pytest.mark.parametrize("headers", [basic(password="wrong"), basic(user="root"),
                                     {"Authorization": "Basic !!notbase64"},
                                     {"Authorization": "Bearer admin-password"}])
def test_wrong_credentials_are_401(client: FlaskClient, headers: dict[str, str]) -> None:
    answer = client.get("/admin/api/stats", headers=headers)
    assert answer.status_code == 401
    assert answer.json["error"]


def test_basic_auth_reads_the_api(client: FlaskClient) -> None:
    assert client.get("/admin/api/stats", headers=basic()).status_code == 200


def test_session_reads_the_api(client: FlaskClient) -> None:
    login(client)
    assert client.get("/admin/api/events").status_code == 200


def test_basic_failures_are_throttled(client: FlaskClient) -> None:
    """Per user name and per address across processes: see test_admin_throttle."""
    for _ in range(10):
        assert client.get("/admin/api/stats", headers=basic(password="guess")).status_code == 401
    locked = client.get("/admin/api/stats", headers=basic())
    assert locked.status_code == 429
    assert "too many failed sign-ins for this user name" in locked.json["error"]
    assert 0 < int(locked.headers["Retry-After"]) <= 900
    other = client.get("/admin/api/stats", headers=basic(),
                       environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert other.status_code == 429  # another address, the same user name


def test_disabled_without_password(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(admin_password=None), TESTING=True)
    try:
        client = app.test_client()
        for path in API_READS:
            answer = client.get(path, headers=basic())
            assert answer.status_code == 503
            assert "RELAY_ADMIN_PASSWORD" in answer.json["error"]
            assert "RELAY_SECRET_KEY" in answer.json["error"]
        answer = client.post("/admin/api/replay", json={}, headers=basic())
        assert answer.status_code == 503
    finally:
        get_db(app).dispose()


# --- CSRF and content type ----------------------------------------------------------------------


@pytest.fixture
def dead_event(app: Flask, post_webhook: Callable[..., Any]) -> int:
    (event_id,) = post_ids(post_webhook, reward())
    make_dead(app, event_id)
    return event_id


@pytest.mark.parametrize("action", ["retry", "replay", "bulk"])
@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_session_writes_need_the_csrf_header(app: Flask, client: FlaskClient, dead_event: int,
                                             action: str, token: str | None) -> None:
    login(client)
    headers = {"X-CSRF-Token": token} if token else {}
    path = "/admin/api/replay" if action == "bulk" else f"/admin/api/events/{dead_event}/{action}"
    answer = client.post(path, json={}, headers=headers)
    assert answer.status_code == 403
    assert "X-CSRF-Token" in answer.json["error"]
    assert stored_event(app, dead_event).status == "dead"


def test_session_write_with_csrf_header_works(app: Flask, client: FlaskClient,
                                              dead_event: int) -> None:
    token = login(client)
    answer = client.post(f"/admin/api/events/{dead_event}/retry", json={},
                         headers={"X-CSRF-Token": token})
    assert answer.status_code == 200
    assert stored_event(app, dead_event).status == "pending"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_writes_need_json(app: Flask, client: FlaskClient, dead_event: int,
                          content_type: str | None) -> None:
    headers = basic() | ({"Content-Type": content_type} if content_type else {})
    answer = client.post(f"/admin/api/events/{dead_event}/retry", data="{}", headers=headers)
    assert answer.status_code == 415
    assert "application/json" in answer.json["error"]
    assert stored_event(app, dead_event).status == "dead"


# --- listing, filters, pagination -----------------------------------------------------------------


def test_list_shape_newest_first(client: FlaskClient, post_webhook: Callable[..., Any]) -> None:
    ids = post_ids(post_webhook, reward(), reward(), reward())
    body = client.get("/admin/api/events", headers=basic()).json
    assert set(body) == {"events", "next_cursor"}
    assert [event["id"] for event in body["events"]] == sorted(ids, reverse=True)
    assert body["next_cursor"] is None
    first = body["events"][0]
    assert set(first) >= EVENT_KEYS
    assert first["email"] == "ann.lee@example.com"
    assert first["braze_event"] == "Earned Reward"
    assert first["status"] == "pending" and first["attempts"] == 0


def test_keyset_pagination_walks_every_event_once(client: FlaskClient,
                                                  post_webhook: Callable[..., Any]) -> None:
    ids = post_ids(post_webhook, *[reward() for _ in range(7)])
    seen: list[int] = []
    cursor = ""
    for _ in range(10):
        body = client.get(f"/admin/api/events?limit=3&cursor={cursor}", headers=basic()).json
        assert len(body["events"]) <= 3
        seen += [event["id"] for event in body["events"]]
        if body["next_cursor"] is None:
            break
        cursor = str(body["next_cursor"])
    assert seen == sorted(ids, reverse=True)


@pytest.mark.parametrize(("query", "message"), [
    ("status=bogus", "status must be one of"),
    ("limit=0", "limit must be a whole number from 1 to 200"),
    ("limit=201", "limit must be a whole number from 1 to 200"),
    ("limit=ten", "limit must be a whole number"),
    ("cursor=-4", "cursor must be a positive event id"),
    ("cursor=abc", "cursor must be a positive event id"),
    ("cursor=99999999999999999999999", "cursor must be a positive event id"),
    ("environment=mars", "environment must be one of production, staging"),
    ("q=" + "x" * 400, "q is longer than 320 characters"),
])
def test_bad_list_parameters_are_400(client: FlaskClient, query: str, message: str) -> None:
    answer = client.get(f"/admin/api/events?{query}", headers=basic())
    assert answer.status_code == 400
    assert message in answer.json["error"]


def test_limit_bounds_are_accepted(client: FlaskClient) -> None:
    for limit in ("1", "200", ""):
        assert client.get(f"/admin/api/events?limit={limit}", headers=basic()).status_code == 200


def _ids(client: FlaskClient, query: str) -> set[int]:
    answer = client.get(f"/admin/api/events?{query}", headers=basic())
    assert answer.status_code == 200, answer.json
    return {event["id"] for event in answer.json["events"]}


def test_filters_and_exact_search(app: Flask, client: FlaskClient,
                                  post_webhook: Callable[..., Any]) -> None:
    ann, bob = post_ids(post_webhook,
                        reward(event_id="ext-ann", partner_user_id="cust-ann", email="ann@x.io"),
                        reward(type="shared", event_id="ext-bob", partner_user_id="cust-bob",
                           email="bob@x.io"))
    (staged,) = post_ids(post_webhook, reward(event_id="ext-stage", partner_user_id="cust-ann"),
                         environment="staging")
    make_dead(app, bob)
    assert _ids(client, "status=dead") == {bob}
    assert _ids(client, "status=pending") == {ann, staged}
    assert _ids(client, "environment=staging") == {staged}
    assert _ids(client, "name=Shared") == {bob}
    assert _ids(client, "name=Earned+Reward&environment=production") == {ann}
    assert _ids(client, "q=cust-ann") == {ann, staged}
    assert _ids(client, "q=ANN@X.IO") == {ann}  # emails are compared lower-cased
    assert _ids(client, "q=ext-bob") == {bob}
    assert _ids(client, "q=ann") == set()  # exact, not a substring
    assert _ids(client, "q=cust-ann&environment=staging&status=pending") == {staged}


@pytest.mark.parametrize("needle", ["' OR '1'='1", "x'; DROP TABLE events; --", "%", "_",
                                    "\" OR 1=1 --", "ann@x.io' --"])
def test_injection_strings_are_plain_data(app: Flask, client: FlaskClient,
                                          post_webhook: Callable[..., Any], needle: str) -> None:
    post_ids(post_webhook, reward(email="ann@x.io"))
    for parameter in ("q", "name"):
        answer = client.get("/admin/api/events", query_string={parameter: needle},
                            headers=basic())
        assert answer.status_code == 200
        assert answer.json["events"] == []
    assert "events" in inspect(get_db(app).engine).get_table_names()
    assert len(client.get("/admin/api/events", headers=basic()).json["events"]) == 1


# --- one event ------------------------------------------------------------------------------------


def test_event_detail(app: Flask, client: FlaskClient, post_webhook: Callable[..., Any]) -> None:
    (event_id,) = post_ids(post_webhook, reward(event_id="ext-1", reward_id="r-1"))
    with get_db(app).session() as session:
        attempt = DeliveryAttempt(environment="production", endpoint="/users/track",
                                  started_at=utcnow(), duration_ms=12.34, status_code=400,
                                  request_body='{"events": []}',
                                  response_body='{"message": "bad"}', error="HTTP 400")
        session.add(attempt)
        session.flush()
        session.add(AttemptEvent(attempt_id=attempt.id, event_id=event_id, outcome="dead"))
    body = client.get(f"/admin/api/events/{event_id}", headers=basic()).json
    assert body["id"] == event_id and body["extole_event_id"] == "ext-1"
    assert body["payload"]["reward_id"] == "r-1"
    assert body["properties"]["reward_id"] == "r-1"
    assert body["inbound"]["method"] == "POST"
    assert body["inbound"]["headers"]["X-Extole-Signature"] == "[redacted]"
    assert '"ext-1"' in body["inbound"]["body"]
    (logged,) = body["attempts_log"]
    assert logged["status_code"] == 400 and logged["duration_ms"] == 12.3
    assert logged["response_body"] == '{"message": "bad"}' and logged["outcome"] == "dead"


@pytest.mark.parametrize("path", ["/admin/api/events/999999", "/admin/api/events/abc",
                                  "/admin/api/events/0", "/admin/api/events/99999999999999999999"])
def test_unknown_event_is_404_json(client: FlaskClient, path: str) -> None:
    answer = client.get(path, headers=basic())
    assert answer.status_code == 404
    assert "no event with id" in answer.json["error"]
    retried = client.post(path + "/retry", json={}, headers=basic())
    assert retried.status_code == 404
    assert "no event with id" in retried.json["error"]


def test_unknown_api_route_and_method_are_json(client: FlaskClient) -> None:
    answer = client.get("/admin/api/nothing-here", headers=basic())
    assert (answer.status_code, answer.json) == (
        404, {"error": "Not Found: GET /admin/api/nothing-here"})
    answer = client.delete("/admin/api/events", headers=basic())
    assert answer.status_code == 405
    assert answer.json == {"error": "Method Not Allowed: DELETE /admin/api/events"}
    assert set(answer.headers["Allow"].split(", ")) >= {"GET"}
    # Pages keep their HTML answers.
    page = client.get("/admin/nothing-here", headers=basic())
    assert page.status_code == 404 and page.mimetype == "text/html"


def test_retry_makes_a_dead_event_due_now(app: Flask, client: FlaskClient,
                                          dead_event: int) -> None:
    before = utcnow()
    answer = client.post(f"/admin/api/events/{dead_event}/retry", json={}, headers=basic())
    assert answer.status_code == 200
    assert answer.json["id"] == dead_event and answer.json["status"] == "pending"
    stored = stored_event(app, dead_event)
    assert stored.status == "pending"
    assert stored.attempts == 0
    assert stored.next_attempt_at is not None and before <= stored.next_attempt_at <= utcnow()
    assert stored.last_error == "Braze refused: bad attribute"  # history kept for the operator


def test_retry_of_a_retrying_event(app: Flask, client: FlaskClient,
                                   post_webhook: Callable[..., Any]) -> None:
    (event_id,) = post_ids(post_webhook, reward())
    update_event(app, event_id, attempts=2, next_attempt_at=utcnow() + timedelta(hours=1))
    assert client.post(f"/admin/api/events/{event_id}/retry", json={},
                       headers=basic()).status_code == 200
    assert stored_event(app, event_id).next_attempt_at <= utcnow()  # type: ignore[operator]


@pytest.mark.parametrize("status", ["delivered", "pending", "skipped"])
def test_retry_refuses_other_states_with_409(app: Flask, client: FlaskClient,
                                             post_webhook: Callable[..., Any],
                                             status: str) -> None:
    (event_id,) = post_ids(post_webhook, reward())
    update_event(app, event_id, status=status)
    answer = client.post(f"/admin/api/events/{event_id}/retry", json={}, headers=basic())
    assert answer.status_code == 409
    assert f"is {status}: only dead or retrying events can be retried" in answer.json["error"]
    assert stored_event(app, event_id).status == status


def test_replay_sends_a_delivered_event_again(app: Flask, client: FlaskClient,
                                              post_webhook: Callable[..., Any]) -> None:
    (event_id,) = post_ids(post_webhook, reward())
    update_event(app, event_id, status="delivered", delivered_at=utcnow(), next_attempt_at=None)
    answer = client.post(f"/admin/api/events/{event_id}/replay", json={}, headers=basic())
    assert answer.status_code == 200
    stored = stored_event(app, event_id)
    assert stored.status == "pending" and stored.next_attempt_at is not None


def test_replay_refuses_a_rejected_event(app: Flask, client: FlaskClient,
                                         post_webhook: Callable[..., Any]) -> None:
    answer = post_webhook({"event_id": "no-type"})
    assert answer.json["rejected"]
    rejected = client.get("/admin/api/events?status=rejected", headers=basic()).json["events"]
    event_id = rejected[0]["id"]
    answer = client.post(f"/admin/api/events/{event_id}/replay", json={}, headers=basic())
    assert answer.status_code == 409
    assert "rejected on receipt" in answer.json["error"]
    assert stored_event(app, event_id).status == "rejected"


# --- bulk replay ----------------------------------------------------------------------------------


def test_bulk_replay_requeues_matching_dead_events(app: Flask, client: FlaskClient,
                                                   post_webhook: Callable[..., Any]) -> None:
    prod = post_ids(post_webhook, reward(), reward(type="shared"), reward())
    (stage,) = post_ids(post_webhook, reward(), environment="staging")
    for event_id in [*prod[:2], stage]:
        make_dead(app, event_id)
    update_event(app, prod[2], status="delivered")
    answer = client.post("/admin/api/replay", json={"environment": "production"},
                         headers=basic())
    assert answer.status_code == 200
    assert answer.json == {"requeued": 2}
    assert [stored_event(app, i).status for i in prod] == ["pending", "pending", "delivered"]
    assert stored_event(app, stage).status == "dead"
    assert client.post("/admin/api/replay", json={"status": "dead", "name": "Shared"},
                       headers=basic()).json == {"requeued": 0}
    assert client.post("/admin/api/replay", json={}, headers=basic()).json == {"requeued": 1}


def test_bulk_replay_since(app: Flask, client: FlaskClient,
                           post_webhook: Callable[..., Any]) -> None:
    old, new = post_ids(post_webhook, reward(), reward())
    for event_id in (old, new):
        make_dead(app, event_id)
    update_event(app, old, received_at=utcnow() - timedelta(days=2))
    since = (utcnow() - timedelta(days=1)).isoformat() + "Z"
    answer = client.post("/admin/api/replay", json={"since": since}, headers=basic())
    assert answer.json == {"requeued": 1}
    assert stored_event(app, old).status == "dead" and stored_event(app, new).status == "pending"


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"statuss": "dead"}, 400, "unknown field 'statuss'"),
    ({"since": "yesterday"}, 400, "since must be an ISO-8601 time"),
    ({"status": "bogus"}, 400, "status must be one of"),
    ({"environment": 5}, 400, "environment must be a string"),
    ([1, 2], 400, "the body must be a JSON object"),
    ({"status": "rejected"}, 409, "rejected events cannot be sent"),
])
def test_bad_bulk_replay_bodies(client: FlaskClient, body: Any, status: int,
                                message: str) -> None:
    answer = client.post("/admin/api/replay", json=body, headers=basic())
    assert answer.status_code == status
    assert message in answer.json["error"]


def test_bulk_replay_invalid_json(client: FlaskClient) -> None:
    answer = client.post("/admin/api/replay", data="{nope",
                         headers=basic() | {"Content-Type": "application/json"})
    assert answer.status_code == 400


# --- stats ----------------------------------------------------------------------------------------


def test_stats_shape_and_values(app: Flask, client: FlaskClient,
                                post_webhook: Callable[..., Any]) -> None:
    ids = post_ids(post_webhook, reward(), reward(), reward())
    make_dead(app, ids[0])
    update_event(app, ids[1], received_at=utcnow() - timedelta(minutes=10))
    body = client.get("/admin/api/stats", headers=basic()).json
    assert set(body) == {"counts", "oldest_pending_seconds", "braze", "reconciliation",
                         "triggers"}
    assert body["counts"] == {"pending": 2, "delivered": 0, "dead": 1, "skipped": 0,
                              "rejected": 0}
    assert body["triggers"] == {"due": 0, "sending": 0, "sent": 0, "failed": 0, "uncertain": 0,
                                "dropped": 0}
    assert 590 <= body["oldest_pending_seconds"] <= 700
    assert body["braze"] == {"production": "ok", "staging": "ok"}
    assert body["reconciliation"]["production"]["configured"] is False
    assert body["reconciliation"]["production"]["last_run_at"] is None


def test_stats_report_missing_and_refused_keys(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(braze_staging_api_key=None), TESTING=True)
    try:
        with get_db(app).session() as session:
            braze_state.mark_refused(session, "production", "401 Invalid API key", 60)
        body = app.test_client().get("/admin/api/stats", headers=basic()).json
        assert body["braze"] == {"production": "refused", "staging": "missing"}
    finally:
        get_db(app).dispose()


def test_database_outage_is_503_json(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*_args: Any, **_kwargs: Any) -> Any:
        raise DatabaseUnavailable("database unavailable: OperationalError: connection refused")

    monkeypatch.setattr(queries, "list_events", down)
    answer = client.get("/admin/api/events", headers=basic())
    assert answer.status_code == 503
    assert "database unavailable" in answer.json["error"]
