"""The admin's URL parameters besides the filter: page size, cursor and event ids, validated once
for the pages and the API.

Every problem raises `FilterError` with a message that names the parameter, so the API can answer
400 with it and the page can show it. The event filter itself is `relay.outbox.filters`.
"""

from __future__ import annotations

from relay.exceptions import EventNotFound, FilterError, TriggerNotFound

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_ID = 2**63 - 1  # BIGINT: a larger number would be a database error, not "not found"


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


def to_event_id(raw: str) -> int:
    """The event id of a URL (`/events/<id>`), or EventNotFound when it cannot be one."""
    number = parse_id(raw)
    if number is None:
        raise EventNotFound(f"no event with id {raw[:40]!r}")
    return number


def to_trigger_id(raw: str) -> int:
    """The trigger id of a URL (`/triggers/<id>/resend`), or TriggerNotFound."""
    number = parse_id(raw)
    if number is None:
        raise TriggerNotFound(f"no trigger with id {raw[:40]!r}")
    return number


def parse_cursor(raw: str | None) -> int | None:
    if raw is None or raw.strip() == "":
        return None
    cursor = parse_id(raw)
    if cursor is None:
        raise FilterError("cursor must be a positive event id (the next_cursor of the previous "
                          f"page), got {raw!r}")
    return cursor
