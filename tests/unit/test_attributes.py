"""A person's attributes key by key (README, "Delivery to Braze"): each subscription group's
state is its own key, for merging one request's events and for the newer-attributes rule."""

from __future__ import annotations

from relay import attributes

A, B = "aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002"


def group(group_id: str, state: str) -> dict[str, str]:
    return {"subscription_group_id": group_id, "subscription_state": state}


def test_keys_name_each_group() -> None:
    assert attributes.keys(None) == set()
    assert attributes.keys({"email": "e", "subscription_groups": [
        group(A, "subscribed"), group(B, "unsubscribed")]}) == {
        "email", f"subscription_groups:{A}", f"subscription_groups:{B}"}


def test_without_drops_stale_keys_and_stale_groups_only() -> None:
    values = {"email": "e", "email_subscribe": "unsubscribed",
              "subscription_groups": [group(A, "unsubscribed"), group(B, "unsubscribed")]}
    assert attributes.without(values, frozenset({"email_subscribe",
                                                 f"subscription_groups:{A}"})) == {
        "email": "e", "subscription_groups": [group(B, "unsubscribed")]}
    assert attributes.without(values, frozenset({f"subscription_groups:{A}",
                                                 f"subscription_groups:{B}"})) == {
        "email": "e", "email_subscribe": "unsubscribed"}
    assert attributes.without(None, frozenset()) == {}


def test_merge_keeps_every_group_with_its_latest_state() -> None:
    merged = {"external_id": "x", "email": "old",
              "subscription_groups": [group(A, "subscribed"), group(B, "subscribed")]}
    attributes.merge(merged, {"email": "new", "subscription_groups": [group(A, "unsubscribed")]})
    assert merged == {"external_id": "x", "email": "new",
                      "subscription_groups": [group(A, "unsubscribed"), group(B, "subscribed")]}
    attributes.merge(merged, {"first_name": "F"})
    assert merged["subscription_groups"] == [group(A, "unsubscribed"), group(B, "subscribed")]
    fresh: dict[str, object] = {"external_id": "y"}
    attributes.merge(fresh, {"subscription_groups": [group(B, "subscribed")]})
    assert fresh == {"external_id": "y", "subscription_groups": [group(B, "subscribed")]}
