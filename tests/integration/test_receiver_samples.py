"""Every file in tests/samples/ posted to its environment and checked field by field.

Files named `staging_*` go to the staging route, the others to production. Each file has its
expected answer and stored rows below; a sample without expectations fails the suite, so a new
sample cannot go untested.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import undefer_group

from relay import create_app
from relay.authentication import sign
from relay.db import get_db
from relay.extole import braze_time, canonical_json
from relay.models import InboundRequest, OutboxEvent
from relay.settings import Settings
from tests.support import (
    PROD_SECRET,
    SAMPLES,
    STAGING_SECRET,
    sample,
    sample_json,
    sample_url,
)

NO_TYPE = "no event type: expected one of type, event, event_type, event_name, name"
LONG_NOTE = "n" * 255
# The event time of an item without one: the time of receipt.
RECEIVED = "received"
GROUP = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"


def hashed(item: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(item).encode()).hexdigest()


def row(event_id: str, extole_type: str, braze_event: str, event_time: str,
        external_id: str | None, email: str | None, attributes: dict[str, Any],
        properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One expected pending row; `properties` gets its `extole_event_id` here."""
    expected = {
        "status": "pending",
        "dedup_key": event_id,
        "extole_event_id": event_id,
        "extole_type": extole_type,
        "braze_event": braze_event,
        "event_time": event_time if event_time == RECEIVED else datetime.fromisoformat(event_time),
        "external_id": external_id,
        "email": email,
        "person_key": f"id:{external_id}" if external_id else f"email:{email}" if email else None,
        "attributes": attributes,
        "properties": {**properties, "extole_event_id": event_id},
        "last_error": None,
    }
    expected.update(extra)
    return expected


def rejected(event_id: str | None, reason: str) -> dict[str, Any]:
    return {"status": "rejected", "dedup_key": None, "extole_event_id": event_id,
            "extole_type": None, "braze_event": None, "external_id": None, "email": None,
            "person_key": None, "event_time": None, "attributes": None, "properties": None,
            "last_error": reason}


_MX_HASHED = hashed(sample_json("variant_array_mixed_good_and_bad.json")[4])
# Posted with ?type=earned_reward: the type is part of what is hashed.
_NO_TYPE_HASHED = hashed({**sample_json("reward_no_type.json"), "type": "earned_reward"})
_PAGE = sample_json("extole_rewards_page.json")

