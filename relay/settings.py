"""One typed settings object, read once from the environment and validated at start-up.

A variable missing from the environment is read from `.env` in the working directory, then from
`instance/.env` (which `make run` writes). An invalid value raises `SettingsError` whose message
is one line naming the variable, so start-up can stop with exactly that line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from sqlalchemy.engine import make_url

from relay.exceptions import EventMapError, SettingsError

ENVIRONMENTS = ("production", "staging")
_RATE_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}


@dataclass(frozen=True)
class Rate:
    """A number of calls per period, e.g. Braze's 250 export calls per minute."""

    calls: int
    period: float

    @property
    def per_second(self) -> float:
        return self.calls / self.period


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///instance/relay.db"
    braze_rest_endpoint: str | None = None
    braze_api_key: str | None = field(default=None, repr=False)
    braze_staging_api_key: str | None = field(default=None, repr=False)
    braze_staging_rest_endpoint: str | None = None
    extole_webhook_secret: str | None = field(default=None, repr=False)
    extole_staging_webhook_secret: str | None = field(default=None, repr=False)
    admin_user: str = "admin"
    admin_password: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    braze_max_objects: int = 75
    braze_export_rate: Rate = Rate(250, 60.0)
    braze_email_identity: str = "lookup"
    # Which Extole field becomes Braze's external_id: `partner_user_id` or `email`.
    external_id_from: str = "partner_user_id"
    identity_ttl: int = 3600
    event_map: str | None = None
    retry_base: float = 5.0
    retry_max_delay: float = 3600.0
    retry_max_age: int = 86400
    log_format: str = "text"
    max_body_bytes: int = 1048576
    max_items: int = 1000
    refused_log_rate: int = 60
    retention_days: int = 30
    dedup_days: int = 400
    trigger_delay: float = 0.0
    # Tunables of the worker, in the README's table too.
    worker_batch_size: int = 500
    worker_threads: int = 8
    lease_seconds: int = 120
    poll_interval: float = 1.0
    braze_connect_timeout: float = 5.0
    braze_read_timeout: float = 30.0
    proxy_fix: int = 0
    group_commit: str = "on"
    # Reconciliation from Extole's rewards API (README, "Reconciliation").
    extole_api_token: str | None = field(default=None, repr=False)
    extole_staging_api_token: str | None = field(default=None, repr=False)
    extole_api_url: str = "https://api.extole.io"
    reconcile_interval: int = 3600
    reconcile_window: int = 172800

    def braze_key(self, environment: str) -> str | None:
        """The key for one environment: production and staging never share one."""
        return self.braze_api_key if environment == "production" else self.braze_staging_api_key

    def braze_endpoint(self, environment: str) -> str | None:
        if environment == "staging" and self.braze_staging_rest_endpoint:
            return self.braze_staging_rest_endpoint
        return self.braze_rest_endpoint

    def webhook_secret(self, environment: str) -> str | None:
        if environment == "production":
            return self.extole_webhook_secret
        return self.extole_staging_webhook_secret

    def extole_token(self, environment: str) -> str | None:
        """The Extole API token that reads one environment's rewards (None: not reconciled)."""
        if environment == "production":
            return self.extole_api_token
        return self.extole_staging_api_token

    def __repr__(self) -> str:
        """Secrets are left out; a database password is masked."""
        shown = []
        for item in fields(self):
            if not item.repr:
                continue
            value = getattr(self, item.name)
            if item.name == "database_url":
                value = _hide_password(value)
            shown.append(f"{item.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__


def _hide_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparseable URL is shown without its credentials
        return re.sub(r"//[^/@]*@", "//***@", url)


def _text(value: str) -> str | None:
    return value.strip() or None


def _int(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {value!r}") from None
        if number < low or (high is not None and number > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {bounds}, got {number}")
        return number

    return parse


def _number(low: float, *, strict: bool = True) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number of seconds, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {value!r}")
        if number < low or (strict and number == low and low == 0):
            raise ValueError(f"must be greater than {low:g}, got {value.strip()}")
        return number

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        chosen = value.strip().lower()
        if chosen not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {value!r}")
        return chosen

    return parse


def _external_id_source(value: str) -> str:
    """`partner_user_id` (also spelt `external_id`, the other name Extole bodies use for it)
    or `email`."""
    chosen = _choice("partner_user_id", "external_id", "email")(value)
    return "partner_user_id" if chosen == "external_id" else chosen


def _rate(value: str) -> Rate:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(second|minute|hour)s?\s*", value.lower())
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"expected calls per period such as '250/minute', got {value!r}")
    return Rate(int(match.group(1)), _RATE_UNITS[match.group(2)])


def _url(value: str) -> str:
    url = value.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"expected an http(s) URL such as https://rest.iad-01.braze.com or "
                         f"https://api.extole.io, got {url!r}")
    return url


def _database_url(value: str) -> str:
    url = value.strip()
    if not re.match(r"^(sqlite(\+\w+)?|postgresql(\+\w+)?|postgres)://", url):
        raise ValueError("expected a sqlite:/// or postgresql+psycopg:// URL")
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _existing_file(value: str) -> str:
    path = Path(value.strip())
    if not path.is_file():
        raise ValueError(f"file {str(path)!r} does not exist")
    return str(path)


# variable name -> (Settings field, parser)
_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "RELAY_DATABASE_URL": ("database_url", _database_url),
    "BRAZE_REST_ENDPOINT": ("braze_rest_endpoint", _url),
    "BRAZE_API_KEY": ("braze_api_key", _text),
    "BRAZE_STAGING_API_KEY": ("braze_staging_api_key", _text),
    "BRAZE_STAGING_REST_ENDPOINT": ("braze_staging_rest_endpoint", _url),
    "EXTOLE_WEBHOOK_SECRET": ("extole_webhook_secret", _text),
    "EXTOLE_STAGING_WEBHOOK_SECRET": ("extole_staging_webhook_secret", _text),
    "RELAY_ADMIN_USER": ("admin_user", lambda v: _text(v) or "admin"),
    "RELAY_ADMIN_PASSWORD": ("admin_password", _text),
    "RELAY_SECRET_KEY": ("secret_key", _text),
    "BRAZE_MAX_OBJECTS": ("braze_max_objects", _int(2, 75)),
    "BRAZE_EXPORT_RATE": ("braze_export_rate", _rate),
    "BRAZE_EMAIL_IDENTITY": ("braze_email_identity", _choice("lookup", "email")),
    "RELAY_IDENTITY_TTL": ("identity_ttl", _int(0)),
    "RELAY_EXTERNAL_ID": ("external_id_from", _external_id_source),
    "RELAY_EVENT_MAP": ("event_map", _existing_file),
    "RELAY_RETRY_BASE": ("retry_base", _number(0)),
    "RELAY_RETRY_MAX_DELAY": ("retry_max_delay", _number(0)),
    "RELAY_RETRY_MAX_AGE": ("retry_max_age", _int(1)),
    "RELAY_LOG_FORMAT": ("log_format", _choice("text", "json")),
    "RELAY_MAX_BODY_BYTES": ("max_body_bytes", _int(1)),
    "RELAY_MAX_ITEMS": ("max_items", _int(1, 10000)),
    "RELAY_REFUSED_LOG_RATE": ("refused_log_rate", _int(0)),
    "RELAY_RETENTION_DAYS": ("retention_days", _int(1)),
    "RELAY_DEDUP_DAYS": ("dedup_days", _int(1)),
    "RELAY_TRIGGER_DELAY": ("trigger_delay", _number(0, strict=False)),
    "RELAY_WORKER_BATCH_SIZE": ("worker_batch_size", _int(1, 10000)),
    "RELAY_WORKER_THREADS": ("worker_threads", _int(1, 64)),
    "RELAY_LEASE_SECONDS": ("lease_seconds", _int(10)),
    "RELAY_POLL_INTERVAL": ("poll_interval", _number(0)),
    "BRAZE_CONNECT_TIMEOUT": ("braze_connect_timeout", _number(0)),
    "BRAZE_READ_TIMEOUT": ("braze_read_timeout", _number(0)),
    "RELAY_PROXY_FIX": ("proxy_fix", _int(0, 10)),
    "RELAY_GROUP_COMMIT": ("group_commit", _choice("on", "off")),
    "EXTOLE_API_TOKEN": ("extole_api_token", _text),
    "EXTOLE_STAGING_API_TOKEN": ("extole_staging_api_token", _text),
    "EXTOLE_API_URL": ("extole_api_url", _url),
    "RELAY_RECONCILE_INTERVAL": ("reconcile_interval", _int(0)),
    "RELAY_RECONCILE_WINDOW": ("reconcile_window", _int(60)),
}

