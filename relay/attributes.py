"""A person's Braze attributes as events carry them, key by key.

An event's attributes are a flat object (`email`, `email_subscribe`, ...) except
`subscription_groups`, a list of `{"subscription_group_id", "subscription_state"}` objects as
Braze takes it. Each group's state is its own key (`subscription_groups:<id>`): merging the events
of one request keeps the latest state of every group, and an older event must not overwrite the
state of a group a newer delivered event set, while its other groups are still news to Braze.
"""

from __future__ import annotations

from typing import Any

GROUPS = "subscription_groups"
GROUP_ID = "subscription_group_id"
_GROUP_KEY = GROUPS + ":"


def _groups(attributes: dict[str, Any]) -> list[dict[str, Any]]:
    value = attributes.get(GROUPS)
    return [g for g in value if isinstance(g, dict)] if isinstance(value, list) else []


def group_key(group_id: Any) -> str:
    return f"{_GROUP_KEY}{group_id}"


def keys(attributes: dict[str, Any] | None) -> set[str]:
    """The attribute names an event sets, one per subscription group."""
    names = {name for name in attributes or {} if name != GROUPS}
    names.update(group_key(g.get(GROUP_ID)) for g in _groups(attributes or {}))
    return names


def without(attributes: dict[str, Any] | None, stale: frozenset[str]) -> dict[str, Any]:
    """The attributes minus those named in `stale` (groups by their own key)."""
    kept = {k: v for k, v in (attributes or {}).items() if k != GROUPS and k not in stale}
    groups = [g for g in _groups(attributes or {}) if group_key(g.get(GROUP_ID)) not in stale]
    if groups:
        kept[GROUPS] = groups
    return kept


def merge(into: dict[str, Any], values: dict[str, Any]) -> None:
    """Apply a later event's attributes: its values win, a group's later state replaces the
    earlier one in place, other groups are kept."""
    later = _groups(values)
    into.update((k, v) for k, v in values.items() if k != GROUPS)
    if not later:
        return
    merged = {g.get(GROUP_ID): dict(g) for g in _groups(into)}
    for group in later:
        merged[group.get(GROUP_ID)] = dict(group)
    into[GROUPS] = list(merged.values())
