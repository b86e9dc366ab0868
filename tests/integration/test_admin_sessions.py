"""Admin sessions end on the server: a cookie copied before sign-out (or before a password change)
is refused afterwards, by every process sharing the database, on pages, the API and the stream."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import undefer_group

from relay import create_app
from relay.admin.auth import SESSION_IDLE, SESSION_MAX_AGE, state
from relay.db import get_db, utcnow
from relay.models import AdminSession, OutboxEvent
from relay.settings import Settings
from tests.integration.test_admin_pages import PASSWORD, form_token
from tests.support import write_events

COOKIE = "relay_admin"


def sign_in(client: FlaskClient) -> str:
    """Sign in through the form; answers the page's CSRF token."""
    token = form_token(client.get("/admin/login").text)
    answer = client.post("/admin/login", data={"username": "admin", "password": PASSWORD,
                                               "csrf_token": token})
    assert answer.status_code == 302, answer.text
    page = client.get("/admin/")
    assert page.status_code == 200
    meta = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert meta
    return meta.group(1)


def cookie_of(client: FlaskClient) -> str:
    cookie = client.get_cookie(COOKIE, path="/admin")
    assert cookie is not None, "no session cookie"
    return cookie.value


def browser_with(app: Flask, cookie: str) -> FlaskClient:
    """Another browser (or an attacker) holding a copy of the cookie."""
    copy = app.test_client()
    copy.set_cookie(COOKIE, cookie, path="/admin")
    return copy


def sign_out(client: FlaskClient) -> None:
    page = client.get("/admin/")
    answer = client.post("/admin/logout", data={"csrf_token": form_token(page.text)})
    assert answer.status_code == 302 and answer.headers["Location"] == "/admin/login"


def dead_event(app: Flask, post_webhook: Callable[..., Any]) -> int:
    answer = post_webhook({"type": "reward_earned", "event_id": f"ev-{uuid.uuid4().hex[:10]}",
                           "partner_user_id": "cust-1", "reward_id": "r-1"})
    assert answer.status_code == 200
    (event_id,) = answer.json["ids"]
    with get_db(app).session() as session:
        write_events(session, [event_id], {"status": "dead", "attempts": 3,
                                           "updated_at": utcnow()})
    return int(event_id)


def status_of(app: Flask, event_id: int) -> str:
    with get_db(app).session() as session:
        found = session.get(OutboxEvent, event_id, options=[undefer_group("queue")])
        assert found is not None
        return found.status


def session_rows(app: Flask) -> int:
    with get_db(app).session() as session:
        return int(session.scalar(select(func.count()).select_from(AdminSession)) or 0)


def assert_refused(copy: FlaskClient, token: str, event_id: int) -> None:
    """The copied cookie opens nothing: API 401, pages to the login, no write, no stream."""
    assert copy.get("/admin/api/events").status_code == 401
    requeue = copy.post("/admin/api/replay", json={"status": "dead"},
                        headers={"X-CSRF-Token": token})
    assert requeue.status_code == 401
    assert requeue.is_json and "sign in at /admin/login" in requeue.text
    retry = copy.post(f"/admin/api/events/{event_id}/retry", json={},
                      headers={"X-CSRF-Token": token})
    assert retry.status_code == 401
    page = copy.get("/admin/")
    assert page.status_code == 302 and page.headers["Location"].startswith("/admin/login")
    form = copy.post(f"/admin/events/{event_id}/retry", data={"csrf_token": token})
    assert form.status_code == 302 and form.headers["Location"].startswith("/admin/login")
    stream = copy.get("/admin/stream")
    assert stream.status_code == 401


def test_a_cookie_copied_before_sign_out_is_refused_after(
        app: Flask, client: FlaskClient, post_webhook: Callable[..., Any]) -> None:
    event_id = dead_event(app, post_webhook)
    token = sign_in(client)
    copied = cookie_of(client)
    copy = browser_with(app, copied)
    assert copy.get("/admin/api/events").status_code == 200  # the copy works while signed in
    assert session_rows(app) == 1

    sign_out(client)
    assert session_rows(app) == 0
    assert_refused(copy, token, event_id)
    assert status_of(app, event_id) == "dead"  # nothing was requeued


def test_sign_out_in_one_process_ends_the_session_in_another(
        app: Flask, second_app: Flask, client: FlaskClient,
        post_webhook: Callable[..., Any]) -> None:
    event_id = dead_event(app, post_webhook)
    token = sign_in(client)
    elsewhere = browser_with(second_app, cookie_of(client))
    assert elsewhere.get("/admin/api/events").status_code == 200
    assert elsewhere.get("/admin/").status_code == 200

    sign_out(client)  # in the first process
    assert_refused(elsewhere, token, event_id)
    assert status_of(app, event_id) == "dead"