SECRET_VARIABLES = frozenset(
    {
        "BRAZE_API_KEY",
        "BRAZE_STAGING_API_KEY",
        "EXTOLE_WEBHOOK_SECRET",
        "EXTOLE_STAGING_WEBHOOK_SECRET",
        "EXTOLE_API_TOKEN",
        "EXTOLE_STAGING_API_TOKEN",
        "RELAY_ADMIN_PASSWORD",
        "RELAY_SECRET_KEY",
    }
)


def read_sources(
    environ: Mapping[str, str] | None = None, cwd: Path | None = None
) -> dict[str, str]:
    """Merge the process environment over `.env` over `instance/.env` (first found wins)."""
    cwd = cwd or Path.cwd()
    merged: dict[str, str] = {}
    for path in (cwd / "instance" / ".env", cwd / ".env"):
        if path.is_file():
            try:
                values = dotenv_values(path, encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
                raise SettingsError(f"{path}: cannot be read ({reason})") from None
            merged.update({k: v for k, v in values.items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    return merged


def load_settings(
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build and validate the settings; the first invalid variable raises SettingsError."""
    source = read_sources(environ, cwd)
    values: dict[str, Any] = {}
    for name, (attr, parse) in _VARIABLES.items():
        raw = source.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[attr] = parse(raw)
        except ValueError as exc:
            raise SettingsError(f"{name}: {exc}") from None
    values.update(overrides or {})
    settings = Settings(**values)
    if settings.retry_max_delay < settings.retry_base:
        raise SettingsError(
            "RELAY_RETRY_MAX_DELAY: must be at least RELAY_RETRY_BASE "
            f"({settings.retry_max_delay:g} < {settings.retry_base:g})"
        )
    if settings.dedup_days < settings.retention_days:
        # Keys must outlive their events: a key gone before its event is purged lets a replay of
        # a purged event in.
        raise SettingsError(
            "RELAY_DEDUP_DAYS: must be at least RELAY_RETENTION_DAYS "
            f"({settings.dedup_days} < {settings.retention_days})"
        )
    if settings.admin_password and not settings.secret_key:
        raise SettingsError(
            "RELAY_SECRET_KEY: required when RELAY_ADMIN_PASSWORD enables the admin area"
        )
    if settings.event_map:
        # The file's content is part of the setting: check it now, not when a worker boots.
        from relay.eventmap import EventMap

        try:
            EventMap.load(settings.event_map)
        except EventMapError as error:
            raise SettingsError(str(error)) from None
    return settings
