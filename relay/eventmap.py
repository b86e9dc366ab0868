"""Extole event types and reward states to Braze event names and attribute effects.

The built-in map ships inside the package; `RELAY_EVENT_MAP` names a TOML file that extends or
overrides it. Entries of the user file replace built-in entries that share any type or alias;
`[rewards.<state>]` entries replace the built-in entry of that reward state.
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
SUBSCRIPTION_STATES = ("subscribed", "unsubscribed")
# The states of an Extole reward (its webhooks post them as the event type; the rewards API adds
# EXPIRED). A reward event is an item with a `reward_id` whose type is one of these.
REWARD_STATES = ("EARNED", "FULFILLED", "SENT", "REDEEMED", "FAILED", "FAILED_FULFILLMENT",
                 "CANCELED", "REVOKED", "EXPIRED")
# Older and reshaped reward bodies name the earned state by these types.
EARNED_TYPES = ("earned_reward", "reward_earned")
MAX_NAME = 255  # Braze event names, and the outbox column that keeps them
MAX_GROUP_ID = 255
MAX_TARGET_ID = 64  # Braze campaign and Canvas ids (UUIDs), and the triggers column
# Entry key -> trigger kind (README, "Campaign and Canvas triggers"). Every kind of entry (an
# event type's, a reward state's) may name them.
TRIGGER_KEYS = {"campaign_id": "campaign", "canvas_id": "canvas"}
EVENT_KEYS = frozenset({"braze_event", "aliases", "email_subscribe", "subscription_state",
                        "subscription_group_id", *TRIGGER_KEYS})
REWARD_KEYS = frozenset({"braze_event", *TRIGGER_KEYS})


@dataclass(frozen=True)
class Mapping:
    """What one Extole type (or reward state) becomes in Braze.

    `subscription_state` says that an event of this type changes a subscription group's state
    (the group named by the event, else `subscription_group_id`); by default it follows
    `email_subscribe`, so `subscribed`/`unsubscribed` events carry their group too.
    `campaign_id` / `canvas_id` name an API-triggered campaign or Canvas started for the person
    once the event is delivered: at most once (README, "Campaign and Canvas triggers").
    """

    braze_event: str
    email_subscribe: str | None = None
    subscription_state: str | None = None
    subscription_group_id: str | None = None
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


_STATE_BY_KEY = {type_key(state): state for state in REWARD_STATES}
_EARNED_KEYS = frozenset(type_key(t) for t in EARNED_TYPES)


def reward_state(extole_type: str) -> str | None:
    """The reward state a type names (`FULFILLED`, `Failed Fulfillment`, ...), upper case."""
    return _STATE_BY_KEY.get(type_key(extole_type))


def is_earned_type(extole_type: str) -> bool:
    """`earned_reward` / `reward_earned`: with a `reward_id`, a reward in state EARNED."""
    return type_key(extole_type) in _EARNED_KEYS


class EventMap:
    def __init__(self, entries: dict[str, Mapping],
                 rewards: dict[str, Mapping] | None = None) -> None:
        self._entries = entries
        self._rewards = rewards or {}

    def lookup(self, extole_type: str) -> Mapping:
        """The mapping for a type; unknown types keep their own name, unchanged."""
        return self._entries.get(type_key(extole_type)) or Mapping(braze_event=extole_type)

    def reward(self, state: str) -> Mapping:
        """The mapping of a reward state (one of REWARD_STATES)."""
        return self._rewards.get(state) or Mapping(braze_event=state)

    @property
    def braze_events(self) -> list[str]:
        names = [m.braze_event for m in (*self._entries.values(), *self._rewards.values())]
        return sorted(set(names))

    @classmethod
    def load(cls, path: str | None = None) -> EventMap:
        builtin = resources.files("relay").joinpath("events.toml").read_text("utf-8")
        entries, rewards = _parse(tomllib.loads(builtin), "built-in event map")
        if path:
            try:
                document = tomllib.loads(Path(path).read_text("utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise EventMapError(f"RELAY_EVENT_MAP: cannot read {path}: {exc}") from None
            more_entries, more_rewards = _parse(document, f"RELAY_EVENT_MAP ({path})")
            entries.update(more_entries)
            rewards.update(more_rewards)
        return cls(entries, rewards)


def _parse(document: dict[str, Any], origin: str) -> tuple[dict[str, Mapping],
                                                           dict[str, Mapping]]:
    events = document.get("events", {})
    rewards = document.get("rewards", {})
    if not isinstance(events, dict) or not isinstance(rewards, dict) or not (events or rewards):
        raise EventMapError(
            f"{origin}: expected [events.<extole_type>] or [rewards.<state>] tables")
    return _parse_events(events, origin), _parse_rewards(rewards, origin)


def _braze_event(table: dict[str, Any], where: str) -> str:
    braze_event = table.get("braze_event")
    if not isinstance(braze_event, str) or not braze_event.strip():
        raise EventMapError(f"{where} needs braze_event = \"<Braze event name>\"")
    if len(braze_event.strip()) > MAX_NAME:
        raise EventMapError(f"{where}: braze_event is longer than {MAX_NAME} characters")
    return braze_event.strip()


def _parse_rewards(rewards: dict[str, Any], origin: str) -> dict[str, Mapping]:
    entries: dict[str, Mapping] = {}
    for name, table in rewards.items():
        where = f"{origin}: [rewards.{name}]"
        state = reward_state(name)
        if state is None:
            raise EventMapError(f"{where}: {name!r} is not a reward state (one of "
                                f"{', '.join(s.lower() for s in REWARD_STATES)})")
        mapping, _ = parse_entry(table, where, REWARD_KEYS)
        if state in entries:
            raise EventMapError(f"{where}: state {state} is already mapped")
        entries[state] = mapping
    return entries


def _subscription(table: dict[str, Any], subscribe: str | None,
                  where: str) -> tuple[str | None, str | None]:
    """The entry's subscription-group effect: (state, fixed group id)."""
    state = table.get("subscription_state")
    if state is None and subscribe is not None:
        state = "unsubscribed" if subscribe == "unsubscribed" else "subscribed"
    if state is not None and state not in SUBSCRIPTION_STATES:
        raise EventMapError(
            f"{where}: subscription_state must be one of {', '.join(SUBSCRIPTION_STATES)}")
    group = table.get("subscription_group_id")
    if group is not None:
        if not isinstance(group, str) or not group.strip() or len(group) > MAX_GROUP_ID:
            raise EventMapError(f"{where}: subscription_group_id must be a non-empty string "
                                f"of at most {MAX_GROUP_ID} characters")
        if state is None:
            raise EventMapError(f"{where}: subscription_group_id needs subscription_state "
                                "(or email_subscribe) to say which state the group gets")
        group = group.strip()
    return state, group


