"""`GET /admin/stream`: arrivals and status changes come out as server-sent events, read from the
database (so any process's changes show), with keepalives, filters, resumption and a bound."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import update

from relay.admin.stream import ChangeFeed
from relay.db import get_db, utcnow
from relay.models import OutboxEvent
from relay.outbox.filters import EventFilter

READ_LIMIT_SECONDS = 5.0


def basic() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(b"admin:admin-password").decode()}


def reward(**overrides: Any) -> dict[str, Any]:
    event = {"type": "reward_earned", "event_id": f"ev-{uuid.uuid4().hex[:12]}",
             "partner_user_id": "cust-1", "email": "ann@example.com"}
    event.update(overrides)
    return event


@pytest.fixture
def fast_stream(app: Flask) -> Flask:
    app.config.update(RELAY_ADMIN_STREAM_SECONDS=3.0, RELAY_ADMIN_STREAM_POLL=0.05,
                      RELAY_ADMIN_STREAM_KEEPALIVE=0.3)
    return app


def chunks(response: Any) -> Iterator[str]:
    """The body as it arrives, bounded in time even if the server misbehaves."""
    deadline = time.monotonic() + READ_LIMIT_SECONDS
    for chunk in response.response:
        yield chunk.decode() if isinstance(chunk, bytes) else chunk
        if time.monotonic() > deadline:
            return


def read_events(response: Any, want: Callable[[list[dict[str, Any]]], bool]) -> tuple[
        list[dict[str, Any]], str]:
    """Parse `event: event` messages until `want(events)` or the stream ends."""
    events: list[dict[str, Any]] = []
    text = ""
    for chunk in chunks(response):
        text += chunk
        for message in chunk.split("\n\n"):
            lines = message.splitlines()
            if "event: event" in lines:
                data = next(line[6:] for line in lines if line.startswith("data: "))
                events.append(json.loads(data))
        if want(events):
            break
    return events, text


def test_stream_emits_an_arrival(fast_stream: Flask, client: FlaskClient,
                                 post_webhook: Callable[..., Any]) -> None:
    response = client.get("/admin/stream", headers=basic(), buffered=False)
    try:
        assert response.status_code == 200
        assert response.mimetype == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-store"
        (event_id,) = post_webhook(reward(event_id="live-1")).json["ids"]
        started = time.monotonic()
        events, text = read_events(response, lambda evs: any(e["id"] == event_id for e in evs))
        assert time.monotonic() - started < 2.0
    finally:
        response.close()
    assert text.startswith("retry: ")
    (arrived,) = [e for e in events if e["id"] == event_id]
    assert arrived["extole_event_id"] == "live-1" and arrived["status"] == "pending"
    assert {"environment", "braze_event", "attempts", "email", "received_at"} <= set(arrived)


def test_stream_emits_status_changes_once(fast_stream: Flask, client: FlaskClient,
                                          post_webhook: Callable[..., Any]) -> None:
    (event_id,) = post_webhook(reward()).json["ids"]
    response = client.get("/admin/stream", headers=basic(), buffered=False)
    try:
        events, _ = read_events(response, lambda evs: len(evs) >= 1)
        assert [e["status"] for e in events] == ["pending"]  # the recent arrival, once
        with get_db(fast_stream).session() as session:
            session.execute(update(OutboxEvent).where(OutboxEvent.id == event_id)
                            .values(status="delivered", updated_at=utcnow()))
        changed, _ = read_events(response, lambda evs: len(evs) >= 1)
    finally:
        response.close()
    assert [(e["id"], e["status"]) for e in changed] == [(event_id, "delivered")]


def test_stream_sends_keepalives_and_ends(fast_stream: Flask, client: FlaskClient) -> None:
    fast_stream.config["RELAY_ADMIN_STREAM_SECONDS"] = 1.0
    response = client.get("/admin/stream", headers=basic(), buffered=False)
    try:
        started = time.monotonic()
        text = "".join(chunks(response))
    finally:
        response.close()
    assert time.monotonic() - started < 2.5
    assert ": keepalive" in text
    assert "id: " in text  # a reconnect resumes from the watermark
    assert text.rstrip().endswith(": stream ends, reconnect")


def test_stream_filters(fast_stream: Flask, client: FlaskClient,
                        post_webhook: Callable[..., Any]) -> None:
    response = client.get("/admin/stream?environment=staging", headers=basic(), buffered=False)
    try:
        post_webhook(reward())
        (staged,) = post_webhook(reward(), "staging").json["ids"]
        events, _ = read_events(response, lambda evs: len(evs) >= 1)
    finally:
        response.close()
    assert [e["id"] for e in events] == [staged]


def test_stream_resumes_from_last_event_id(fast_stream: Flask, client: FlaskClient,
                                           post_webhook: Callable[..., Any]) -> None:
    resume_from = (utcnow() - timedelta(seconds=30)).isoformat()
    (event_id,) = post_webhook(reward()).json["ids"]
    with get_db(fast_stream).session() as session:
        session.execute(update(OutboxEvent).where(OutboxEvent.id == event_id)
                        .values(updated_at=utcnow() - timedelta(seconds=20)))
    headers = basic() | {"Last-Event-ID": resume_from}
    response = client.get("/admin/stream", headers=headers, buffered=False)
    try:
        events, _ = read_events(response, lambda evs: len(evs) >= 1)
    finally:
        response.close()
    assert [e["id"] for e in events] == [event_id]


def test_stream_needs_credentials_and_valid_filters(client: FlaskClient) -> None:
    assert client.get("/admin/stream").status_code == 401
    answer = client.get("/admin/stream?status=nope", headers=basic())
    assert answer.status_code == 400
    assert "status must be one of" in answer.json["error"]


def test_streams_per_process_are_bounded(fast_stream: Flask, client: FlaskClient) -> None:
    fast_stream.config["RELAY_ADMIN_MAX_STREAMS"] = 1
    first = client.get("/admin/stream", headers=basic(), buffered=False)
    second = None
    try:
        body = iter(first.response)
        assert "connected" in next(body).decode()  # holds the only slot
        second = client.get("/admin/stream", headers=basic(), buffered=False)
        text = "".join(chunks(second))
        assert "too many open streams" in text and text.startswith("retry: 5000")
    finally:
        first.close()
        if second is not None:
            second.close()
    third = client.get("/admin/stream", headers=basic(), buffered=False)
    try:
        assert "connected" in next(iter(third.response)).decode()  # the slot came back
    finally:
        third.close()


def test_feed_catches_a_late_commit_and_reports_it_once(app: Flask,
                                                        post_webhook: Callable[..., Any]) -> None:
    """A row stamped before the watermark but committed after it is still reported."""
    db = get_db(app)
    (first,) = post_webhook(reward()).json["ids"]
    feed = ChangeFeed(EventFilter(), utcnow() - timedelta(seconds=1))
    with db.session() as session:
        assert [e["id"] for e in feed.poll(session)] == [first]
    (late,) = post_webhook(reward()).json["ids"]
    with db.session() as session:
        session.execute(update(OutboxEvent).where(OutboxEvent.id == late)
                        .values(updated_at=feed.watermark - timedelta(seconds=2)))
    with db.session() as session:
        assert [e["id"] for e in feed.poll(session)] == [late]
    with db.session() as session:
        assert feed.poll(session) == []


def test_stream_sees_changes_made_by_another_process(fast_stream: Flask, client: FlaskClient,
                                                     post_webhook: Callable[..., Any]) -> None:
    """A change committed through a separate engine (as a worker process would) shows up."""
    from relay.db import Database

    (event_id,) = post_webhook(reward()).json["ids"]
    other = Database(get_db(fast_stream).url)
    response = client.get("/admin/stream?status=dead", headers=basic(), buffered=False)

    def worker() -> None:
        time.sleep(0.3)
        with other.session() as session:
            session.execute(update(OutboxEvent).where(OutboxEvent.id == event_id)
                            .values(status="dead", updated_at=utcnow()))

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        events, _ = read_events(response, lambda evs: len(evs) >= 1)
    finally:
        response.close()
        thread.join()
        other.dispose()
    assert [(e["id"], e["status"]) for e in events] == [(event_id, "dead")]
