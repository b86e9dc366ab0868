"""The webhook receiver, answer by answer in the README's order ("Pointing Extole at relay"), on
SQLite and PostgreSQL.

Every test asserts the HTTP status, the exact error text and the rows left in `events` and
`inbound_requests`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event as event_api
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from relay import create_app
from relay.authentication import sign
from relay.db import get_db
from relay.extole import canonical_json
from relay.models import Base, InboundRequest
from relay.settings import Settings
from tests.support import (
    POSTGRESQL_ONLY,
    PROD_SECRET,
    STAGING_SECRET,
    post_concurrently,
    signed,
    stored_events,
)

JSON = {"Content-Type": "application/json"}
DB_DOWN = {"error": "database unavailable: the event was not stored, retry later"}
MISSING = ("missing credentials: send Authorization: Bearer <secret>, Authorization: Basic, "
           "or X-Extole-Signature (HMAC-SHA256 of the body)")


# --- helpers ----------------------------------------------------------------------------------


def event(event_id: str = "ev-1", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "shared", "event_id": event_id,
                            "event_time": "2026-11-23T10:00:00Z", "partner_user_id": "cust-1"}
    body.update(fields)
    return body


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


def bearer(secret: str) -> dict[str, str]:
    return {**JSON, "Authorization": f"Bearer {secret}"}


def basic(credentials: str) -> dict[str, str]:
    return {**JSON, "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def inbound(app: Flask) -> list[InboundRequest]:
    with get_db(app).session() as session:
        return list(session.scalars(select(InboundRequest).order_by(InboundRequest.id)))


def assert_refused(app: Flask, response: Any, status: int, error: str, outcome: str,
                   *, environment: str = "production", body: bytes | None = None,
                   auth_method: str | None = None) -> InboundRequest:
    """The answer, no event stored, and exactly one inbound log row saying why.

    `body`: the body as the receiver read it whole (None: not read, or not whole). A request
    refused before authentication (or with 413) keeps only its SHA-256; one refused after it
    (415, 400) keeps the body itself."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.get_json() == {"error": error}
    assert stored_events(app) == []
    [row] = inbound(app)
    assert (row.status_code, row.outcome, row.error) == (status, outcome, error)
    assert row.environment == environment
    assert (row.accepted, row.duplicates, row.rejected) == (0, 0, 0)
    if auth_method is None or status == 413:
        assert row.body is None
        assert row.body_sha256 == (hashlib.sha256(body).hexdigest() if body is not None
                                   else None)
    else:
        assert (row.body, row.body_sha256) == (body, None)
    assert row.auth_method == auth_method
    assert row.method == "POST"
    return row


