"""`relay check-config`: is this configuration able to run, and do Braze and Extole accept its keys
and tokens?

Each check gives one line: what was checked and `OK`, or the exact problem. Notes are facts an
operator may have chosen (no staging key: staging events are skipped) and do not fail the check.
Keys and secrets never appear in the output, not even inside an answer Braze echoes back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import requests
from sqlalchemy.engine import make_url

from relay.braze import (
    EXPORT_IDS_PATH,
    BrazeClient,
    BrazeError,
    RateLimited,
    TransportError,
)
from relay.exceptions import ExtoleError
from relay.extoleapi import TOKEN_VARIABLES, ExtoleClient
from relay.settings import Settings

PROBE_TIMEOUT = (3.0, 10.0)


@dataclass(frozen=True)
class Check:
    name: str
    detail: str
    problem: bool = False

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"


def run_checks(settings: Settings, *, timeout: tuple[float, float] = PROBE_TIMEOUT) -> list[Check]:
    """Every check, in the order an operator fixes things: database, webhooks, admin, Braze,
    Extole's API (reconciliation)."""
    checks = [check_database(settings)]
    checks += check_webhook_secrets(settings)
    checks.append(check_admin(settings))
    checks += check_braze(settings, timeout=timeout)
    checks += check_extole(settings, timeout=timeout)
    return checks


def check_database(settings: Settings) -> Check:
    from relay import migrate
    from relay.db import describe_error, make_engine

    shown = make_url(settings.database_url).render_as_string(hide_password=True)
    engine = make_engine(settings.database_url)
    try:
        current = migrate.current_revision(engine)
        problem = migrate.schema_problem(current)
    except Exception as error:  # noqa: BLE001 - any failure to connect is the answer
        return Check("database", f"{shown}: {describe_error(error)}", problem=True)
    finally:
        engine.dispose()
    if problem:
        return Check("database", f"{shown}: {problem}", problem=True)
    if current != migrate.head_revision():
        return Check("database", f"{shown}: schema {current} is newer than this relay: "
                                 "install the new version", problem=True)
    return Check("database", f"OK ({shown}, schema {current})")


def check_webhook_secrets(settings: Settings) -> list[Check]:
    checks = [
        Check("webhook secret production", "OK" if settings.extole_webhook_secret else
              "EXTOLE_WEBHOOK_SECRET is not set: production webhooks are answered 503",
              problem=not settings.extole_webhook_secret),
        Check("webhook secret staging", "OK" if settings.extole_staging_webhook_secret else
              "not set (EXTOLE_STAGING_WEBHOOK_SECRET): staging webhooks are answered 503"),
    ]
    if (settings.extole_webhook_secret
            and settings.extole_webhook_secret == settings.extole_staging_webhook_secret):
        checks.append(Check("webhook secrets", "production and staging use the same secret: "
                            "each environment needs its own", problem=True))
    return checks


def check_admin(settings: Settings) -> Check:
    if settings.admin_password:
        return Check("admin", f"OK (user {settings.admin_user})")
    return Check("admin", "disabled: set RELAY_ADMIN_PASSWORD and RELAY_SECRET_KEY to enable it")


def check_braze(settings: Settings, *, timeout: tuple[float, float] = PROBE_TIMEOUT) -> list[Check]:
    checks: list[Check] = []
    variables = {"production": ("BRAZE_API_KEY", "BRAZE_REST_ENDPOINT"),
                 "staging": ("BRAZE_STAGING_API_KEY", "BRAZE_STAGING_REST_ENDPOINT")}
    for environment, (key_variable, endpoint_variable) in variables.items():
        name = f"braze {environment}"
        key, endpoint = settings.braze_key(environment), settings.braze_endpoint(environment)
        if not key:
            if environment == "production":
                checks.append(Check(name, f"{key_variable} is not set: production events wait "
                                          "in the outbox", problem=True))
            else:
                checks.append(Check(name, f"not configured ({key_variable} is not set): "
                                          "staging events are stored and skipped"))
        elif not endpoint:
            checks.append(Check(name, f"{key_variable} is set but {endpoint_variable} is not",
                                problem=True))
        else:
            problem = probe_braze(endpoint, key, environment=environment, timeout=timeout)
            checks.append(Check(name, problem or "OK", problem=problem is not None))
    production, staging = settings.braze_api_key, settings.braze_staging_api_key
    if production and production == staging and (
            settings.braze_endpoint("production") == settings.braze_endpoint("staging")):
        checks.append(Check("braze keys", "staging uses the production key and endpoint: staging "
                            "events would reach the production workspace", problem=True))
    return checks