def _parse_events(events: dict[str, Any], origin: str) -> dict[str, Mapping]:
    entries: dict[str, Mapping] = {}
    defined_by: dict[str, str] = {}
    for name, table in events.items():
        where = f"{origin}: [events.{name}]"
        mapping, aliases = parse_entry(table, where, EVENT_KEYS)
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


def parse_entry(table: Any, where: str,
                keys: frozenset[str] = EVENT_KEYS) -> tuple[Mapping, list[str]]:
    """One entry (its table named by `where` in messages): the mapping and its aliases.

    Every kind of entry (`[events.<type>]`, `[rewards.<state>]`) is read here, each allowing its
    own `keys`; the trigger keys are in every kind, so a trigger can be named wherever an event
    name can.
    """
    if not isinstance(table, dict):
        raise EventMapError(f"{where} must be a table")
    unknown = set(table) - keys
    if unknown:
        raise EventMapError(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
    braze_event = _braze_event(table, where)
    aliases = table.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise EventMapError(f"{where}: aliases must be a list of strings")
    subscribe = table.get("email_subscribe")
    if subscribe is not None and subscribe not in EMAIL_SUBSCRIBE_STATES:
        raise EventMapError(
            f"{where}: email_subscribe must be one of {', '.join(EMAIL_SUBSCRIBE_STATES)}"
        )
    state, group = _subscription(table, subscribe, where)
    targets: dict[str, str | None] = {}
    for key in TRIGGER_KEYS:
        value = table.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()
                                  or len(value.strip()) > MAX_TARGET_ID
                                  or any(c.isspace() for c in value.strip())):
            raise EventMapError(f"{where}: {key} must be a Braze id (a string of at most "
                                f"{MAX_TARGET_ID} characters without spaces)")
        targets[key] = value.strip() if isinstance(value, str) else None
    mapping = Mapping(braze_event=braze_event, email_subscribe=subscribe,
                      subscription_state=state, subscription_group_id=group,
                      campaign_id=targets["campaign_id"], canvas_id=targets["canvas_id"])
    return mapping, list(aliases)