def receipt(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.get_data(as_text=True)
    body: dict[str, Any] = response.get_json()
    return body


class Trickle:
    """A request body that arrives a few bytes per read, as a chunked upload does."""

    def __init__(self, data: bytes, step: int = 7) -> None:
        self._data, self._step, self._pos = data, step, 0

    def read(self, size: int | None = -1) -> bytes:
        remaining = len(self._data) - self._pos
        count = remaining if size is None or size < 0 else min(size, remaining)
        count = min(count, self._step)
        chunk = self._data[self._pos : self._pos + count]
        self._pos += count
        return chunk

    def readline(self, size: int | None = -1) -> bytes:
        return self.read(size)

    def close(self) -> None:
        pass


def post_streamed(client: FlaskClient, path: str, body: bytes, headers: dict[str, str],
                  *, content_length: int | None = None, step: int = 7) -> Any:
    """POST without Content-Length (chunked, as gunicorn passes it on) or with a wrong one."""
    builder = EnvironBuilder(path=path, method="POST", headers=headers)
    environ = builder.get_environ()
    builder.close()
    environ.pop("CONTENT_LENGTH", None)
    if content_length is None:
        environ["wsgi.input"] = Trickle(body, step)
        environ["wsgi.input_terminated"] = True
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    else:
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(content_length)
    return client.open(Request(environ))


# --- 1. 404 unknown environment, 413 body too large ------------------------------------------


def test_unknown_environment_is_404_and_logged(app: Flask, client: FlaskClient) -> None:
    body = encode(event())
    response = client.post("/webhooks/extole/qa", data=body, headers=signed(body))
    row = assert_refused(app, response, 404, "unknown environment 'qa': use production or staging",
                         "not_found", environment="qa", body=body)
    assert row.path == "/webhooks/extole/qa"


def test_unknown_environment_with_a_nul_character_is_404_not_500(
    app: Flask, client: FlaskClient
) -> None:
    body = encode(event())
    response = client.post("/webhooks/extole/qa%00x", data=body, headers=signed(body))
    row = assert_refused(app, response, 404,
                         "unknown environment 'qa\\x00x': use production or staging",
                         "not_found", environment="qa\ufffdx", body=body)
    assert row.path == "/webhooks/extole/qa\ufffdx"


def test_environment_names_are_case_sensitive(app: Flask, client: FlaskClient) -> None:
    body = encode(event())
    response = client.post("/webhooks/extole/Production", data=body, headers=signed(body))
    assert_refused(app, response, 404,
                   "unknown environment 'Production': use production or staging", "not_found",
                   environment="Production", body=body)


def test_unknown_environment_is_checked_before_the_size(
    make_app: Callable[..., Flask]
) -> None:
    app = make_app(max_body_bytes=10)
    body = encode(event())
    response = app.test_client().post("/webhooks/extole/qa", data=body, headers=signed(body))
    row = assert_refused(app, response, 404,
                         "unknown environment 'qa': use production or staging", "not_found",
                         environment="qa", body=None)
    assert row.body_size == len(body)


def test_body_over_the_limit_by_content_length_is_413(make_app: Callable[..., Flask]) -> None:
    app = make_app(max_body_bytes=100)
    body = encode(event(padding="x" * 100))
    response = app.test_client().post("/webhooks/extole/production", data=body,
                                      headers=signed(body))
    row = assert_refused(app, response, 413, "body larger than 100 bytes", "too_large")
    assert row.body_size == len(body)


def test_body_exactly_at_the_limit_is_accepted(make_app: Callable[..., Flask]) -> None:
    app = make_app(max_body_bytes=100)
    small = {"type": "shared", "event_id": "at-limit", "p": ""}
    body = encode({**small, "p": "x" * (100 - len(encode(small)))})
    assert len(body) == 100
    assert receipt(app.test_client().post("/webhooks/extole/production", data=body,
                                          headers=signed(body)))["accepted"] == 1


def test_streamed_body_without_content_length_over_the_limit_is_413(
    make_app: Callable[..., Flask]
) -> None:
    app = make_app(max_body_bytes=100)
    body = encode(event(padding="x" * 500))
    response = post_streamed(app.test_client(), "/webhooks/extole/production", body,
                             signed(body))
    row = assert_refused(app, response, 413, "body larger than 100 bytes", "too_large")
    assert row.body_size == 101  # read stops one byte past the limit
    assert "Content-Length" not in row.headers


def test_streamed_body_arriving_in_small_reads_is_read_whole(
    make_app: Callable[..., Flask]
) -> None:
    """A stream may answer a read with fewer bytes than asked: the signature covers them all."""
    app = make_app(max_body_bytes=4096)
    body = encode([event("st-1"), event("st-2", padding="y" * 1000)])
    response = post_streamed(app.test_client(), "/webhooks/extole/production", body,
                             signed(body), step=7)
    assert receipt(response)["accepted"] == 2
    [row] = inbound(app)
    assert (row.body, row.body_size, row.outcome) == (body, len(body), "accepted")


def test_body_shorter_than_its_content_length_is_400(app: Flask, client: FlaskClient) -> None:
    body = encode(event())
    response = post_streamed(client, "/webhooks/extole/production", body, signed(body),
                             content_length=len(body) + 50)
    assert_refused(app, response, 400, "body ended before its Content-Length", "bad_request")


def test_size_is_checked_before_the_secret(make_app: Callable[..., Flask]) -> None:
    app = make_app(max_body_bytes=10, extole_staging_webhook_secret=None)
    body = encode(event())
    response = app.test_client().post("/webhooks/extole/staging", data=body, headers=JSON)
    assert_refused(app, response, 413, "body larger than 10 bytes", "too_large",
                   environment="staging")


# --- 2. 503 secret not configured, 401 credentials --------------------------------------------


@pytest.mark.parametrize(("environment", "path", "unset"), [
    ("staging", "/webhooks/extole/staging", "extole_staging_webhook_secret"),
    ("production", "/webhooks/extole/production", "extole_webhook_secret"),
    ("production", "/webhooks/extole", "extole_webhook_secret"),
])
def test_environment_without_secret_is_503(make_app: Callable[..., Flask], environment: str,
                                           path: str, unset: str) -> None:
    app = make_app(**{unset: None})
    body = encode(event())
    # Even valid-looking credentials for the other environment change nothing.
    response = app.test_client().post(path, data=body, headers=bearer(PROD_SECRET))
    assert_refused(app, response, 503, f"webhook secret for {environment} is not configured",
                   "not_configured", environment=environment, body=body)


def test_missing_secret_of_one_environment_leaves_the_other_working(
    make_app: Callable[..., Flask]
) -> None:
    app = make_app(extole_staging_webhook_secret=None)
    body = encode(event())
    client = app.test_client()
    assert receipt(client.post("/webhooks/extole/production", data=body,
                               headers=signed(body)))["accepted"] == 1
    assert client.post("/webhooks/extole/staging", data=body,
                       headers=signed(body, STAGING_SECRET)).status_code == 503


def test_secret_is_checked_before_credentials(make_app: Callable[..., Flask]) -> None:
    app = make_app(extole_staging_webhook_secret=None)
    body = encode(event())
    response = app.test_client().post("/webhooks/extole/staging", data=body, headers={})
    assert_refused(app, response, 503, "webhook secret for staging is not configured",
                   "not_configured", environment="staging", body=body)


def _wrong_credentials() -> list[Any]:
    body = encode(event())
    token = base64.b64encode(b"extole:wrong").decode()
    return [
        pytest.param("production", JSON, MISSING, id="missing"),
        pytest.param("production", {**JSON, "Authorization": "  "}, MISSING, id="blank"),
        pytest.param("production", bearer("wrong"), "invalid bearer token", id="wrong-bearer"),
        pytest.param("production", {**JSON, "Authorization": "Bearer"}, "invalid bearer token",
                     id="empty-bearer"),
        pytest.param("production", basic("extole:wrong"), "invalid basic credentials",
                     id="wrong-basic-user-password"),
        pytest.param("production", basic("wrong"), "invalid basic credentials",
                     id="wrong-basic-secret"),
        pytest.param("production", basic(f"{PROD_SECRET}x"), "invalid basic credentials",
                     id="basic-secret-with-suffix"),
        pytest.param("production", {**JSON, "Authorization": "Basic %%%"},
                     "malformed basic credentials", id="malformed-basic"),
        pytest.param("production", {**JSON, "Authorization": "Basic " + token[:-2]},
                     "malformed basic credentials", id="truncated-basic"),
        pytest.param("production", {**JSON, "X-Extole-Signature": "0" * 64},
                     "X-Extole-Signature does not match the body", id="wrong-signature"),
        pytest.param("production", {**JSON, "X-Extole-Signature": ""},
                     "X-Extole-Signature does not match the body", id="empty-signature"),
        pytest.param("production", {**JSON, "X-Extole-Signature": sign(body + b" ", PROD_SECRET)},
                     "X-Extole-Signature does not match the body", id="signature-of-other-body"),
        pytest.param("production", {**JSON, "Authorization": "Token abc"},
                     "unsupported authorization scheme 'Token': use Bearer <secret> or Basic",
                     id="other-scheme"),
        pytest.param("production", {**JSON, "Authorization": PROD_SECRET},
                     "unsupported authorization scheme: use Bearer <secret> or Basic",
                     id="bare-secret-without-scheme"),
        pytest.param("production", signed(body, STAGING_SECRET),
                     "X-Extole-Signature does not match the body", id="staging-signature"),
        pytest.param("production", bearer(STAGING_SECRET), "invalid bearer token",
                     id="staging-bearer"),
        pytest.param("production", basic(STAGING_SECRET), "invalid basic credentials",
                     id="staging-basic"),
        pytest.param("production", basic(f"extole:{STAGING_SECRET}"), "invalid basic credentials",
                     id="staging-basic-user"),
        pytest.param("staging", signed(body, PROD_SECRET),
                     "X-Extole-Signature does not match the body", id="production-signature"),
        pytest.param("staging", bearer(PROD_SECRET), "invalid bearer token",
                     id="production-bearer"),
        pytest.param("staging", basic(PROD_SECRET), "invalid basic credentials",
                     id="production-basic"),
        pytest.param("staging", basic(f"extole:{PROD_SECRET}"), "invalid basic credentials",
                     id="production-basic-user"),
        pytest.param("staging", {**signed(body, PROD_SECRET), "Authorization": "Bearer nope"},
                     "invalid bearer token", id="wrong-signature-and-wrong-bearer"),
    ]


@pytest.mark.parametrize(("environment", "headers", "error"), _wrong_credentials())
def test_missing_or_wrong_credentials_are_401(app: Flask, client: FlaskClient, environment: str,
                                              headers: dict[str, str], error: str) -> None:
    body = encode(event())
    response = client.post(f"/webhooks/extole/{environment}", data=body, headers=headers)
    # Without a signature the headers decide, and the body is never read: size, no SHA-256.
    read = body if "X-Extole-Signature" in headers else None
    row = assert_refused(app, response, 401, error, "unauthorized", environment=environment,
                         body=read)
    assert row.body_size == len(body)
    assert row.path == f"/webhooks/extole/{environment}"
    assert row.remote_addr == "127.0.0.1"


def test_staging_secret_does_not_open_the_production_alias(app: Flask,
                                                           client: FlaskClient) -> None:
    body = encode(event())
    response = client.post("/webhooks/extole", data=body, headers=signed(body, STAGING_SECRET))
    row = assert_refused(app, response, 401, "X-Extole-Signature does not match the body",
                         "unauthorized", body=body)
    assert row.path == "/webhooks/extole"


def test_credentials_are_checked_before_the_content_type(app: Flask,
                                                         client: FlaskClient) -> None:
    body = b"not json"
    response = client.post("/webhooks/extole/production", data=body,
                           headers={"Content-Type": "text/plain", "Authorization": "Bearer x"})
    assert_refused(app, response, 401, "invalid bearer token", "unauthorized", body=None)


def _good_credentials(body: bytes, secret: str) -> list[tuple[str, dict[str, str], str]]:
    digest = sign(body, secret)
    return [
        ("bearer", bearer(secret), "bearer"),
        ("bearer-lowercase-scheme", {**JSON, "Authorization": f"bearer {secret}"}, "bearer"),
        ("bearer-padded", {**JSON, "Authorization": f"  Bearer   {secret}  "}, "bearer"),
        ("basic-secret", basic(secret), "basic"),
        ("basic-user-secret", basic(f"extole:{secret}"), "basic"),
        ("basic-empty-user", basic(f":{secret}"), "basic"),
        ("signature", {**JSON, "X-Extole-Signature": digest}, "signature"),
        ("signature-prefixed", {**JSON, "X-Extole-Signature": f"sha256={digest}"}, "signature"),
        ("signature-uppercase", {**JSON, "X-Extole-Signature": digest.upper()}, "signature"),
        ("signature-uppercase-prefix", {**JSON, "X-Extole-Signature": f"SHA256={digest}"},
         "signature"),
        ("signature-lowercase-header", {**JSON, "x-extole-signature": f" {digest} "},
         "signature"),
        ("signature-with-wrong-bearer", {**JSON, "X-Extole-Signature": digest,
                                         "Authorization": "Bearer wrong"}, "signature"),
        ("bearer-with-wrong-signature", {**bearer(secret), "X-Extole-Signature": "00"},
         "bearer"),
    ]


@pytest.mark.parametrize("environment", ["production", "staging"])
def test_every_key_type_is_accepted(app: Flask, client: FlaskClient, environment: str) -> None:
    secret = STAGING_SECRET if environment == "staging" else PROD_SECRET
    methods: list[str] = []
    for index in range(len(_good_credentials(b"", secret))):
        body = encode(event(f"{environment}-{index}"))
        name, headers, method = _good_credentials(body, secret)[index]
        response = client.post(f"/webhooks/extole/{environment}", data=body, headers=headers)
        assert receipt(response)["accepted"] == 1, name
        methods.append(method)
    rows = inbound(app)
    assert [(r.auth_method, r.outcome, r.status_code, r.environment) for r in rows] == [
        (method, "accepted", 200, environment) for method in methods]
    stored = stored_events(app)
    assert [e.extole_event_id for e in stored] == [
        f"{environment}-{i}" for i in range(len(methods))]
    assert {e.environment for e in stored} == {environment}


def test_secret_containing_a_colon_works_with_basic(make_app: Callable[..., Flask]) -> None:
    app = make_app(extole_webhook_secret="part:two")
    client = app.test_client()
    for number, credentials in enumerate(["part:two", "extole:part:two"]):
        body = encode(event(f"colon-{number}"))
        response = client.post("/webhooks/extole/production", data=body,
                               headers=basic(credentials))
        assert receipt(response)["accepted"] == 1
    body = encode(event("colon-x"))
    response = client.post("/webhooks/extole/production", data=body, headers=basic("part"))
    assert response.status_code == 401


def test_stored_headers_have_no_credentials(app: Flask, client: FlaskClient) -> None:
    body = encode(event("h-1"))
    client.post("/webhooks/extole/production", data=body,
                headers={**signed(body), "X-Request-Id": "req-42", "X-Webhook-Token": "t-1",
                         "X-Api-Key": "k-123", "Proxy-Authorization": "Basic cHJveHk6cHc="})
    body = encode(event("h-2"))
    client.post("/webhooks/extole/production", data=body, headers=bearer(PROD_SECRET))
    body = encode(event("h-3"))
    client.post("/webhooks/extole/production", data=body, headers=basic(f"u:{PROD_SECRET}"))
    body = encode(event("h-4"))
    client.post("/webhooks/extole/production", data=body,
                headers={**JSON, "Authorization": PROD_SECRET})
    first, second, third, fourth = (r.headers for r in inbound(app))
    assert first["X-Extole-Signature"] == "[redacted]"
    assert first["X-Request-Id"] == "req-42"
    assert first["X-Webhook-Token"] == "[redacted]"
    assert first["Proxy-Authorization"] == "Basic [redacted]"
    assert first["X-Api-Key"] == "[redacted]"
    assert first["Content-Type"] == "application/json"
    assert second["Authorization"] == "Bearer [redacted]"
    assert third["Authorization"] == "Basic [redacted]"
    assert fourth["Authorization"] == "[redacted]"


def test_header_with_a_nul_character_is_stored_without_it(app: Flask,
                                                          client: FlaskClient) -> None:
    body = encode(event())
    response = client.post("/webhooks/extole/production", data=body,
                           headers={**signed(body), "X-Trace": "a\x00b"})
    assert receipt(response)["accepted"] == 1
    [row] = inbound(app)
    assert row.headers["X-Trace"] == "a\ufffdb"


# --- 3. 415 content type, 400 body ------------------------------------------------------------


@pytest.mark.parametrize(("content_type", "shown"), [
    (None, "none"),
    ("text/plain", "text/plain"),
    ("application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),
    ("application/jsonp", "application/jsonp"),
    ("text/json; charset=utf-8", "text/json; charset=utf-8"),
])
def test_content_type_that_is_not_json_is_415(app: Flask, client: FlaskClient,
                                              content_type: str | None, shown: str) -> None:
    body = encode(event())
    headers = {"X-Extole-Signature": sign(body, PROD_SECRET)}
    if content_type:
        headers["Content-Type"] = content_type
    response = client.post("/webhooks/extole/production", data=body, headers=headers)
    assert_refused(app, response, 415, f"content type must be application/json, got {shown!r}",
                   "unsupported_media_type", body=body, auth_method="signature")


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
    "application/vnd.x+json", "application/vnd.extole.webhook+json; version=2",
])
def test_json_content_types_are_accepted(app: Flask, client: FlaskClient,
                                         content_type: str) -> None:
    body = encode(event())
    response = client.post("/webhooks/extole/production", data=body,
                           headers={"Content-Type": content_type,
                                    "X-Extole-Signature": sign(body, PROD_SECRET)})
    assert receipt(response)["accepted"] == 1
    assert len(stored_events(app)) == 1


