"""Extole event types to Braze event names and attribute effects.

The built-in map ships inside the package; `RELAY_EVENT_MAP` names a TOML file that extends or
overrides it. Entries of the user file replace built-in entries that share any type or alias.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from relay.exceptions import EventMapError

EMAIL_SUBSCRIBE_STATES = ("opted_in", "subscribed", "unsubscribed")
MAX_NAME = 255  # Braze event names, and the outbox column that keeps them
MAX_TARGET_ID = 64  # Braze campaign and Canvas ids (UUIDs), and the triggers column
# The keys of one entry, whatever table it sits in (an event type's, a reward state's).
ENTRY_KEYS = frozenset({"braze_event", "aliases", "email_subscribe", "campaign_id", "canvas_id"})
# Entry key -> trigger kind (README, "Campaign and Canvas triggers").
TRIGGER_KEYS = {"campaign_id": "campaign", "canvas_id": "canvas"}


@dataclass(frozen=True)
class Mapping:
    """One entry of the map: the Braze event name, and what else the event does in Braze.

    `campaign_id` / `canvas_id` name an API-triggered campaign or Canvas started for the person
    once the event is delivered: at most once (README, "Campaign and Canvas triggers").
    """

    braze_event: str
    email_subscribe: str | None = None
    campaign_id: str | None = None
    canvas_id: str | None = None

    @property
    def triggers(self) -> list[tuple[str, str]]:
        """(kind, Braze id) of each campaign or Canvas this entry starts."""
        found = []
        if self.campaign_id:
            found.append(("campaign", self.campaign_id))
        if self.canvas_id:
            found.append(("canvas", self.canvas_id))
        return found


def type_key(extole_type: str) -> str:
    """Types match ignoring case, `_`, `-` and spaces, so `Share Link Created` matches."""
    return re.sub(r"[\s_\-]+", "", extole_type).casefold()


class EventMap:
    def __init__(self, entries: dict[str, Mapping]) -> None:
        self._entries = entries

    def lookup(self, extole_type: str) -> Mapping:
        """The mapping for a type; unknown types keep their own name, unchanged."""
        return self._entries.get(type_key(extole_type)) or Mapping(braze_event=extole_type)

    @property
    def braze_events(self) -> list[str]:
        return sorted({m.braze_event for m in self._entries.values()})

    @classmethod
    def load(cls, path: str | None = None) -> EventMap:
        builtin = resources.files("relay").joinpath("events.toml").read_text("utf-8")
        entries = _parse(tomllib.loads(builtin), "built-in event map")
        if path:
            try:
                document = tomllib.loads(Path(path).read_text("utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise EventMapError(f"RELAY_EVENT_MAP: cannot read {path}: {exc}") from None
            entries.update(_parse(document, f"RELAY_EVENT_MAP ({path})"))
        return cls(entries)


def _parse(document: dict[str, Any], origin: str) -> dict[str, Mapping]:
    events = document.get("events")
    if not isinstance(events, dict):
        raise EventMapError(f"{origin}: expected [events.<extole_type>] tables")
    entries: dict[str, Mapping] = {}
    defined_by: dict[str, str] = {}
    for name, table in events.items():
        where = f"{origin}: [events.{name}]"
        mapping, aliases = parse_entry(table, where)
        for extole_type in [name, *aliases]:
            key = type_key(extole_type)
            if not key:
                raise EventMapError(f"{where}: type {extole_type!r} is empty once case, _, - "
                                    "and spaces are ignored")
            if key in defined_by and defined_by[key] != name:
                raise EventMapError(f"{where}: type {extole_type!r} is already mapped by "
                                    f"[events.{defined_by[key]}]")
            defined_by[key] = name
            entries[key] = mapping
    return entries


def parse_entry(table: Any, where: str) -> tuple[Mapping, list[str]]:
    """One entry (its table named by `where` in messages): the mapping and its aliases.

    Every table of the map (`[events.<type>]`, and any other kind of entry) has these keys, so
    a trigger can be named wherever an event name can.
    """
    if not isinstance(table, dict):
        raise EventMapError(f"{where} must be a table")
    unknown = set(table) - ENTRY_KEYS
    if unknown:
        raise EventMapError(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
    braze_event = table.get("braze_event")
    if not isinstance(braze_event, str) or not braze_event.strip():
        raise EventMapError(f"{where} needs braze_event = \"<Braze event name>\"")
    aliases = table.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise EventMapError(f"{where}: aliases must be a list of strings")
    subscribe = table.get("email_subscribe")
    if subscribe is not None and subscribe not in EMAIL_SUBSCRIBE_STATES:
        raise EventMapError(
            f"{where}: email_subscribe must be one of {', '.join(EMAIL_SUBSCRIBE_STATES)}"
        )
    if len(braze_event.strip()) > MAX_NAME:
        raise EventMapError(f"{where}: braze_event is longer than {MAX_NAME} characters")
    targets: dict[str, str | None] = {}
    for key in TRIGGER_KEYS:
        value = table.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()
                                  or len(value.strip()) > MAX_TARGET_ID
                                  or any(c.isspace() for c in value.strip())):
            raise EventMapError(f"{where}: {key} must be a Braze id (a string of at most "
                                f"{MAX_TARGET_ID} characters without spaces)")
        targets[key] = value.strip() if isinstance(value, str) else None
    mapping = Mapping(braze_event=braze_event.strip(), email_subscribe=subscribe,
                      campaign_id=targets["campaign_id"], canvas_id=targets["canvas_id"])
    return mapping, list(aliases)
