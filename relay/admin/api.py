"""The admin JSON API (README, "Admin page"): list, detail, retry, replay, bulk replay, stats,
and the campaign/Canvas triggers (list, resend, drop).

Answers are JSON, errors `{"error": "<specific message>"}`: 400 bad parameters, 401 no
credentials, 403 missing CSRF token, 404 no such event or trigger, 409 a transition the event's or
trigger's state does not allow, 415 not JSON, 503 database unavailable. Session or HTTP Basic; see
`auth`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from relay import triggers
from relay.admin import auth
from relay.admin.params import parse_cursor, parse_limit, to_event_id, to_trigger_id
from relay.braze_state import environment_report
from relay.db import get_db
from relay.exceptions import (
    DatabaseUnavailable,
    EventNotFound,
    FilterError,
    InvalidTransition,
    TriggerNotFound,
)
from relay.outbox import operator, queries
from relay.outbox.filters import EventFilter
from relay.settings import ENVIRONMENTS, Settings

bp = Blueprint("api", __name__)

REPLAY_FIELDS = ("status", "environment", "name", "q", "since")
STATS_TTL = 1.0  # seconds; the page script waits at least this long after a change to ask


@bp.before_request
def _require_credentials() -> Response | None:
    method, refusal = auth.authenticate_api()
    if refusal is not None:
        return refusal
    g.admin_auth = method
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        return auth.check_state_change(str(method))
    return None


@bp.errorhandler(FilterError)
def _bad_request(error: FilterError) -> Response:
    return auth.json_error(400, str(error))


@bp.errorhandler(EventNotFound)
@bp.errorhandler(TriggerNotFound)
def _not_found(error: EventNotFound | TriggerNotFound) -> Response:
    return auth.json_error(404, str(error))


@bp.errorhandler(InvalidTransition)
def _conflict(error: InvalidTransition) -> Response:
    return auth.json_error(409, str(error))


@bp.errorhandler(DatabaseUnavailable)
def _unavailable(error: DatabaseUnavailable) -> Response:
    return auth.json_error(503, str(error), **{"Retry-After": "5"})


@bp.get("/events")
def list_events() -> Response:
    event_filter = EventFilter.from_args(request.args)
    limit = parse_limit(request.args.get("limit"))
    cursor = parse_cursor(request.args.get("cursor"))
    with get_db().session() as session:
        events, next_cursor = queries.list_events(session, event_filter, limit=limit,
                                                  cursor=cursor)
        body = {"events": [queries.event_json(e) for e in events], "next_cursor": next_cursor}
    return jsonify(body)


@bp.get("/events/<raw_id>")
def event(raw_id: str) -> Response:
    with get_db().session() as session:
        return jsonify(queries.event_detail(session, to_event_id(raw_id)))


@bp.post("/events/<raw_id>/retry")
def retry(raw_id: str) -> Response:
    """A dead or retrying event becomes due now; 409 says why when it is neither."""
    with get_db().session() as session:
        body = queries.event_json(operator.retry(session, to_event_id(raw_id)))
    return jsonify(body)


@bp.post("/events/<raw_id>/replay")
def replay(raw_id: str) -> Response:
    """Send the event again, even if delivered; its attempt history is kept."""
    with get_db().session() as session:
        body = queries.event_json(operator.replay(session, to_event_id(raw_id)))
    return jsonify(body)


@bp.post("/replay")
def replay_matching() -> Response:
    """Requeue every event matching the filter (dead by default): `{"requeued": n}`."""
    data = request.get_json(silent=True)
    if data is None:
        data = {} if not request.get_data() else None
    if not isinstance(data, dict):
        raise FilterError("the body must be a JSON object such as "
                          '{"status": "dead", "environment": "production"}')
    unknown = sorted(set(data) - set(REPLAY_FIELDS))
    if unknown:
        raise FilterError(f"unknown field {unknown[0]!r}: use {', '.join(REPLAY_FIELDS)}")
    event_filter = EventFilter.from_args(data, with_since=True)
    with get_db().session() as session:
        requeued = operator.replay_matching(session, event_filter)
    return jsonify({"requeued": requeued})


class StatsCache:
    """The stats, computed at most once per STATS_TTL seconds per process.

    Counting a million rows per status takes ~0.2 s on PostgreSQL and every open page asks after
    each burst of changes; the page asks no sooner than STATS_TTL after the change it saw, so a
    cached answer never hides that change.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._at = 0.0

    def get(self) -> dict[str, Any]:
        with self._lock:
            if self._value is None or time.monotonic() - self._at >= STATS_TTL:
                self._value = _compute_stats()
                self._at = time.monotonic()
            return self._value


def _compute_stats() -> dict[str, Any]:
    settings: Settings = current_app.config["RELAY_SETTINGS"]
    with get_db().session() as session:
        reconciliation = queries.reconciliation(session, ENVIRONMENTS)
        for environment, last in reconciliation.items():
            last["configured"] = bool(settings.extole_token(environment))
        return {
            "counts": queries.counts_by_status(session),
            "oldest_pending_seconds": round(queries.oldest_pending_age(session), 1),
            "braze": environment_report(session, settings),
            "reconciliation": reconciliation,
            "triggers": triggers.counts_by_state(session),
        }


def collect_stats() -> dict[str, Any]:
    """Counts per status, the oldest pending event's age, each Braze key's state, triggers per
    state and each environment's last reconciliation run."""
    cache: StatsCache = current_app.extensions.setdefault("relay.admin.stats", StatsCache())
    return cache.get()


@bp.get("/stats")
def stats() -> Response:
    return jsonify(collect_stats())


@bp.get("/triggers")
def list_triggers() -> Response:
    """Triggers newest first, filtered by `state`, `environment`, `kind`, `event_id`."""
    filters = triggers.parse_filter(request.args.get("state"), request.args.get("environment"),
                                    request.args.get("kind"))
    limit = parse_limit(request.args.get("limit"))
    cursor = parse_cursor(request.args.get("cursor"))
    raw_event = request.args.get("event_id")
    event_id = to_event_id(raw_event) if raw_event else None
    with get_db().session() as session:
        found, next_cursor = triggers.list_triggers(session, filters, limit=limit, cursor=cursor,
                                                    event_id=event_id)
        body = {"triggers": [triggers.trigger_json(t) for t in found],
                "next_cursor": next_cursor}
    return jsonify(body)


@bp.post("/triggers/<raw_id>/resend")
def resend_trigger(raw_id: str) -> Response:
    """An uncertain (or failed) trigger is sent again, once: the operator has checked that the
    person did not get the message."""
    with get_db().session() as session:
        body = triggers.trigger_json(triggers.resend(session, to_trigger_id(raw_id)))
    return jsonify(body)


@bp.post("/triggers/<raw_id>/drop")
def drop_trigger(raw_id: str) -> Response:
    """The trigger is never sent (again): state `dropped`."""
    with get_db().session() as session:
        body = triggers.trigger_json(triggers.drop(session, to_trigger_id(raw_id)))
    return jsonify(body)
