"""The admin area: the live event page, one event's story with Retry/Replay, and a JSON API.

`init_app` mounts it all under /admin: `auth` (login, session, Basic, throttling, CSRF), `views`
(pages), `api` (JSON), `stream` (server-sent events). Without an admin password and secret key,
every admin route answers 503 saying how to enable it. Every asset is served by the app itself.
No admin request may carry a body over MAX_BODY_BYTES: a larger Content-Length is answered 413
before anything reads the body, and a body without one (chunked) is answered 413 as soon as it
passes the limit, so nothing is ever spooled to disk.
"""

from __future__ import annotations

import io
import json
from datetime import datetime
from typing import Any

from flask import Blueprint, Flask, Response, current_app, render_template, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from relay.exceptions import DatabaseUnavailable

MAX_BODY_BYTES = 64 * 1024
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


def init_app(app: Flask) -> None:
    from relay.admin import api, auth, stream, views

    app.extensions["relay.admin"] = auth.make_state(app.config["RELAY_SETTINGS"])
    app.config.update(
        SESSION_COOKIE_NAME="relay_admin",
        SESSION_COOKIE_PATH="/admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=auth.SESSION_IDLE,  # the cookie lives as long as the record
    )
    app.session_interface = auth.AdminSessionInterface()
    bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates",
                   static_folder="static", static_url_path="/static")
    bp.before_request(_limit_body)
    bp.before_request(_require_enabled)
    bp.after_request(_protect)
    bp.register_error_handler(RequestEntityTooLarge, _too_large)
    bp.register_error_handler(DatabaseUnavailable, _database_unavailable)
    bp.app_context_processor(lambda: {"admin_user": auth.displayed_user,
                                      "csrf_token": auth.csrf_token})
    for name, function in (("ts", format_time), ("pretty", pretty_json), ("age", format_age)):
        bp.add_app_template_filter(function, name)
    bp.register_blueprint(auth.bp)
    bp.register_blueprint(views.bp)
    bp.register_blueprint(api.bp, url_prefix="/api")
    bp.register_blueprint(stream.bp)
    app.register_blueprint(bp)
    for code in (404, 405):
        app.register_error_handler(code, _http_error)


def _http_error(error: HTTPException) -> Response | HTTPException:
    """An API client gets JSON for an unknown route or method too, like every other answer."""
    if _wants_json():
        from relay.admin.auth import json_error

        response = json_error(error.code or 500, f"{error.name}: {request.method} "
                              f"{request.path[:200]}")
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response
    return error


def _wants_json() -> bool:
    return request.path.startswith(("/admin/api/", "/admin/stream"))


def _limit_body() -> Response | None:
    """First thing for every admin request: a declared length over the limit is refused unread.
    A body without a length (chunked, which the server marks `wsgi.input_terminated`) is read
    here, at most one byte past the limit, and refused if it goes past; otherwise the view reads
    it from memory. (Werkzeug's own limit would cut such a body off silently at the limit.)"""
    request.max_content_length = MAX_BODY_BYTES
    length = request.content_length
    if length is not None:
        return _too_large(RequestEntityTooLarge()) if length > MAX_BODY_BYTES else None
    environ = request.environ
    if not environ.get("wsgi.input_terminated"):
        return None  # no length and no end marker: Werkzeug reads nothing at all
    stream, chunks, total = environ["wsgi.input"], [], 0
    while total <= MAX_BODY_BYTES:
        chunk = stream.read(MAX_BODY_BYTES + 1 - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > MAX_BODY_BYTES:
        return _too_large(RequestEntityTooLarge())
    environ["wsgi.input"] = io.BytesIO(b"".join(chunks))
    return None


def _too_large(_error: RequestEntityTooLarge) -> Response:
    message = (f"request body too large: the admin area accepts at most {MAX_BODY_BYTES // 1024} "
               "KiB")
    if _wants_json():
        from relay.admin.auth import json_error

        return json_error(413, message)
    return message_page(413, "Request too large", message[0].upper() + message[1:] + ".")


def _database_unavailable(error: DatabaseUnavailable) -> Response:
    """Sessions and the login throttle live in the database: without it, 503, never a 500."""
    if _wants_json():
        from relay.admin.auth import json_error

        return json_error(503, str(error), **{"Retry-After": "5"})
    return message_page(503, "Database unavailable", f"{error}. Try again in a moment.")


def _require_enabled() -> Response | None:
    from relay.admin.auth import DISABLED_MESSAGE, json_error, state

    if state().enabled:
        return None
    if _wants_json():
        return json_error(503, DISABLED_MESSAGE)
    return message_page(503, "Admin area disabled", DISABLED_MESSAGE[0].upper()
                        + DISABLED_MESSAGE[1:] + ".")


def _protect(response: Response) -> Response:
    """Operator data never lands in shared caches, frames or other origins' scripts."""
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if request.endpoint != "admin.static":
        response.headers["Cache-Control"] = "no-store"
    return response


def message_page(status: int, title: str, message: str) -> Response:
    """A plain page for errors (403, 404, 409, 503) with a way back."""
    response = current_app.make_response(render_template("message.html", title=title,
                                                         message=message))
    response.status_code = status
    return response


# --- template filters -------------------------------------------------------------------------


def format_time(value: str | datetime | None) -> str:
    """ISO-8601 (the API's format) to `YYYY-MM-DD HH:MM:SS`, UTC like every time shown."""
    if not value:
        return "—"
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return text.replace("T", " ")[:19]


def format_age(seconds: float | None) -> str:
    if not seconds:
        return "—"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def pretty_json(value: Any) -> str:
    """Indented JSON for display; a string that is JSON is re-indented, other text kept as is."""
    if value is None:
        return "—"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text: str = value
        try:
            value = json.loads(text)
        except ValueError:
            return text
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)
