"""`GET /admin/stream`: server-sent events for every arrival and status change.

The database is the source of truth, so any gunicorn worker can serve a stream and changes made by
another process (a separate delivery worker) show up too: each stream polls for rows whose
`updated_at` is at or after its watermark. Each poll re-reads the last OVERLAP seconds, because a
transaction stamped earlier can commit after a later one was already seen; a small `seen` map drops
the repeats. Under a flood a poll takes the newest MAX_ROWS changes: a live view wants the present.
Each event's SSE `id` is the watermark, so a reconnecting browser (Last-Event-ID) misses nothing.
A stream opened with a session asks every RECHECK_SECONDS whether the session is still live and
ends as soon as it is not (signed out, on any host): the reconnect then gets 401.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Blueprint, Response, current_app, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from relay.admin import auth
from relay.db import Database, get_db, utcnow
from relay.exceptions import DatabaseUnavailable, FilterError
from relay.models import OutboxEvent
from relay.outbox import queries
from relay.outbox.filters import EventFilter

bp = Blueprint("stream", __name__)

POLL_SECONDS = 0.5
# Comments this often, though one per 15 s keeps proxies from closing an idle stream: a write is
# how a closed tab is noticed, and noticing it within seconds gives its thread and slot back.
KEEPALIVE_SECONDS = 2.0
STREAM_SECONDS = 300.0
RECHECK_SECONDS = 5.0
OVERLAP = timedelta(seconds=5)
MAX_ROWS = 500
MAX_RESUME = timedelta(minutes=10)  # how far back a reconnect (or `since`) may reach
MAX_STREAMS = 4  # per process: streams hold a thread each, the receiver needs the rest
RECONNECT_MS = 2000
BUSY_RECONNECT_MS = 5000


class ChangeFeed:
    """Events changed since a watermark, each (id, updated_at) reported once."""

    def __init__(self, event_filter: EventFilter, since: datetime) -> None:
        self.filter = event_filter
        self.watermark = since
        self.seen: dict[int, datetime] = {}

    def poll(self, session: Session) -> list[dict[str, Any]]:
        window = self.filter.apply(select(OutboxEvent.id, OutboxEvent.updated_at))
        keys = session.execute(
            window.where(OutboxEvent.updated_at >= self.watermark - OVERLAP)
            .order_by(OutboxEvent.updated_at.desc(), OutboxEvent.id.desc())
            .limit(MAX_ROWS)
        ).all()
        fresh = [event_id for event_id, updated in keys
                 if (seen := self.seen.get(event_id)) is None or seen < updated]
        if keys:
            self.watermark = max(self.watermark, keys[0].updated_at)
        events = list(session.scalars(select(OutboxEvent).options(*queries.SHOWN)
                                      .where(OutboxEvent.id.in_(fresh)))
                      ) if fresh else []
        events.sort(key=lambda event: (event.updated_at, event.id))
        for event in events:
            self.seen[event.id] = event.updated_at
        cutoff = self.watermark - OVERLAP
        self.seen = {key: moment for key, moment in self.seen.items() if moment >= cutoff}
        return [queries.event_json(event) for event in events]


def _start(raw: str | None, now: datetime) -> datetime:
    """Where a stream starts: the browser's Last-Event-ID or `since`, never far in the past."""
    if raw:
        try:
            moment = datetime.fromisoformat(raw.strip())
        except ValueError:
            return now
        if moment.tzinfo is not None:
            moment = moment.astimezone(UTC).replace(tzinfo=None)
        return min(max(moment, now - MAX_RESUME), now)
    return now


def _message(event: str, data: Any, event_id: str) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def events(db: Database, feed: ChangeFeed, limiter: threading.BoundedSemaphore,
           config: dict[str, float],
           still_signed_in: Callable[[], bool] | None = None) -> Iterator[str]:
    """The stream body; the slot is taken on the first read so an unread body holds nothing.
    `still_signed_in` (a session's stream) is asked every `config["recheck"]` seconds."""
    if not limiter.acquire(blocking=False):
        yield (f"retry: {BUSY_RECONNECT_MS}\n: too many open streams in this process, "
               "reconnect later\n\n")
        return
    try:
        yield f"retry: {RECONNECT_MS}\n: connected\n\n"
        deadline = time.monotonic() + config["seconds"]
        last_write = last_check = time.monotonic()
        while time.monotonic() < deadline:
            if still_signed_in is not None and time.monotonic() - last_check >= config["recheck"]:
                last_check = time.monotonic()
                if not still_signed_in():
                    yield ": signed out, stream ends\n\n"
                    return
            try:
                with db.session() as session:
                    changes = feed.poll(session)
            except DatabaseUnavailable:
                changes = []
                yield ": database unavailable, still trying\n\n"
                last_write = time.monotonic()
            for change in changes:
                yield _message("event", change, feed.watermark.isoformat())
                last_write = time.monotonic()
            if time.monotonic() - last_write >= config["keepalive"]:
                yield f"id: {feed.watermark.isoformat()}\n: keepalive\n\n"
                last_write = time.monotonic()
            time.sleep(config["poll"])
        yield f"id: {feed.watermark.isoformat()}\n: stream ends, reconnect\n\n"
    finally:
        limiter.release()


@bp.get("/stream")
def stream() -> Response:
    """`event: event` with the event JSON per change; filters as in the list (query params)."""
    method, refusal = auth.authenticate_api()
    if refusal is not None:
        return refusal
    try:
        event_filter = EventFilter.from_args(request.args)
    except FilterError as problem:
        return auth.json_error(400, str(problem))
    app = current_app
    now = utcnow()
    feed = ChangeFeed(event_filter,
                      _start(request.headers.get("Last-Event-ID") or request.args.get("since"),
                             now))
    limiter = app.extensions.setdefault(
        "relay.admin.streams",
        threading.BoundedSemaphore(int(app.config.get("RELAY_ADMIN_MAX_STREAMS", MAX_STREAMS))))
    config = {
        "seconds": float(app.config.get("RELAY_ADMIN_STREAM_SECONDS", STREAM_SECONDS)),
        "poll": float(app.config.get("RELAY_ADMIN_STREAM_POLL", POLL_SECONDS)),
        "keepalive": float(app.config.get("RELAY_ADMIN_STREAM_KEEPALIVE", KEEPALIVE_SECONDS)),
        "recheck": float(app.config.get("RELAY_ADMIN_STREAM_RECHECK", RECHECK_SECONDS)),
    }
    checker = auth.session_checker() if method == "session" else None
    return Response(events(get_db(), feed, limiter, config, checker),
                    mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
