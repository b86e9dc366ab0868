"""`EventFilter`: the one filter of the admin page, its API, the live stream and `relay events`.

Exact matches only (status, environment, Braze event name, a person or event id), plus `since`
for bulk replay, so every filter is served by an index. `from_args` validates what arrives over
HTTP once, for pages, API and stream alike; every problem raises `FilterError` naming the
parameter, so the API can answer 400 with it and the page can show it. The command line builds
its filter from options click has already checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVarTuple

from sqlalchemy import Select, or_

from relay.exceptions import FilterError
from relay.models import OutboxEvent, Status
from relay.settings import ENVIRONMENTS

MAX_TEXT = 320  # the longest column compared (email)
STATUSES = tuple(status.value for status in Status)

Columns = TypeVarTuple("Columns")


@dataclass(frozen=True)
class EventFilter:
    """Which events: unset fields match everything."""

    status: str | None = None
    environment: str | None = None
    name: str | None = None
    q: str | None = None  # an email (any case), an external_id or an Extole event id
    since: datetime | None = None  # received at or after (naive UTC)

    @classmethod
    def from_args(cls, args: Mapping[str, Any], *, with_since: bool = False) -> EventFilter:
        """From query parameters, a form or a JSON body; `since` only where it filters (bulk
        replay): the live stream's `since` is where it resumes, not a filter."""
        status = _text(args, "status")
        if status is not None and status not in STATUSES:
            raise FilterError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        environment = _text(args, "environment")
        if environment is not None and environment not in ENVIRONMENTS:
            raise FilterError(f"environment must be one of {', '.join(ENVIRONMENTS)}, "
                              f"got {environment!r}")
        return cls(status=status, environment=environment, name=_text(args, "name"),
                   q=_text(args, "q"), since=parse_since(args.get("since")) if with_since else None)

    def apply(self, query: Select[*Columns]) -> Select[*Columns]:
        """The filter as WHERE clauses on a query over events."""
        if self.status:
            query = query.where(OutboxEvent.status == self.status)
        if self.environment:
            query = query.where(OutboxEvent.environment == self.environment)
        if self.name:
            query = query.where(OutboxEvent.braze_event == self.name)
        if self.q:
            needle = self.q.strip()
            query = query.where(
                or_(
                    OutboxEvent.email == needle.lower(),
                    OutboxEvent.external_id == needle,
                    OutboxEvent.extole_event_id == needle,
                )
            )
        if self.since is not None:
            query = query.where(OutboxEvent.received_at >= self.since)
        return query

    def query_args(self) -> dict[str, str]:
        """Only the filters that are set, for building URLs."""
        args = {"status": self.status, "environment": self.environment, "name": self.name,
                "q": self.q, "since": self.since.isoformat() if self.since else None}
        return {key: value for key, value in args.items() if value}

    def __bool__(self) -> bool:
        return bool(self.query_args())

    def describe(self) -> str:
        """The text filters in words (pages show `since` as it was typed)."""
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
