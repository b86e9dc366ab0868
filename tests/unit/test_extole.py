"""Parsing and normalising Extole events: times, field variants, properties, reward events, the
URL's default type, RELAY_EXTERNAL_ID, subscription groups, body parsing."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.eventmap import REWARD_STATES, EventMap
from relay.exceptions import InvalidBody, RejectedEvent
from relay.extole import (
    braze_time,
    canonical_json,
    content_hash,
    normalise,
    parse_body,
    parse_time,
    sanitise,
    stored_entry,
)

RECEIVED = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
EVENTS = EventMap.load()


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def event(**fields: Any) -> Any:
    body = {"type": "shared", "event_id": "e-1", **fields}
    return normalise(body, EVENTS, RECEIVED)


# --- times -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-11-20T14:14:18.548Z", utc(2026, 11, 20, 14, 14, 18, 548000)),
    ("2026-11-20T14:14:18Z", utc(2026, 11, 20, 14, 14, 18)),
    ("2026-11-20T14:14:18+00:00", utc(2026, 11, 20, 14, 14, 18)),
    ("2026-11-20T15:14:18+01:00", utc(2026, 11, 20, 14, 14, 18)),
    ("2026-11-20T08:44:18.5-05:30", utc(2026, 11, 20, 14, 14, 18, 500000)),
    ("2026-11-21T00:14:18+10:00", utc(2026, 11, 20, 14, 14, 18)),
    ("2026-11-20T15:14:18+0100", utc(2026, 11, 20, 14, 14, 18)),
    ("2026-11-20T14:14:18", utc(2026, 11, 20, 14, 14, 18)),          # no offset: UTC
    ("2026-11-20 14:14:18.123456", utc(2026, 11, 20, 14, 14, 18, 123456)),
    ("  2026-11-20T14:14:18Z  ", utc(2026, 11, 20, 14, 14, 18)),
    ("2026-11-20", utc(2026, 11, 20)),
    ("2026-01-01T00:30:00+01:00", utc(2025, 12, 31, 23, 30)),         # crosses the year
    (1795171200, utc(2026, 11, 20, 10, 40)),                           # epoch seconds
    (1795171200.25, utc(2026, 11, 20, 10, 40, 0, 250000)),
    (1795183500123, utc(2026, 11, 20, 14, 5, 0, 123000)),              # milliseconds
    (0, utc(1970, 1, 1)),
    (10**11, utc(5138, 11, 16, 9, 46, 40)),                            # still seconds
    (10**11 + 1, utc(1973, 3, 3, 9, 46, 40, 1000)),                    # milliseconds above
    ("1795171200", utc(2026, 11, 20, 10, 40)),                         # numeric strings
    (" 1795183500123 ", utc(2026, 11, 20, 14, 5, 0, 123000)),
    ("1795171200.5", utc(2026, 11, 20, 10, 40, 0, 500000)),
    (253402300799999, utc(9999, 12, 31, 23, 59, 59, 999000)),          # exact at the far end
    (253402300798123, utc(9999, 12, 31, 23, 59, 58, 123000)),
    ("253402300798123", utc(9999, 12, 31, 23, 59, 58, 123000)),
    (1.0e12, utc(2001, 9, 9, 1, 46, 40)),
])
def test_time_formats(value: Any, expected: datetime) -> None:
    parsed = parse_time(value)
    assert parsed == expected
    assert parsed.tzinfo is not None and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(("value", "error"), [
    (True, "event time True is not a time"),
    (False, "event time False is not a time"),
    (None, "event time must be a string or a number, not NoneType"),
    ([1795171200], "event time must be a string or a number, not list"),
    ({"seconds": 1}, "event time must be a string or a number, not dict"),
    ("yesterday", "event time 'yesterday' does not parse"),
    ("2026-13-01T00:00:00Z", "event time '2026-13-01T00:00:00Z' does not parse"),
    ("2026-11-20T25:00:00", "event time '2026-11-20T25:00:00' does not parse"),
    ("", "event time '' does not parse"),
    ("nan", "event time 'nan' is not a time"),
    ("Infinity", "event time 'Infinity' is not a time"),
    ("-1", "event time -1 is out of range"),
    (-1, "event time -1 is out of range"),
    (-1e12, "event time -1000000000000.0 is out of range"),
    (253402300800000, "event time 253402300800000 is out of range"),
    (10**30, "event time 1000000000000000000000000000000 is out of range"),
    (1e300, "event time 1e+300 is out of range"),
    ("1e999999999", "event time 1e999999999 is out of range"),
    ("0001-01-01T00:00:00+01:00", "event time '0001-01-01T00:00:00+01:00' is out of range"),
    ("9999-12-31T23:59:59-01:00", "event time '9999-12-31T23:59:59-01:00' is out of range"),
])
def test_times_that_cannot_be_used(value: Any, error: str) -> None:
    with pytest.raises(RejectedEvent) as caught:
        parse_time(value)
    assert str(caught.value) == error


def test_long_unparseable_time_is_shortened_in_the_reason() -> None:
    with pytest.raises(RejectedEvent) as caught:
        parse_time("x" * 500)
    assert str(caught.value) == f"event time '{'x' * 60}…' does not parse"


@pytest.mark.parametrize(("moment", "text"), [
    (utc(2026, 11, 20, 14, 14, 18, 548999), "2026-11-20T14:14:18.548Z"),
    (utc(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05.000Z"),
    (datetime(2026, 11, 20, 15, 0, tzinfo=timezone(timedelta(hours=1))),
     "2026-11-20T14:00:00.000Z"),
    (datetime(2026, 11, 20, 14, 0), "2026-11-20T14:00:00.000Z"),   # naive is UTC
    (utc(1, 1, 1), "0001-01-01T00:00:00.000Z"),
    (utc(999, 1, 1), "0999-01-01T00:00:00.000Z"),
])
def test_braze_time_format(moment: datetime, text: str) -> None:
    assert braze_time(moment) == text


# --- fields ----------------------------------------------------------------------------------


def test_missing_time_is_the_time_of_receipt() -> None:
    assert event().event_time == RECEIVED


@pytest.mark.parametrize("name", ["event_time", "timestamp", "time", "created_at",
                                  "EVENT_TIME", "Created_At"])
def test_every_time_name(name: str) -> None:
    assert event(**{name: "2026-11-20T14:00:00Z"}).event_time == utc(2026, 11, 20, 14)


def test_time_names_in_their_listed_order() -> None:
    both = normalise({"type": "x", "time": 1795171200, "event_time": "2026-01-01T00:00:00Z",
                      "timestamp": "garbage"}, EVENTS, RECEIVED)
    assert both.event_time == utc(2026, 1, 1)
    # A time under `data` is not the event time.
    assert event(data={"event_time": "2020-01-01T00:00:00Z"}).event_time == RECEIVED


@pytest.mark.parametrize("name", ["type", "event", "event_type", "event_name", "name", "TYPE",
                                  "Event_Name"])
def test_every_type_name(name: str) -> None:
    normalised = normalise({name: "reward_earned", "event_id": "t"}, EVENTS, RECEIVED)
    assert (normalised.extole_type, normalised.braze_event) == ("reward_earned", "Earned Reward")


def test_type_names_in_their_listed_order_and_blank_ones_skipped() -> None:
    normalised = normalise({"name": "Ann", "event": "shared", "type": "subscribed"}, EVENTS,
                           RECEIVED)
    assert normalised.extole_type == "subscribed"
    normalised = normalise({"type": "  ", "event": "", "event_type": " shared "}, EVENTS,
                           RECEIVED)
    assert normalised.extole_type == "shared"


@pytest.mark.parametrize(("body", "error"), [
    ({"event_id": "x"}, "no event type: expected one of type, event, event_type, event_name, name"),
    ({"type": None}, "no event type: expected one of type, event, event_type, event_name, name"),
    ({"data": {"type": "shared"}},
     "no event type: expected one of type, event, event_type, event_name, name"),
    ({"type": 5}, "event type must be a non-empty string"),
    ({"type": ["shared"]}, "event type must be a non-empty string"),
    ({"type": "s" * 256}, "event type is longer than 255 characters"),
    ({"type": "shared", "event_id": {"v": 1}}, "event id must be a string or a number, not dict"),
    ({"type": "shared", "event_id": True}, "event id must be a string or a number, not bool"),
    ({"type": "shared", "event_id": "i" * 256}, "event id is longer than 255 characters"),
    ({"type": "shared", "partner_user_id": ["a"]},
     "partner_user_id/external_id must be a string or a number, not list"),
    ({"type": "shared", "person": {"external_id": "e" * 256}},
     "partner_user_id/external_id is longer than 255 characters"),
    ([], "event must be a JSON object, not an array"),
    ("shared", "event must be a JSON object, not a string"),
    (3.5, "event must be a JSON object, not a number"),
    (False, "event must be a JSON object, not a boolean"),
    (None, "event must be a JSON object, not null"),
])
def test_unusable_events_are_rejected_with_a_reason(body: Any, error: str) -> None:
    with pytest.raises(RejectedEvent) as caught:
        normalise(body, EVENTS, RECEIVED)
    assert str(caught.value) == error


def test_event_id_names_and_missing_id() -> None:
    assert event().dedup_key == "e-1"
    assert normalise({"type": "x", "id": 42}, EVENTS, RECEIVED).dedup_key == "42"
    assert normalise({"type": "x", "id": "b", "event_id": "a"}, EVENTS, RECEIVED).dedup_key == "a"
    assert normalise({"type": "x", "Event_Id": " c "}, EVENTS, RECEIVED).dedup_key == "c"
    body = {"type": "x", "partner_user_id": "p"}
    hashed = normalise(body, EVENTS, RECEIVED)
    expected = "sha256:" + hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert hashed.dedup_key == hashed.extole_event_id == expected
    assert hashed.properties["extole_event_id"] == expected
    # An id under `data` or `person` is not the event's.
    assert normalise({"type": "x", "data": {"event_id": "d"}}, EVENTS,
                     RECEIVED).dedup_key.startswith("sha256:")


def test_identity_top_level_before_person_before_data() -> None:
    places = {"data": {"partner_user_id": "from-data", "email": "data@x.com"},
              "person": {"partner_user_id": "from-person", "email": "person@x.com"}}
    assert event(**places).external_id == "from-person"
    assert event(**places).email == "person@x.com"
    top = event(**places, external_id="from-top", email_address="top@x.com")
    assert (top.external_id, top.email) == ("from-top", "top@x.com")
    only_data = event(data={"external_id": 77, "recipient_email": "d@x.com"})
    assert (only_data.external_id, only_data.email) == ("77", "d@x.com")


def test_names_in_their_listed_order() -> None:
    normalised = event(external_id="second", partner_user_id="first",
                       recipient_email="c@x.com", email_address="b@x.com", email="a@x.com")
    assert (normalised.external_id, normalised.email) == ("first", "a@x.com")


def test_blank_or_unusable_values_fall_through_to_the_next_place() -> None:
    normalised = event(email="   ", partner_user_id="", person={"email": 5},
                       data={"email": "Data@X.com", "partner_user_id": "d-1"})
    assert (normalised.email, normalised.external_id) == ("data@x.com", "d-1")


def test_field_names_are_case_insensitive_and_the_first_spelling_wins() -> None:
    normalised = normalise({"TYPE": "Shared", "Event_ID": "m-1", "EMAIL": "First@X.com",
                            "email": "second@x.com", "Person": {"Partner_User_Id": "P-1"}},
                           EVENTS, RECEIVED)
    assert normalised.email == "first@x.com"
    assert normalised.external_id == "P-1"
    assert normalised.dedup_key == "m-1"


def test_email_is_trimmed_and_lower_cased() -> None:
    normalised = event(email="  Ann.Lee@Example.COM\t")
    assert normalised.email == "ann.lee@example.com"
    assert normalised.attributes["email"] == "ann.lee@example.com"
    assert normalised.person_key == "email:ann.lee@example.com"


def test_person_key_is_the_external_id_else_the_email() -> None:
    assert event(partner_user_id="c-1", email="a@x.com").person_key == "id:c-1"
    assert event(email="a@x.com").person_key == "email:a@x.com"
    assert event().person_key is None


def test_attributes() -> None:
    normalised = normalise({
        "type": "subscribed", "event_id": "s", "email": "A@x.com",
        "person": {"first_name": " Ann ", "last_name": "Lee", "phone_number": 5551234},
        "data": {"share_link": "https://r.example/a", "first_name": "Not Ann"},
    }, EVENTS, RECEIVED)
    assert normalised.attributes == {
        "email": "a@x.com", "first_name": "Ann", "last_name": "Lee", "phone": "5551234",
        "share_link": "https://r.example/a", "email_subscribe": "opted_in"}
    assert event(first_name={"x": 1}, last_name=True).attributes == {}
    assert event(first_name="f" * 300).attributes["first_name"] == "f" * 255


def test_properties_are_data_plus_top_level_non_envelope_fields() -> None:
    normalised = normalise({
        "type": "reward_earned", "event_id": "r-1", "event_time": "2026-01-01T00:00:00Z",
        "partner_user_id": "c-1", "email": "a@x.com", "first_name": "A", "last_name": "B",
        "phone_number": "1", "reward_id": "rw", "face_value": 5, "face_value_type": "USD",
        "person_id": "p", "message": None, "coupon_code": "C",
        "data": {"journey": "j", "reward_id": "from-data", "nothing": None},
    }, EVENTS, RECEIVED)
    assert normalised.properties == {
        "journey": "j", "reward_id": "rw", "face_value": 5, "face_value_type": "USD",
        "person_id": "p", "coupon_code": "C", "reward_state": "EARNED", "extole_event_id": "r-1"}


def test_person_unknown_fields_are_kept_but_not_its_identity() -> None:
    normalised = event(person={"id": "person-9", "name": "Ann Lee", "email": "a@x.com",
                               "partner_user_id": "c", "locale": "en"})
    assert normalised.properties == {"id": "person-9", "name": "Ann Lee", "locale": "en",
                                     "extole_event_id": "e-1"}


def test_funnel_program_and_share_link_are_passed_on_once() -> None:
    normalised = event(Funnel="friend", data={"PROGRAM": "p", "funnel": "advocate"},
                       person={"share_link": "https://s"})
    assert normalised.properties == {"funnel": "friend", "program": "p",
                                     "share_link": "https://s", "extole_event_id": "e-1"}


def test_properties_braze_would_refuse_are_cleaned() -> None:
    normalised = event(data={"$flag": True, "long": "x" * 300, "none": None,
                             "nested": {"$deep": 1, "s": "y" * 256, "n": None, "ok": 1},
                             "list": ["z" * 256, None, 1]},
                       **{"$top": "dropped"})
    assert normalised.properties == {
        "long": "x" * 255, "nested": {"s": "y" * 255, "ok": 1},
        "list": ["z" * 255, None, 1], "extole_event_id": "e-1"}
    assert sorted(normalised.trimmed) == sorted([
        "dropped property '$flag': keys may not start with $",
        "cut property 'long' from 300 to 255 characters",
        "dropped property '$deep': keys may not start with $",
        "cut property 's' from 256 to 255 characters",
        "cut property 'list' from 256 to 255 characters",
        "dropped property '$top': keys may not start with $",
    ])


def test_payload_is_the_event_as_received() -> None:
    body = {"type": "shared", "event_id": "p-1", "data": {"$x": 1, "n": None}}
    assert normalise(body, EVENTS, RECEIVED).payload == body


def test_unknown_type_keeps_its_name_and_aliases_map() -> None:
    assert event(type="reward_fulfilled").braze_event == "reward_fulfilled"
    assert event(type=" Share Link Created ").extole_type == "Share Link Created"
    assert event(type=" Share Link Created ").braze_event == "Created Share Link"
    assert event(type="UNSUBSCRIBED").attributes == {"email_subscribe": "unsubscribed"}


def test_canonical_json_and_hash_ignore_key_order() -> None:
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'
    assert content_hash({"b": 1, "a": [1, 2]}) == content_hash({"a": [1, 2], "b": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})


# --- body parsing ----------------------------------------------------------------------------


def test_parse_body_makes_strings_storable() -> None:
    body = b'{"a\\u0000": ["x\\u0000y", "\\ud800", {"\\udfff": "\\ud83d\\ude00"}]}'
    assert parse_body(body) == {"a\ufffd": ["x\ufffdy", "\ufffd", {"\ufffd": "\U0001f600"}]}


def test_parse_body_nesting_limit() -> None:
    assert parse_body(b"[" * 64 + b"]" * 64) is not None
    with pytest.raises(InvalidBody, match=r"^body is not valid JSON: nested deeper than 64 levels"):
        parse_body(b"[" * 65 + b"]" * 65)
    with pytest.raises(InvalidBody, match=r"nested too deeply to parse$"):
        parse_body(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)


@pytest.mark.parametrize(("body", "error"), [
    (b"[NaN]", "body is not valid JSON: NaN is not a JSON number"),
    (b"[1e400]", "body is not valid JSON: number 1e400 is out of range"),
    (b"[-1E+999]", "body is not valid JSON: number -1E+999 is out of range"),
    (b"[" + b"9" * 5000 + b"]", "body is not valid JSON: Exceeds the limit (4300 digits) for "
                                "integer string conversion: value has 5000 digits; use "
                                "sys.set_int_max_str_digits() to increase the limit"),
    (b"\xc3\x28", "body is not valid UTF-8 (byte 0)"),
])
def test_parse_body_refusals(body: bytes, error: str) -> None:
    with pytest.raises(InvalidBody) as caught:
        parse_body(body)
    assert str(caught.value) == error


def test_parse_body_keeps_large_but_finite_numbers() -> None:
    assert parse_body(b"[1.7e308, -0.0, 1e-400, 123456789012345678901234567890]") == [
        1.7e308, -0.0, 0.0, 123456789012345678901234567890]


# --- properties for any input ----------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
              allow_infinity=False), st.text()),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=10), children, max_size=5)),
    max_leaves=20,
)
keys = st.sampled_from(["type", "event", "name", "event_id", "id", "event_time", "time",
                        "partner_user_id", "external_id", "email", "recipient_email",
                        "first_name", "phone_number", "share_link", "funnel", "person", "data",
                        "Type", "EMAIL"])
events = st.dictionaries(st.one_of(keys, st.text(max_size=6)),
                         st.one_of(json_values, st.dictionaries(keys, json_values, max_size=5)),
                         max_size=10)


@settings(max_examples=400, deadline=None)
@given(item=st.one_of(events, json_values))
def test_normalise_only_ever_rejects(item: Any) -> None:
    """Any JSON value either becomes an event or is rejected with a reason: never a crash."""
    try:
        normalised = normalise(item, EVENTS, RECEIVED)
    except RejectedEvent as rejection:
        assert str(rejection)
        return
    assert normalised.dedup_key and len(normalised.dedup_key) <= 255
    assert normalised.braze_event and len(normalised.extole_type) <= 255
    assert normalised.properties["extole_event_id"] == normalised.extole_event_id
    assert normalised.event_time.tzinfo is not None
    json.dumps(normalised.properties, allow_nan=False)
    if normalised.email:
        assert normalised.email == normalised.email.strip().lower()


@settings(max_examples=300, deadline=None)
@given(value=json_values, text=st.text(st.one_of(
    st.characters(), st.sampled_from(["\x00", "\ud800", "\udc00"]))))
def test_sanitised_values_are_storable_anywhere(value: Any, text: str) -> None:
    cleaned = sanitise([value, {text: text}])
    encoded = json.dumps(cleaned, ensure_ascii=False)
    encoded.encode("utf-8")  # no lone surrogate left
    assert "\x00" not in encoded


# --- reward events (README, "Reward events") ---------------------------------------------------

REWARD_NAMES = {"EARNED": "Earned Reward", "FULFILLED": "Reward Fulfilled", "SENT": "Reward Sent",
                "REDEEMED": "Reward Redeemed", "FAILED": "Reward Failed",
                "FAILED_FULFILLMENT": "Reward Failed", "CANCELED": "Reward Canceled",
                "REVOKED": "Reward Revoked", "EXPIRED": "Reward Expired"}


def reward(**fields: Any) -> Any:
    body = {"event_id": "rw-1", "reward_id": "r-9", "partner_user_id": "c-1", **fields}
    return normalise(body, EVENTS, RECEIVED)


@pytest.mark.parametrize("state", REWARD_STATES)
@pytest.mark.parametrize("spell", [str.upper, str.lower, lambda s: s.title().replace("_", " ")])
def test_every_reward_state_in_any_case_is_a_reward_event(state: str, spell: Any) -> None:
    normalised = reward(type=spell(state))
    assert normalised.extole_type == spell(state)
    assert normalised.braze_event == REWARD_NAMES[state]
    assert (normalised.reward_id, normalised.reward_state) == ("r-9", state)
    assert normalised.properties == {"reward_id": "r-9", "reward_state": state,
                                     "extole_event_id": "rw-1"}


def test_a_state_without_a_reward_id_is_an_ordinary_type() -> None:
    normalised = event(type="FULFILLED")
    assert (normalised.braze_event, normalised.reward_id, normalised.reward_state) == (
        "FULFILLED", None, None)
    assert "reward_state" not in normalised.properties


@pytest.mark.parametrize("extole_type", ["earned_reward", "reward_earned", "Reward Earned"])
def test_legacy_earned_types_with_a_reward_id_are_state_earned(extole_type: str) -> None:
    normalised = reward(type=extole_type)
    assert normalised.braze_event == "Earned Reward"
    assert (normalised.reward_id, normalised.reward_state) == ("r-9", "EARNED")
    assert normalised.properties["reward_state"] == "EARNED"
    # Without a reward id: the same name, but no reward state.
    plain = event(type=extole_type)
    assert (plain.braze_event, plain.reward_state, plain.reward_id) == ("Earned Reward", None,
                                                                        None)


def test_other_reward_types_keep_their_own_name() -> None:
    normalised = reward(type="reward_fulfilled", partner_reward_id="CODE")
    assert (normalised.braze_event, normalised.reward_state) == ("reward_fulfilled", None)
    assert "coupon_code" not in normalised.properties


def test_without_a_type_a_rewards_state_is_the_type() -> None:
    normalised = reward(state="sent")
    assert (normalised.extole_type, normalised.braze_event, normalised.reward_state) == (
        "sent", "Reward Sent", "SENT")
    assert normalised.properties["state"] == "sent"
    # The type wins over the state; a state that is no reward state is no type.
    assert reward(type="FULFILLED", state="SENT").reward_state == "FULFILLED"
    with pytest.raises(RejectedEvent, match="^no event type"):
        reward(state="PENDING")
    with pytest.raises(RejectedEvent, match="^no event type"):
        normalise({"state": "SENT", "event_id": "x"}, EVENTS, RECEIVED)


@pytest.mark.parametrize(("key_type", "coupon"), [
    ("COUPON", "CODE-1"), ("coupon", "CODE-1"), (None, "CODE-1"), ("ID", None), ("LINK", None),
])
def test_coupon_code_is_the_partner_reward_id_of_a_coupon(key_type: str | None,
                                                          coupon: str | None) -> None:
    normalised = reward(type="FULFILLED", partner_reward_id=" CODE-1 ",
                        partner_reward_key_type=key_type)
    assert normalised.properties.get("coupon_code") == coupon
    assert normalised.properties["partner_reward_id"] == " CODE-1 "


def test_coupon_code_replaces_a_custom_spelling_and_needs_a_partner_reward_id() -> None:
    normalised = reward(type="FULFILLED", partner_reward_id="NEW", data={"Coupon_Code": "OLD"})
    assert normalised.properties["coupon_code"] == "NEW"
    assert "Coupon_Code" not in normalised.properties
    assert "coupon_code" not in reward(type="EARNED").properties
    assert "coupon_code" not in reward(type="EARNED", partner_reward_id={"x": 1}).properties


@pytest.mark.parametrize(("value", "number"), [
    ("20.00", 20.0), ("50", 50), (" 7.5 ", 7.5), ("-3", -3), (".5", 0.5), ("10.", 10.0),
    ("abc", "abc"), ("1e3", "1e3"), ("NaN", "NaN"), ("", ""), ("1" * 41, "1" * 41),
    (12, 12), (12.5, 12.5),
])
def test_face_value_reaches_braze_as_a_number(value: Any, number: Any) -> None:
    normalised = reward(type="FULFILLED", face_value=value)
    assert normalised.properties.get("face_value") == number
    assert type(normalised.properties.get("face_value")) is type(number)
    # Any event's face value, under any spelling, wherever it came from.
    assert event(data={"Face_Value": "5.25"}).properties["Face_Value"] == 5.25


def test_reward_id_must_be_usable_on_a_reward_event() -> None:
    assert reward(type="SENT", reward_id=42).reward_id == "42"
    with pytest.raises(RejectedEvent, match="^reward_id must be a string or a number"):
        reward(type="SENT", reward_id={"id": 1})
    with pytest.raises(RejectedEvent, match="^reward_id is longer than 255 characters"):
        reward(type="SENT", reward_id="r" * 256)
    # Anywhere: a reshaped body may carry it under `data`.
    assert reward(type="SENT", reward_id=None, data={"reward_id": "d-1"}).reward_id == "d-1"


def test_the_event_map_renames_reward_states(tmp_path: Any) -> None:
    path = tmp_path / "events.toml"
    path.write_text('[rewards.fulfilled]\nbraze_event = "Coupon Ready"\n', encoding="utf-8")
    events = EventMap.load(str(path))
    body = {"type": "FULFILLED", "reward_id": "r", "event_id": "e"}
    assert normalise(body, events, RECEIVED).braze_event == "Coupon Ready"
    assert normalise({**body, "type": "SENT"}, events, RECEIVED).braze_event == "Reward Sent"


def test_a_stored_event_maps_to_the_entry_that_named_it(tmp_path: Any) -> None:
    """Triggers are found by `stored_entry` from the stored type and item: the same entry as
    `normalise` chose (a reward state's, unless it is an older earned type or has no reward)."""
    path = tmp_path / "events.toml"
    path.write_text('[rewards.fulfilled]\nbraze_event = "Coupon Ready"\ncampaign_id = "c-r"\n'
                    '[rewards.earned]\nbraze_event = "Earned"\ncampaign_id = "c-e"\n'
                    '[events.fulfilled]\nbraze_event = "Fulfilled"\ncanvas_id = "v-f"\n',
                    encoding="utf-8")
    events = EventMap.load(str(path))
    for body in ({"type": "FULFILLED", "reward_id": "r", "event_id": "e"},
                 {"type": "fulfilled", "event_id": "e"},  # no reward: its type's entry
                 {"type": "EARNED", "data": {"reward_id": "r"}, "event_id": "e"},
                 {"type": "earned_reward", "reward_id": "r", "event_id": "e"},
                 {"state": "FULFILLED", "reward_id": "r", "event_id": "e"},
                 {"type": "shared", "reward_id": "r", "event_id": "e"}):
        normalised = normalise(body, events, RECEIVED)
        entry = stored_entry(events, normalised.extole_type, normalised.payload)
        assert entry.braze_event == normalised.braze_event, body
    assert stored_entry(events, "FULFILLED", {"type": "FULFILLED", "reward_id": "r"}).triggers == [
        ("campaign", "c-r")]
    assert stored_entry(events, "FULFILLED", {"type": "FULFILLED"}).triggers == [
        ("canvas", "v-f")]
    assert stored_entry(events, "earned_reward", {"reward_id": "r"}).triggers == []
    assert stored_entry(events, "FULFILLED", {"erased": True}).triggers == [("canvas", "v-f")]


# --- the webhook URL's type --------------------------------------------------------------------


def test_the_default_type_types_only_items_without_one() -> None:
    body = {"reward_id": "r-1", "partner_user_id": "c", "data": {"k": "v"}}
    typed = normalise(body, EVENTS, RECEIVED, default_type="earned_reward")
    assert (typed.extole_type, typed.braze_event, typed.reward_state) == (
        "earned_reward", "Earned Reward", "EARNED")
    assert typed.payload == body  # stored as received
    # The URL's type is part of the content hash: the same body under two types is two events.
    other = normalise(body, EVENTS, RECEIVED, default_type="FULFILLED")
    assert (other.braze_event, other.reward_state) == ("Reward Fulfilled", "FULFILLED")
    assert typed.dedup_key == "sha256:" + content_hash({**body, "type": "earned_reward"})
    assert other.dedup_key != typed.dedup_key
    # An item with its own type (or a reward state) keeps it.
    own = normalise({**body, "type": "shared"}, EVENTS, RECEIVED, default_type="earned_reward")
    assert (own.extole_type, own.braze_event) == ("shared", "Shared")
    state = normalise({**body, "state": "REDEEMED"}, EVENTS, RECEIVED,
                      default_type="earned_reward")
    assert state.reward_state == "REDEEMED"


# --- RELAY_EXTERNAL_ID -------------------------------------------------------------------------


def test_external_id_from_email_makes_partner_user_id_a_property() -> None:
    body = {"type": "shared", "event_id": "x-1", "partner_user_id": "cust-1",
            "email": " Ann@Example.COM ", "person": {"external_id": "p-ext"}}
    normalised = normalise(body, EVENTS, RECEIVED, external_id_from="email")
    assert (normalised.external_id, normalised.email, normalised.person_key) == (
        "ann@example.com", "ann@example.com", "id:ann@example.com")
    assert normalised.attributes == {"email": "ann@example.com"}
    assert normalised.properties == {"external_id": "p-ext", "partner_user_id": "cust-1",
                                     "extole_event_id": "x-1"}
    default = normalise(body, EVENTS, RECEIVED)
    assert (default.external_id, default.properties) == ("cust-1", {"extole_event_id": "x-1"})


def test_external_id_from_email_without_an_email_has_no_external_id() -> None:
    normalised = normalise({"type": "shared", "partner_user_id": "cust-1"}, EVENTS, RECEIVED,
                           external_id_from="email")
    assert (normalised.external_id, normalised.email, normalised.person_key) == (None, None, None)
    with pytest.raises(RejectedEvent, match="^email is longer than 255 characters, too long "
                                            "for an external_id"):
        normalise({"type": "shared", "email": "a" * 250 + "@x.com"}, EVENTS, RECEIVED,
                  external_id_from="email")


# --- subscription groups -----------------------------------------------------------------------

GROUP = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"


@pytest.mark.parametrize("place", ["top", "person", "data"])
@pytest.mark.parametrize(("extole_type", "state", "subscribe"), [
    ("subscribed", "subscribed", "opted_in"), ("Unsubscribed", "unsubscribed", "unsubscribed")])
def test_a_subscription_event_naming_a_group_sets_its_state(place: str, extole_type: str,
                                                            state: str, subscribe: str) -> None:
    named = {"Subscription_Group_Id": GROUP}
    fields = named if place == "top" else {place: named}
    normalised = event(type=extole_type, **fields)
    assert normalised.attributes == {
        "email_subscribe": subscribe,
        "subscription_groups": [{"subscription_group_id": GROUP, "subscription_state": state}]}


def test_groups_only_for_subscription_types_and_only_usable_ids() -> None:
    assert event(subscription_group_id=GROUP).attributes == {}
    assert event(type="subscribed").attributes == {"email_subscribe": "opted_in"}
    assert event(type="subscribed", subscription_group_id=1234).attributes[
        "subscription_groups"] == [{"subscription_group_id": "1234",
                                    "subscription_state": "subscribed"}]
    with pytest.raises(RejectedEvent, match="^subscription_group_id must be a string or a "
                                            "number, not list"):
        event(type="unsubscribed", subscription_group_id=[GROUP])


def test_an_event_map_entry_can_fix_the_group(tmp_path: Any) -> None:
    path = tmp_path / "events.toml"
    path.write_text('[events.newsletter_off]\nbraze_event = "Newsletter Off"\n'
                    'subscription_state = "unsubscribed"\n'
                    'subscription_group_id = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"\n',
                    encoding="utf-8")
    events = EventMap.load(str(path))
    fixed = normalise({"type": "newsletter_off", "event_id": "n"}, events, RECEIVED)
    assert fixed.attributes == {"subscription_groups": [
        {"subscription_group_id": "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0",
         "subscription_state": "unsubscribed"}]}
    # A group the event names wins over the entry's.
    named = normalise({"type": "newsletter_off", "subscription_group_id": GROUP}, events,
                      RECEIVED)
    assert named.attributes["subscription_groups"][0]["subscription_group_id"] == GROUP
