"""Extole's REST API: the rewards list that reconciliation reads (README, "Reconciliation").

The only code that talks to Extole's API, apart from the Braze client on purpose: Extole is
another service with its own token, errors and limits. One client per environment (each has its
own access token) owns one `requests` session. Every call has timeouts; 429, 5xx, timeouts and
connection errors are retried with exponential backoff within the call (Extole's `Retry-After`
wins when it gives one); 401/403 and 400 are not retried. Extole's JSON error bodies (`code`,
`message`, `parameters`, `unique_id`) become the error's message, without the token. Errors are
`relay.exceptions.ExtoleError` and its kin.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import requests

from relay.exceptions import (
    ExtoleBadAnswer,
    ExtoleBadRequest,
    ExtoleError,
    ExtoleTokenRefused,
    ExtoleUnavailable,
)

log = logging.getLogger(__name__)

REWARDS_PATH = "/v2/rewards"
MAX_LIMIT = 1000  # Extole's largest page (`max_fetch_size_1000` beyond it)
ATTEMPTS = 5
BACKOFF_BASE = 1.0
BACKOFF_MAX = 30.0
RETRY_AFTER_MAX = 120.0
TOKEN_VARIABLES = {"production": "EXTOLE_API_TOKEN", "staging": "EXTOLE_STAGING_API_TOKEN"}
_SHOWN_ANSWER = 200


def interval(start: datetime, end: datetime) -> str:
    """Extole's `time_interval` in ISO-8601 explicit form, `start/end` in UTC to the second.

    The start is rounded down and the end up, so the interval asked for covers the window.
    """
    first = _utc(start).replace(microsecond=0)
    last = _utc(end)
    if last.microsecond:
        last = last.replace(microsecond=0) + timedelta(seconds=1)
    return f"{first:%Y-%m-%dT%H:%M:%S}Z/{last:%Y-%m-%dT%H:%M:%S}Z"


def _utc(moment: datetime) -> datetime:
    """Naive times are UTC (the relay's convention); aware ones are converted."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


class ExtoleClient:
    """Reads one Extole program's rewards with one access token."""

    def __init__(self, base_url: str, token: str, *, environment: str,
                 connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 attempts: int = ATTEMPTS, backoff_base: float = BACKOFF_BASE,
                 session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep, log_requests: bool = True) -> None:
        """`log_requests=False` for a caller that reports each outcome itself (check-config)."""
        if not token:
            raise ValueError(f"Extole API token for {environment} is empty")
        self.base_url = base_url.rstrip("/")
        self.environment = environment
        self._token = token
        # Per request, not on the session: a shared session never carries the token.
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._timeout = (connect_timeout, read_timeout)
        self._attempts = max(1, attempts)
        self._backoff_base = backoff_base
        self._owns_session = session is None
        self._session = session or requests.Session()
        self._sleep = sleep
        self._log = log.info if log_requests else log.debug

    def __repr__(self) -> str:
        return f"ExtoleClient(base_url={self.base_url!r}, environment={self.environment!r})"

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def rewards(self, start: datetime, end: datetime, *, limit: int = MAX_LIMIT,
                offset: int = 0) -> list[Any]:
        """One page of the rewards created in [start, end], failed ones included.

        The elements are returned as Extole sent them: the caller checks each one, so a single
        malformed reward is reported without losing the page.
        """
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
        params: dict[str, str | int] = {"time_interval": interval(start, end),
                                        "success_only": "false", "limit": limit,
                                        "offset": offset}
        answer = self._get(REWARDS_PATH, params)
        if not isinstance(answer, list):
            raise ExtoleBadAnswer(f"Extole's answer to GET {REWARDS_PATH} is not a list of "
                                  f"rewards but {_kind(answer)}")
        return answer

    def reward_pages(self, start: datetime, end: datetime, *,
                     limit: int = MAX_LIMIT) -> Iterator[tuple[int, list[Any]]]:
        """(offset, page) for every page, following `offset` until a page is shorter than
        `limit` (an empty one included)."""
        offset = 0
        while True:
            page = self.rewards(start, end, limit=limit, offset=offset)
            yield offset, page
            if len(page) < limit:
                return
            offset += len(page)

    def check_token(self, now: datetime | None = None) -> None:
        """A small read that needs the token and its scope: one reward of the last hour.
        Raises like every call (ExtoleTokenRefused for a refused token)."""
        end = now or datetime.now(UTC)
        self.rewards(end - timedelta(hours=1), end, limit=1)

    # -- internals -------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, str | int]) -> Any:
        url = self.base_url + path
        problem = ""
        for attempt in range(1, self._attempts + 1):
            started = time.monotonic()
            try:
                response = self._session.get(url, params=params, headers=self._headers,
                                             timeout=self._timeout, allow_redirects=False)
            except requests.RequestException as error:
                problem = _transport_problem(self.base_url, error, self._timeout)
                log.warning("extole %s GET %s offset=%s: %s (try %d of %d)", self.environment,
                            path, params.get("offset"), problem, attempt, self._attempts)
                delay = self._backoff(attempt)
            else:
                took = (time.monotonic() - started) * 1000
                self._log("extole %s GET %s offset=%s limit=%s -> %d (%.0f ms)",
                         self.environment, path, params.get("offset"), params.get("limit"),
                         response.status_code, took)
                status = response.status_code
                if 200 <= status < 300:
                    return self._json(response, path)
                described = self._describe(response)
                if status in (401, 403):
                    variable = TOKEN_VARIABLES.get(self.environment, "the Extole API token")
                    raise ExtoleTokenRefused(
                        f"Extole refused the {self.environment} API token ({status}{described}): "
                        f"check {variable} (it needs the scope to read rewards)",
                        status=status, code=_code(response))
                if status == 400:
                    raise ExtoleBadRequest(f"Extole refused the request GET {path} "
                                           f"(400{described})", status=status,
                                           code=_code(response))
                if status != 429 and status < 500:
                    raise ExtoleError(f"{status} from Extole at {url}{described}: is "
                                      "EXTOLE_API_URL Extole's API?", status=status,
                                      code=_code(response))
                problem = f"{status}{described}"
                log.warning("extole %s GET %s offset=%s: %s (try %d of %d)", self.environment,
                            path, params.get("offset"), problem, attempt, self._attempts)
                delay = self._backoff(attempt)
                if status == 429:
                    delay = _retry_after(response.headers.get("Retry-After"), delay)
            if attempt < self._attempts:
                self._sleep(delay)
        raise ExtoleUnavailable(f"Extole GET {path} failed {self._attempts} times, last: "
                                f"{problem}")

    def _backoff(self, attempt: int) -> float:
        return float(min(BACKOFF_MAX, self._backoff_base * 2 ** (attempt - 1)))

    def _json(self, response: requests.Response, path: str) -> Any:
        try:
            return json.loads(response.content)
        except (ValueError, RecursionError):
            shown = self._scrub(response.text[:_SHOWN_ANSWER].strip())
            raise ExtoleBadAnswer(f"Extole's answer to GET {path} is not JSON: {shown!r}",
                                  status=response.status_code) from None

    def _describe(self, response: requests.Response) -> str:
        """Extole's error body as `: <code>: <message> (parameters …, unique_id …)`."""
        try:
            body: Any = json.loads(response.content)
        except (ValueError, RecursionError):
            text = " ".join(response.text.split())[:_SHOWN_ANSWER]
            return f": {self._scrub(text)}" if text else ""
        if not isinstance(body, dict):
            return f": {self._scrub(' '.join(str(body).split())[:_SHOWN_ANSWER])}"
        parts = [str(body[name]) for name in ("code", "message") if body.get(name)]
        text = ": ".join(parts)
        extra = []
        if body.get("parameters"):
            extra.append("parameters " + json.dumps(body["parameters"], sort_keys=True))
        if body.get("unique_id"):
            extra.append(f"unique_id {body['unique_id']}")
        if extra:
            text += f" ({', '.join(extra)})"
        return f": {self._scrub(text[:_SHOWN_ANSWER * 2])}" if text else ""

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "[redacted]")


def _code(response: requests.Response) -> str | None:
    try:
        body = json.loads(response.content)
    except (ValueError, RecursionError):
        return None
    code = body.get("code") if isinstance(body, dict) else None
    return str(code) if code is not None else None


def _retry_after(value: str | None, default: float) -> float:
    """Extole's Retry-After in seconds, within reason; else the backoff delay."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return default
    return min(seconds, RETRY_AFTER_MAX)


def _transport_problem(base_url: str, error: requests.RequestException,
                       timeout: tuple[float, float]) -> str:
    if isinstance(error, requests.exceptions.SSLError):
        return f"TLS handshake with {base_url} failed"
    if isinstance(error, requests.exceptions.Timeout):
        return f"no answer from {base_url} within {timeout[0] + timeout[1]:g} s"
    if isinstance(error, requests.exceptions.ConnectionError):
        text = str(error)
        if "Connection refused" in text:
            return f"connection to {base_url} refused"
        return f"cannot connect to {base_url}"
    return f"request to {base_url} failed: {type(error).__name__}"


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"