def test_content_type_is_checked_before_the_body(app: Flask, client: FlaskClient) -> None:
    body = b"{not json"
    response = client.post("/webhooks/extole/production", data=body,
                           headers={"Content-Type": "text/plain",
                                    "X-Extole-Signature": sign(body, PROD_SECRET)})
    assert_refused(app, response, 415, "content type must be application/json, got 'text/plain'",
                   "unsupported_media_type", body=body, auth_method="signature")


NOT_OBJECT_OR_ARRAY = "body must be a JSON object or an array of objects"


@pytest.mark.parametrize(("body", "error"), [
    pytest.param(b"", "body is not valid JSON: Expecting value: line 1 column 1 (char 0)",
                 id="empty"),
    pytest.param(b'{"type":', "body is not valid JSON: Expecting value: line 1 column 9 (char 8)",
                 id="truncated"),
    pytest.param(b'{"a": 1} x', "body is not valid JSON: Extra data: line 1 column 10 (char 9)",
                 id="trailing-data"),
    pytest.param(b"{'type': 'shared'}", "body is not valid JSON: Expecting property name enclosed "
                 "in double quotes: line 1 column 2 (char 1)", id="single-quotes"),
    pytest.param(b'{"type": "\xff"}', "body is not valid UTF-8 (byte 10)", id="invalid-utf8"),
    pytest.param(b'{"type": "\xed\xa0\x80"}', "body is not valid UTF-8 (byte 10)",
                 id="utf8-encoded-surrogate"),
    pytest.param(b'{"type": "shared", "v": NaN}',
                 "body is not valid JSON: NaN is not a JSON number", id="nan"),
    pytest.param(b'[Infinity]', "body is not valid JSON: Infinity is not a JSON number",
                 id="infinity"),
    pytest.param(b'{"v": -Infinity}', "body is not valid JSON: -Infinity is not a JSON number",
                 id="minus-infinity"),
    pytest.param(b'{"type": "shared", "v": 1e400}',
                 "body is not valid JSON: number 1e400 is out of range", id="float-overflow"),
    pytest.param(b"[" * 10_000 + b"]" * 10_000,
                 "body is not valid JSON: nested too deeply to parse", id="nested-10000"),
    pytest.param(b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
                 "body is not valid JSON: nested too deeply to parse", id="nested-objects-10000"),
    pytest.param(b"[" * 100 + b"]" * 100,
                 "body is not valid JSON: nested deeper than 64 levels", id="nested-100"),
    pytest.param(b'"shared"', NOT_OBJECT_OR_ARRAY, id="string"),
    pytest.param(b"42", NOT_OBJECT_OR_ARRAY, id="number"),
    pytest.param(b"null", NOT_OBJECT_OR_ARRAY, id="null"),
    pytest.param(b"true", NOT_OBJECT_OR_ARRAY, id="boolean"),
])
def test_body_that_is_not_usable_json_is_400(app: Flask, client: FlaskClient, body: bytes,
                                             error: str) -> None:
    response = client.post("/webhooks/extole/production", data=body, headers=signed(body))
    row = assert_refused(app, response, 400, error, "bad_json", body=body,
                         auth_method="signature")
    assert row.body_size == len(body)


