"""The admin pages: the live event list, one event's whole story, and bulk replay.

Pages are rendered on the server (Jinja autoescapes every value) and a small script keeps the list
live from `/admin/stream`. Forms post with the session's CSRF token and flash their result.
"""

from __future__ import annotations

from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.wrappers import Response as BaseResponse

from relay import triggers
from relay.admin import auth, message_page
from relay.admin.api import collect_stats
from relay.admin.params import parse_cursor, parse_id, to_event_id, to_trigger_id
from relay.db import get_db, utcnow
from relay.exceptions import (
    DatabaseUnavailable,
    EventNotFound,
    FilterError,
    InvalidTransition,
    TriggerNotFound,
)
from relay.models import Status
from relay.outbox import operator, queries
from relay.outbox.filters import EventFilter
from relay.settings import ENVIRONMENTS

bp = Blueprint("views", __name__)

PAGE_SIZE = 50
KEY_VARIABLES = {"production": "BRAZE_API_KEY", "staging": "BRAZE_STAGING_API_KEY"}


@bp.before_request
def _require_login() -> BaseResponse | None:
    return auth.require_page_login()


@bp.errorhandler(DatabaseUnavailable)
def _unavailable(error: DatabaseUnavailable) -> Response:
    return message_page(503, "Database unavailable", f"{error}. Try again in a moment.")


@bp.errorhandler(EventNotFound)
def _not_found(error: EventNotFound) -> Response:
    return message_page(404, "No such event", str(error))


@bp.errorhandler(TriggerNotFound)
def _no_trigger(error: TriggerNotFound) -> Response:
    return message_page(404, "No such trigger", str(error))


@bp.app_context_processor
def _page_globals() -> dict[str, Any]:
    return {"statuses": [status.value for status in Status], "environments": ENVIRONMENTS,
            "trigger_states": triggers.STATES, "trigger_kinds": triggers.KINDS,
            "can_resend": triggers.RESENDABLE, "can_drop": triggers.DROPPABLE}


def trigger_banner(counts: dict[str, int]) -> tuple[str, str] | None:
    """The banner while any trigger is uncertain; the script mirrors this."""
    uncertain = counts.get("uncertain", 0)
    if not uncertain:
        return None
    return ("error", f"{uncertain} campaign/Canvas trigger{'s are' if uncertain != 1 else ' is'} "
            "uncertain: Braze may or may not have sent the message. Check in Braze, then resend "
            "or drop each one on the triggers page.")


def braze_banners(report: dict[str, str]) -> list[tuple[str, str]]:
    """(level, text) for each Braze environment that cannot deliver; the script mirrors this."""
    banners = []
    for environment, key_state in report.items():
        variable = KEY_VARIABLES.get(environment, "the Braze key")
        if key_state == "refused":
            banners.append(("error", f"Braze refused the {environment} key (401/403): "
                            f"{environment} delivery is paused and resumes by itself once the "
                            f"key works. Check {variable}."))
        elif key_state == "missing" and environment == "production":
            banners.append(("error", f"No Braze key for production ({variable} or "
                            "BRAZE_REST_ENDPOINT is not set): production events are stored "
                            "and wait until one is set."))
        elif key_state == "missing":
            banners.append(("info", f"No Braze key for {environment} ({variable} is not set): "
                            f"{environment} events are stored and marked skipped."))
    return banners


@bp.get("/")
def index() -> Any:
    """The live page: the newest events, kept current by the script without a reload."""
    error = None
    try:
        event_filter = EventFilter.from_args(request.args)
        cursor = parse_cursor(request.args.get("cursor"))
    except FilterError as problem:
        event_filter, cursor, error = EventFilter(), None, str(problem)
    since = utcnow()  # taken before the query: the stream resumes from here, nothing slips by
    with get_db().session() as session:
        events, next_cursor = queries.list_events(session, event_filter, limit=PAGE_SIZE,
                                                  cursor=cursor)
        rows = [queries.event_json(event) for event in events]
    stats = collect_stats()
    args = event_filter.query_args()
    without_status: dict[str, Any] = {key: value for key, value in args.items()
                                      if key != "status"}
    page = render_template(
        "index.html", events=rows, next_cursor=next_cursor, filter=event_filter, cursor=cursor,
        stats=stats, since=since.isoformat(),
        banners=braze_banners(stats["braze"]) + [
            b for b in [trigger_banner(stats["triggers"])] if b is not None],
        triggers_url=url_for("admin.views.trigger_list", state="uncertain"),
        error=error, event_names=current_app.extensions["relay.event_map"].braze_events,
        status_urls={status.value: url_for("admin.views.index", **without_status,
                                           status=status.value) for status in Status},
        replay_url=url_for("admin.views.bulk_replay", **without_status),
        # The status filter is applied by the script: a row that leaves it (a dead event being
        # retried) must still receive its change.
        stream_url=url_for("admin.stream.stream", **without_status),
    )
    return (page, 400) if error else page


