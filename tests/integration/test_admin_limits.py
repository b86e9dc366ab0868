"""Admin request bodies are bounded: over 64 KiB is 413 before the body is read (Content-Length)
or as soon as the limit is passed (chunked), on every admin route, the login form included;
64 KiB exactly is accepted."""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from flask import Flask
from flask.testing import FlaskClient

from relay.admin import MAX_BODY_BYTES
from relay.db import get_db, utcnow
from tests.integration.test_admin_pages import PASSWORD, form_token
from tests.support import write_events

BASIC = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}


class GuardedStream(io.RawIOBase):
    """A request body that fails the test if anything reads past `allowed` bytes of it."""

    def __init__(self, size: int, allowed: int) -> None:
        self.remaining, self.allowed, self.read_so_far = size, allowed, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self.remaining)
        if self.read_so_far + wanted > self.allowed:
            raise AssertionError(f"read past {self.allowed} bytes of a refused body")
        buffer[:wanted] = b"a" * wanted
        self.remaining -= wanted
        self.read_so_far += wanted
        return wanted


def post_stream(client: FlaskClient, path: str, stream: GuardedStream, content_type: str,
                length: int | None, headers: dict[str, str] | None = None) -> Any:
    """POST a body from `stream`: with a Content-Length, or chunked as gunicorn hands it over
    (no length, `wsgi.input_terminated` set)."""
    environ: dict[str, Any] = {"wsgi.input": stream}
    if length is None:
        environ |= {"wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"}
    else:
        environ["CONTENT_LENGTH"] = str(length)
    return client.post(path, environ_overrides=environ, content_type=content_type,
                       headers=headers or {})


FORM = "application/x-www-form-urlencoded"
ROUTES = [("/admin/login", FORM, {}), ("/admin/logout", FORM, {}),
          ("/admin/replay", FORM, {}), ("/admin/events/1/retry", FORM, {}),
          ("/admin/api/replay", "application/json", BASIC),
          ("/admin/api/events/1/retry", "application/json", BASIC),
          ("/admin/api/replay", "application/json", {})]


@pytest.mark.parametrize(("path", "content_type", "headers"), ROUTES)
def test_a_declared_length_over_64_kib_is_413_unread(client: FlaskClient, path: str,
                                                     content_type: str,
                                                     headers: dict[str, str]) -> None:
    stream = GuardedStream(MAX_BODY_BYTES + 1, allowed=0)
    answer = post_stream(client, path, stream, content_type, MAX_BODY_BYTES + 1, headers)
    assert answer.status_code == 413
    assert stream.read_so_far == 0
    if path.startswith("/admin/api/"):
        assert answer.json == {"error": "request body too large: the admin area accepts at "
                                        "most 64 KiB"}
    else:
        assert answer.mimetype == "text/html"
        assert "Request body too large: the admin area accepts at most 64 KiB." in answer.text


def test_400_mib_to_the_login_is_refused_without_reading(client: FlaskClient) -> None:
    size = 400 * 1024 * 1024
    stream = GuardedStream(size, allowed=0)
    answer = post_stream(client, "/admin/login", stream,
                         "multipart/form-data; boundary=xyz", size)
    assert answer.status_code == 413 and stream.read_so_far == 0


@pytest.mark.parametrize(("path", "content_type", "headers"), ROUTES)
def test_a_chunked_body_is_refused_one_byte_past_the_limit(
        client: FlaskClient, path: str, content_type: str, headers: dict[str, str]) -> None:
    """Without a length the body is read at most one byte past the limit, then refused."""
    stream = GuardedStream(50 * 1024 * 1024, allowed=MAX_BODY_BYTES + 1)
    answer = post_stream(client, path, stream, content_type, None, headers)
    assert answer.status_code == 413, answer.text[:300]
    assert stream.read_so_far == MAX_BODY_BYTES + 1


def _padded_form(fields: dict[str, str], size: int) -> bytes:
    body = urlencode(fields | {"padding": ""}).encode()
    return urlencode(fields | {"padding": "x" * (size - len(body))}).encode()


def test_a_login_of_exactly_64_kib_is_accepted(client: FlaskClient) -> None:
    token = form_token(client.get("/admin/login").text)
    body = _padded_form({"username": "admin", "password": PASSWORD, "csrf_token": token},
                        MAX_BODY_BYTES)
    assert len(body) == MAX_BODY_BYTES
    answer = client.post("/admin/login", data=body, content_type=FORM)
    assert answer.status_code == 302 and answer.headers["Location"] == "/admin/"
    one_more = client.post("/admin/login", data=body + b"x", content_type=FORM)
    assert one_more.status_code == 413


def test_a_chunked_login_of_exactly_64_kib_is_accepted(client: FlaskClient) -> None:
    token = form_token(client.get("/admin/login").text)
    body = _padded_form({"username": "admin", "password": PASSWORD, "csrf_token": token},
                        MAX_BODY_BYTES)
    answer = client.post("/admin/login", content_type=FORM, environ_overrides={
        "wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True,
        "HTTP_TRANSFER_ENCODING": "chunked"})
    assert answer.status_code == 302 and answer.headers["Location"] == "/admin/"


def test_an_api_body_of_exactly_64_kib_is_accepted(
        app: Flask, client: FlaskClient, post_webhook: Callable[..., Any]) -> None:
    answer = post_webhook({"type": "reward_earned", "event_id": f"ev-{uuid.uuid4().hex[:8]}",
                           "partner_user_id": "cust-1", "reward_id": "r-1"})
    (event_id,) = answer.json["ids"]
    with get_db(app).session() as session:
        write_events(session, [event_id], {"status": "dead", "updated_at": utcnow()})
    body = json.dumps({"status": "dead", "note": ""}).encode()
    body = json.dumps({"status": "dead", "note": "x" * (MAX_BODY_BYTES - len(body))}).encode()
    assert len(body) == MAX_BODY_BYTES
    exact = client.post("/admin/api/replay", data=body, headers=BASIC,
                        content_type="application/json")
    # The body was read and parsed: the unknown field is named, not a 413.
    assert exact.status_code == 400, exact.text
    assert "unknown field 'note'" in exact.text
    fits = json.dumps({"status": "dead"}).encode().ljust(MAX_BODY_BYTES)
    requeued = client.post("/admin/api/replay", data=fits, headers=BASIC,
                           content_type="application/json")
    assert requeued.status_code == 200 and requeued.json == {"requeued": 1}
    too_big = client.post("/admin/api/replay", data=fits + b" ", headers=BASIC,
                          content_type="application/json")
    assert too_big.status_code == 413