def test_nesting_up_to_the_limit_is_accepted(app: Flask, client: FlaskClient) -> None:
    nested: Any = "deep"
    for _ in range(62):  # the body object and its `data` make 64 levels with these
        nested = [nested]
    body = encode(event(data=nested))
    assert receipt(client.post("/webhooks/extole/production", data=body,
                               headers=signed(body)))["accepted"] == 1


def test_byte_order_mark_is_tolerated(app: Flask, client: FlaskClient) -> None:
    body = b"\xef\xbb\xbf" + encode(event())
    assert receipt(client.post("/webhooks/extole/production", data=body,
                               headers=signed(body)))["accepted"] == 1
    [row] = inbound(app)
    assert row.body == body  # the raw bytes are kept untouched


@pytest.mark.parametrize(("query", "error"), [
    ("?type=", "query parameter type is empty"),
    ("?type=%20%20", "query parameter type is empty"),
    ("?type=" + "t" * 256, "query parameter type is longer than 255 characters"),
    ("?type=shared&type=earned_reward", "query parameter type is given more than once"),
])
def test_a_type_parameter_that_names_no_type_is_400(app: Flask, client: FlaskClient, query: str,
                                                    error: str) -> None:
    """A misconfigured webhook URL is refused at once (Extole shows the error and retries),
    never used to type events wrongly; the body is kept in the inbound log."""
    body = encode({"reward_id": "r-1", "partner_user_id": "cust-1"})
    response = client.post("/webhooks/extole/production" + query, data=body, headers=signed(body))
    assert_refused(app, response, 400, error, "bad_request", body=body, auth_method="signature")


