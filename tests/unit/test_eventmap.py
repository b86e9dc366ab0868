"""The event map: built-in Extole types (README, "Event names") and reward states (README,
"Reward events"), loose matching, override files."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.eventmap import (
    REWARD_KEYS,
    REWARD_STATES,
    EventMap,
    Mapping,
    is_earned_type,
    parse_entry,
    reward_state,
    type_key,
)
from relay.exceptions import EventMapError

README_TABLE = {
    "created_share_link": "Created Share Link",
    "share_link_created": "Created Share Link",
    "extole_share_link_created": "Created Share Link",
    "shared": "Shared",
    "share": "Shared",
    "extole_shared": "Shared",
    "referred_signed_up": "Referred Signed Up",
    "signed_up": "Referred Signed Up",
    "registered": "Referred Signed Up",
    "referred_converted": "Referred Converted",
    "converted": "Referred Converted",
    "extole_converted": "Referred Converted",
    "subscribed": "Subscribed",
    "unsubscribed": "Unsubscribed",
    "earned_reward": "Earned Reward",
    "reward_earned": "Earned Reward",
}
# README, "Reward events": the Braze event of each reward state.
REWARD_TABLE = {
    "EARNED": "Earned Reward",
    "FULFILLED": "Reward Fulfilled",
    "SENT": "Reward Sent",
    "REDEEMED": "Reward Redeemed",
    "FAILED": "Reward Failed",
    "FAILED_FULFILLMENT": "Reward Failed",
    "CANCELED": "Reward Canceled",
    "REVOKED": "Reward Revoked",
    "EXPIRED": "Reward Expired",
}


@pytest.fixture(scope="module")
def builtin() -> EventMap:
    return EventMap.load()


@pytest.mark.parametrize(("extole_type", "braze_event"), README_TABLE.items())
def test_builtin_map_is_the_readme_table(builtin: EventMap, extole_type: str,
                                           braze_event: str) -> None:
    assert builtin.lookup(extole_type).braze_event == braze_event


def test_subscription_types_set_email_subscribe(builtin: EventMap) -> None:
    assert builtin.lookup("subscribed") == Mapping("Subscribed", "opted_in", "subscribed")
    assert builtin.lookup("unsubscribed") == Mapping("Unsubscribed", "unsubscribed",
                                                     "unsubscribed")
    others = [t for t in README_TABLE if t not in ("subscribed", "unsubscribed")]
    assert all(builtin.lookup(t).email_subscribe is None for t in others)
    assert all(builtin.lookup(t).subscription_state is None for t in others)


@pytest.mark.parametrize(("state", "braze_event"), REWARD_TABLE.items())
def test_builtin_reward_states_are_the_readme_table(builtin: EventMap, state: str,
                                                     braze_event: str) -> None:
    assert builtin.reward(state) == Mapping(braze_event)


def test_reward_states_match_loosely_and_only_states() -> None:
    assert tuple(REWARD_TABLE) == REWARD_STATES
    for spelling, state in [("fulfilled", "FULFILLED"), ("Failed Fulfillment",
                                                         "FAILED_FULFILLMENT"),
                            ("failed-fulfillment", "FAILED_FULFILLMENT"), (" SENT ", "SENT"),
                            ("Canceled", "CANCELED")]:
        assert reward_state(spelling) == state
    assert [reward_state(t) for t in ("reward_fulfilled", "earned_reward", "CANCELLED", "")] == [
        None, None, None, None]
    assert is_earned_type("Reward Earned") and is_earned_type("EARNED_REWARD")
    assert not is_earned_type("EARNED")


def test_override_file_renames_a_reward_state_and_keeps_the_others(tmp_path: Path) -> None:
    events = EventMap.load(write(tmp_path, """
[rewards.fulfilled]
braze_event = "Coupon Ready"

[rewards."Failed Fulfillment"]
braze_event = "Coupon Problem"
"""))
    assert events.reward("FULFILLED") == Mapping("Coupon Ready")
    assert events.reward("FAILED_FULFILLMENT") == Mapping("Coupon Problem")
    assert events.reward("FAILED") == Mapping("Reward Failed")
    assert events.reward("SENT") == Mapping("Reward Sent")
    assert events.lookup("shared").braze_event == "Shared"  # a rewards-only file is enough
    assert "Coupon Ready" in events.braze_events


def test_an_entry_can_name_a_fixed_subscription_group(tmp_path: Path) -> None:
    events = EventMap.load(write(tmp_path, """
[events.newsletter_unsubscribed]
braze_event = "Newsletter Unsubscribed"
subscription_state = "unsubscribed"
subscription_group_id = " 0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0 "

