"""Who may use the admin area: one operator login, HTTP Basic for the API, sessions kept on the
server, failed sign-ins counted in the database, and CSRF.

The password is hashed once at start-up (scrypt, salted with a value derived from the secret key)
and every check hashes the attempt and compares in constant time, so a wrong user and a wrong
password take as long.

Sessions: the signed cookie (HttpOnly, SameSite=Lax, Secure over HTTPS) carries a random session
id and the session's CSRF token; the database keeps the id's SHA-256 with the user, the times and
the version of the credentials it was opened with (`admin_sessions`). Every admin request (page,
API, stream) looks the record up, so signing out, which deletes it, ends the session in every
process and on every host, and a copied cookie stops working; a password change makes every older
session invalid.

Failed sign-ins are counted in the database per user name and per client address (`LoginThrottle`),
so the limit holds across gunicorn workers and hosts. The client address is `request.remote_addr`:
X-Forwarded-For counts only through RELAY_PROXY_FIX (ProxyFix), so a forged header changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy import CursorResult, delete, select, update
from werkzeug.wrappers import Response as BaseResponse

from relay import dialect
from relay.admin import message_page
from relay.db import Database, get_db, utcnow
from relay.exceptions import DatabaseUnavailable
from relay.models import AdminLoginFailure, AdminSession
from relay.settings import Settings

MAX_FAILURES = 10
FAILURE_WINDOW = timedelta(minutes=15)
SESSION_IDLE = timedelta(hours=12)  # as the cookie: a session unused this long ends
SESSION_MAX_AGE = timedelta(days=7)  # and none lasts longer than this, used or not
TOUCH_EVERY = timedelta(minutes=1)  # last_seen_at is written at most this often per session
PURGE_EVERY_SECONDS = 60.0
PURGE_BATCH = 1000
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LENGTH = 2**14, 8, 1, 32
MAX_CREDENTIAL_LENGTH = 1024
MAX_NEXT_LENGTH = 2000
BASIC_CACHE_SECONDS = 60.0  # a script calling the API with Basic pays the scrypt cost once a minute
SESSION_ID, SESSION_CSRF = "sid", "csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
DISABLED_MESSAGE = ("the admin area is disabled: set RELAY_ADMIN_PASSWORD and RELAY_SECRET_KEY "
                    "(in the environment or instance/.env) and restart relay")
_USER_CACHE = "relay_admin_user"

bp = Blueprint("auth", __name__)


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                          p=SCRYPT_P, dklen=SCRYPT_LENGTH)


class Credentials:
    """The operator's user name and the scrypt hash of the password, made once per process.

    The salt is derived from the secret key, so every process computes the same hash and the same
    `version`: a name for these credentials that sessions record. Changing the password, the user
    name or the secret key changes it, which ends every session opened before. Stored in the
    database, it reveals no more than the hash: guessing the password from it costs an scrypt per
    guess and needs the secret key.
    """

    def __init__(self, user: str, password: str, secret_key: str) -> None:
        self.user = user.encode("utf-8")
        self._salt = hmac.new(secret_key.encode("utf-8"), b"relay admin salt\0" + self.user,
                              hashlib.sha256).digest()[:16]
        self._digest = _scrypt(password, self._salt)
        self.version = hashlib.sha256(b"relay admin credentials\0" + self._digest).hexdigest()
        self._cache_key = secrets.token_bytes(32)
        self._recent: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def check(self, user: str, password: str) -> bool:
        if len(user) > MAX_CREDENTIAL_LENGTH or len(password) > MAX_CREDENTIAL_LENGTH:
            return False
        user_ok = hmac.compare_digest(user.encode("utf-8"), self.user)
        return hmac.compare_digest(_scrypt(password, self._salt), self._digest) and user_ok

    def _token(self, user: str, password: str) -> bytes:
        return hmac.new(self._cache_key, f"{user}\0{password}".encode(), hashlib.sha256).digest()

    def recently_verified(self, user: str, password: str, now: float) -> bool:
        """These exact credentials passed `check_basic` within BASIC_CACHE_SECONDS."""
        with self._lock:
            expires = self._recent.get(self._token(user, password))
        return expires is not None and expires > now

    def check_basic(self, user: str, password: str, now: float) -> bool:
        """`check`, remembering a success briefly under a keyed hash (never the password)."""
        if not self.check(user, password):
            return False
        with self._lock:
            if len(self._recent) >= 64:
                self._recent.clear()
            self._recent[self._token(user, password)] = now + BASIC_CACHE_SECONDS
        return True


class _Every:
    """True at most once per `seconds` in this process: how often the tables are tidied."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock = seconds, clock
        self._last: float | None = None
        self._lock = threading.Lock()

    def due(self) -> bool:
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last < self.seconds:
                return False
            self._last = now
            return True