@bp.get("/events/<raw_id>")
def event(raw_id: str) -> Any:
    event_id = to_event_id(raw_id)
    with get_db().session() as session:
        detail = queries.event_detail(session, event_id)
    return render_template("event.html", event=detail, can_retry=can_retry(detail),
                           can_replay=detail["status"] != Status.REJECTED.value)


def can_retry(event: dict[str, Any]) -> bool:
    return bool(event["status"] == Status.DEAD.value or (
        event["status"] == Status.PENDING.value and event["attempts"] > 0))


@bp.post("/events/<raw_id>/retry")
def retry(raw_id: str) -> Any:
    return _act(raw_id, operator.retry, "is due now and will be retried within seconds")


@bp.post("/events/<raw_id>/replay")
def replay(raw_id: str) -> Any:
    return _act(raw_id, operator.replay, "is queued to be sent to Braze again")


def _act(raw_id: str, action: Any, done: str) -> Any:
    event_id = to_event_id(raw_id)
    try:
        with get_db().session() as session:
            action(session, event_id)
        flash(f"Event {event_id} {done}.", "ok")
    except InvalidTransition as refusal:
        flash(f"Not done: {refusal}.", "error")
    return redirect(url_for("admin.views.event", raw_id=event_id))


@bp.route("/replay", methods=["GET", "POST"])
def bulk_replay() -> Any:
    """Dead events matching the filter: the count first, then requeue on confirmation."""
    try:
        event_filter = EventFilter.from_args(
            {key: request.values.get(key) for key in ("environment", "name", "q", "since")}
            | {"status": Status.DEAD.value}, with_since=True)
    except FilterError as problem:
        return message_page(400, "Invalid filter", str(problem))
    list_args: dict[str, Any] = {k: v for k, v in event_filter.query_args().items()
                                 if k not in ("status", "since")}
    if request.method == "POST":
        with get_db().session() as session:
            requeued = operator.replay_matching(session, event_filter)
        flash(f"Requeued {requeued} dead event{'s' if requeued != 1 else ''} "
              f"({event_filter.describe()}).", "ok")
        return redirect(url_for("admin.views.index", **list_args))
    with get_db().session() as session:
        count = operator.count_matching(session, event_filter)
    return render_template("replay.html", filter=event_filter, count=count,
                           since=request.values.get("since", ""), list_args=list_args)


# --- campaign and Canvas triggers ---------------------------------------------------------------


@bp.get("/triggers")
def trigger_list() -> Any:
    """Triggers newest first, filtered by state, environment and kind; resend or drop each."""
    error = None
    try:
        filters = triggers.parse_filter(request.args.get("state"),
                                        request.args.get("environment"),
                                        request.args.get("kind"))
        cursor = parse_cursor(request.args.get("cursor"))
    except FilterError as problem:
        filters, cursor, error = {}, None, str(problem)
    with get_db().session() as session:
        found, next_cursor = triggers.list_triggers(session, filters, limit=PAGE_SIZE,
                                                    cursor=cursor)
        rows = [triggers.trigger_json(t) for t in found]
        counts = triggers.counts_by_state(session)
    page = render_template("triggers.html", triggers=rows, filters=filters, counts=counts,
                           next_cursor=next_cursor, cursor=cursor, error=error,
                           banner=trigger_banner(counts))
    return (page, 400) if error else page


@bp.post("/triggers/<raw_id>/resend")
def resend_trigger(raw_id: str) -> Any:
    return _act_on_trigger(raw_id, triggers.resend, "is due again and will be sent once")


@bp.post("/triggers/<raw_id>/drop")
def drop_trigger(raw_id: str) -> Any:
    return _act_on_trigger(raw_id, triggers.drop, "is dropped: it will never be sent")


def _act_on_trigger(raw_id: str, action: Any, done: str) -> Any:
    trigger_id = to_trigger_id(raw_id)
    try:
        with get_db().session() as session:
            action(session, trigger_id)
        flash(f"Trigger {trigger_id} {done}.", "ok")
    except InvalidTransition as refusal:
        flash(f"Not done: {refusal}.", "error")
    # Back to the event page the form was on, else to the list.
    event_id = parse_id(request.form.get("event_id"))
    if event_id is not None:
        return redirect(url_for("admin.views.event", raw_id=event_id))
    return redirect(url_for("admin.views.trigger_list"))