[events.unsubscribed]
braze_event = "Unsubscribed"
subscription_state = "unsubscribed"
"""))
    # Only the group: no email_subscribe, so the person stays subscribed to other email.
    assert events.lookup("newsletter unsubscribed") == Mapping(
        "Newsletter Unsubscribed", None, "unsubscribed", "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0")
    assert events.lookup("unsubscribed") == Mapping("Unsubscribed", None, "unsubscribed")


@pytest.mark.parametrize("spelling", [
    "Share Link Created", "SHARE-LINK-CREATED", "share__link  created", "ShareLinkCreated",
    " share_link_created ", "share-link_created", "Extole Share Link Created",
])
def test_types_match_ignoring_case_underscores_dashes_and_spaces(builtin: EventMap,
                                                                 spelling: str) -> None:
    assert builtin.lookup(spelling).braze_event == "Created Share Link"


def test_type_key() -> None:
    assert type_key("Reward-Earned  ") == type_key("reward_earned") == "rewardearned"
    assert type_key("\tShare\nLink") == "sharelink"


@pytest.mark.parametrize("extole_type", ["reward_fulfilled", "Custom Thing", "réclamé", "x"])
def test_other_types_keep_their_own_name_unchanged(builtin: EventMap, extole_type: str) -> None:
    assert builtin.lookup(extole_type) == Mapping(extole_type)


def test_braze_events_lists_every_name(builtin: EventMap) -> None:
    assert builtin.braze_events == sorted(set(README_TABLE.values()) | set(REWARD_TABLE.values()))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "events.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_override_file_adds_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, """
[events.reward_fulfilled]
braze_event = "Reward Fulfilled"
aliases = ["Reward Delivered"]

[events.shared]
braze_event = "Referral Shared"

[events.newsletter_opt_in]
braze_event = "Newsletter Opt In"
email_subscribe = "subscribed"
""")
    events = EventMap.load(path)
    assert events.lookup("reward-fulfilled").braze_event == "Reward Fulfilled"
    assert events.lookup("REWARD DELIVERED").braze_event == "Reward Fulfilled"
    # The override replaces that type; the built-in's other aliases are left as they were.
    assert events.lookup("shared").braze_event == "Referral Shared"
    assert events.lookup("extole_shared").braze_event == "Shared"
    assert events.lookup("newsletter opt in") == Mapping("Newsletter Opt In", "subscribed",
                                                         "subscribed")
    # Everything else is still the built-in map.
    assert events.lookup("reward_earned").braze_event == "Earned Reward"
    assert EventMap.load().lookup("shared").braze_event == "Shared"  # no lasting effect


def test_override_file_wins_over_a_builtin_alias(tmp_path: Path) -> None:
    events = EventMap.load(write(tmp_path, """
[events.purchase]
braze_event = "Purchase"
aliases = ["converted"]
"""))
    assert events.lookup("converted").braze_event == "Purchase"
    assert events.lookup("referred_converted").braze_event == "Referred Converted"


def test_documented_example_file_loads() -> None:
    events = EventMap.load("config/events.toml")
    assert events.reward("FULFILLED") == Mapping("Reward Fulfilled")
    assert events.lookup("reward_fulfilled").braze_event == "Reward Fulfilled"
    assert events.lookup("reward_redeemed").braze_event == "Reward Redeemed"
    assert events.lookup("converted").braze_event == "Referred Converted"


@pytest.mark.parametrize(("text", "message"), [
    ("", "expected [events.<extole_type>] or [rewards.<state>] tables"),
    ("events = 3", "expected [events.<extole_type>] or [rewards.<state>] tables"),
    ("rewards = 3", "expected [events.<extole_type>] or [rewards.<state>] tables"),
    ("[rewards.fulfiled]\nbraze_event = 'F'",
     "[rewards.fulfiled]: 'fulfiled' is not a reward state (one of earned, fulfilled, sent, "
     "redeemed, failed, failed_fulfillment, canceled, revoked, expired)"),
    ("[rewards]\nsent = 'S'", "[rewards.sent] must be a table"),
    ("[rewards.sent]\nbraze_event = 'S'\naliases = ['x']",
     "[rewards.sent] has unknown keys: aliases"),
    ("[rewards.sent]\nbraze_event = ''", '[rewards.sent] needs braze_event = "<Braze event name>"'),
    ("[rewards.sent]\nbraze_event = 'S'\n[rewards.SENT]\nbraze_event = 'T'",
     "[rewards.SENT]: state SENT is already mapped"),
    ("[events.x]\nbraze_event = 'X'\nsubscription_state = 'opted_in'",
     "[events.x]: subscription_state must be one of subscribed, unsubscribed"),
    ("[events.x]\nbraze_event = 'X'\nsubscription_group_id = 'g'",
     "[events.x]: subscription_group_id needs subscription_state (or email_subscribe)"),
    ("[events.x]\nbraze_event = 'X'\nsubscription_state = 'subscribed'\n"
     "subscription_group_id = ' '",
     "[events.x]: subscription_group_id must be a non-empty string of at most 255 characters"),
    ("[events]\nshared = 'Shared'", "[events.shared] must be a table"),
    ("[events.shared]\nbraze = 'x'", "[events.shared] has unknown keys: braze"),
    ("[events.shared]\naliases = []", '[events.shared] needs braze_event = "<Braze event name>"'),
    ("[events.shared]\nbraze_event = '  '",
     '[events.shared] needs braze_event = "<Braze event name>"'),
    ("[events.shared]\nbraze_event = 5",
     '[events.shared] needs braze_event = "<Braze event name>"'),
    ("[events.shared]\nbraze_event = 'S'\naliases = 'share'",
     "[events.shared]: aliases must be a list of strings"),
    ("[events.shared]\nbraze_event = 'S'\naliases = [1]",
     "[events.shared]: aliases must be a list of strings"),
    ("[events.shared]\nbraze_event = 'S'\nemail_subscribe = 'yes'",
     "[events.shared]: email_subscribe must be one of opted_in, subscribed, unsubscribed"),
    (f"[events.shared]\nbraze_event = '{'x' * 256}'",
     "[events.shared]: braze_event is longer than 255 characters"),
    ("[events.shared]\nbraze_event = 'S'\naliases = ['--']",
     "[events.shared]: type '--' is empty once case, _, - and spaces are ignored"),
    ("[events.a]\nbraze_event = 'A'\naliases = ['Shared']\n[events.shared]\nbraze_event = 'S'",
     "[events.shared]: type 'shared' is already mapped by [events.a]"),
    ("[events.shared\nbraze_event = 'S'", "cannot read"),
])
def test_invalid_files_raise_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(EventMapError) as caught:
        EventMap.load(path)
    error = str(caught.value)
    assert error.startswith("RELAY_EVENT_MAP"), error
    assert message in error
    assert "\n" not in error


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(EventMapError, match=r"^RELAY_EVENT_MAP: cannot read .*missing\.toml"):
        EventMap.load(str(tmp_path / "missing.toml"))
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[events.caf\xe9]\nbraze_event = 'x'\n")
    with pytest.raises(EventMapError, match=r"^RELAY_EVENT_MAP: cannot read "):
        EventMap.load(str(path))


def test_the_same_type_twice_in_one_entry_is_fine(tmp_path: Path) -> None:
    events = EventMap.load(write(tmp_path, """