def _purge(db: Database, model: type[AdminSession] | type[AdminLoginFailure], key: Any,
           condition: Any) -> int:
    """Delete the rows matching `condition`, PURGE_BATCH at a time, each batch its own short
    transaction; answers how many went. A batch skips rows another transaction holds
    (PostgreSQL), so two processes tidying at once never wait on or deadlock each other."""
    total = 0
    while True:
        with db.session() as session:
            doomed = (select(key).where(condition).limit(PURGE_BATCH)
                      .with_for_update(skip_locked=True))
            result = cast(CursorResult[Any], session.execute(delete(model).where(key.in_(doomed))))
            deleted = int(result.rowcount)
        total += deleted
        if deleted < PURGE_BATCH:
            return total


@dataclass(frozen=True)
class Refusal:
    """Why an attempt may not even be checked: the scope at its limit, and for how long."""

    scope: str
    retry_after: int

    @property
    def message(self) -> str:
        minutes = max(1, math.ceil(self.retry_after / 60))
        where = "for this user name" if self.scope == "user" else "from your address"
        return (f"too many failed sign-ins {where}: try again in about {minutes} "
                f"minute{'s' if minutes != 1 else ''}")


class LoginThrottle:
    """At most `max_failures` failed sign-ins per user name and per client address within
    `window`, counted in the database so every process and host shares one count.

    An attempt is counted *before* its password is checked (`reserve`) and the count is released
    when the password was right (`release`). The check-and-count happens under a lock per key (a
    transaction-scoped advisory lock on PostgreSQL, the database write lock on SQLite), so however
    many attempts arrive at once, in however many processes, no more than `max_failures` of them
    are ever checked against the password within the window; the rest get a `Refusal` with the
    seconds until the oldest counted failure leaves the window. Rows are keyed by an HMAC of the
    scope and value; rows past the window are deleted as new ones are written.
    """

    SCOPES = ("user", "address")

    def __init__(self, secret: bytes, max_failures: int = MAX_FAILURES,
                 window: timedelta = FAILURE_WINDOW,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._secret = hmac.new(secret, b"relay admin login throttle", hashlib.sha256).digest()
        self.max_failures, self.window, self.clock = max_failures, window, clock
        self.tidy = _Every(PURGE_EVERY_SECONDS)

    def key(self, scope: str, value: str) -> str:
        return hmac.new(self._secret, f"{scope}\0{value}".encode("utf-8", "replace"),
                        hashlib.sha256).hexdigest()

    def reserve(self, db: Database, user: str, address: str) -> list[int] | Refusal:
        """Count one attempt for `user` and `address` (the row ids, to release on success), or
        refuse it without counting when either is at its limit."""
        now = self.clock()
        cutoff = now - self.window
        keys = {self.key("user", user[:MAX_CREDENTIAL_LENGTH]): "user",
                self.key("address", address): "address"}
        with db.session() as session:
            # PostgreSQL: advisory locks on the keys, in one order everywhere (no lock cycles).
            dialect.lock_text_keys(session.connection(),
                                   (f"relay-admin-login:{key}" for key in keys))
            # The first write takes SQLite's write lock for the rest of the transaction.
            session.execute(delete(AdminLoginFailure).where(
                AdminLoginFailure.key_hash.in_(keys), AdminLoginFailure.failed_at <= cutoff))
            recent: dict[str, list[datetime]] = {key: [] for key in keys}
            for key, failed_at in session.execute(
                    select(AdminLoginFailure.key_hash, AdminLoginFailure.failed_at)
                    .where(AdminLoginFailure.key_hash.in_(keys),
                           AdminLoginFailure.failed_at > cutoff)
                    .order_by(AdminLoginFailure.failed_at)):
                recent[key].append(failed_at)
            for scope in self.SCOPES:
                times = next(t for k, t in recent.items() if keys[k] == scope)
                if len(times) >= self.max_failures:
                    free_at = times[len(times) - self.max_failures] + self.window
                    seconds = max(1, math.ceil((free_at - now).total_seconds()))
                    return Refusal(scope, seconds)
            rows = [AdminLoginFailure(scope=scope, key_hash=key, failed_at=now)
                    for key, scope in keys.items()]
            session.add_all(rows)
            session.flush()
            ids = [row.id for row in rows]
        if self.tidy.due():
            self.purge(db)
        return ids

    def release(self, db: Database, ids: list[int]) -> None:
        """The attempt was right: it does not count as a failure."""
        with db.session() as session:
            session.execute(delete(AdminLoginFailure).where(AdminLoginFailure.id.in_(ids)))

    def purge(self, db: Database) -> int:
        """Delete rows that no longer count (older than the window), a batch at a time."""
        cutoff = self.clock() - self.window
        return _purge(db, AdminLoginFailure, AdminLoginFailure.id,
                      AdminLoginFailure.failed_at <= cutoff)


def session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()


class SessionStore:
    """Admin sessions in the database: opened at sign-in, looked up on every request, ended at
    sign-out; expired ones are deleted as new ones are opened."""

    def __init__(self, idle: timedelta = SESSION_IDLE, max_age: timedelta = SESSION_MAX_AGE,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.idle, self.max_age, self.clock = idle, max_age, clock
        self.tidy = _Every(PURGE_EVERY_SECONDS)

    def open(self, db: Database, user: str, version: str) -> str:
        """A new session for `user`; answers its id, for the cookie only (the table keeps a
        hash)."""
        session_id = secrets.token_urlsafe(32)
        now = self.clock()
        with db.session() as session:
            session.add(AdminSession(id_hash=session_hash(session_id), user_name=user[:255],
                                     credentials_version=version, created_at=now,
                                     last_seen_at=now, expires_at=now + self.idle))
        if self.tidy.due():
            self.purge(db)
        return session_id

    def find(self, db: Database, session_id: str, version: str) -> str | None:
        """The user of a live session opened with these credentials, else None. Use keeps a
        session alive (at most once per TOUCH_EVERY a write), up to max_age after sign-in."""
        now = self.clock()
        with db.session() as session:
            record = session.get(AdminSession, session_hash(session_id))
            if record is None or record.expires_at <= now:
                return None
            if not hmac.compare_digest(record.credentials_version, version):
                return None
            if now - record.last_seen_at >= TOUCH_EVERY:
                session.execute(update(AdminSession).where(
                    AdminSession.id_hash == record.id_hash).values(
                    last_seen_at=now,
                    expires_at=min(now + self.idle, record.created_at + self.max_age)))
            return record.user_name

    def end(self, db: Database, session_id: str) -> None:
        with db.session() as session:
            session.execute(delete(AdminSession).where(
                AdminSession.id_hash == session_hash(session_id)))

    def purge(self, db: Database) -> int:
        now = self.clock()
        return _purge(db, AdminSession, AdminSession.id_hash, AdminSession.expires_at <= now)


@dataclass
class AdminState:
    """What the admin area knows for the life of the app: None credentials means disabled."""

    credentials: Credentials | None
    throttle: LoginThrottle
    sessions: SessionStore

    @property
    def enabled(self) -> bool:
        return self.credentials is not None


def make_state(settings: Settings) -> AdminState:
    credentials = None
    if settings.admin_password and settings.secret_key:
        credentials = Credentials(settings.admin_user, settings.admin_password, settings.secret_key)
    return AdminState(credentials=credentials,
                      throttle=LoginThrottle((settings.secret_key or "").encode("utf-8")),
                      sessions=SessionStore())


def state() -> AdminState:
    state: AdminState = current_app.extensions["relay.admin"]
    return state


class AdminSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, marked Secure whenever the request came over HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or request.is_secure


def client_address() -> str:
    """The peer's address; behind RELAY_PROXY_FIX, ProxyFix has put the trusted proxy's
    X-Forwarded-For entry here. A header the client wrote itself is never read."""
    return request.remote_addr or "unknown"


# --- session and CSRF -------------------------------------------------------------------------


def current_user() -> str | None:
    """The signed-in operator: the cookie's session is live in the database, for the current
    credentials. Looked up once per request."""
    if _USER_CACHE in g:
        cached: str | None = g.get(_USER_CACHE)
        return cached
    user = None
    credentials = state().credentials
    session_id = session.get(SESSION_ID)
    if credentials is not None and isinstance(session_id, str) and session_id:
        user = state().sessions.find(get_db(), session_id, credentials.version)
    setattr(g, _USER_CACHE, user)
    return user


def displayed_user() -> str | None:
    """`current_user` for templates: an error page shown because the database is down must not
    fail again asking who is signed in."""
    try:
        return current_user()
    except DatabaseUnavailable:
        return None


def session_checker() -> Callable[[], bool]:
    """For a long-lived answer (the stream): asks whether this request's session is still live,
    without the request context. An outage answers True: the stream reports outages itself."""
    store, db, credentials = state().sessions, get_db(), state().credentials
    session_id = session.get(SESSION_ID)

    def still_signed_in() -> bool:
        if credentials is None or not isinstance(session_id, str):
            return False
        try:
            return store.find(db, session_id, credentials.version) is not None
        except DatabaseUnavailable:
            return True

    return still_signed_in


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
    previous = session.get(SESSION_ID)
    if isinstance(previous, str) and previous:
        state().sessions.end(get_db(), previous)
    session.clear()
    session.permanent = True
    session[SESSION_ID] = state().sessions.open(get_db(), user, credentials.version)
    session[SESSION_CSRF] = secrets.token_urlsafe(32)
    setattr(g, _USER_CACHE, user)


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
        credentials = state().credentials
        assert credentials is not None
        user, password = authorization.username or "", authorization.password or ""
        if credentials.recently_verified(user, password, time.monotonic()):
            return "basic", None  # proven right moments ago: no new guess to count
        reserved = state().throttle.reserve(get_db(), user, client_address())
        if isinstance(reserved, Refusal):
            return None, json_error(429, reserved.message,
                                    **{"Retry-After": str(reserved.retry_after)})
        if credentials.check_basic(user, password, time.monotonic()):
            state().throttle.release(get_db(), reserved)
            return "basic", None
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


def safe_next(target: str | None) -> str | None:
    """`target` if it is a plain path inside the admin area, else None: never an open redirect,
    and never a header value Werkzeug must refuse (CR, LF and other control characters)."""
    if not target or len(target) > MAX_NEXT_LENGTH:
        return None
    if not all("\x21" <= char <= "\x7e" for char in target) or "\\" in target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/admin/"):
        return None
    if any(unquote(segment) in (".", "..") for segment in parts.path.split("/")):
        return None
    return target


def _next_or_index(target: str | None) -> str:
    return safe_next(target) or url_for("admin.views.index")


def this_page() -> str:
    """The current request's path and query, percent-encoded, for a `next` parameter."""
    path = quote(request.path, safe="/:@!$&'()*+,;=-._~")
    query = request.query_string.decode("latin-1")
    return f"{path}?{query}" if query else path


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    next_url = _next_or_index(request.values.get("next"))
    if request.method == "GET":
        if current_user() is not None:
            return redirect(next_url)
        return render_template("login.html", next_url=next_url, user="")
    user = request.form.get("username", "")[:MAX_CREDENTIAL_LENGTH]
    if not csrf_valid(request.form.get(CSRF_FIELD)):
        return _login_error("the sign-in form expired: please try again", 403, next_url, user)
    reserved = state().throttle.reserve(get_db(), user, client_address())
    if isinstance(reserved, Refusal):
        return _login_error(reserved.message, 429, next_url, user,
                            {"Retry-After": str(reserved.retry_after)})
    credentials = state().credentials
    assert credentials is not None
    if not credentials.check(user, request.form.get("password", "")):
        return _login_error("wrong user name or password", 401, next_url, user)
    state().throttle.release(get_db(), reserved)
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
    session_id = session.get(SESSION_ID)
    if isinstance(session_id, str) and session_id:
        state().sessions.end(get_db(), session_id)
    session.clear()
    setattr(g, _USER_CACHE, None)
    flash("You are signed out.", "info")
    return redirect(url_for("admin.auth.login"))


def require_page_login() -> BaseResponse | None:
    """Pages: no live session means a redirect to the login, back here afterwards."""
    if current_user() is None:
        return redirect(url_for("admin.auth.login", next=this_page()))
    if request.method == "POST" and not csrf_valid(request.form.get(CSRF_FIELD)):
        return message_page(403, "Form expired",
                            "Missing or wrong CSRF token: reload the page and try again.")
    return None