def check_extole(settings: Settings, *,
                 timeout: tuple[float, float] = PROBE_TIMEOUT) -> list[Check]:
    """Each environment's Extole API token, tried with one small rewards read (no retries)."""
    checks: list[Check] = []
    for environment, variable in TOKEN_VARIABLES.items():
        name = f"extole {environment}"
        token = settings.extole_token(environment)
        if not token:
            checks.append(Check(name, f"not configured ({variable} is not set): {environment} "
                                      "is not reconciled"))
            continue
        client = ExtoleClient(settings.extole_api_url, token, environment=environment,
                              connect_timeout=timeout[0], read_timeout=timeout[1], attempts=1,
                              log_requests=False)
        try:
            client.check_token()
        except ExtoleError as error:
            checks.append(Check(name, str(error), problem=True))
        else:
            checks.append(Check(name, f"OK (token reads rewards at {settings.extole_api_url})"))
        finally:
            client.close()
    return checks


def probe_braze(endpoint: str, key: str, *, environment: str = "production",
                timeout: tuple[float, float] = PROBE_TIMEOUT) -> str | None:
    """None when Braze accepts the key, else the problem in a few words (never the key).

    The probe is `BrazeClient.check_key`: the client delivery uses, so it sends what delivery
    sends (headers, no redirects followed) and scrubs the key from whatever Braze echoes.
    """
    client = BrazeClient(endpoint, key, environment=environment, connect_timeout=timeout[0],
                         read_timeout=timeout[1], log_requests=False)
    try:
        client.check_key()
    except RateLimited:
        return None  # rate limited: Braze knew the key
    except TransportError as error:
        answered = error.exchange.status if error.exchange else None
        if answered is not None and answered < 300:
            return None  # a 2xx, whatever its body: the key was accepted
        return _transport_problem(endpoint, error.__cause__, timeout)
    except BrazeError as error:
        exchange = error.exchange
        status = exchange.status if exchange and exchange.status else 0
        return _answer_problem(endpoint, status, _message(exchange.response_body if exchange
                                                          else ""))
    finally:
        client.close()
    return None


def _transport_problem(endpoint: str, cause: BaseException | None,
                       timeout: tuple[float, float]) -> str:
    if isinstance(cause, requests.exceptions.SSLError):
        return f"TLS handshake with {endpoint} failed"
    if isinstance(cause, requests.exceptions.Timeout):
        return f"no answer from {endpoint} within {timeout[0] + timeout[1]:g} s"
    if isinstance(cause, requests.exceptions.ConnectionError):
        return _connection_problem(endpoint, cause)
    return f"request to {endpoint} failed: {type(cause).__name__}"


def _answer_problem(endpoint: str, status: int, message: str) -> str:
    if status == 401:
        return "401 key refused"
    if status == 403:
        return (f"403 key lacks permission for {EXPORT_IDS_PATH} (it needs users.track and "
                f"users.export.ids){message}")
    if status == 404:
        return f"404 at {endpoint}{EXPORT_IDS_PATH}: is this your instance's REST endpoint?"
    return f"{status} from Braze{message}"


def _connection_problem(endpoint: str, error: Exception) -> str:
    text = str(error)
    if "Connection refused" in text:
        return "connection refused"
    if any(word in text for word in ("NameResolution", "Name or service not known",
                                     "nodename nor servname", "Failed to resolve")):
        return f"cannot resolve the host of {endpoint}"
    return f"cannot connect to {endpoint}"


def _message(answer: str) -> str:
    """Braze's message (the client has scrubbed the key from it), in a few words."""
    try:
        body: Any = json.loads(answer)
    except (ValueError, RecursionError):
        body = answer
    if isinstance(body, dict):
        body = body.get("message") or body.get("errors") or body
    text = " ".join(str(body).split())[:200]
    return f": {text}" if text else ""
