"""`EventFilter`: one filter for the admin page, its API, the live stream and `relay events`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import sqlite

from relay.exceptions import FilterError, RelayError
from relay.models import OutboxEvent
from relay.outbox.filters import EventFilter, parse_since


def test_from_args_trims_and_drops_empty_values() -> None:
    event_filter = EventFilter.from_args({"status": " dead ", "environment": "",
                                          "name": "Earned Reward", "q": "  ann@example.com "})
    assert event_filter == EventFilter(status="dead", name="Earned Reward", q="ann@example.com")
    assert event_filter.query_args() == {"status": "dead", "name": "Earned Reward",
                                         "q": "ann@example.com"}
    assert event_filter.describe() == ("status dead, Braze event “Earned Reward”, person or "
                                       "event id “ann@example.com”")
    assert not EventFilter.from_args({}) and EventFilter.from_args({}).describe() == "no filter"


@pytest.mark.parametrize(("args", "message"), [
    ({"status": "lost"}, "status must be one of pending, delivered, dead, skipped, rejected, "
                         "got 'lost'"),
    ({"environment": "qa"}, "environment must be one of production, staging, got 'qa'"),
    ({"name": 7}, "name must be a string"),
    ({"q": "x" * 321}, "q is longer than 320 characters"),
])
def test_from_args_names_the_bad_parameter(args: dict[str, Any], message: str) -> None:
    with pytest.raises(FilterError) as raised:
        EventFilter.from_args(args)
    assert str(raised.value) == message
    assert isinstance(raised.value, RelayError)


def test_since_filters_only_where_asked() -> None:
    """The live stream's `since` is where it resumes, not a filter; bulk replay's filters."""
    args = {"since": "2026-11-20T15:00:00+01:00"}
    assert EventFilter.from_args(args).since is None
    assert EventFilter.from_args(args, with_since=True).since == datetime(2026, 11, 20, 14)
    with pytest.raises(FilterError, match="since must be an ISO-8601 time"):
        EventFilter.from_args({"since": "yesterday"}, with_since=True)


@pytest.mark.parametrize(("raw", "expected"), [
    (None, None), ("", None), ("2026-11-20T14:00:00Z", datetime(2026, 11, 20, 14)),
    ("2026-11-20T14:00:00", datetime(2026, 11, 20, 14)),
    (" 2026-11-20T09:00:00-05:00 ", datetime(2026, 11, 20, 14)),
])
def test_parse_since_is_naive_utc(raw: str | None, expected: datetime | None) -> None:
    assert parse_since(raw) == expected


def test_apply_matches_exactly_on_indexed_columns() -> None:
    query = EventFilter(status="dead", environment="production", name="Shared",
                        q=" Ann@Example.com ", since=datetime(2026, 11, 20)).apply(
        select(OutboxEvent.id))
    compiled = query.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True})
    where = str(compiled).split("WHERE", 1)[1]
    assert "events.status = 'dead'" in where
    assert "events.environment = 'production'" in where
    assert "events.braze_event = 'Shared'" in where
    assert ("events.email = 'ann@example.com' OR events.external_id = 'Ann@Example.com' OR "
            "events.extole_event_id = 'Ann@Example.com'") in where
    assert "events.received_at >= '2026-11-20 00:00:00.000000'" in where
    assert "LIKE" not in where