# file -> (auth, answer without ids, expected rows in id order, indexes of the items they store)
EXPECTED: dict[str, tuple[str, dict[str, Any], list[dict[str, Any]], list[int]]] = {
    "reward_earned.json": ("signature", {"accepted": 1, "duplicates": 0, "rejected": []}, [
        row("r7k2m9q4x1b8c3d5e6f0", "reward_earned", "Earned Reward", "2026-11-20T14:14:18.548",
            "cust-1036950000", "ann.lee@example.com", {"email": "ann.lee@example.com"},
            # The README's worked example ("Delivery to Braze"), property for property.
            {"recipient_email": "ann.lee@example.com", "journey_name": "refer-a-friend",
             "rewardee_role": "ADVOCATE", "earned_event_value": "120.00",
             "reward_id": "a41f0c9e2b7d4e11a3c6f508",
             "reward_supplier_name": "Advocate Account Credit",
             "reward_supplier_id": "71b0c2d3e4f5061728394a5b",
             "partner_reward_supplier_id": "Advocate Account Credit",
             "reward_supplier_type": "CUSTOM_REWARD", "person_id": "6816411215104951917",
             "face_value": 50, "face_value_type": "USD", "schema_version": 1,
             "reward_state": "EARNED"}),
    ], [0]),
    # A reward as Extole's reward webhook posts it: the type is the state, the coupon is
    # `partner_reward_id`, the face value a decimal string (a number for Braze); no
    # partner_user_id, so the (lower-cased) email is the person.
    "reward_fulfilled_coupon.json": ("signature", {"accepted": 1, "duplicates": 0,
                                                   "rejected": []}, [
        row("6d1f4a0b2c9e8d7f6a5b4c3d", "FULFILLED", "Reward Fulfilled",
            "2026-11-21T09:02:44.120", None, "bo.chen@example.org",
            {"email": "bo.chen@example.org"},
            {"earned_event_value": "64.90", "journey_name": "FRIEND", "rewardee_role": "friend",
             "client_id": "1890234567", "webhook_id": "b3a2c1d0e9f8a7b6",
             "cause_event_id": "6d1f4a0b2c9e8d7f6a5b4c30",
             "root_event_id": "6d1f4a0b2c9e8d7f6a5b4c00", "cause_event_sequence": 2,
             "reward_id": "c93e7a1f5b2d4c6e8a0f1b3d", "reward_name": "Friend 20% off",
             "reward_supplier_id": "5e4d3c2b1a09f8e7d6c5b4a3",
             "reward_supplier_name": "Friend Coupon Pool",
             "reward_supplier_type": "MANUAL_COUPON", "partner_reward_key_type": "COUPON",
             "partner_reward_id": "FRIEND20-7QX4", "person_id": "7012345678901234567",
             "face_value": 20.0, "face_value_type": "PERCENT_OFF",
             "reward_state": "FULFILLED", "coupon_code": "FRIEND20-7QX4"}),
    ], [0]),
    # No type, no id, no time: posted to ?type=earned_reward (SAMPLE_QUERIES).
    "reward_no_type.json": ("signature", {"accepted": 1, "duplicates": 0, "rejected": []}, [
        row(_NO_TYPE_HASHED, "earned_reward", "Earned Reward", RECEIVED, "cust-2200431", None, {},
            {"earned_event_value": "100.00", "journey_name": "ADVOCATE",
             "rewardee_role": "advocate", "custom_key": "custom_value",
             "reward_id": "d0e1f2a3b4c5d6e7f8091a2b", "reward_state": "EARNED"}),
    ], [0]),
    # Rewards as Extole's rewards API lists them: no type but a `state`, which is the type.
    "extole_rewards_page.json": ("signature", {"accepted": 2, "duplicates": 0, "rejected": []}, [
        row(hashed(_PAGE[0]), "SENT", "Reward Sent", "2026-11-21T09:01:57.005", None,
            "bo.chen@example.org", {"email": "bo.chen@example.org"},
            {"earned_event_value": "64.90", "reward_id": "c93e7a1f5b2d4c6e8a0f1b3d",
             "cause_event_id": "6d1f4a0b2c9e8d7f6a5b4c30",
             "root_event_id": "6d1f4a0b2c9e8d7f6a5b4c00", "action_id": "4b5c6d7e8f90a1b2",
             "reward_supplier_id": "5e4d3c2b1a09f8e7d6c5b4a3",
             "partner_reward_key_type": "COUPON", "campaign_id": "9a8b7c6d5e4f3a2b",
             "person_id": "7012345678901234567", "state": "SENT", "face_value": 20.0,
             "face_value_type": "PERCENT_OFF", "partner_reward_id": "FRIEND20-7QX4",
             "journey_name": "FRIEND", "sandbox": "production-production",
             "container": "production", "reward_state": "SENT",
             "coupon_code": "FRIEND20-7QX4"}),
        # Key type ID: a gift-card id, not a coupon code.
        row(hashed(_PAGE[1]), "EARNED", "Earned Reward", "2026-11-22T10:15:00", "cust-1036950000",
            "ann.lee@example.com", {"email": "ann.lee@example.com"},
            {"earned_event_value": "120.00", "reward_id": "e5f6a7b8c9d0e1f2a3b4c5d6",
             "cause_event_id": "7a6b5c4d3e2f1a0b9c8d7e6f",
             "root_event_id": "7a6b5c4d3e2f1a0b9c8d7e00", "action_id": "4b5c6d7e8f90a1b3",
             "reward_supplier_id": "71b0c2d3e4f5061728394a5b",
             "partner_reward_supplier_id": "Advocate Account Credit",
             "partner_reward_key_type": "ID", "campaign_id": "9a8b7c6d5e4f3a2b",
             "person_id": "6816411215104951917", "state": "EARNED", "face_value": 50.0,
             "face_value_type": "USD", "journey_name": "ADVOCATE",
             "sandbox": "production-production", "container": "production",
             "reward_state": "EARNED"}),
    ], [0, 1]),
    "share_link_created.json": ("signature", {"accepted": 1, "duplicates": 0, "rejected": []}, [
        row("s1a2b3c4d5e6f7a8b9c0", "Share Link Created", "Created Share Link",
            "2026-11-20T14:02:11", "cust-1036950000", "ann.lee@example.com",
            {"email": "ann.lee@example.com", "first_name": "Ann", "last_name": "Lee",
             "share_link": "https://refer.example.com/ann1"},
            {"share_link": "https://refer.example.com/ann1", "funnel": "advocate",
             "program": "refer-a-friend"}),
    ], [0]),
    "shared.json": ("signature", {"accepted": 1, "duplicates": 0, "rejected": []}, [
        row("sh09f8e7d6c5b4a3f2e1", "shared", "Shared", "2026-11-20T14:05:00.123",
            "cust-1036950000", "ann.lee@example.com",
            {"email": "ann.lee@example.com", "first_name": "Ann", "last_name": "Lee",
             "share_link": "https://refer.example.com/ann1"},
            {"share_channel": "EMAIL", "share_link": "https://refer.example.com/ann1",
             "recipient_count": 3, "funnel": "advocate"}),
    ], [0]),
    "staging_named_epoch_seconds.json": ("signature",
                                         {"accepted": 1, "duplicates": 0, "rejected": []}, [
        row("st-77aa88bb99cc", "Created Share Link", "Created Share Link", "2026-11-20T10:40:00",
            "cust-5550001", "flo.ng@example.com",
            {"email": "flo.ng@example.com", "share_link": "https://refer.example.com/flo"},
            {"share_link": "https://refer.example.com/flo", "program": "spring-launch",
             "funnel": "advocate"}, environment="staging"),
    ], [0]),
    "subscribed.json": ("signature", {"accepted": 1, "duplicates": 0, "rejected": []}, [
        row("sb1234abcd5678ef9012", "subscribed", "Subscribed", "2026-11-22T08:00:00",
            "cust-1036950000", "ann.lee@example.com",
            {"email": "ann.lee@example.com", "email_subscribe": "opted_in"},
            {"list": "marketing"}),
    ], [0]),
    "unsubscribed.json": ("signature", {"accepted": 1, "duplicates": 0, "rejected": []}, [
        row("us1234abcd5678ef9013", "unsubscribed", "Unsubscribed", "2026-11-22T08:05:00",
            "cust-1036950000", "ann.lee@example.com",
            {"email": "ann.lee@example.com", "email_subscribe": "unsubscribed"},
            {"list": "marketing"}),
    ], [0]),
    # A subscription group named under `data`: Braze's subscription_groups in the attributes.
    "unsubscribed_group.json": ("signature", {"accepted": 1, "duplicates": 0, "rejected": []}, [
        row("un-5f6e7d8c9b0a", "unsubscribed", "Unsubscribed", "2026-11-22T18:30:00",
            "p-2024-0001", "pat.doe@example.com",
            {"email": "pat.doe@example.com", "email_subscribe": "unsubscribed",
             "subscription_groups": [{"subscription_group_id": GROUP,
                                      "subscription_state": "unsubscribed"}]},
            {"list_type": "MARKETING", "subscription_group_id": GROUP}),
    ], [0]),
    "referred_converted.json": ("signature", {"accepted": 1, "duplicates": 0, "rejected": []}, [
        row("rc00112233445566778", "referred_converted", "Referred Converted",
            "2026-11-22T18:45:03", "cust-2200431", "bo.chen@example.org",
            {"email": "bo.chen@example.org"},
            {"partner_conversion_id": "order-99812", "cart_value": 84.5, "currency": "EUR",
             "funnel": "friend"}),
    ], [0]),
    "referred_signed_up_email_only.json": ("signature",
                                           {"accepted": 1, "duplicates": 0, "rejected": []}, [
        row("rs5566778899aabbccdd", "referred_signed_up", "Referred Signed Up",
            "2026-11-21T08:30:00", None, "bo.chen@example.org",
            {"email": "bo.chen@example.org", "first_name": "Bo", "last_name": "Chen"},
            {"advocate_partner_user_id": "cust-1036950000", "program": "refer-a-friend",
             "funnel": "friend"}),
    ], [0]),
    "naive_time_awkward_properties.json": ("signature",
                                           {"accepted": 1, "duplicates": 0, "rejected": []}, [
        row("rc-naive-0001", "Referred Converted", "Referred Converted", "2026-11-24T16:00:00",
            "cust-7007", None, {},
            # `$internal_flag` dropped, the note cut to 255 characters, the null coupon dropped.
            {"order_note": LONG_NOTE, "cart_value": 19.99}),
    ], [0]),
    "batch.json": ("signature", {"accepted": 3, "duplicates": 0, "rejected": []}, [
        row("bt-0001", "shared", "Shared", "2026-11-23T10:00:00", "cust-3001", "cy@example.net",
            {"email": "cy@example.net"}, {"share_channel": "SMS"}),
        row("bt-0002", "reward_fulfilled", "reward_fulfilled", "2026-11-23T10:00:01",
            "cust-3001", None, {},
            {"reward_id": "f00dfeed", "face_value": 10, "face_value_type": "USD",
             "partner_reward_id": "GIFT-10-XYZ"}),
        row("bt-0003", "earned_reward", "Earned Reward", "2026-11-23T10:00:02", None,
            "dee@example.net", {"email": "dee@example.net"},
            {"coupon_code": "DEE15OFF", "face_value": 15, "face_value_type": "PERCENT_OFF"}),
    ], [0, 1, 2]),
    "invalid_no_type.json": ("signature", {"accepted": 0, "duplicates": 0,
                                           "rejected": [{"index": 0, "error": NO_TYPE}]},
                             [rejected("bad-0001", NO_TYPE)], [0]),
    "invalid_no_identifier.json": ("signature", {"accepted": 1, "duplicates": 0, "rejected": []}, [
        row("bad-0002", "shared", "Shared", "2026-11-23T10:00:00", None, None, {},
            {"share_channel": "FACEBOOK"}),
    ], [0]),
    # --- variants: reshaped bodies as clients build them in Extole's request builder ---
    "variant_custom_shape_basic_auth.json": (
        "basic", {"accepted": 1, "duplicates": 0, "rejected": []}, [
            row("880012", "converted", "Referred Converted", "2026-11-22T18:45:03.5", "4400123",
                "zed.kim@example.org",
                {"email": "zed.kim@example.org", "first_name": "Zed", "phone": "+1 555 0100"},
                {"order": {"total": 129.9, "currency": "USD",
                           "items": [{"sku": "A-1", "qty": 2}]},
                 "coupon_code": "ZED10", "program": "winter-referrals"}),
        ], [0]),
    "variant_person_nested_extra_fields.json": (
        "bearer", {"accepted": 1, "duplicates": 0, "rejected": []}, [
            # `person` beats `data` for identity; data's own fields and the person's unknown
            # fields are kept as properties.
            row("pn-0001", "Subscribed", "Subscribed", "2026-11-20T10:40:00", "p-2024-0001",
                "pat.doe@example.com",
                {"email": "pat.doe@example.com", "first_name": "Pat", "last_name": "Doe",
                 "phone": "+44 20 7946 0000", "email_subscribe": "opted_in"},
                {"email": "someone.else@example.com", "partner_user_id": "not-this-one",
                 "list": "newsletter", "source": "checkout", "locale": "en_GB",
                 "loyalty_tier": "gold", "id": "person-internal-77"}),
        ], [0]),
    "variant_iso_offset_mixed_case.json": (
        "signature", {"accepted": 1, "duplicates": 0, "rejected": []}, [
            row("mc-0001", "EXTOLE-SHARED", "Shared", "2026-11-23T07:00:00.250",
                "cust-mixed-1", "mixed.case@example.com",
                {"email": "mixed.case@example.com",
                 "share_link": "https://refer.example.com/mixed"},
                {"Share_Channel": "SMS", "Recipient_Count": 1, "funnel": "friend",
                 "share_link": "https://refer.example.com/mixed"}),
        ], [0]),
    "variant_array_mixed_good_and_bad.json": (
        "signature", {"accepted": 3, "duplicates": 1, "rejected": [
            {"index": 1, "error": "event must be a JSON object, not a string"},
            {"index": 2, "error": "event time '2026-13-45T00:00:00Z' does not parse"},
            {"index": 3, "error": NO_TYPE},
            {"index": 5, "error": "event must be a JSON object, not a number"},
        ]}, [
            row("mx-0001", "shared", "Shared", "2026-11-20T14:05:00.123", "cust-mx-1", None, {},
                {}),
            rejected(None, "event must be a JSON object, not a string"),
            rejected("mx-0003", "event time '2026-13-45T00:00:00Z' does not parse"),
            rejected("mx-0004", NO_TYPE),
            row(_MX_HASHED, "Reward Earned", "Earned Reward", "2026-11-23T12:00:00", "cust-mx-2",
                None, {}, {"face_value": 5}),
            rejected(None, "event must be a JSON object, not a number"),
            row("9001", "registered", "Referred Signed Up", "2026-11-20T14:05:00.5", None,
                "new.friend@example.net", {"email": "new.friend@example.net"}, {}),
        ], [0, 1, 2, 3, 4, 5, 6]),
    "staging_variant_epoch_string_bearer.json": (
        "bearer", {"accepted": 1, "duplicates": 0, "rejected": []}, [
            row("stg-v-0001", "unsubscribed", "Unsubscribed", "2026-11-20T10:40:00",
                "cust-stg-9", "sam@example.com",
                {"email": "sam@example.com", "email_subscribe": "unsubscribed"},
                {"list": "marketing", "reason": "too many emails"}, environment="staging"),
        ], [0]),
}

