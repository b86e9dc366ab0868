"""The admin pages: login, session cookie, throttling, CSRF on every form, the live list, one
event's page, Retry/Replay and bulk replay, escaping, and the 503 when no password is set."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from relay import create_app
from relay.db import get_db, utcnow
from relay.exceptions import DatabaseUnavailable
from relay.models import AttemptEvent, DeliveryAttempt
from relay.outbox import queries
from relay.settings import Settings
from tests.support import form_token, login, post_ids, stored_event, update_event

PASSWORD = "admin-password"
ADMIN_DIR = Path(__file__).resolve().parents[2] / "relay" / "admin"
XSS = "<script>alert(1)</script>"


def signed_in(client: FlaskClient) -> str:
    assert login(client).status_code == 302
    return form_token(client.get("/admin/").text)


def reward(**overrides: Any) -> dict[str, Any]:
    # Each its own reward: one reward in one state is one event (README, "Duplicates").
    event = {"type": "reward_earned", "event_id": f"ev-{uuid.uuid4().hex[:12]}",
             "partner_user_id": "cust-1", "email": "ann@example.com",
             "reward_id": f"r-{uuid.uuid4().hex[:12]}"}
    event.update(overrides)
    return event


def make_dead(app: Flask, event_id: int) -> None:
    update_event(app, event_id, status="dead", attempts=4, next_attempt_at=None,
                 last_error="Braze: 'external_id' is invalid", updated_at=utcnow())


# --- signing in -----------------------------------------------------------------------------------

PAGES = ["/admin/", "/admin/events/1", "/admin/replay", "/admin/?status=dead"]


@pytest.mark.parametrize("path", PAGES)
def test_pages_redirect_to_login(client: FlaskClient, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith("/admin/login?next=")


def test_login_sets_a_protected_session_cookie(client: FlaskClient) -> None:
    answer = login(client)
    assert answer.status_code == 302 and answer.headers["Location"] == "/admin/"
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/admin" in cookie
    assert "Secure" not in cookie
    page = client.get("/admin/")
    assert page.status_code == 200 and "Live events" in page.text


def test_cookie_is_secure_over_https(app: Flask) -> None:
    client = app.test_client()
    answer = login(client, base_url="https://relay.example")
    assert answer.status_code == 302
    assert "Secure" in answer.headers["Set-Cookie"]


def test_login_returns_to_the_page_asked_for_but_never_elsewhere(client: FlaskClient) -> None:
    token = form_token(client.get("/admin/login").text)
    data = {"username": "admin", "password": PASSWORD, "csrf_token": token,
            "next": "/admin/events/5"}
    assert client.post("/admin/login", data=data).headers["Location"] == "/admin/events/5"
    for target in ("https://evil.example/admin/", "//evil.example/admin/", "/elsewhere",
                   "/admin/\r\nSet-Cookie: relay_admin=forged", "/admin/\nx", "/admin/\x00",
                   "/admin/\tx", "/admin/../metrics", "/admin/%2e%2e/metrics",
                   "/admin/\\evil.example", "https:/admin/", "/admin/ x", "/admin/é"):
        client.post("/admin/logout", data={"csrf_token": form_token(client.get("/admin/").text)})
        token = form_token(client.get("/admin/login").text)
        answer = client.post("/admin/login", data=data | {"csrf_token": token, "next": target})
        assert answer.headers["Location"] == "/admin/"


@pytest.mark.parametrize("target", ["/admin/\r\nSet-Cookie: relay_admin=forged",
                                    "/admin/\u2028", "/admin/\x7f", "//evil.example/"])
def test_a_bad_next_is_ignored_never_a_500(client: FlaskClient, target: str) -> None:
    form = client.get("/admin/login", query_string={"next": target})
    assert form.status_code == 200
    assert 'name="next" value="/admin/"' in form.text
    signed_in(client)
    again = client.get("/admin/login", query_string={"next": target})  # signed in: a redirect
    assert again.status_code == 302 and again.headers["Location"] == "/admin/"


def test_the_login_brings_back_to_an_encoded_path_and_query(client: FlaskClient) -> None:
    bounced = client.get("/admin/events/a%20b?q=ann%40example.com&status=dead")
    assert bounced.status_code == 302
    form = client.get(bounced.headers["Location"])
    next_url = re.search(r'name="next" value="([^"]+)"', form.text)
    assert next_url and next_url.group(1).replace("&amp;", "&") == (
        "/admin/events/a%20b?q=ann%40example.com&status=dead")
    answer = client.post("/admin/login", data={
        "username": "admin", "password": PASSWORD, "csrf_token": form_token(form.text),
        "next": next_url.group(1).replace("&amp;", "&")})
    assert answer.headers["Location"] == "/admin/events/a%20b?q=ann%40example.com&status=dead"


@pytest.mark.parametrize(("user", "password"), [("admin", "wrong"), ("root", PASSWORD),
                                                ("", "")])
def test_wrong_login_is_refused(client: FlaskClient, user: str, password: str) -> None:
    token = form_token(client.get("/admin/login").text)
    answer = client.post("/admin/login", data={"username": user, "password": password,
                                               "csrf_token": token})
    assert answer.status_code == 401
    assert "wrong user name or password" in answer.text
    assert client.get("/admin/").status_code == 302


def test_login_form_needs_its_csrf_token(client: FlaskClient) -> None:
    client.get("/admin/login")
    for token in (None, "forged"):
        data = {"username": "admin", "password": PASSWORD} | ({"csrf_token": token}
                                                               if token else {})
        answer = client.post("/admin/login", data=data)
        assert answer.status_code == 403
        assert "form expired" in answer.text
    assert client.get("/admin/").status_code == 302


def test_login_is_throttled_after_ten_failures(client: FlaskClient) -> None:
    """The details (per user name, per address, across processes) are in test_admin_throttle."""
    for _ in range(10):
        assert login(client, password="guess").status_code == 401
    locked = login(client)  # even the right password, for a while
    assert locked.status_code == 429
    assert "too many failed sign-ins for this user name" in locked.text
    assert 0 < int(locked.headers["Retry-After"]) <= 900
    assert client.get("/admin/").status_code == 302


def test_logout_needs_csrf_and_ends_the_session(client: FlaskClient) -> None:
    token = signed_in(client)
    assert client.post("/admin/logout").status_code == 403
    assert client.post("/admin/logout", data={"csrf_token": "forged"}).status_code == 403
    assert client.get("/admin/").status_code == 200
    answer = client.post("/admin/logout", data={"csrf_token": token})
    assert answer.status_code == 302 and answer.headers["Location"] == "/admin/login"
    assert "signed out" in client.get("/admin/login").text
    assert client.get("/admin/").status_code == 302


def test_changing_the_password_signs_sessions_out(
        make_settings: Callable[..., Settings], client: FlaskClient) -> None:
    signed_in(client)
    for password, status in ((PASSWORD, 200), ("a-new-password", 302)):
        restarted = create_app(make_settings(admin_password=password), TESTING=True)
        try:
            browser = restarted.test_client()
            browser._cookies = client._cookies  # the same browser after a restart
            assert browser.get("/admin/").status_code == status
        finally:
            get_db(restarted).dispose()


@pytest.mark.parametrize("path", ["/admin/", "/admin/login", "/admin/events/1",
                                  "/admin/static/admin.css"])
def test_every_route_is_503_without_a_password(make_settings: Callable[..., Settings],
                                               path: str) -> None:
    app = create_app(make_settings(admin_password=None), TESTING=True)
    try:
        answer = app.test_client().get(path)
        assert answer.status_code == 503
        assert "RELAY_ADMIN_PASSWORD" in answer.text and "RELAY_SECRET_KEY" in answer.text
        posted = app.test_client().post("/admin/login", data={"username": "admin"})
        assert posted.status_code == 503
    finally:
        get_db(app).dispose()


# --- the live page ------------------------------------------------------------------------------


def test_live_page_lists_events_with_counts_and_stream(app: Flask, client: FlaskClient,
                                                       post_webhook: Callable[..., Any]) -> None:
    ids = post_ids(post_webhook, reward(partner_user_id="cust-77"), reward(
        partner_user_id=None, email="Only.Email@Example.com", type="shared"))
    make_dead(app, ids[0])
    signed_in(client)
    html = client.get("/admin/").text
    assert f'data-id="{ids[0]}"' in html and f'data-id="{ids[1]}"' in html
    assert html.index(f'data-id="{ids[1]}"') < html.index(f'data-id="{ids[0]}"')  # newest first
    assert "cust-77" in html and "only.email@example.com" in html
    assert 'class="pill pill-dead"' in html and "Earned Reward" in html and "Shared" in html
    assert 'data-count="dead">1<' in html and 'data-count="pending">1<' in html
    assert 'data-stream="/admin/stream"' in html
    assert 'name="csrf-token"' in html
    assert 'src="/admin/static/admin.js"' in html and 'href="/admin/static/admin.css"' in html


def test_live_page_filters_and_passes_them_to_the_stream(
        app: Flask, client: FlaskClient, post_webhook: Callable[..., Any]) -> None:
    ann, bob = post_ids(post_webhook, reward(email="ann@x.io", partner_user_id=None),
                        reward(email="bob@x.io", partner_user_id=None))
    (staged,) = post_ids(post_webhook, reward(email="ann@x.io", partner_user_id=None),
                         environment="staging")
    signed_in(client)
    html = client.get("/admin/?q=Ann@X.io&environment=production").text
    assert f'data-id="{ann}"' in html
    assert f'data-id="{bob}"' not in html and f'data-id="{staged}"' not in html
    assert 'data-stream="/admin/stream?environment=production&amp;q=Ann@X.io"' in html
    assert 'data-filter-q="Ann@X.io"' in html
    assert '<option selected>production</option>' in html


def test_live_page_stream_leaves_the_status_filter_to_the_script(client: FlaskClient) -> None:
    """A dead event being retried leaves a `status=dead` list: its row must still hear of it."""
    signed_in(client)
    html = client.get("/admin/?status=dead&environment=staging").text
    assert 'data-stream="/admin/stream?environment=staging"' in html
    assert 'data-filter-status="dead"' in html


def test_live_page_rejects_a_bad_filter_with_a_message(client: FlaskClient) -> None:
    signed_in(client)
    answer = client.get("/admin/?status=lost")
    assert answer.status_code == 400
    assert "status must be one of" in answer.text


def test_live_page_paginates_with_a_cursor(app: Flask, client: FlaskClient,
                                           post_webhook: Callable[..., Any]) -> None:
    from relay.admin import views

    ids = post_ids(post_webhook, *[reward() for _ in range(5)])
    signed_in(client)
    original = views.PAGE_SIZE
    views.PAGE_SIZE = 2
    try:
        first = client.get("/admin/").text
        assert f'data-cursor="{ids[3]}"' in first and f'data-id="{ids[2]}"' not in first
        older = client.get(f"/admin/?cursor={ids[3]}").text
        assert f'data-id="{ids[2]}"' in older and f'data-id="{ids[1]}"' in older
        assert f'data-id="{ids[4]}"' not in older
        assert 'data-paged="1"' in older
    finally:
        views.PAGE_SIZE = original


def test_live_page_banner_when_a_braze_key_is_missing(
        make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(braze_api_key=None), TESTING=True)
    try:
        client = app.test_client()
        signed_in(client)
        html = client.get("/admin/").text
        assert "No Braze key for production (BRAZE_API_KEY" in html
        assert "banner-error" in html
    finally:
        get_db(app).dispose()


def test_pages_carry_security_headers_and_no_external_assets(client: FlaskClient) -> None:
    signed_in(client)
    answer = client.get("/admin/")
    assert "default-src 'self'" in answer.headers["Content-Security-Policy"]
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert not re.search(r'(src|href)="(https?:)?//', answer.text)
    for name in ("admin.css", "admin.js"):
        asset = client.get(f"/admin/static/{name}")
        assert asset.status_code == 200
        assert "http://" not in asset.text and "https://" not in asset.text
        asset.close()
    script = (ADMIN_DIR / "static" / "admin.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script


# --- one event ------------------------------------------------------------------------------------


def test_event_page_tells_the_whole_story(app: Flask, client: FlaskClient,
                                          post_webhook: Callable[..., Any]) -> None:
    (event_id,) = post_ids(post_webhook, reward(event_id="ext-story", partner_user_id="cust-9"))
    make_dead(app, event_id)
    update_event(app, event_id, identity={"external_id": "cust-9"})
    with get_db(app).session() as session:
        attempt = DeliveryAttempt(environment="production", endpoint="/users/track",
                                  started_at=utcnow(), duration_ms=87.5, status_code=400,
                                  request_body='{"events": [{"name": "Earned Reward"}]}',
                                  response_body='{"message": "invalid external_id"}',
                                  error="HTTP 400")
        session.add(attempt)
        session.flush()
        session.add(AttemptEvent(attempt_id=attempt.id, event_id=event_id, outcome="dead"))
    signed_in(client)
    html = client.get(f"/admin/events/{event_id}").text
    assert f"Event #{event_id}" in html and "ext-story" in html
    assert "X-Extole-Signature" in html and "[redacted]" in html  # inbound headers
    assert "&#34;ext-story&#34;" in html  # the raw body, escaped
    assert "&#34;external_id&#34;: &#34;cust-9&#34;" in html  # the resolved identity
    assert "/users/track" in html and "87.5 ms" in html and "invalid external_id" in html
    assert "Braze: &#39;external_id&#39; is invalid" in html  # last error
    assert 'id="retry-form"' in html and 'id="retry-form" hidden' not in html
    assert f'action="/admin/events/{event_id}/replay"' in html


def test_event_page_hides_retry_when_not_allowed(app: Flask, client: FlaskClient,
                                                 post_webhook: Callable[..., Any]) -> None:
    (event_id,) = post_ids(post_webhook, reward())
    update_event(app, event_id, status="delivered")
    signed_in(client)
    html = client.get(f"/admin/events/{event_id}").text
    assert 'id="retry-form" hidden' in html
    assert "No request to Braze has carried this event yet" in html


@pytest.mark.parametrize("path", ["/admin/events/424242", "/admin/events/nope"])
def test_unknown_event_page_is_404(client: FlaskClient, path: str) -> None:
    signed_in(client)
    answer = client.get(path)
    assert answer.status_code == 404
    assert "No such event" in answer.text


def test_payload_with_script_is_shown_as_text(app: Flask, client: FlaskClient,
                                              post_webhook: Callable[..., Any]) -> None:
    (event_id,) = post_ids(post_webhook, reward(type=XSS, partner_user_id=XSS, note=XSS,
                                            event_id="x<img src=x onerror=alert(1)>"))
    signed_in(client)
    for path in (f"/admin/events/{event_id}", "/admin/", f"/admin/?q={XSS}"):
        html = client.get(path).text
        assert XSS not in html and "<img src=x" not in html, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path


def test_retry_form(app: Flask, client: FlaskClient, post_webhook: Callable[..., Any]) -> None:
    (event_id,) = post_ids(post_webhook, reward())
    make_dead(app, event_id)
    token = signed_in(client)
    for forged in ({}, {"csrf_token": "forged"}):
        assert client.post(f"/admin/events/{event_id}/retry", data=forged).status_code == 403
        assert stored_event(app, event_id).status == "dead"
    answer = client.post(f"/admin/events/{event_id}/retry", data={"csrf_token": token})
    assert answer.status_code == 302 and answer.headers["Location"] == f"/admin/events/{event_id}"
    assert stored_event(app, event_id).status == "pending"
    assert f"Event {event_id} is due now" in client.get(answer.headers["Location"]).text
    again = client.post(f"/admin/events/{event_id}/retry", data={"csrf_token": token},
                        follow_redirects=True)
    assert "Not done: event" in again.text and "only dead or retrying" in again.text


def test_replay_form(app: Flask, client: FlaskClient, post_webhook: Callable[..., Any]) -> None:
    (event_id,) = post_ids(post_webhook, reward())
    update_event(app, event_id, status="delivered", delivered_at=utcnow())
    token = signed_in(client)
    assert client.post(f"/admin/events/{event_id}/replay").status_code == 403
    assert stored_event(app, event_id).status == "delivered"
    answer = client.post(f"/admin/events/{event_id}/replay", data={"csrf_token": token},
                         follow_redirects=True)
    assert "is queued to be sent to Braze again" in answer.text
    assert stored_event(app, event_id).status == "pending"


def test_bulk_replay_confirms_the_count_first(app: Flask, client: FlaskClient,
                                              post_webhook: Callable[..., Any]) -> None:
    prod = post_ids(post_webhook, reward(), reward(), reward())
    (stage,) = post_ids(post_webhook, reward(), environment="staging")
    for event_id in (*prod[:2], stage):
        make_dead(app, event_id)
    token = signed_in(client)
    html = client.get("/admin/").text
    assert 'href="/admin/replay"' in html
    confirm = client.get("/admin/replay?environment=production&status=pending")
    assert '<strong id="replay-count">2</strong> dead events will be sent' in confirm.text
    assert stored_event(app, prod[0]).status == "dead"  # counting changes nothing
    form = {"environment": "production", "csrf_token": token}
    assert client.post("/admin/replay", data=form | {"csrf_token": "x"}).status_code == 403
    answer = client.post("/admin/replay", data=form)
    assert answer.status_code == 302
    assert answer.headers["Location"] == "/admin/?environment=production"
    assert "Requeued 2 dead events" in client.get(answer.headers["Location"]).text
    assert [stored_event(app, i).status for i in (*prod, stage)] == [
        "pending", "pending", "pending", "dead"]
    nothing = client.get("/admin/replay?environment=production").text
    assert "nothing to replay" in nothing


def test_bulk_replay_since_and_bad_since(app: Flask, client: FlaskClient,
                                         post_webhook: Callable[..., Any]) -> None:
    old, new = post_ids(post_webhook, reward(), reward())
    make_dead(app, old)
    make_dead(app, new)
    update_event(app, old, received_at=utcnow() - timedelta(days=3))
    signed_in(client)
    since = (utcnow() - timedelta(days=1)).isoformat(timespec="seconds") + "Z"
    confirm = client.get("/admin/replay", query_string={"since": since}).text
    assert '<strong id="replay-count">1</strong> dead event will be sent' in confirm
    assert client.get("/admin/replay?since=last+week").status_code == 400


def test_database_outage_page_is_503(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    signed_in(client)

    def down(*_args: Any, **_kwargs: Any) -> Any:
        raise DatabaseUnavailable("database unavailable: OperationalError: gone")

    monkeypatch.setattr(queries, "event_detail", down)
    answer = client.get("/admin/events/1")
    assert answer.status_code == 503
    assert "Database unavailable" in answer.text
