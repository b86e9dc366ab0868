"""Braze REST client: one per environment, shared by the delivery threads of that environment.

The only code that talks to Braze: delivery (`track`, `export_ids_by_email`), campaign and Canvas
triggers (`trigger`) and `relay check-config` (`check_key`) go through it, so every request has the
same headers, timeouts, pacing, key scrubbing and errors. Its errors derive from `BrazeError` (a
`RelayError`) and carry the `Exchange` (request and answer) so callers can record it; a transport
failure is chained to the `requests` exception behind it (`__cause__`).
"""

from __future__ import annotations

import email.utils
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests
import urllib3

from relay.exceptions import RelayError

log = logging.getLogger(__name__)

TRACK_PATH = "/users/track"
EXPORT_IDS_PATH = "/users/export/ids"
CAMPAIGN_TRIGGER_PATH = "/campaigns/trigger/send"
CANVAS_TRIGGER_PATH = "/canvas/trigger/send"
# trigger kind -> (path, the id field, the recipients' properties field)
TRIGGER_ENDPOINTS = {
    "campaign": (CAMPAIGN_TRIGGER_PATH, "campaign_id", "trigger_properties"),
    "canvas": (CANVAS_TRIGGER_PATH, "canvas_id", "canvas_entry_properties"),
}
MAX_TRIGGER_RECIPIENTS = 50
# Braze limits the two trigger endpoints together (with /messages/send): one pacing state.
_RATE_GROUPS = {CAMPAIGN_TRIGGER_PATH: "/messages", CANVAS_TRIGGER_PATH: "/messages"}
# `check_key` asks for one made-up user: harmless, and it needs the permission email lookups need.
CHECK_KEY_BODY = {"external_ids": ["relay-check-config"], "fields_to_export": ["external_id"]}
MAX_PACING_SLEEP = 60.0
# Problems with the objects sent: splitting the batch isolates them. 404 (wrong endpoint) and
# 415 (wrong content type) are about the relay's configuration, not the events: they are
# retried like an outage so a misconfiguration never kills a backlog.
_BAD_REQUEST = frozenset({400, 413, 422})
_MESSAGE_LIMIT = 500


@dataclass
class Exchange:
    """One request to Braze and its answer, kept so every call can be recorded and shown."""

    endpoint: str
    request_body: str
    status: int | None
    response_body: str
    duration_ms: float
    error: str | None
    started_at: datetime


@dataclass
class TrackResult:
    """A 2xx answer to /users/track; `errors` names the objects Braze refused."""

    exchange: Exchange
    response: dict[str, Any]
    errors: list[dict[str, Any]] = field(default_factory=list)


class BrazeError(RelayError):
    """Braze request failed."""

    def __init__(self, message: str | None = None, *, exchange: Exchange | None = None) -> None:
        super().__init__(message)
        self.exchange = exchange


class RateLimited(BrazeError):
    """Braze rate limit reached."""

    def __init__(self, message: str | None = None, *, reset_at: float,
                 exchange: Exchange | None = None) -> None:
        super().__init__(message, exchange=exchange)
        self.reset_at = reset_at


class Unauthorized(BrazeError):
    """Braze refused the API key."""

    def __init__(self, message: str | None = None, *, status: int,
                 exchange: Exchange | None = None) -> None:
        super().__init__(message, exchange=exchange)
        self.status = status


class BadRequest(BrazeError):
    """Braze refused the request."""

    def __init__(self, message: str | None = None, *, status: int = 400,
                 errors: list[dict[str, Any]] | None = None,
                 exchange: Exchange | None = None) -> None:
        super().__init__(message, exchange=exchange)
        self.message = str(self)
        self.status = status
        self.errors = errors or []


class ServerError(BrazeError):
    """Braze answered with a server error."""

    def __init__(self, message: str | None = None, *, status: int,
                 exchange: Exchange | None = None) -> None:
        super().__init__(message, exchange=exchange)
        self.status = status


