"""Delivery to Braze: the exact /users/track body for every sample, keys per environment,
batching under the object cap, and every request recorded against its events."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import responses
from flask import Flask
from sqlalchemy import select

from relay.extole import braze_time
from relay.models import AttemptEvent, DeliveryAttempt, OutboxEvent
from relay.settings import Settings
from relay.worker import Worker
from tests.support import (
    BRAZE_URL,
    PROD_KEY,
    SAMPLE_QUERIES,
    SAMPLES,
    STAGING_KEY,
    sample,
    sample_json,
    stored_events,
)

TRACK = BRAZE_URL + "/users/track"
EXPORT = BRAZE_URL + "/users/export/ids"
SUCCESS = {"message": "success"}
ANN = "cust-1036950000"
BO_ALIAS = {"alias_name": "bo.chen@example.org", "alias_label": "email"}
DEE_ALIAS = {"alias_name": "dee@example.net", "alias_label": "email"}
NEW_FRIEND_ALIAS = {"alias_name": "new.friend@example.net", "alias_label": "email"}
# An event without an id is known by the SHA-256 of its canonical JSON.
NO_ID_REWARD = "sha256:" + hashlib.sha256(json.dumps(
    sample_json("variant_array_mixed_good_and_bad.json")[4], sort_keys=True,
    separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()

# The README's worked example ("Delivery to Braze"), verbatim.
REWARD_EARNED = {
    "attributes": [{"external_id": "cust-1036950000", "email": "ann.lee@example.com"}],
    "events": [{"external_id": "cust-1036950000", "name": "Earned Reward",
                "time": "2026-11-20T14:14:18.548Z",
                "properties": {"recipient_email": "ann.lee@example.com",
                               "journey_name": "refer-a-friend",
                               "rewardee_role": "ADVOCATE", "earned_event_value": "120.00",
                               "reward_id": "a41f0c9e2b7d4e11a3c6f508",
                               "reward_supplier_name": "Advocate Account Credit",
                               "reward_supplier_id": "71b0c2d3e4f5061728394a5b",
                               "partner_reward_supplier_id": "Advocate Account Credit",
                               "reward_supplier_type": "CUSTOM_REWARD",
                               "person_id": "6816411215104951917", "face_value": 50,
                               "face_value_type": "USD", "schema_version": 1,
                               "reward_state": "EARNED",
                               "extole_event_id": "r7k2m9q4x1b8c3d5e6f0"}}],
}
# Its time is the time of receipt: the body names none.
RECEIVED = "received"
GROUP = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
NO_TYPE_REWARD = "sha256:" + hashlib.sha256(json.dumps(
    {**sample_json("reward_no_type.json"), "type": "earned_reward"}, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
PAGE_IDS = ["sha256:" + hashlib.sha256(json.dumps(
    item, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
    for item in sample_json("extole_rewards_page.json")]
BO_FULFILLED = {
    "earned_event_value": "64.90", "journey_name": "FRIEND", "rewardee_role": "friend",
    "client_id": "1890234567", "webhook_id": "b3a2c1d0e9f8a7b6",
    "cause_event_id": "6d1f4a0b2c9e8d7f6a5b4c30", "root_event_id": "6d1f4a0b2c9e8d7f6a5b4c00",
    "cause_event_sequence": 2, "reward_id": "c93e7a1f5b2d4c6e8a0f1b3d",
    "reward_name": "Friend 20% off", "reward_supplier_id": "5e4d3c2b1a09f8e7d6c5b4a3",
    "reward_supplier_name": "Friend Coupon Pool", "reward_supplier_type": "MANUAL_COUPON",
    "partner_reward_key_type": "COUPON", "partner_reward_id": "FRIEND20-7QX4",
    "person_id": "7012345678901234567", "face_value": 20.0, "face_value_type": "PERCENT_OFF",
    "reward_state": "FULFILLED", "coupon_code": "FRIEND20-7QX4",
    "extole_event_id": "6d1f4a0b2c9e8d7f6a5b4c3d"}

# sample -> (environment, every /users/track body in the order sent, on an empty database
# and with Braze's export finding nobody for an email-only event)
SAMPLE_BODIES: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "reward_earned.json": ("production", [REWARD_EARNED]),
    # Email only, unknown to Braze: an alias-only profile gets the reward and its coupon.
    "reward_fulfilled_coupon.json": ("production", [{
        "attributes": [{"user_alias": BO_ALIAS, "_update_existing_only": False,
                        "email": "bo.chen@example.org"}],
        "events": [{"user_alias": BO_ALIAS, "name": "Reward Fulfilled",
                    "time": "2026-11-21T09:02:44.120Z", "properties": BO_FULFILLED}],
    }]),
    # Posted to ?type=earned_reward; no email, so no attributes object.
    "reward_no_type.json": ("production", [{
        "events": [{"external_id": "cust-2200431", "name": "Earned Reward", "time": RECEIVED,
                    "properties": {"earned_event_value": "100.00", "journey_name": "ADVOCATE",
                                   "rewardee_role": "advocate", "custom_key": "custom_value",
                                   "reward_id": "d0e1f2a3b4c5d6e7f8091a2b",
                                   "reward_state": "EARNED",
                                   "extole_event_id": NO_TYPE_REWARD}}],
    }]),
    # Two rewards as Extole's rewards API lists them (`state`, no type), in one request.
    "extole_rewards_page.json": ("production", [{
        "attributes": [{"user_alias": BO_ALIAS, "_update_existing_only": False,
                        "email": "bo.chen@example.org"},
                       {"external_id": ANN, "email": "ann.lee@example.com"}],
        "events": [{"user_alias": BO_ALIAS, "name": "Reward Sent",
                    "time": "2026-11-21T09:01:57.005Z",
                    "properties": {"earned_event_value": "64.90",
                                   "reward_id": "c93e7a1f5b2d4c6e8a0f1b3d",
                                   "cause_event_id": "6d1f4a0b2c9e8d7f6a5b4c30",
                                   "root_event_id": "6d1f4a0b2c9e8d7f6a5b4c00",
                                   "action_id": "4b5c6d7e8f90a1b2",
                                   "reward_supplier_id": "5e4d3c2b1a09f8e7d6c5b4a3",
                                   "partner_reward_key_type": "COUPON",
                                   "campaign_id": "9a8b7c6d5e4f3a2b",
                                   "person_id": "7012345678901234567", "state": "SENT",
                                   "face_value": 20.0, "face_value_type": "PERCENT_OFF",
                                   "partner_reward_id": "FRIEND20-7QX4",
                                   "journey_name": "FRIEND", "sandbox": "production-production",
                                   "container": "production", "reward_state": "SENT",
                                   "coupon_code": "FRIEND20-7QX4",
                                   "extole_event_id": PAGE_IDS[0]}},
                   {"external_id": ANN, "name": "Earned Reward",
                    "time": "2026-11-22T10:15:00.000Z",
                    "properties": {"earned_event_value": "120.00",
                                   "reward_id": "e5f6a7b8c9d0e1f2a3b4c5d6",
                                   "cause_event_id": "7a6b5c4d3e2f1a0b9c8d7e6f",
                                   "root_event_id": "7a6b5c4d3e2f1a0b9c8d7e00",
                                   "action_id": "4b5c6d7e8f90a1b3",
                                   "reward_supplier_id": "71b0c2d3e4f5061728394a5b",
                                   "partner_reward_supplier_id": "Advocate Account Credit",
                                   "partner_reward_key_type": "ID",
                                   "campaign_id": "9a8b7c6d5e4f3a2b",
                                   "person_id": "6816411215104951917", "state": "EARNED",
                                   "face_value": 50.0, "face_value_type": "USD",
                                   "journey_name": "ADVOCATE",
                                   "sandbox": "production-production",
                                   "container": "production", "reward_state": "EARNED",
                                   "extole_event_id": PAGE_IDS[1]}}],
    }]),
    # The group named by the event: in the attributes object, as Braze takes it.
    "unsubscribed_group.json": ("production", [{
        "attributes": [{"external_id": "p-2024-0001", "email": "pat.doe@example.com",
                        "email_subscribe": "unsubscribed",
                        "subscription_groups": [{"subscription_group_id": GROUP,
                                                 "subscription_state": "unsubscribed"}]}],
        "events": [{"external_id": "p-2024-0001", "name": "Unsubscribed",
                    "time": "2026-11-22T18:30:00.000Z",
                    "properties": {"list_type": "MARKETING", "subscription_group_id": GROUP,
                                   "extole_event_id": "un-5f6e7d8c9b0a"}}],
    }]),
    "share_link_created.json": ("production", [{
        "attributes": [{"external_id": ANN, "email": "ann.lee@example.com", "first_name": "Ann",
                        "last_name": "Lee", "share_link": "https://refer.example.com/ann1"}],
        "events": [{"external_id": ANN, "name": "Created Share Link",
                    "time": "2026-11-20T14:02:11.000Z",
                    "properties": {"share_link": "https://refer.example.com/ann1",
                                   "funnel": "advocate", "program": "refer-a-friend",
                                   "extole_event_id": "s1a2b3c4d5e6f7a8b9c0"}}],
    }]),
    "shared.json": ("production", [{
        "attributes": [{"external_id": ANN, "email": "ann.lee@example.com", "first_name": "Ann",
                        "last_name": "Lee", "share_link": "https://refer.example.com/ann1"}],
        "events": [{"external_id": ANN, "name": "Shared", "time": "2026-11-20T14:05:00.123Z",
                    "properties": {"share_channel": "EMAIL",
                                   "share_link": "https://refer.example.com/ann1",
                                   "recipient_count": 3, "funnel": "advocate",
                                   "extole_event_id": "sh09f8e7d6c5b4a3f2e1"}}],
    }]),
    "referred_converted.json": ("production", [{
        "attributes": [{"external_id": "cust-2200431", "email": "bo.chen@example.org"}],
        "events": [{"external_id": "cust-2200431", "name": "Referred Converted",
                    "time": "2026-11-22T18:45:03.000Z",
                    "properties": {"partner_conversion_id": "order-99812", "cart_value": 84.5,
                                   "currency": "EUR", "funnel": "friend",
                                   "extole_event_id": "rc00112233445566778"}}],
    }]),
    "referred_signed_up_email_only.json": ("production", [{
        "attributes": [{"user_alias": BO_ALIAS, "_update_existing_only": False,
                        "email": "bo.chen@example.org", "first_name": "Bo", "last_name": "Chen"}],
        "events": [{"user_alias": BO_ALIAS, "name": "Referred Signed Up",
                    "time": "2026-11-21T08:30:00.000Z",
                    "properties": {"advocate_partner_user_id": ANN,
                                   "program": "refer-a-friend", "funnel": "friend",
                                   "extole_event_id": "rs5566778899aabbccdd"}}],
    }]),
    "naive_time_awkward_properties.json": ("production", [{
        "events": [{"external_id": "cust-7007", "name": "Referred Converted",
                    "time": "2026-11-24T16:00:00.000Z",
                    "properties": {"order_note": "n" * 255, "cart_value": 19.99,
                                   "extole_event_id": "rc-naive-0001"}}],
    }]),
    "staging_named_epoch_seconds.json": ("staging", [{
        "attributes": [{"external_id": "cust-5550001", "email": "flo.ng@example.com",
                        "share_link": "https://refer.example.com/flo"}],
        "events": [{"external_id": "cust-5550001", "name": "Created Share Link",
                    "time": "2026-11-20T10:40:00.000Z",
                    "properties": {"share_link": "https://refer.example.com/flo",
                                   "program": "spring-launch", "funnel": "advocate",
                                   "extole_event_id": "st-77aa88bb99cc"}}],
    }]),
    "subscribed.json": ("production", [{
        "attributes": [{"external_id": ANN, "email": "ann.lee@example.com",
                        "email_subscribe": "opted_in"}],
        "events": [{"external_id": ANN, "name": "Subscribed", "time": "2026-11-22T08:00:00.000Z",
                    "properties": {"list": "marketing",
                                   "extole_event_id": "sb1234abcd5678ef9012"}}],
    }]),
    "unsubscribed.json": ("production", [{
        "attributes": [{"external_id": ANN, "email": "ann.lee@example.com",
                        "email_subscribe": "unsubscribed"}],
        "events": [{"external_id": ANN, "name": "Unsubscribed",
                    "time": "2026-11-22T08:05:00.000Z",
                    "properties": {"list": "marketing",
                                   "extole_event_id": "us1234abcd5678ef9013"}}],
    }]),
    # cust-3001's second event waits for its first (per-person order): two requests.
    "batch.json": ("production", [
        {"attributes": [{"external_id": "cust-3001", "email": "cy@example.net"},
                        {"user_alias": DEE_ALIAS, "_update_existing_only": False,
                         "email": "dee@example.net"}],
         "events": [{"external_id": "cust-3001", "name": "Shared",
                     "time": "2026-11-23T10:00:00.000Z",
                     "properties": {"share_channel": "SMS", "extole_event_id": "bt-0001"}},
                    {"user_alias": DEE_ALIAS, "name": "Earned Reward",
                     "time": "2026-11-23T10:00:02.000Z",
                     "properties": {"coupon_code": "DEE15OFF", "face_value": 15,
                                    "face_value_type": "PERCENT_OFF",
                                    "extole_event_id": "bt-0003"}}]},
        {"events": [{"external_id": "cust-3001", "name": "reward_fulfilled",
                     "time": "2026-11-23T10:00:01.000Z",
                     "properties": {"reward_id": "f00dfeed", "face_value": 10,
                                    "face_value_type": "USD", "partner_reward_id": "GIFT-10-XYZ",
                                    "extole_event_id": "bt-0002"}}]},
    ]),
    "invalid_no_identifier.json": ("production", []),
    "invalid_no_type.json": ("production", []),
    "staging_variant_epoch_string_bearer.json": ("staging", [{
        "attributes": [{"external_id": "cust-stg-9", "email": "sam@example.com",
                        "email_subscribe": "unsubscribed"}],
        "events": [{"external_id": "cust-stg-9", "name": "Unsubscribed",
                    "time": "2026-11-20T10:40:00.000Z",
                    "properties": {"list": "marketing", "reason": "too many emails",
                                   "extole_event_id": "stg-v-0001"}}],
    }]),
    # Three usable events (one a duplicate of another) among unusable items: one request.
    "variant_array_mixed_good_and_bad.json": ("production", [{
        "attributes": [{"user_alias": NEW_FRIEND_ALIAS, "_update_existing_only": False,
                        "email": "new.friend@example.net"}],
        "events": [{"external_id": "cust-mx-1", "name": "Shared",
                    "time": "2026-11-20T14:05:00.123Z",
                    "properties": {"extole_event_id": "mx-0001"}},
                   {"user_alias": NEW_FRIEND_ALIAS, "name": "Referred Signed Up",
                    "time": "2026-11-20T14:05:00.500Z",
                    "properties": {"extole_event_id": "9001"}},
                   {"external_id": "cust-mx-2", "name": "Earned Reward",
                    "time": "2026-11-23T12:00:00.000Z",
                    "properties": {"face_value": 5, "extole_event_id": NO_ID_REWARD}}],
    }]),
    "variant_custom_shape_basic_auth.json": ("production", [{
        "attributes": [{"external_id": "4400123", "email": "zed.kim@example.org",
                        "first_name": "Zed", "phone": "+1 555 0100"}],
        "events": [{"external_id": "4400123", "name": "Referred Converted",
                    "time": "2026-11-22T18:45:03.500Z",
                    "properties": {"order": {"total": 129.9, "currency": "USD",
                                             "items": [{"sku": "A-1", "qty": 2}]},
                                   "coupon_code": "ZED10", "program": "winter-referrals",
                                   "extole_event_id": "880012"}}],
    }]),
    "variant_iso_offset_mixed_case.json": ("production", [{
        "attributes": [{"external_id": "cust-mixed-1", "email": "mixed.case@example.com",
                        "share_link": "https://refer.example.com/mixed"}],
        "events": [{"external_id": "cust-mixed-1", "name": "Shared",
                    "time": "2026-11-23T07:00:00.250Z",
                    "properties": {"Share_Channel": "SMS", "Recipient_Count": 1,
                                   "funnel": "friend",
                                   "share_link": "https://refer.example.com/mixed",
                                   "extole_event_id": "mc-0001"}}],
    }]),
    # The person's own fields are the identity and profile; `data`'s email is only a property.
    "variant_person_nested_extra_fields.json": ("production", [{
        "attributes": [{"external_id": "p-2024-0001", "email": "pat.doe@example.com",
                        "first_name": "Pat", "last_name": "Doe", "phone": "+44 20 7946 0000",
                        "email_subscribe": "opted_in"}],
        "events": [{"external_id": "p-2024-0001", "name": "Subscribed",
                    "time": "2026-11-20T10:40:00.000Z",
                    "properties": {"email": "someone.else@example.com",
                                   "partner_user_id": "not-this-one", "list": "newsletter",
                                   "source": "checkout", "locale": "en_GB",
                                   "loyalty_tier": "gold", "id": "person-internal-77",
                                   "extole_event_id": "pn-0001"}}],
    }]),
}


@pytest.fixture
def braze() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TRACK, json=SUCCESS, status=201)
        mock.post(EXPORT, json={"message": "success", "users": []})
        yield mock


def sent(mock: responses.RequestsMock, url: str = TRACK) -> list[dict[str, Any]]:
    return [json.loads(c.request.body) for c in mock.calls if c.request.url == url]


def objects(body: dict[str, Any]) -> int:
    return sum(len(body.get(array, [])) for array in ("attributes", "events", "purchases"))


def person(number: int, **extra: Any) -> dict[str, Any]:
    return {"type": "shared", "event_id": f"ev-{number:05d}",
            "event_time": f"2026-11-20T10:{number // 60 % 60:02d}:{number % 60:02d}Z",
            "partner_user_id": f"cust-{number}", "email": f"p{number}@example.com", **extra}


def test_every_sample_file_has_its_expected_body() -> None:
    assert set(SAMPLE_BODIES) == {path.name for path in SAMPLES.glob("*.json")}


@pytest.mark.parametrize("name", sorted(SAMPLE_BODIES))
def test_each_sample_becomes_the_exact_track_body(
        name: str, post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    environment, expected = SAMPLE_BODIES[name]
    answer = post_webhook(sample(name), environment, query=SAMPLE_QUERIES.get(name, ""))
    assert answer.status_code == 200
    make_worker().drain(max_seconds=10)
    received = {braze_time(e.received_at) for e in stored_events(app)}
    assert sent(braze) == json.loads(
        json.dumps(expected).replace(f'"{RECEIVED}"', json.dumps(min(received, default=""))))
    key = STAGING_KEY if environment == "staging" else PROD_KEY
    assert {c.request.headers["Authorization"] for c in braze.calls} <= {f"Bearer {key}"}
    stored = [e for e in stored_events(app) if e.status != "rejected"]
    assert len(stored_events(app)) - len(stored) == len(answer.get_json()["rejected"])
    if name == "invalid_no_identifier.json":
        assert [(e.status, e.last_error, e.attempts) for e in stored] == [
            ("dead", "no identifier", 0)]
    else:
        assert len(stored) == answer.get_json()["accepted"]
        assert {e.status for e in stored} <= {"delivered"}
        assert all(e.attempts == 0 and e.delivered_at is not None for e in stored)


def test_the_email_only_sample_is_looked_up_once_then_sent_to_a_new_alias(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("referred_signed_up_email_only.json"))
    make_worker().drain(max_seconds=10)
    assert sent(braze, EXPORT) == [{"email_address": "bo.chen@example.org",
                                    "fields_to_export": ["external_id", "braze_id"]}]
    [body] = sent(braze)
    assert body["attributes"][0]["_update_existing_only"] is False
    assert body["attributes"][0]["user_alias"] == BO_ALIAS
    [event] = stored_events(app)
    assert event.status == "delivered"
    assert event.identity == {"user_alias": BO_ALIAS}


def test_every_braze_request_is_recorded_once_and_linked_to_its_events(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("batch.json"))
    make_worker().drain(max_seconds=10)
    with app.extensions["relay.db"].session() as session:
        attempts = list(session.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id)))
        links = session.execute(select(AttemptEvent.attempt_id, OutboxEvent.extole_event_id,
                                       AttemptEvent.outcome)
                                .join(OutboxEvent, OutboxEvent.id == AttemptEvent.event_id)
                                .order_by(AttemptEvent.attempt_id, OutboxEvent.id)).all()
    assert [(a.endpoint, a.status_code) for a in attempts] == [
        ("/users/export/ids", 200), ("/users/track", 201), ("/users/track", 201)]
    assert [json.loads(a.request_body) for a in attempts[1:]] == SAMPLE_BODIES["batch.json"][1]
    assert json.loads(attempts[1].response_body) == SUCCESS
    assert all(a.duration_ms >= 0 and a.error is None for a in attempts)
    export_id, first_id, second_id = (a.id for a in attempts)
    assert links == [(export_id, "bt-0003", "lookup"),
                     (first_id, "bt-0001", "delivered"), (first_id, "bt-0003", "delivered"),
                     (second_id, "bt-0002", "delivered")]
    # The identity each event was delivered under: its own external_id (written by SQL for the
    # whole chunk) or what the lookup found, side by side in one chunk.
    stored = {e.extole_event_id: e for e in stored_events(app)}
    assert [(stored[n].external_id, stored[n].identity) for n in ("bt-0001", "bt-0002", "bt-0003")
            ] == [("cust-3001", {"external_id": "cust-3001"}),
                  ("cust-3001", {"external_id": "cust-3001"}),
                  (None, {"user_alias": {"alias_name": "dee@example.net", "alias_label": "email"}})]


# -- environments and keys -------------------------------------------------------------------

def test_each_environment_uses_only_its_own_key(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("staging_named_epoch_seconds.json"), "staging")
    post_webhook(sample("reward_earned.json"), "production")
    post_webhook(sample("subscribed.json"), "staging")
    make_worker().drain(max_seconds=10)
    keys = {}
    for call in braze.calls:
        for event in json.loads(call.request.body)["events"]:
            keys[event["properties"]["extole_event_id"]] = call.request.headers["Authorization"]
    assert keys == {"st-77aa88bb99cc": f"Bearer {STAGING_KEY}",
                    "sb1234abcd5678ef9012": f"Bearer {STAGING_KEY}",
                    "r7k2m9q4x1b8c3d5e6f0": f"Bearer {PROD_KEY}"}
    # Production and staging never share a request.
    assert len(braze.calls) == 2
    assert {e.status for e in stored_events(app)} == {"delivered"}


def test_staging_goes_to_its_own_endpoint_when_one_is_set(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    other = "https://rest.fra-02.braze.eu"
    braze.post(other + "/users/track", json=SUCCESS, status=201)
    post_webhook(sample("staging_named_epoch_seconds.json"), "staging")
    post_webhook(sample("reward_earned.json"), "production")
    make_worker(make_settings(braze_staging_rest_endpoint=other)).drain(max_seconds=10)
    by_url = {c.request.url: c.request.headers["Authorization"] for c in braze.calls}
    assert by_url == {other + "/users/track": f"Bearer {STAGING_KEY}",
                      TRACK: f"Bearer {PROD_KEY}"}


def test_staging_without_a_staging_key_is_skipped_and_never_sent(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("staging_named_epoch_seconds.json"), "staging")
    post_webhook(sample("reward_earned.json"), "production")
    make_worker(make_settings(braze_staging_api_key=None)).drain(max_seconds=10)
    staging, production = sorted(stored_events(app), key=lambda e: e.environment, reverse=True)
    assert (staging.status, staging.attempts) == ("skipped", 0)
    assert "BRAZE_STAGING_API_KEY" in (staging.last_error or "")
    assert production.status == "delivered"
    assert [c.request.headers["Authorization"] for c in braze.calls] == [f"Bearer {PROD_KEY}"]


def test_production_without_a_key_stays_pending_and_staging_still_flows(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    post_webhook(sample("reward_earned.json"), "production")
    post_webhook(sample("staging_named_epoch_seconds.json"), "staging")
    worker = make_worker(make_settings(braze_api_key=None))
    worker.drain(max_seconds=10)
    assert worker.run_once() == 0
    production, staging = sorted(stored_events(app), key=lambda e: e.environment)
    assert (production.status, production.attempts, production.lease_owner) == (
        "pending", 0, None)
    assert staging.status == "delivered"
    assert [c.request.headers["Authorization"] for c in braze.calls] == [f"Bearer {STAGING_KEY}"]


# -- batching ----------------------------------------------------------------------------------

def test_two_hundred_people_go_in_requests_of_at_most_75_objects(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    assert post_webhook([person(n) for n in range(200)]).get_json()["accepted"] == 200
    make_worker().drain(max_seconds=20)
    bodies = sent(braze)
    assert all(objects(body) <= 75 for body in bodies)
    # Each person has attributes: two objects per event, 37 events per request.
    assert sorted(len(body["events"]) for body in bodies) == [15] + [37] * 5
    ids = [e["properties"]["extole_event_id"] for body in bodies for e in body["events"]]
    assert sorted(ids) == [f"ev-{n:05d}" for n in range(200)]
    assert all(len(body["attributes"]) == len(body["events"]) for body in bodies)
    assert {e.status for e in stored_events(app)} == {"delivered"}


def test_a_smaller_object_cap_is_honoured(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_settings: Callable[..., Settings], make_worker: Callable[..., Worker]) -> None:
    post_webhook([person(n) for n in range(30)])
    make_worker(make_settings(braze_max_objects=10)).drain(max_seconds=20)
    bodies = sent(braze)
    assert len(bodies) == 6 and all(objects(body) == 10 for body in bodies)
    assert {e.status for e in stored_events(app)} == {"delivered"}


def test_one_profile_reached_from_two_events_gets_one_merged_attributes_object(
        post_webhook: Any, braze: responses.RequestsMock, app: Flask,
        make_worker: Callable[..., Worker]) -> None:
    # The email-only event resolves to cust-9, whom the other event names directly: both are
    # claimed together (two persons for relay), and Braze gets one attributes object.
    braze.replace(responses.POST, EXPORT,
                  json={"message": "success", "users": [{"external_id": "cust-9",
                                                          "braze_id": "b-9"}]})
    post_webhook([
        {"type": "signed_up", "event_id": "m-2", "event_time": "2026-11-20T10:00:05Z",
         "email": "zed@example.com", "first_name": "New", "phone_number": "+1555"},
        {"type": "shared", "event_id": "m-1", "event_time": "2026-11-20T10:00:00Z",
         "partner_user_id": "cust-9", "email": "zed@example.com", "first_name": "Old",
         "last_name": "Zed"},
    ])
    make_worker().drain(max_seconds=10)
    [body] = sent(braze)
    assert body["attributes"] == [{"external_id": "cust-9", "email": "zed@example.com",
                                   "first_name": "New", "last_name": "Zed", "phone": "+1555"}]
    assert [(e["external_id"], e["properties"]["extole_event_id"]) for e in body["events"]] == [
        ("cust-9", "m-1"), ("cust-9", "m-2")]
    assert {e.status for e in stored_events(app)} == {"delivered"}
