"""The admin's filter, limit, cursor and time parameters, validated once for pages, API and stream.

Every problem raises `FilterError` with a message that names the parameter, so the API can answer
400 with it and the page can show it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from relay.models import Status
from relay.settings import ENVIRONMENTS

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_TEXT = 320  # the longest column compared (email)
MAX_ID = 2**63 - 1  # BIGINT: a larger number would be a database error, not "not found"
STATUSES = tuple(status.value for status in Status)


class FilterError(ValueError):
    """A filter parameter has an invalid value."""


@dataclass(frozen=True)
class EventFilter:
    """Exact-match filters, the same for the list, the live stream and bulk replay."""

    status: str | None = None
    environment: str | None = None
    name: str | None = None
    q: str | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> EventFilter:
        status = _text(args, "status")
        if status is not None and status not in STATUSES:
            raise FilterError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        environment = _text(args, "environment")
        if environment is not None and environment not in ENVIRONMENTS:
            raise FilterError(f"environment must be one of {', '.join(ENVIRONMENTS)}, "
                              f"got {environment!r}")
        return cls(status=status, environment=environment, name=_text(args, "name"),
                   q=_text(args, "q"))

    def as_kwargs(self) -> dict[str, str | None]:
        return asdict(self)

    def query_args(self) -> dict[str, str]:
        """Only the filters that are set, for building URLs."""
        return {key: value for key, value in asdict(self).items() if value}

    def __bool__(self) -> bool:
        return any(asdict(self).values())

    def describe(self) -> str:
        parts = [f"status {self.status}" if self.status else "",
                 f"environment {self.environment}" if self.environment else "",
                 f"Braze event “{self.name}”" if self.name else "",
                 f"person or event id “{self.q}”" if self.q else ""]
        return ", ".join(part for part in parts if part) or "no filter"


def _text(args: Mapping[str, Any], name: str) -> str | None:
    value = args.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise FilterError(f"{name} must be a string")
    value = value.strip()
    if len(value) > MAX_TEXT:
        raise FilterError(f"{name} is longer than {MAX_TEXT} characters")
    return value or None


def parse_limit(raw: str | None) -> int:
    if raw is None or raw.strip() == "":
        return DEFAULT_LIMIT
    try:
        limit = int(raw.strip())
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise FilterError(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {raw!r}")
    return limit


def parse_id(raw: str | None) -> int | None:
    """An event id as typed in a URL; None when it cannot be one (so: not found)."""
    text = (raw or "").strip()
    if not text.isdigit() or len(text) > 19:
        return None
    number = int(text)
    return number if 1 <= number <= MAX_ID else None


def parse_cursor(raw: str | None) -> int | None:
    if raw is None or raw.strip() == "":
        return None
    cursor = parse_id(raw)
    if cursor is None:
        raise FilterError("cursor must be a positive event id (the next_cursor of the previous "
                          f"page), got {raw!r}")
    return cursor


def parse_since(raw: Any) -> datetime | None:
    """ISO-8601 to naive UTC (the database's convention); no offset means UTC."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise FilterError("since must be an ISO-8601 time string such as 2026-11-20T14:00:00Z")
    try:
        moment = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise FilterError("since must be an ISO-8601 time such as 2026-11-20T14:00:00Z, "
                          f"got {raw[:40]!r}") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment
