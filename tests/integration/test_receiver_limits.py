"""What a client can make the receiver store and compute (README, "Refused requests"), on SQLite
and PostgreSQL.

A refused request keeps its size and SHA-256, never its body; beyond RELAY_REFUSED_LOG_RATE per
address and minute it is only counted, in one row every process shares; wrong Bearer or Basic
credentials are refused before the body is read. An array over RELAY_MAX_ITEMS gets 413 and
stores nothing; the answer lists at most 100 rejections, with their total.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from relay import metrics
from relay.db import get_db
from relay.models import InboundRequest, RefusedRequestCount
from relay.refused import REFUSED_HEADER_BYTES
from tests.support import PROD_SECRET, signed, stored_events

JSON = {"Content-Type": "application/json"}
WRONG_BEARER = {**JSON, "Authorization": "Bearer not-the-secret"}
ELSEWHERE = {"REMOTE_ADDR": "192.0.2.9"}
NO_TYPE = "no event type: expected one of type, event, event_type, event_name, name"


def shared(event_id: str) -> dict[str, Any]:
    return {"type": "shared", "event_id": event_id, "event_time": "2026-11-23T10:00:00Z",
            "partner_user_id": "cust-1"}


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


def inbound(app: Flask) -> list[InboundRequest]:
    with get_db(app).session() as session:
        return list(session.scalars(select(InboundRequest).order_by(InboundRequest.id)))


def counts(app: Flask) -> list[tuple[Any, ...]]:
    """(address, refused, logged, 400, 401, 404, 413, 503) per address and minute."""
    with get_db(app).session() as session:
        return [(r.remote_addr, r.refused, r.logged, r.status_400, r.status_401, r.status_404,
                 r.status_413, r.status_503)
                for r in session.scalars(select(RefusedRequestCount)
                                         .order_by(RefusedRequestCount.remote_addr))]


def sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


# --- refused requests ---------------------------------------------------------------------------


def test_refused_requests_keep_no_body_and_beyond_the_rate_are_only_counted(
        make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    app = make_app(refused_log_rate=3)
    client = app.test_client()
    body = encode(shared("flood")) + b" " * 100_000  # 100 KB that must not be kept
    unauthorized = metrics.WEBHOOKS.labels("production", "unauthorized")._value.get()

    statuses = [client.post("/webhooks/extole/qa", data=body, headers=signed(body)).status_code
                for _ in range(2)]
    statuses += [client.post("/webhooks/extole/production", data=body,
                             headers=WRONG_BEARER).status_code for _ in range(5)]
    elsewhere = client.post("/webhooks/extole/production", data=body, headers=WRONG_BEARER,
                            environ_base=ELSEWHERE)
    genuine = encode(shared("genuine"))
    accepted = client.post("/webhooks/extole/production", data=genuine, headers=signed(genuine))

    assert statuses == [404, 404, 401, 401, 401, 401, 401]
    assert (elsewhere.status_code, accepted.status_code) == (401, 200)
    rows = inbound(app)
    # The first three of 127.0.0.1's minute, the other address's first, the genuine webhook.
    assert [(r.remote_addr, r.status_code) for r in rows] == [
        ("127.0.0.1", 404), ("127.0.0.1", 404), ("127.0.0.1", 401), ("192.0.2.9", 401),
        ("127.0.0.1", 200)]
    # A 404's body is read (within the limit) for its hash; a wrong Bearer token's never is.
    assert [(r.body, r.body_sha256, r.body_size) for r in rows[:4]] == [
        (None, sha256(body), len(body)), (None, sha256(body), len(body)),
        (None, None, len(body)), (None, None, len(body))]
    assert rows[2].headers["Authorization"] == "Bearer [redacted]"
    assert (rows[4].body, rows[4].body_sha256) == (genuine, None)  # authenticated: kept
    assert counts(app) == [("127.0.0.1", 7, 3, 0, 5, 2, 0, 0), ("192.0.2.9", 1, 1, 0, 1, 0, 0, 0)]
    assert [e.extole_event_id for e in stored_events(app)] == ["genuine"]
    # The metric counts every one; the log names the first three, then says once that the
    # rest of the minute is only counted.
    assert metrics.WEBHOOKS.labels("production", "unauthorized")._value.get() == (
        unauthorized + 6)
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.receiver"]
    assert [line.split(" refused ")[1][:3] for line in lines if " refused 40" in line] == [
        "404", "404", "401", "401"]
    assert [line for line in lines if "only counted" in line] == [
        "refused webhooks from 127.0.0.1: more than 3 this minute (RELAY_REFUSED_LOG_RATE), "
        "the rest of the minute only counted"]


def test_processes_share_one_count_per_address_and_minute(
        make_app: Callable[..., Flask]) -> None:
    """Two apps on one database stand for two processes (or hosts) behind one address."""
    first, second = make_app(refused_log_rate=2), make_app(refused_log_rate=2)
    for app in (first, second, first, second, first):
        assert app.test_client().post("/webhooks/extole/production", data=b"{}",
                                      headers=JSON).status_code == 401
    assert len(inbound(first)) == 2
    assert counts(first) == [("127.0.0.1", 5, 2, 0, 5, 0, 0, 0)]


def test_a_rate_of_zero_logs_no_refused_request_one_by_one(
        make_app: Callable[..., Flask]) -> None:
    app = make_app(refused_log_rate=0)
    assert app.test_client().post("/webhooks/extole/production", data=b"{}",
                                  headers=WRONG_BEARER).status_code == 401
    assert inbound(app) == []
    assert counts(app) == [("127.0.0.1", 1, 0, 0, 1, 0, 0, 0)]


class Untouchable(io.RawIOBase):
    """A request body that fails the test if anything reads it."""

    def __init__(self) -> None:
        self.reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.reads += 1
        raise AssertionError("the body of a request with wrong credentials was read")


def _post_unread(app: Flask, headers: dict[str, str]) -> tuple[Any, Untouchable]:
    builder = EnvironBuilder(path="/webhooks/extole/production", method="POST", headers=headers)
    environ = builder.get_environ()
    builder.close()
    stream = Untouchable()
    environ["wsgi.input"] = stream
    environ["CONTENT_LENGTH"] = str(1024 * 1024)
    return app.test_client().open(Request(environ)), stream


@pytest.mark.parametrize(("headers", "error"), [
    pytest.param({"Authorization": "Bearer wrong"}, "invalid bearer token", id="bearer"),
    pytest.param({"Authorization": "Basic " + base64.b64encode(b"u:wrong").decode()},
                 "invalid basic credentials", id="basic"),
    pytest.param({"Authorization": "Token abc"},
                 "unsupported authorization scheme 'Token': use Bearer <secret> or Basic",
                 id="other-scheme"),
    pytest.param({}, "missing credentials: send Authorization: Bearer <secret>, Authorization: "
                 "Basic, or X-Extole-Signature (HMAC-SHA256 of the body)", id="missing"),
])
def test_wrong_bearer_or_basic_credentials_are_refused_before_the_body_is_read(
        app: Flask, headers: dict[str, str], error: str) -> None:
    response, stream = _post_unread(app, {**JSON, **headers})
    assert (response.status_code, response.get_json()) == (401, {"error": error})
    assert stream.reads == 0
    [row] = inbound(app)
    assert (row.body, row.body_sha256, row.body_size) == (None, None, 1024 * 1024)


def test_right_bearer_credentials_still_read_and_keep_the_body(app: Flask) -> None:
    body = encode(shared("bearer-ok"))
    response = app.test_client().post("/webhooks/extole/production", data=body,
                                      headers={**JSON, "Authorization": f"Bearer {PROD_SECRET}"})
    assert response.status_code == 200
    [row] = inbound(app)
    assert (row.body, row.auth_method) == (body, "bearer")


def test_a_refused_request_keeps_a_bounded_part_of_its_headers(app: Flask) -> None:
    many = {f"X-Padding-{n:02d}": "p" * 900 for n in range(40)}
    response = app.test_client().post("/webhooks/extole/production", data=b"{}",
                                      headers={**WRONG_BEARER, **many})
    assert response.status_code == 401
    [row] = inbound(app)
    assert len(json.dumps(row.headers)) < REFUSED_HEADER_BYTES + 200
    assert row.headers["Content-Type"] == "application/json"
    dropped = row.headers["..."]
    kept = [name for name in row.headers if name.startswith("X-Padding-")]
    assert dropped == f"{40 - len(kept)} more headers not kept"


# --- RELAY_MAX_ITEMS ----------------------------------------------------------------------------


def test_an_array_over_max_items_is_413_and_stores_nothing_but_the_log_entry(
        make_app: Callable[..., Flask]) -> None:
    app = make_app(max_items=3)
    client = app.test_client()
    body = encode([shared(f"m-{n}") for n in range(4)])
    response = client.post("/webhooks/extole/production", data=body, headers=signed(body))
    assert (response.status_code, response.get_json()) == (
        413, {"error": "body has 4 items, more than RELAY_MAX_ITEMS (3)"})
    assert stored_events(app) == []
    [row] = inbound(app)
    assert (row.status_code, row.outcome, row.auth_method) == (413, "too_many_items", "signature")
    assert (row.body, row.body_sha256, row.body_size) == (None, sha256(body), len(body))
    assert (row.accepted, row.duplicates, row.rejected) == (0, 0, 0)

    at_limit = encode([shared(f"m-{n}") for n in range(3)])
    answer = client.post("/webhooks/extole/production", data=at_limit, headers=signed(at_limit))
    assert answer.status_code == 200 and answer.get_json()["accepted"] == 3


def test_the_default_max_items_is_1000(app: Flask) -> None:
    body = encode([{"event_id": n} for n in range(1001)])
    response = app.test_client().post("/webhooks/extole/production", data=body,
                                      headers=signed(body))
    assert (response.status_code, response.get_json()) == (
        413, {"error": "body has 1001 items, more than RELAY_MAX_ITEMS (1000)"})
    assert stored_events(app) == []


def test_the_answer_lists_the_first_100_rejections_and_counts_them_all(
        app: Flask, post_webhook: Callable[..., Any]) -> None:
    items: list[Any] = [{"event_id": f"bad-{n}"} for n in range(150)]
    items[10], items[140] = shared("good-1"), shared("good-2")
    response = post_webhook(items)
    assert response.status_code == 200
    answer = response.get_json()
    listed = [n for n in range(150) if n not in (10, 140)][:100]
    assert answer["rejected"] == [{"index": n, "error": NO_TYPE} for n in listed]
    assert (answer["accepted"], answer["duplicates"], answer["rejected_count"]) == (2, 0, 148)
    stored = stored_events(app)
    assert [e.extole_event_id for e in stored if e.status == "pending"] == ["good-1", "good-2"]
    assert answer["ids"] == [e.id for e in stored if e.status == "pending"]
    rejected = [e for e in stored if e.status == "rejected"]
    assert [e.extole_event_id for e in rejected] == [
        f"bad-{n}" for n in range(150) if n not in (10, 140)]
    assert {e.last_error for e in rejected} == {NO_TYPE}
    [row] = inbound(app)
    assert (row.accepted, row.duplicates, row.rejected) == (2, 0, 148)