def test_a_password_change_ends_every_session(make_settings: Callable[..., Settings],
                                              app: Flask, client: FlaskClient) -> None:
    sign_in(client)
    copied = cookie_of(client)
    changed = create_app(make_settings(admin_password="a-new-password"), TESTING=True)
    try:
        after = browser_with(changed, copied)  # the same cookie, a process with the new password
        assert after.get("/admin/api/events").status_code == 401
        assert after.get("/admin/").status_code == 302
        fresh = changed.test_client()
        token = form_token(fresh.get("/admin/login").text)
        assert fresh.post("/admin/login", data={"username": "admin", "csrf_token": token,
                                                "password": "a-new-password"}).status_code == 302
        assert fresh.get("/admin/api/events").status_code == 200
        # ...and a session of the new credentials is not accepted by a process still running
        # with the old ones.
        assert browser_with(app, cookie_of(fresh)).get("/admin/api/events").status_code == 401
    finally:
        get_db(changed).dispose()


def test_the_database_keeps_only_a_hash_of_the_session_id(app: Flask,
                                                          client: FlaskClient) -> None:
    sign_in(client)
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    session_id = serializer.loads(cookie_of(client))["sid"]
    with app.app_context():
        credentials = state().credentials
        assert credentials is not None
        version = credentials.version
    with get_db(app).session() as session:
        (record,) = session.scalars(select(AdminSession))
        assert record.id_hash == hashlib.sha256(session_id.encode()).hexdigest()
        assert record.user_name == "admin"
        assert record.credentials_version == version
        assert PASSWORD not in version


def test_signing_in_again_replaces_the_previous_session(app: Flask, client: FlaskClient) -> None:
    token = sign_in(client)
    first = cookie_of(client)
    again = client.post("/admin/login", data={"username": "admin", "password": PASSWORD,
                                              "csrf_token": token})
    assert again.status_code == 302
    assert cookie_of(client) != first
    assert client.get("/admin/api/events").status_code == 200
    assert session_rows(app) == 1
    assert browser_with(app, first).get("/admin/api/events").status_code == 401


def test_sessions_end_when_idle_and_at_their_maximum_age(app: Flask,
                                                         client: FlaskClient) -> None:
    start = utcnow()
    now = [start]
    with app.app_context():
        state().sessions.clock = lambda: now[0]
    sign_in(client)
    cookie = cookie_of(client)
    step = SESSION_IDLE - timedelta(minutes=1)
    while now[0] + step < start + SESSION_MAX_AGE:  # used twice a day: alive for days...
        now[0] += step
        assert browser_with(app, cookie).get("/admin/api/events").status_code == 200, now[0]
    now[0] = start + SESSION_MAX_AGE + timedelta(seconds=1)  # ...but never past the maximum age
    assert browser_with(app, cookie).get("/admin/api/events").status_code == 401

    sign_in(client)
    idle = cookie_of(client)
    assert browser_with(app, idle).get("/admin/api/events").status_code == 200
    now[0] += SESSION_IDLE + timedelta(seconds=1)  # then unused for 12 hours
    assert browser_with(app, idle).get("/admin/api/events").status_code == 401


def test_expired_sessions_are_deleted_as_new_ones_open(app: Flask,
                                                       client: FlaskClient) -> None:
    with get_db(app).session() as session:
        old = utcnow() - timedelta(days=30)
        session.add_all([AdminSession(id_hash=f"{n:064x}", user_name="admin",
                                      credentials_version="x", created_at=old,
                                      last_seen_at=old, expires_at=old + SESSION_IDLE)
                         for n in range(1500)])
    sign_in(client)
    with get_db(app).session() as session:
        expires: list[datetime] = list(session.scalars(select(AdminSession.expires_at)))
    assert len(expires) == 1 and expires[0] > utcnow()


def test_an_open_stream_ends_when_its_session_is_signed_out(app: Flask,
                                                            client: FlaskClient) -> None:
    app.config.update(RELAY_ADMIN_STREAM_SECONDS=20.0, RELAY_ADMIN_STREAM_POLL=0.05,
                      RELAY_ADMIN_STREAM_KEEPALIVE=0.2, RELAY_ADMIN_STREAM_RECHECK=0.1)
    sign_in(client)
    watcher = browser_with(app, cookie_of(client))
    response = watcher.get("/admin/stream", buffered=False)
    assert response.status_code == 200
    text = ""
    try:
        chunks = response.iter_encoded()
        text += next(chunks).decode()
        sign_out(client)
        deadline = time.monotonic() + 10
        for chunk in chunks:  # the stream must end by itself, long before its 20 s
            text += chunk.decode()
            assert time.monotonic() < deadline, text
    finally:
        response.close()
    assert text.rstrip().endswith(": signed out, stream ends"), text
    assert watcher.get("/admin/stream").status_code == 401