def test_the_type_parameter_is_checked_after_the_credentials(app: Flask,
                                                             client: FlaskClient) -> None:
    body = encode(event())
    response = client.post("/webhooks/extole/production?type=", data=body,
                           headers=signed(body, "wrong-secret"))
    assert response.status_code == 401


# --- 5. 200 -----------------------------------------------------------------------------------


def test_the_type_parameter_types_the_items_without_a_type(app: Flask,
                                                           post_webhook: Any) -> None:
    reshaped = {"reward_id": "r-1", "partner_user_id": "cust-1", "data": {"k": "v"}}
    answer = receipt(post_webhook([reshaped, event("own-type"), {**reshaped, "reward_id": "r-2",
                                                                 "state": "SENT"}],
                                  query="?type=%20earned_reward%20"))
    assert (answer["accepted"], answer["rejected"]) == (3, [])
    by_id = {e.id: e for e in stored_events(app)}
    stored = [by_id[i] for i in answer["ids"]]
    assert [(e.extole_type, e.braze_event, (e.properties or {}).get("reward_state"))
            for e in stored] == [("earned_reward", "Earned Reward", "EARNED"),
                                 ("shared", "Shared", None),
                                 ("SENT", "Reward Sent", "SENT")]
    assert stored[0].payload == reshaped  # stored as it came
    # The same bodies again (same URL): duplicates, as Extole's retries must be.
    again = receipt(post_webhook([reshaped], query="?type=earned_reward"))
    assert (again["accepted"], again["duplicates"]) == (0, 1)
    # Without the parameter, the reshaped body has no type: rejected, as before.
    alone = receipt(post_webhook({**reshaped, "reward_id": "r-3"}))
    assert alone["rejected"] == [{"index": 0, "error": "no event type: expected one of type, "
                                                       "event, event_type, event_name, name"}]


def test_the_type_parameter_works_on_the_alias_and_staging(app: Flask, client: FlaskClient,
                                                           post_webhook: Any) -> None:
    reshaped = {"reward_id": "r-1", "partner_user_id": "cust-1"}
    body = encode(reshaped)
    assert receipt(client.post("/webhooks/extole?type=FULFILLED", data=body,
                               headers=signed(body)))["accepted"] == 1
    assert receipt(post_webhook(reshaped, "staging", query="?type=FULFILLED"))["accepted"] == 1
    assert [(e.environment, e.braze_event) for e in stored_events(app)] == [
        ("production", "Reward Fulfilled"), ("staging", "Reward Fulfilled")]


def test_one_object_is_accepted_and_stored(app: Flask, client: FlaskClient) -> None:
    body = encode(event("one-1"))
    response = client.post("/webhooks/extole/production", data=body, headers=signed(body))
    [stored] = stored_events(app)
    assert receipt(response) == {"accepted": 1, "duplicates": 0, "rejected": [],
                                 "rejected_count": 0, "ids": [stored.id]}
    assert (stored.environment, stored.status, stored.dedup_key) == ("production", "pending",
                                                                      "one-1")
    [row] = inbound(app)
    assert (row.status_code, row.outcome, row.error, row.auth_method) == (200, "accepted", None,
                                                                          "signature")
    assert (row.accepted, row.duplicates, row.rejected) == (1, 0, 0)
    assert (row.body, row.body_size, row.environment) == (body, len(body), "production")
    assert stored.inbound_id == row.id


def test_array_ids_follow_the_request_order(app: Flask, client: FlaskClient,
                                            post_webhook: Any) -> None:
    first = receipt(post_webhook(event("b")))
    body = [event("a"), event("b"), "junk", event("c"), event("a")]
    answer = receipt(post_webhook(body))
    assert answer["accepted"] == 2
    assert answer["duplicates"] == 2
    assert answer["rejected"] == [{"index": 2, "error": "event must be a JSON object, "
                                   "not a string"}]
    by_id = {e.id: e for e in stored_events(app)}
    assert [by_id[i].extole_event_id for i in answer["ids"]] == ["a", "c"]
    assert by_id[first["ids"][0]].extole_event_id == "b"


def test_empty_array_is_200_with_zeros(app: Flask, post_webhook: Any) -> None:
    assert receipt(post_webhook([])) == {"accepted": 0, "duplicates": 0, "rejected": [],
                                         "rejected_count": 0, "ids": []}
    assert stored_events(app) == []
    [row] = inbound(app)
    assert (row.status_code, row.outcome, row.accepted, row.duplicates, row.rejected) == (
        200, "accepted", 0, 0, 0)


def test_duplicates_within_one_request(app: Flask, post_webhook: Any) -> None:
    answer = receipt(post_webhook([event("d-1"), event("d-1", extra="ignored"), event("d-2")]))
    assert (answer["accepted"], answer["duplicates"], answer["rejected"]) == (2, 1, [])
    stored = stored_events(app)
    assert [e.dedup_key for e in stored] == ["d-1", "d-2"]
    assert "extra" not in stored[0].payload  # the first copy is the one kept
    [row] = inbound(app)
    assert (row.accepted, row.duplicates, row.rejected) == (2, 1, 0)


def test_duplicates_across_requests_and_key_types(app: Flask, client: FlaskClient) -> None:
    body = encode(event("x-1"))
    first = receipt(client.post("/webhooks/extole/production", data=body, headers=signed(body)))
    again = receipt(client.post("/webhooks/extole/production", data=body,
                                headers=bearer(PROD_SECRET)))
    assert first == {"accepted": 1, "duplicates": 0, "rejected": [], "rejected_count": 0,
                     "ids": first["ids"]}
    assert again == {"accepted": 0, "duplicates": 1, "rejected": [], "rejected_count": 0,
                     "ids": []}
    assert len(stored_events(app)) == 1
    rows = inbound(app)
    assert [(r.accepted, r.duplicates, r.outcome) for r in rows] == [(1, 0, "accepted"),
                                                                     (0, 1, "accepted")]


def test_numeric_and_string_event_ids_are_the_same_event(post_webhook: Any, app: Flask) -> None:
    receipt(post_webhook(event(12345)))
    assert receipt(post_webhook(event("12345")))["duplicates"] == 1
    assert receipt(post_webhook(event(" 12345 ")))["duplicates"] == 1
    assert [e.dedup_key for e in stored_events(app)] == ["12345"]