FIELDS = ("status", "dedup_key", "extole_event_id", "extole_type", "braze_event", "event_time",
          "external_id", "email", "person_key", "attributes", "properties", "last_error")


def environment_of(name: str) -> str:
    return "staging" if name.startswith("staging_") else "production"


def headers_for(auth: str, body: bytes, secret: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if auth == "signature":
        headers["X-Extole-Signature"] = sign(body, secret)
    elif auth == "bearer":
        headers["Authorization"] = f"Bearer {secret}"
    else:
        headers["Authorization"] = "Basic " + base64.b64encode(f"extole:{secret}".encode()).decode()
    return headers


def stored(app: Flask) -> tuple[list[OutboxEvent], list[InboundRequest]]:
    with get_db(app).session() as session:
        return (list(session.scalars(select(OutboxEvent).options(undefer_group("queue"))
                                     .order_by(OutboxEvent.id))),
                list(session.scalars(select(InboundRequest).order_by(InboundRequest.id))))


def test_every_sample_has_expectations() -> None:
    files = sorted(p.name for p in Path(SAMPLES).glob("*.json"))
    assert files == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_is_stored_field_by_field(app: Flask, client: FlaskClient, name: str) -> None:
    auth, answer, rows, indexes = EXPECTED[name]
    # Rejected items are stored by one insert after the accepted ones (each in request order).
    expected_order = sorted(zip(rows, indexes, strict=True),
                            key=lambda pair: pair[0]["status"] == "rejected")
    rows, indexes = [r for r, _ in expected_order], [i for _, i in expected_order]
    environment = environment_of(name)
    secret = STAGING_SECRET if environment == "staging" else PROD_SECRET
    body = sample(name)
    response = client.post(sample_url(name, environment), data=body,
                           headers=headers_for(auth, body, secret))
    assert response.status_code == 200, response.get_data(as_text=True)
    got = response.get_json()
    events, inbound = stored(app)
    assert {k: v for k, v in got.items() if k != "ids"} == {
        **answer, "rejected_count": len(answer["rejected"])}
    assert got["ids"] == [e.id for e in events if e.status == "pending"]

    items = sample_json(name)
    items = items if isinstance(items, list) else [items]
    assert len(events) == len(rows)
    for event, expected, index in zip(events, rows, indexes, strict=True):
        if expected["event_time"] == RECEIVED:
            expected = {**expected, "event_time": event.received_at}
        actual = {field: getattr(event, field) for field in FIELDS}
        assert actual == {field: expected[field] for field in FIELDS}, name
        assert event.environment == expected.get("environment", environment)
        assert event.payload == items[index]
        assert event.attempts == 0
        assert event.inbound_id == inbound[0].id
        if event.status == "pending":
            assert event.next_attempt_at == event.received_at
            assert braze_time(event.event_time) == (
                expected["event_time"].isoformat(timespec="milliseconds") + "Z")

    [request] = inbound
    assert (request.status_code, request.outcome, request.environment) == (200, "accepted",
                                                                           environment)
    assert (request.accepted, request.duplicates, request.rejected) == (
        answer["accepted"], answer["duplicates"], len(answer["rejected"]))
    assert request.body == body
    assert request.auth_method == auth


def test_samples_posted_twice_are_all_duplicates(app: Flask, client: FlaskClient) -> None:
    for name in sorted(EXPECTED):
        environment = environment_of(name)
        secret = STAGING_SECRET if environment == "staging" else PROD_SECRET
        body = sample(name)
        client.post(sample_url(name, environment), data=body,
                    headers=headers_for("signature", body, secret))
    first_count = len(stored(app)[0])
    for name in sorted(EXPECTED):
        environment = environment_of(name)
        secret = STAGING_SECRET if environment == "staging" else PROD_SECRET
        body = sample(name)
        again = client.post(sample_url(name, environment), data=body,
                            headers=headers_for("signature", body, secret)).get_json()
        _, answer, _, _ = EXPECTED[name]
        assert again["accepted"] == 0, name
        assert again["duplicates"] == answer["accepted"] + answer["duplicates"], name
        assert again["rejected"] == answer["rejected"], name
    rejected_items = sum(len(e[1]["rejected"]) for e in EXPECTED.values())
    # Only the rejected items are stored a second time (they never deduplicate).
    assert len(stored(app)[0]) == first_count + rejected_items


def test_documented_event_map_renames_reward_fulfilled(
    make_settings: Callable[..., Settings]
) -> None:
    app = create_app(make_settings(event_map="config/events.toml"), TESTING=True)
    try:
        client = app.test_client()
        body = sample("batch.json")
        response = client.post("/webhooks/extole/production", data=body,
                               headers=headers_for("signature", body, PROD_SECRET))
        assert response.get_json()["accepted"] == 3
        events, _ = stored(app)
        assert [(e.extole_type, e.braze_event) for e in events] == [
            ("shared", "Shared"), ("reward_fulfilled", "Reward Fulfilled"),
            ("earned_reward", "Earned Reward")]
    finally:
        app.extensions["relay.db"].dispose()