class TransportError(BrazeError):
    """No usable answer from Braze.

    `reached` says whether the request may have reached Braze: False only when the connection
    could not be opened (refused, unresolvable, a connect timeout, a failed TLS handshake), so
    nothing of the request was sent. A trigger may only be tried again when it is False.
    """

    def __init__(self, message: str | None = None, *, exchange: Exchange | None = None,
                 reached: bool = True) -> None:
        super().__init__(message, exchange=exchange)
        self.reached = reached


def _may_have_reached(error: requests.RequestException) -> bool:
    """False only for failures that happen before any byte of the request is sent."""
    if isinstance(error, requests.ConnectTimeout | requests.exceptions.SSLError):
        return False
    if isinstance(error, requests.ConnectionError):
        reason = error.args[0] if error.args else None
        reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
        return not isinstance(reason, urllib3.exceptions.NewConnectionError
                              | urllib3.exceptions.ConnectTimeoutError)
    return True


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _retry_after(value: str | None, now: float) -> float | None:
    """Retry-After is either seconds or an HTTP date."""
    seconds = _float(value)
    if seconds is not None:
        return now + max(0.0, seconds)
    if value:
        try:
            return email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None
    return None


class BrazeClient:
    """Talks to one Braze workspace; paces itself from Braze's rate-limit headers."""

    def __init__(self, endpoint: str, api_key: str, *, environment: str,
                 connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time, log_requests: bool = True) -> None:
        """`log_requests=False` for a caller that reports each outcome itself (check-config)."""
        if not api_key:
            raise ValueError(f"Braze API key for {environment} is empty")
        self.endpoint = endpoint.rstrip("/")
        self.environment = environment
        self._api_key = api_key
        # Per request rather than on the session, so a shared session never carries our key.
        self._headers = {"Authorization": f"Bearer {api_key}",
                         "Content-Type": "application/json", "Accept": "application/json"}
        self._timeout = (connect_timeout, read_timeout)
        self._owns_session = session is None
        self._session = session or requests.Session()
        self._sleep = sleep
        self._clock = clock
        self._log_requests = log_requests
        self._lock = threading.Lock()
        # Braze limits each endpoint separately, so the pacing state is per endpoint.
        self._rate: dict[str, dict[str, float | None]] = {}
        # Requests sent and not answered yet: each will take one from what Braze said remains.
        self._in_flight: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"BrazeClient(endpoint={self.endpoint!r}, environment={self.environment!r})"

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def rate_limit_state(self, endpoint: str = TRACK_PATH) -> dict[str, float | None]:
        """What Braze last said about this endpoint's limit (None where it said nothing)."""
        with self._lock:
            return dict(self._rate.get(_RATE_GROUPS.get(endpoint, endpoint),
                                       {"limit": None, "remaining": None, "reset": None}))

    def track(self, body: dict[str, Any]) -> TrackResult:
        data, exchange = self._call(TRACK_PATH, body)
        errors = data.get("errors") or []
        if not isinstance(errors, list):
            errors = [errors]
        errors = [e if isinstance(e, dict) else {"type": str(e)} for e in errors]
        return TrackResult(exchange=exchange, response=data, errors=errors)

    def export_ids_by_email(self, email: str) -> tuple[list[dict[str, Any]], Exchange]:
        body = {"email_address": email, "fields_to_export": ["external_id", "braze_id"]}
        data, exchange = self._call(EXPORT_IDS_PATH, body)
        users = data.get("users", [])
        if not isinstance(users, list) or not all(isinstance(u, dict) for u in users):
            raise TransportError("Braze's export answer has no list of users", exchange=exchange)
        return users, exchange

    @staticmethod
    def trigger_body(kind: str, target_id: str, recipients: list[dict[str, Any]]) -> dict[str, Any]:
        """The /campaigns/trigger/send or /canvas/trigger/send body for these recipients, each
        `{<identifier>, "properties": {...}}` (README, "Campaign and Canvas triggers")."""
        _path, id_field, properties_field = TRIGGER_ENDPOINTS[kind]
        if not 0 < len(recipients) <= MAX_TRIGGER_RECIPIENTS:
            raise ValueError(f"a trigger request carries 1 to {MAX_TRIGGER_RECIPIENTS} "
                             f"recipients, not {len(recipients)}")
        sent = []
        for recipient in recipients:
            one = {k: v for k, v in recipient.items() if k != "properties"}
            if recipient.get("properties"):
                one[properties_field] = recipient["properties"]
            sent.append(one)
        return {id_field: target_id, "recipients": sent}

    def trigger(self, kind: str, body: dict[str, Any], *, pace: bool = True) -> Exchange:
        """Send a trigger body (from `trigger_body`); raises as every call does. A 2xx whose
        body is not JSON still started the campaign: its TransportError carries the status.
        `pace=False`: never sleep before sending (the caller asked `pacing_delay` first: a
        trigger committed `sending` must leave at once)."""
        path = TRIGGER_ENDPOINTS[kind][0]
        _, exchange = self._call(path, body, pace=pace)
        return exchange

    def pacing_delay(self, path: str) -> float:
        """Seconds `_pace` would wait before a request to `path` now (0: none)."""
        group = _RATE_GROUPS.get(path, path)
        with self._lock:
            state = dict(self._rate.get(group, {}))
            in_flight = self._in_flight.get(group, 0)
        remaining, limit, reset = state.get("remaining"), state.get("limit"), state.get("reset")
        wait = reset - self._clock() if reset is not None else 0.0
        if remaining is None or wait <= 0 or remaining - in_flight >= max(1.0, (limit or 0) * 0.01):
            return 0.0
        return min(wait, MAX_PACING_SLEEP)

    @staticmethod
    def serialise(body: dict[str, Any]) -> str:
        """The exact text a request body is sent as (and recorded as)."""
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))

    def check_key(self) -> Exchange:
        """A harmless request that needs this key and the permission delivery needs
        (`/users/export/ids` for a user nobody has); raises as every call does."""
        _, exchange = self._call(EXPORT_IDS_PATH, CHECK_KEY_BODY)
        return exchange

    # -- internals -------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "[redacted]")

    def _pace(self, path: str) -> None:
        """Wait for the window to reset when the last answer said it is (nearly) used up,
        counting this client's requests still in flight (concurrent threads share the window);
        then count this request as in flight."""
        with self._lock:
            state = dict(self._rate.get(path, {}))
            in_flight = self._in_flight.get(path, 0)
            remaining, limit = state.get("remaining"), state.get("limit")
            reset = state.get("reset")
            wait = reset - self._clock() if reset is not None else 0.0
            if remaining is None or wait <= 0 or remaining - in_flight >= max(
                    1.0, (limit or 0) * 0.01):
                self._in_flight[path] = in_flight + 1
                return
        self._sleep(min(wait, MAX_PACING_SLEEP))
        with self._lock:
            self._in_flight[path] = self._in_flight.get(path, 0) + 1

    def _answered(self, path: str) -> None:
        with self._lock:
            self._in_flight[path] = max(0, self._in_flight.get(path, 0) - 1)

    def _remember_rate(self, path: str, headers: Any, status: int, reset_at: float | None) -> None:
        state = {"limit": _float(headers.get("X-RateLimit-Limit")),
                 "remaining": _float(headers.get("X-RateLimit-Remaining")),
                 "reset": _float(headers.get("X-RateLimit-Reset"))}
        if status == 429:
            state["remaining"], state["reset"] = 0.0, reset_at
        with self._lock:
            old = self._rate.get(path)
            # Answers of concurrent calls arrive out of order: within one window, trust the lowest.
            if (old and old["reset"] == state["reset"] and old["remaining"] is not None
                    and state["remaining"] is not None):
                state["remaining"] = min(old["remaining"], state["remaining"])
            self._rate[path] = state

    def _reset_at(self, headers: Any) -> float:
        now = self._clock()
        reset = _float(headers.get("X-RateLimit-Reset"))
        if reset is not None and reset > now:
            return reset
        retry = _retry_after(headers.get("Retry-After"), now)
        return retry if retry is not None else now + 1.0

    def _call(self, path: str, body: dict[str, Any], *,
              pace: bool = True) -> tuple[dict[str, Any], Exchange]:
        payload = self.serialise(body)
        group = _RATE_GROUPS.get(path, path)
        if pace:
            self._pace(group)
        else:
            with self._lock:
                self._in_flight[group] = self._in_flight.get(group, 0) + 1
        started_at = datetime.now(UTC)
        t0 = time.perf_counter()
        status: int | None = None
        text = ""
        error: str | None = None
        failure: requests.RequestException | None = None
        try:
            response = self._session.post(self.endpoint + path, data=payload.encode("utf-8"),
                                          headers=self._headers, timeout=self._timeout,
                                          allow_redirects=False)
            status, text = response.status_code, self._scrub(response.text)
        except requests.Timeout as exc:
            error, failure = self._scrub(f"timeout: {exc}"), exc
        except requests.ConnectionError as exc:
            error, failure = self._scrub(f"connection error: {exc}"), exc
        except requests.RequestException as exc:
            error, failure = self._scrub(f"request failed: {type(exc).__name__}: {exc}"), exc
        finally:
            if status is None:
                self._answered(group)
        duration_ms = (time.perf_counter() - t0) * 1000.0
        if self._log_requests:
            log.info("braze POST %s status=%s duration_ms=%.1f environment=%s",
                     path, status if status is not None else "-", duration_ms, self.environment)

        def exchange(err: str | None) -> Exchange:
            return Exchange(endpoint=path, request_body=payload, status=status,
                            response_body=text, duration_ms=duration_ms, error=err,
                            started_at=started_at)

        if error is not None:
            reached = failure is None or _may_have_reached(failure)
            raise TransportError(error, exchange=exchange(error), reached=reached) from failure
        assert status is not None
        reset_at = self._reset_at(response.headers) if status == 429 else None
        self._remember_rate(group, response.headers, status, reset_at)
        self._answered(group)
        data = self._json(text)

        if 200 <= status < 300:
            if not isinstance(data, dict):
                msg = f"Braze answered {status} with a body that is not a JSON object"
                raise TransportError(msg, exchange=exchange(msg))
            return data, exchange(None)
        message = self._message(data, text)
        if reset_at is not None:
            raise RateLimited(f"Braze rate limit reached until {reset_at:.0f}",
                              reset_at=reset_at, exchange=exchange(f"HTTP 429: {message}"))
        if status in (401, 403):
            raise Unauthorized(f"Braze refused the API key for {self.environment} "
                               f"(HTTP {status}: {message})", status=status,
                               exchange=exchange(f"HTTP {status}: {message}"))
        if status in _BAD_REQUEST:
            errors = data.get("errors") if isinstance(data, dict) else None
            errors = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
            raise BadRequest(message, status=status, errors=errors,
                             exchange=exchange(f"HTTP {status}: {message}"))
        # 5xx, and anything Braze does not document (3xx, 405, 408…): retried like an outage.
        raise ServerError(f"Braze answered HTTP {status}: {message}", status=status,
                          exchange=exchange(f"HTTP {status}: {message}"))

    @staticmethod
    def _json(text: str) -> Any:
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            return None

    @staticmethod
    def _message(data: Any, text: str) -> str:
        message = data.get("message") if isinstance(data, dict) else None
        if isinstance(message, str) and message:
            return message[:_MESSAGE_LIMIT]
        return (text.strip() or "(empty answer)")[:_MESSAGE_LIMIT]
