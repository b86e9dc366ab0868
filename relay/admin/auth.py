"""Who may use the admin area: one operator login, HTTP Basic for the API, throttling and CSRF.

The password is hashed once at start-up (scrypt, random salt) and every check hashes the attempt and
compares in constant time, so a wrong user and a wrong password take as long. Failed checks are
counted per client address: after MAX_FAILURES within FAILURE_WINDOW the address is refused for
LOCKOUT seconds, even with the right password (the counter lives in each process; with several
gunicorn workers an address gets MAX_FAILURES tries per worker). Sessions are Flask's signed cookie
(HttpOnly, SameSite=Lax, Secure over HTTPS) carrying a per-session CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from werkzeug.wrappers import Response as BaseResponse

from relay.admin import message_page
from relay.settings import Settings

MAX_FAILURES = 5
FAILURE_WINDOW = 15 * 60.0
LOCKOUT = 5 * 60.0
MAX_TRACKED_ADDRESSES = 10_000
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
MAX_CREDENTIAL_LENGTH = 1024
BASIC_CACHE_SECONDS = 60.0  # a script calling the API with Basic pays the scrypt cost once a minute
SESSION_USER, SESSION_CSRF, SESSION_VERSION = "admin_user", "csrf", "admin_version"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
DISABLED_MESSAGE = ("the admin area is disabled: set RELAY_ADMIN_PASSWORD and RELAY_SECRET_KEY "
                    "(in the environment or instance/.env) and restart relay")

bp = Blueprint("auth", __name__)


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, **SCRYPT)


class Credentials:
    """The operator's user name and the scrypt hash of the password, made once per process."""

    def __init__(self, user: str, password: str, secret_key: str) -> None:
        self.user = user.encode("utf-8")
        self._salt = secrets.token_bytes(16)
        self._digest = _scrypt(password, self._salt)
        self._cache_key = secrets.token_bytes(32)
        self._recent: dict[bytes, float] = {}
        self._lock = threading.Lock()
        # Sessions carry this, so changing the password (or the secret key) signs everyone out.
        self.version = hmac.new(secret_key.encode(), b"admin\0" + self.user + b"\0"
                                + password.encode(), hashlib.sha256).hexdigest()[:16]

    def check(self, user: str, password: str) -> bool:
        if len(user) > MAX_CREDENTIAL_LENGTH or len(password) > MAX_CREDENTIAL_LENGTH:
            return False
        user_ok = hmac.compare_digest(user.encode("utf-8"), self.user)
        return hmac.compare_digest(_scrypt(password, self._salt), self._digest) and user_ok

    def check_basic(self, user: str, password: str, now: float) -> bool:
        """`check`, remembering a success briefly under a keyed hash (never the password)."""
        token = hmac.new(self._cache_key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        with self._lock:
            expires = self._recent.get(token)
            if expires is not None and expires > now:
                return True
        if not self.check(user, password):
            return False
        with self._lock:
            if len(self._recent) >= 64:
                self._recent.clear()
            self._recent[token] = now + BASIC_CACHE_SECONDS
        return True


class Throttle:
    """Failed logins per client address; an address with too many is locked out for a while."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = FAILURE_WINDOW,
                 lockout: float = LOCKOUT, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures, self.window, self.lockout, self.clock = (
            max_failures, window, lockout, clock)
        self._failures: dict[str, list[float]] = {}
        self._locked: dict[str, float] = {}
        self._lock = threading.Lock()

    def locked_for(self, address: str) -> float:
        """Seconds until this address may try again (0: it may now)."""
        with self._lock:
            until = self._locked.get(address)
            now = self.clock()
            if until is None or until <= now:
                self._locked.pop(address, None)
                return 0.0
            return until - now

    def failure(self, address: str) -> None:
        with self._lock:
            now = self.clock()
            if len(self._failures) >= MAX_TRACKED_ADDRESSES:
                self._prune(now)
            recent = [t for t in self._failures.get(address, []) if t > now - self.window]
            recent.append(now)
            if len(recent) >= self.max_failures:
                self._locked[address] = now + self.lockout
                self._failures.pop(address, None)
            else:
                self._failures[address] = recent

    def success(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)

    def _prune(self, now: float) -> None:
        self._failures = {a: ts for a, ts in self._failures.items() if ts[-1] > now - self.window}
        self._locked = {a: t for a, t in self._locked.items() if t > now}
        while len(self._failures) >= MAX_TRACKED_ADDRESSES:  # a flood of addresses: forget oldest
            self._failures.pop(next(iter(self._failures)))


@dataclass
class AdminState:
    """What the admin area knows for the life of the app: None credentials means disabled."""

    credentials: Credentials | None
    throttle: Throttle

    @property
    def enabled(self) -> bool:
        return self.credentials is not None


def make_state(settings: Settings) -> AdminState:
    credentials = None
    if settings.admin_password and settings.secret_key:
        credentials = Credentials(settings.admin_user, settings.admin_password, settings.secret_key)
    return AdminState(credentials=credentials, throttle=Throttle())


def state() -> AdminState:
    admin: AdminState = current_app.extensions["relay.admin"]
    return admin


class AdminSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, marked Secure whenever the request came over HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or request.is_secure


def client_address() -> str:
    return request.remote_addr or "unknown"


def throttled_message(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    return (f"too many failed sign-ins from your address: try again in about {minutes} "
            f"minute{'s' if minutes != 1 else ''}")


# --- session and CSRF -------------------------------------------------------------------------


def current_user() -> str | None:
    """The signed-in operator, if the session is for the current credentials."""
    credentials = state().credentials
    user = session.get(SESSION_USER)
    if not user or credentials is None:
        return None
    if not hmac.compare_digest(str(session.get(SESSION_VERSION, "")), credentials.version):
        return None
    return str(user)


def csrf_token() -> str:
    """This session's CSRF token (created on first use, rotated at sign-in)."""
    token = session.get(SESSION_CSRF)
    if not token:
        token = session[SESSION_CSRF] = secrets.token_urlsafe(32)
    return str(token)


def csrf_valid(supplied: str | None) -> bool:
    expected = session.get(SESSION_CSRF)
    if not expected or not supplied:
        return False
    return hmac.compare_digest(str(expected).encode(), supplied.encode("utf-8", "replace"))


def _sign_in(user: str) -> None:
    credentials = state().credentials
    assert credentials is not None
    session.clear()
    session.permanent = True
    session[SESSION_USER] = user
    session[SESSION_VERSION] = credentials.version
    session[SESSION_CSRF] = secrets.token_urlsafe(32)


# --- the API's credentials --------------------------------------------------------------------


def json_error(status: int, message: str, **headers: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    response.headers.update(headers)
    return response


def authenticate_api() -> tuple[str | None, Response | None]:
    """("basic" or "session", None) when the request may use the API, else (None, answer)."""
    authorization = request.authorization
    if authorization is not None and authorization.type == "basic":
        address = client_address()
        throttle, credentials = state().throttle, state().credentials
        assert credentials is not None
        wait = throttle.locked_for(address)
        if wait:
            return None, json_error(429, throttled_message(wait), **{"Retry-After": str(int(wait))})
        if credentials.check_basic(authorization.username or "", authorization.password or "",
                                   time.monotonic()):
            throttle.success(address)
            return "basic", None
        throttle.failure(address)
        return None, _unauthorized("wrong user name or password")
    if current_user() is not None:
        return "session", None
    return None, _unauthorized("sign in at /admin/login or send HTTP Basic credentials")


def _unauthorized(message: str) -> Response:
    # The page's own fetch calls ask not to be challenged, so the browser shows no Basic dialog.
    if request.headers.get("X-Requested-With") == "fetch":
        return json_error(401, message)
    return json_error(401, message, **{"WWW-Authenticate": 'Basic realm="relay admin"'})


def check_state_change(method: str) -> Response | None:
    """A state-changing API call needs JSON, and with a session also the CSRF header."""
    if method == "session" and not csrf_valid(request.headers.get(CSRF_HEADER)):
        return json_error(403, f"missing or wrong {CSRF_HEADER} header: send the token from the "
                               "admin page's csrf-token meta tag, or use HTTP Basic")
    if request.mimetype != "application/json":
        return json_error(415, "send Content-Type: application/json")
    return None


# --- pages ------------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only a path inside the admin area: never an open redirect."""
    fallback = url_for("admin.views.index")
    if not target:
        return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/admin/") or "\\" in target:
        return fallback
    return target


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    next_url = _safe_next(request.values.get("next"))
    if request.method == "GET":
        if current_user() is not None:
            return redirect(next_url)
        return render_template("login.html", next_url=next_url, user="")
    address, throttle = client_address(), state().throttle
    user = request.form.get("username", "")[:MAX_CREDENTIAL_LENGTH]
    wait = throttle.locked_for(address)
    if wait:
        return _login_error(throttled_message(wait), 429, next_url, user,
                            {"Retry-After": str(int(wait))})
    if not csrf_valid(request.form.get(CSRF_FIELD)):
        return _login_error("the sign-in form expired: please try again", 403, next_url, user)
    credentials = state().credentials
    assert credentials is not None
    if not credentials.check(user, request.form.get("password", "")):
        throttle.failure(address)
        wait = throttle.locked_for(address)
        message = throttled_message(wait) if wait else "wrong user name or password"
        return _login_error(message, 429 if wait else 401, next_url, user)
    throttle.success(address)
    _sign_in(user)
    return redirect(next_url)


def _login_error(message: str, status: int, next_url: str, user: str,
                 headers: dict[str, str] | None = None) -> Response:
    response = current_app.make_response(
        render_template("login.html", next_url=next_url, user=user, error=message))
    response.status_code = status
    response.headers.update(headers or {})
    return response


@bp.post("/logout")
def logout() -> Any:
    if not csrf_valid(request.form.get(CSRF_FIELD)):
        return message_page(403, "Form expired",
                            "Missing or wrong CSRF token: reload the page and sign out again.")
    session.clear()
    flash("You are signed out.", "info")
    return redirect(url_for("admin.auth.login"))


def require_page_login() -> BaseResponse | None:
    """Pages: no session means a redirect to the login, back here afterwards."""
    if current_user() is None:
        target = request.full_path if request.query_string else request.path
        return redirect(url_for("admin.auth.login", next=target))
    if request.method == "POST" and not csrf_valid(request.form.get(CSRF_FIELD)):
        return message_page(403, "Form expired",
                            "Missing or wrong CSRF token: reload the page and try again.")
    return None