def test_same_event_id_in_the_other_environment_is_not_a_duplicate(
    app: Flask, post_webhook: Any
) -> None:
    assert receipt(post_webhook(event("both")))["accepted"] == 1
    assert receipt(post_webhook(event("both"), environment="staging"))["accepted"] == 1
    assert receipt(post_webhook(event("both"), environment="staging"))["duplicates"] == 1
    assert sorted((e.environment, e.dedup_key) for e in stored_events(app)) == [
        ("production", "both"), ("staging", "both")]


def test_events_without_id_deduplicate_on_their_content(app: Flask, post_webhook: Any) -> None:
    body = {"type": "shared", "partner_user_id": "c-9", "event_time": "2026-11-23T10:00:00Z"}
    answer = receipt(post_webhook(body))
    reordered = dict(reversed(list(body.items())))
    assert receipt(post_webhook(reordered))["duplicates"] == 1
    assert receipt(post_webhook({**body, "partner_user_id": "c-10"}))["accepted"] == 1
    first = stored_events(app)[0]
    expected = "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()
    assert first.id == answer["ids"][0]
    assert first.dedup_key == first.extole_event_id == expected
    assert first.properties["extole_event_id"] == expected


def test_unusable_items_are_stored_rejected_and_the_rest_accepted(
    app: Flask, post_webhook: Any
) -> None:
    items: list[Any] = [
        event("ok-1"),
        "a string",
        {"event_id": "no-type", "email": "x@example.com"},
        event("bad-time", event_time="yesterday"),
        17,
        None,
        [event("nested")],
        event("ok-2"),
        {"type": "", "event_id": "empty-type"},
        event("bool-time", event_time=True),
        {"type": {"name": "shared"}, "event_id": "object-type"},
        event("far-time", event_time="9999-12-31T23:59:59-01:00"),
    ]
    answer = receipt(post_webhook(items))
    reasons = [
        (1, "event must be a JSON object, not a string"),
        (2, "no event type: expected one of type, event, event_type, event_name, name"),
        (3, "event time 'yesterday' does not parse"),
        (4, "event must be a JSON object, not a number"),
        (5, "event must be a JSON object, not null"),
        (6, "event must be a JSON object, not an array"),
        (8, "no event type: expected one of type, event, event_type, event_name, name"),
        (9, "event time True is not a time"),
        (10, "event type must be a non-empty string"),
        (11, "event time '9999-12-31T23:59:59-01:00' is out of range"),
    ]
    assert answer["rejected"] == [{"index": i, "error": e} for i, e in reasons]
    assert (answer["accepted"], answer["duplicates"]) == (2, 0)
    stored = stored_events(app)
    assert len(stored) == len(items)  # nothing that passed authentication is lost
    by_payload = [(e.status, e.last_error, e.dedup_key) for e in stored
                  if e.status == "rejected"]
    assert by_payload == [("rejected", e, None) for _, e in reasons]
    rejected = [e for e in stored if e.status == "rejected"]
    assert [e.payload for e in rejected] == [items[i] for i, _ in reasons]
    assert [e.extole_event_id for e in rejected] == [
        None, "no-type", "bad-time", None, None, None, "empty-type", "bool-time",
        "object-type", "far-time"]
    assert [e.extole_event_id for e in stored if e.status == "pending"] == ["ok-1", "ok-2"]
    assert answer["ids"] == [e.id for e in stored if e.status == "pending"]
    [row] = inbound(app)
    assert (row.accepted, row.duplicates, row.rejected, row.status_code) == (2, 0, 10, 200)


def test_a_single_unusable_event_is_200_with_nothing_accepted(app: Flask,
                                                             post_webhook: Any) -> None:
    answer = receipt(post_webhook({"event_id": "lonely"}))
    assert answer == {"accepted": 0, "duplicates": 0, "ids": [], "rejected_count": 1,
                      "rejected": [{"index": 0, "error": "no event type: expected one of "
                                                         "type, event, event_type, event_name, "
                                                         "name"}]}
    [stored] = stored_events(app)
    assert (stored.status, stored.extole_event_id, stored.payload) == (
        "rejected", "lonely", {"event_id": "lonely"})


def test_rejected_items_never_deduplicate(app: Flask, post_webhook: Any) -> None:
    receipt(post_webhook({"event_id": "r-1"}))
    receipt(post_webhook({"event_id": "r-1"}))
    assert [e.status for e in stored_events(app)] == ["rejected", "rejected"]


def test_alias_is_production(app: Flask, client: FlaskClient) -> None:
    body = encode(event("alias-1"))
    answer = receipt(client.post("/webhooks/extole", data=body, headers=signed(body)))
    # The same event through the full path is a duplicate: same environment.
    again = receipt(client.post("/webhooks/extole/production", data=body, headers=signed(body)))
    assert (answer["accepted"], again["duplicates"]) == (1, 1)
    [stored] = stored_events(app)
    assert stored.environment == "production"
    assert [(r.environment, r.path) for r in inbound(app)] == [
        ("production", "/webhooks/extole"), ("production", "/webhooks/extole/production")]


def test_strings_postgres_cannot_store_are_made_storable(app: Flask, client: FlaskClient) -> None:
    body = (b'{"type": "shared\\u0000", "event_id": "nul-\\u0000", "partner_user_id": "c\\ud800",'
            b' "data": {"k\\u0000": "\\udc00v"}}')
    answer = receipt(client.post("/webhooks/extole/production", data=body, headers=signed(body)))
    assert answer["accepted"] == 1
    [stored] = stored_events(app)
    assert stored.extole_type == "shared\ufffd"
    assert stored.dedup_key == "nul-\ufffd"
    assert stored.external_id == "c\ufffd"
    assert stored.properties["k\ufffd"] == "\ufffdv"
    [row] = inbound(app)
    assert row.body == body


# --- 4. 503 database unavailable --------------------------------------------------------------


def _settings_for(url: str) -> Settings:
    return Settings(database_url=url, extole_webhook_secret=PROD_SECRET,
                    extole_staging_webhook_secret=STAGING_SECRET)


@pytest.fixture
def unreachable_app() -> Iterator[Flask]:
    application = create_app(
        _settings_for("postgresql+psycopg://postgres:db-pass-XYZ@127.0.0.1:1/x"), TESTING=True)
    yield application
    application.extensions["relay.db"].dispose()