[events.shared]
braze_event = "Shared"
aliases = ["Shared", "SHARED", "share"]
"""))
    assert events.lookup("share").braze_event == "Shared"


def test_entries_may_start_a_campaign_or_a_canvas(tmp_path: Path) -> None:
    events = EventMap.load(write(tmp_path, """
[events.reward_fulfilled]
braze_event = "Reward Fulfilled"
campaign_id = " 3c2b1a09-8f7e-4d6c-b5a4-93827160f5e4 "

[events.signed_up]
braze_event = "Referred Signed Up"
canvas_id = "cnv-1"
campaign_id = "cmp-1"
"""))
    assert events.lookup("Reward Fulfilled").triggers == [
        ("campaign", "3c2b1a09-8f7e-4d6c-b5a4-93827160f5e4")]
    assert events.lookup("signed_up").triggers == [("campaign", "cmp-1"), ("canvas", "cnv-1")]
    assert events.lookup("shared").triggers == []
    assert events.lookup("unknown type").triggers == []


@pytest.mark.parametrize("value", ['""', "5", '"has space"', '"' + "x" * 65 + '"', "[]"])
@pytest.mark.parametrize("key", ["campaign_id", "canvas_id"])
def test_a_trigger_id_must_be_a_braze_id(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(EventMapError, match=f"\\[events.shared\\]: {key} must be a Braze id"):
        EventMap.load(write(tmp_path, f'[events.shared]\nbraze_event = "Shared"\n{key} = {value}'))


def test_parse_entry_is_the_shape_of_every_entry() -> None:
    """Every kind of entry is read by parse_entry; each kind allows its own keys."""
    mapping, aliases = parse_entry({"braze_event": "Shared", "campaign_id": "c-1",
                                    "aliases": ["share"]}, "[events.shared]")
    assert mapping == Mapping("Shared", campaign_id="c-1") and aliases == ["share"]
    mapping, aliases = parse_entry({"braze_event": "Reward Fulfilled", "canvas_id": "v-1"},
                                   "[rewards.fulfilled]", REWARD_KEYS)
    assert mapping == Mapping("Reward Fulfilled", canvas_id="v-1") and aliases == []
    with pytest.raises(EventMapError, match=r"\[rewards.x\] has unknown keys: aliases, nope"):
        parse_entry({"braze_event": "X", "nope": 1, "aliases": []}, "[rewards.x]", REWARD_KEYS)


def test_reward_entries_may_start_a_campaign_or_a_canvas(tmp_path: Path) -> None:
    events = EventMap.load(write(tmp_path, """
[rewards.fulfilled]
braze_event = "Coupon Ready"
campaign_id = "cmp-coupon"

[rewards."Failed Fulfillment"]
braze_event = "Coupon Problem"
canvas_id = "cnv-problem"
"""))
    assert events.reward("FULFILLED").triggers == [("campaign", "cmp-coupon")]
    assert events.reward("FAILED_FULFILLMENT").triggers == [("canvas", "cnv-problem")]
    assert events.reward("SENT").triggers == []
    with pytest.raises(EventMapError, match=r"\[rewards.sent\]: canvas_id must be a Braze id"):
        EventMap.load(write(tmp_path, '[rewards.sent]\nbraze_event = "S"\ncanvas_id = ""'))