def test_unreachable_postgresql_is_503(unreachable_app: Flask,
                                       caplog: pytest.LogCaptureFixture) -> None:
    body = encode(event())
    caplog.set_level(logging.WARNING, logger="relay")
    response = unreachable_app.test_client().post("/webhooks/extole/production", data=body,
                                                  headers=signed(body))
    assert response.status_code == 503
    assert response.get_json() == DB_DOWN
    assert any("not stored" in r.getMessage() and "OperationalError" in r.getMessage()
               for r in caplog.records)
    assert "db-pass-XYZ" not in caplog.text  # the database password is not logged


def test_failed_commit_is_503_and_stores_nothing(app: Flask, client: FlaskClient) -> None:
    """A 2xx only after the commit: when the commit itself fails, the answer is 503."""
    engine = get_db(app).engine

    def fail_commit(_connection: Any) -> None:
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    # Two events: the session's path, with its own COMMIT, on both databases.
    body = encode([event("commit-1"), event("commit-2")])
    event_api.listen(engine, "commit", fail_commit)
    try:
        response = client.post("/webhooks/extole/production", data=body, headers=signed(body))
    finally:
        event_api.remove(engine, "commit", fail_commit)
    assert (response.status_code, response.get_json()) == (503, DB_DOWN)
    assert stored_events(app) == []
    assert inbound(app) == []
    # Extole's retry is then stored as the first copy, not a duplicate.
    again = receipt(client.post("/webhooks/extole/production", data=body, headers=signed(body)))
    assert (again["accepted"], again["duplicates"]) == (2, 0)


@POSTGRESQL_ONLY  # the single-statement path is PostgreSQL's
def test_failed_commit_of_a_single_event_is_503_and_stores_nothing(
        app: Flask, client: FlaskClient) -> None:
    """One event on PostgreSQL is one autocommitted statement: a failure at its commit (here a
    deferred constraint trigger, which runs at commit time) is a 503 with nothing stored."""
    with get_db(app).engine.begin() as connection:
        connection.execute(text(
            "CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$"))
        connection.execute(text(
            "CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON events "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit()"))
    body = encode(event("commit-single"))
    try:
        response = client.post("/webhooks/extole/production", data=body, headers=signed(body))
    finally:  # the database is shared by the session's tests
        with get_db(app).engine.begin() as connection:
            connection.execute(text("DROP TRIGGER refuse_at_commit ON events"))
            connection.execute(text("DROP FUNCTION refuse_at_commit()"))
    assert (response.status_code, response.get_json()) == (503, DB_DOWN)
    assert stored_events(app) == []
    assert inbound(app) == []
    again = receipt(client.post("/webhooks/extole/production", data=body, headers=signed(body)))
    assert (again["accepted"], again["duplicates"]) == (1, 0)
    [stored] = stored_events(app)
    assert stored.extole_event_id == "commit-single"


def test_refusals_keep_their_status_when_the_database_is_down(unreachable_app: Flask) -> None:
    client = unreachable_app.test_client()
    body = encode(event())
    assert client.post("/webhooks/extole/qa", data=body,
                       headers=signed(body)).status_code == 404
    response = client.post("/webhooks/extole/production", data=body, headers=bearer("wrong"))
    assert (response.status_code, response.get_json()) == (401, {"error": "invalid bearer token"})
    response = client.post("/webhooks/extole/production", data=b"[", headers=signed(b"["))
    assert response.status_code == 400


def test_locked_sqlite_is_503_after_the_busy_timeout(
    sqlite_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    monkeypatch.setattr("relay.db.SQLITE_BUSY_TIMEOUT_MS", 200)
    path = tmp_path / "locked.db"
    shutil.copy(sqlite_template, path)
    application = create_app(_settings_for(f"sqlite:///{path}"), TESTING=True)
    client = application.test_client()
    body = encode(event("locked-1"))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode=WAL")
        holder.execute("BEGIN EXCLUSIVE")
        response = client.post("/webhooks/extole/production", data=body, headers=signed(body))
        assert (response.status_code, response.get_json()) == (503, DB_DOWN)
        # A refusal while locked still answers its own status; its log row is given up.
        refused = client.post("/webhooks/extole/production", data=body, headers=bearer("no"))
        assert refused.status_code == 401
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    # Nothing was stored by the refused attempts: Extole's retry is the first copy.
    assert stored_events(application) == []
    assert inbound(application) == []
    again = receipt(client.post("/webhooks/extole/production", data=body, headers=signed(body)))
    assert again["accepted"] == 1
    application.extensions["relay.db"].dispose()


def test_database_without_schema_is_503_never_500(empty_database_url: str) -> None:
    application = create_app(_settings_for(empty_database_url), TESTING=True)
    try:
        client = application.test_client()
        body = encode(event())
        response = client.post("/webhooks/extole/production", data=body, headers=signed(body))
        assert (response.status_code, response.get_json()) == (503, DB_DOWN)
        response = client.post("/webhooks/extole/production", data=body, headers=bearer("x"))
        assert response.status_code == 401
    finally:
        application.extensions["relay.db"].dispose()


# --- concurrency --------------------------------------------------------------------------------


@pytest.mark.parametrize("round_", range(3))
def test_same_event_from_eight_threads_is_stored_once(app: Flask, round_: int) -> None:
    body = encode(event(f"race-{round_}"))
    answers = post_concurrently(app, [body] * 8)
    assert [a.status_code for a in answers] == [200] * 8
    receipts = [a.get_json() for a in answers]
    assert sum(r["accepted"] for r in receipts) == 1
    assert sum(r["duplicates"] for r in receipts) == 7
    [stored] = stored_events(app)
    assert [r["ids"] for r in receipts if r["accepted"]] == [[stored.id]]
    rows = inbound(app)
    assert len(rows) == 8
    assert sorted((r.accepted, r.duplicates) for r in rows) == [(0, 1)] * 7 + [(1, 0)]
    assert stored.inbound_id in {r.id for r in rows if r.accepted == 1}


def test_overlapping_arrays_in_opposite_orders_store_each_event_once(app: Flask) -> None:
    """Two batches sharing events in opposite orders: each event exactly once; an answer may be
    503 (PostgreSQL may pick one as a deadlock victim, and Extole retries it), never 500."""
    names = [f"ov-{i}" for i in range(6)]
    forward = encode([event(n) for n in names])
    backward = encode([event(n) for n in reversed(names)])
    answers = post_concurrently(app, [forward, backward] * 4)
    assert {a.status_code for a in answers} <= {200, 503}
    for answer in answers:
        if answer.status_code == 503:
            assert answer.get_json() == DB_DOWN
    ok = [a.get_json() for a in answers if a.status_code == 200]
    assert ok, "at least one batch goes through"
    assert sum(r["accepted"] for r in ok) == len(names)
    assert sum(r["accepted"] + r["duplicates"] for r in ok) == len(names) * len(ok)
    assert sorted(e.extole_event_id for e in stored_events(app)) == names


class _MeetAfterFirstEventInsert:
    """Holds each thread after its first INSERT into events until the other thread has done
    its own: two transactions sharing events in opposite orders then deadlock for certain
    (when rows are locked per event, as on PostgreSQL; SQLite's one writer at a time makes the
    second thread wait before its first insert, so the meeting cannot happen there)."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties)
        self.local = threading.local()

    def __call__(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not statement.lstrip().upper().startswith("INSERT INTO EVENTS"):
            return
        if getattr(self.local, "met", False):
            return
        self.local.met = True
        with contextlib.suppress(threading.BrokenBarrierError):
            self.barrier.wait(timeout=3)  # no meeting (the other thread waits on a lock): go on


@POSTGRESQL_ONLY
def test_webhooks_sharing_events_in_opposite_orders_both_answer_200_without_deadlock(
        app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    names = [f"dl-{i}" for i in range(3)]
    forward = encode([event(n) for n in names])
    backward = encode([event(n) for n in reversed(names)])
    engine = get_db(app).engine
    meet = _MeetAfterFirstEventInsert(2)
    event_api.listen(engine, "after_cursor_execute", meet)
    try:
        answers = post_concurrently(app, [forward, backward])
    finally:
        event_api.remove(engine, "after_cursor_execute", meet)
    assert [a.status_code for a in answers] == [200, 200]
    receipts = [a.get_json() for a in answers]
    assert sorted((r["accepted"], r["duplicates"]) for r in receipts) in (
        [(0, 3), (3, 0)], [(1, 2), (2, 1)])
    assert sorted(e.extole_event_id for e in stored_events(app)) == names
    assert len(inbound(app)) == 2
    assert not any("deadlock" in r.getMessage() for r in caplog.records)
    assert not any("not stored" in r.getMessage() for r in caplog.records)


@POSTGRESQL_ONLY
def test_store_webhook_takes_row_locks_in_a_deadlock_free_order(app: Flask) -> None:
    """Called directly, without the receiver's retry: neither transaction may be a victim."""
    from relay.outbox.ingest import store_webhook

    names = [f"lk-{i}" for i in range(3)]
    batches = [[event(n) for n in names], [event(n) for n in reversed(names)]]
    engine = get_db(app).engine
    meet = _MeetAfterFirstEventInsert(2)
    errors: list[BaseException] = []

    def run(items: list[Any]) -> None:
        try:
            with get_db(app).session() as session:
                row = InboundRequest(received_at=datetime.now(UTC).replace(tzinfo=None),
                                     environment="production", method="POST", path="/x",
                                     headers={}, body_size=0, status_code=200,
                                     outcome="accepted", accepted=0, duplicates=0, rejected=0)
                store_webhook(session, row, items, "production",
                              app.extensions["relay.event_map"])
        except BaseException as error:  # noqa: BLE001 - asserted below
            errors.append(error)

    event_api.listen(engine, "after_cursor_execute", meet)
    try:
        threads = [threading.Thread(target=run, args=(b,)) for b in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        event_api.remove(engine, "after_cursor_execute", meet)
    assert errors == []


# --- every table row, and the logs, without secrets ----------------------------------------------


def _secret_forms() -> list[str]:
    forms = []
    for secret in (PROD_SECRET, STAGING_SECRET):
        forms += [secret, base64.b64encode(secret.encode()).decode(),
                  base64.b64encode(f"extole:{secret}".encode()).decode(), secret[:12]]
    return forms


def _requests_with_every_credential(client: FlaskClient) -> None:
    number = 0
    for environment in ("production", "staging", "qa"):
        for secret in (PROD_SECRET, STAGING_SECRET):
            for headers_for in (
                lambda b, s: signed(b, s),
                lambda b, s: {**JSON, "X-Extole-Signature": "sha256=" + sign(b, s).upper()},
                lambda b, s: bearer(s),
                lambda b, s: basic(s),
                lambda b, s: basic(f"extole:{s}"),
                lambda b, s: {**JSON, "Authorization": s},
                lambda b, s: {**JSON, "Authorization": f"Token {s}"},
                lambda b, s: {"Content-Type": "text/plain", "Authorization": f"Bearer {s}"},
            ):
                number += 1
                body = encode(event(f"s-{number}"))
                client.post(f"/webhooks/extole/{environment}", data=body,
                            headers=headers_for(body, secret))
    body = b"{broken"
    client.post("/webhooks/extole/production", data=body, headers=bearer(PROD_SECRET))


def test_secrets_never_reach_any_table(app: Flask, client: FlaskClient) -> None:
    _requests_with_every_credential(client)
    seen = 0
    with get_db(app).engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            for row in connection.execute(table.select()):
                seen += 1
                for value in row:
                    if isinstance(value, bytes | bytearray | memoryview):
                        shown = bytes(value).decode("latin-1")
                    else:
                        shown = json.dumps(value, default=str) if not isinstance(value, str) \
                            else value
                    for form in _secret_forms():
                        assert form not in shown, (table.name, form)
    rows = inbound(app)
    assert {r.status_code for r in rows} == {200, 401, 404, 415, 400}
    assert seen >= len(rows) + len(stored_events(app)) == 49 + 10


def test_secrets_never_reach_the_logs(app: Flask, client: FlaskClient,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="relay")
    caplog.set_level(logging.DEBUG, logger="sqlalchemy")  # SQL and its parameters too
    _requests_with_every_credential(client)
    assert sum(r.name.startswith("sqlalchemy.engine") for r in caplog.records) > 100
    assert sum(r.name == "relay.receiver" for r in caplog.records) >= 39  # every refusal
    text_logged = caplog.text + "\n".join(
        f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    for form in _secret_forms():
        assert form not in text_logged, form
