"""The Braze sandbox: as strict as Braze, honest about what it holds, and faulty on demand."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from relay.braze import BrazeClient, RateLimited
from relay.sandbox import SandboxConfig, create_sandbox_app
from tests.support import served_sandbox

PROD = "prod-key-0000-1111"
STAGING = "staging-key-0000-2222"
T = "2026-11-20T14:14:18.548Z"
GROUP = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
OTHER_GROUP = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"


def event(ident: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    base = {"external_id": "cust-1"} if ident is None else ident
    return {**base, "name": "Shared", "time": T, **extra}


@pytest.fixture
def app() -> Flask:
    return create_sandbox_app(SandboxConfig(api_keys=[f"prod={PROD}", f"staging={STAGING}"]))


@pytest.fixture
def bz(app: Flask) -> FlaskClient:
    return app.test_client()


def post(bz: FlaskClient, body: Any, path: str = "/users/track", key: str | None = PROD,
         **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return bz.post(path, json=body, headers=headers, **kwargs)


def profiles(bz: FlaskClient, workspace: str = "prod") -> list[dict[str, Any]]:
    return bz.get("/sandbox/profiles").get_json()["workspaces"].get(workspace, [])


def faults(bz: FlaskClient, **values: Any) -> Any:
    return bz.post("/sandbox/faults", json=values)


# -- routing, keys and bodies ----------------------------------------------------------------

def test_trailing_slash_is_forbidden_and_unknown_paths_are_not_found(bz: FlaskClient) -> None:
    assert post(bz, {"events": [event()]}, "/users/track/").status_code == 403
    assert post(bz, {}, "/users/export/ids/").status_code == 403
    assert post(bz, {}, "/users/alias/new").status_code == 404
    assert bz.get("/users/track", headers={"Authorization": f"Bearer {PROD}"}).status_code == 405
    assert profiles(bz) == []


@pytest.mark.parametrize(("headers", "message"), [
    ({}, "Invalid API key: "),
    ({"Authorization": "Bearer wrong-key-9876"}, "Invalid API key: 9876"),
    ({"Authorization": f"Basic {PROD}"}, "Invalid API key: "),
])
def test_missing_or_unknown_key_is_401(bz: FlaskClient, headers: dict[str, str],
                                       message: str) -> None:
    answer = bz.post("/users/track", json={"events": [event()]}, headers=headers)
    assert answer.status_code == 401 and answer.get_json()["message"] == message


def test_wrong_content_type_is_415(bz: FlaskClient) -> None:
    answer = bz.post("/users/track", data='{"events": []}', content_type="text/plain",
                     headers={"Authorization": f"Bearer {PROD}"})
    assert answer.status_code == 415


@pytest.mark.parametrize("raw", [b"{nope", b"[1, 2]", b'"text"', b'{"a": NaN}', b"[" * 5000])
def test_body_must_be_a_json_object(bz: FlaskClient, raw: bytes) -> None:
    answer = bz.post("/users/track", data=raw, content_type="application/json",
                     headers={"Authorization": f"Bearer {PROD}"})
    assert answer.status_code == 400 and "Invalid JSON" in answer.get_json()["message"]


@pytest.mark.parametrize("body", [{"events": {"name": "x"}}, {"attributes": "x"},
                                  {"purchases": 1}])
def test_arrays_must_be_arrays(bz: FlaskClient, body: dict[str, Any]) -> None:
    answer = post(bz, body)
    assert answer.status_code == 400 and "must be an array" in answer.get_json()["message"]


def test_more_than_75_objects_in_total_is_refused(bz: FlaskClient) -> None:
    attrs = [{"external_id": f"c{i}", "first_name": "A"} for i in range(40)]
    events = [event({"external_id": f"c{i}"}) for i in range(36)]
    answer = post(bz, {"attributes": attrs, "events": events})
    assert answer.status_code == 400
    assert answer.get_json() == {"message": "Max Input Length Exceeded"}
    assert post(bz, {"attributes": attrs, "events": events[:35]}).status_code == 201


def test_object_cap_is_configurable() -> None:
    bz = create_sandbox_app(SandboxConfig(max_objects=2)).test_client()
    assert post(bz, {"events": [event()] * 3}, key="any-key").status_code == 400
    assert post(bz, {"events": [event()] * 2}, key="any-key").status_code == 201


def test_empty_request_is_refused(bz: FlaskClient) -> None:
    answer = post(bz, {"events": []})
    assert answer.status_code == 400 and "Valid data" in answer.get_json()["message"]


# -- per-object validation -------------------------------------------------------------------

BAD_OBJECTS = [
    ("events", {"name": "Shared", "time": T}, "is required"),
    ("events", event(email="a@example.com"), "only one"),
    ("attributes", {"external_id": "x", "braze_id": "b" * 24}, "only one"),
    ("events", event({"external_id": ""}), "'external_id' must be a non-empty string"),
    ("events", event({"external_id": 42}), "'external_id' must be a non-empty string"),
    ("events", event({"user_alias": {"alias_name": "a"}}), "'user_alias' must be an object"),
    ("events", event({"user_alias": "a@example.com"}), "'user_alias' must be an object"),
    ("events", {"external_id": "x", "time": T}, "'name' is required"),
    ("events", {"external_id": "x", "name": "", "time": T}, "'name' is required"),
    ("events", {"external_id": "x", "name": "Shared"}, "'time' is required"),
    ("events", event(time="yesterday"), "'time' must be an ISO-8601"),
    ("events", event(time=1700000000), "'time' must be an ISO-8601"),
    ("events", event(properties=["a"]), "'properties' must be an object"),
    ("events", event(properties={"$price": 1}), "must not start with '$'"),
    ("events", event(properties={"note": "x" * 256}), "longer than 255"),
    ("events", event(properties={f"k{i}": "x" * 250 for i in range(220)}), "50 KB"),
    ("events", event(_update_existing_only="yes"), "'_update_existing_only'"),
    ("events", "not an object", "must be JSON objects"),
    ("attributes", {"external_id": "x", "email_subscribe": "yes"}, "'email_subscribe'"),
    ("attributes", {"external_id": "x", "email": "not-an-email"}, "valid email"),
    ("attributes", {"external_id": "x", "subscription_groups": {"subscription_group_id": GROUP}},
     "'subscription_groups' must be an array"),
    ("attributes", {"external_id": "x", "subscription_groups": [GROUP]},
     "'subscription_groups' items must be objects"),
    ("attributes", {"external_id": "x", "subscription_groups": [
        {"subscription_group_id": "newsletter", "subscription_state": "subscribed"}]},
     "'subscription_group_id' must be a subscription group id (a UUID)"),
    ("attributes", {"external_id": "x", "subscription_groups": [
        {"subscription_state": "subscribed"}]},
     "'subscription_group_id' must be a subscription group id (a UUID)"),
    ("attributes", {"external_id": "x", "subscription_groups": [
        {"subscription_group_id": GROUP, "subscription_state": "opted_in"}]},
     "'subscription_state' must be one of subscribed, unsubscribed"),
    ("attributes", {"external_id": "x", "subscription_groups": [
        {"subscription_group_id": GROUP, "subscription_state": "subscribed", "list": "m"}]},
     "'subscription_groups' item has unknown field 'list'"),
    ("purchases", {"external_id": "x", "time": T, "currency": "USD", "price": 1},
     "'product_id'"),
]


@pytest.mark.parametrize(("array", "bad", "reason"), BAD_OBJECTS)
def test_a_bad_object_is_reported_by_index_and_the_rest_is_processed(
        bz: FlaskClient, array: str, bad: Any, reason: str) -> None:
    good = {"attributes": {"external_id": "ok", "first_name": "Ann"}, "events": event(),
            "purchases": {"external_id": "ok", "product_id": "p", "currency": "USD",
                          "price": 1.5, "time": T}}[array]
    other = "events" if array != "events" else "attributes"
    other_good = event() if other == "events" else {"external_id": "ok", "first_name": "A"}
    answer = post(bz, {array: [good, bad], other: [other_good]})
    assert answer.status_code == 201
    body = answer.get_json()
    assert body["message"] == "success"
    assert len(body["errors"]) == 1
    error = body["errors"][0]
    assert (error["input_array"], error["index"]) == (array, 1)
    assert reason in error["type"]


def test_every_object_invalid_is_a_400_with_the_errors(bz: FlaskClient) -> None:
    answer = post(bz, {"events": [event(time="nope"), {"name": "x", "time": T}]})
    assert answer.status_code == 400
    body = answer.get_json()
    assert "Valid data" in body["message"]
    assert [(e["input_array"], e["index"]) for e in body["errors"]] == [("events", 0),
                                                                        ("events", 1)]


def test_success_counts_omit_zeroes(bz: FlaskClient) -> None:
    answer = post(bz, {"events": [event(), event()]})
    assert answer.status_code == 201
    assert answer.get_json() == {"message": "success", "events_processed": 2}
    both = post(bz, {"attributes": [{"external_id": "cust-1", "first_name": "A"}],
                     "events": [event()]})
    assert both.get_json() == {"message": "success", "attributes_processed": 1,
                               "events_processed": 1}


# -- profiles --------------------------------------------------------------------------------

def test_external_id_creates_the_profile(bz: FlaskClient) -> None:
    post(bz, {"attributes": [{"external_id": "cust-1", "email": "Ann@Example.com",
                              "first_name": "Ann", "share_link": "https://x/y"}],
              "events": [event(properties={"extole_event_id": "e1"})]})
    [profile] = profiles(bz)
    assert profile["external_id"] == "cust-1" and profile["email"] == "ann@example.com"
    assert len(profile["braze_id"]) == 24 and int(profile["braze_id"], 16) >= 0
    assert profile["attributes"] == {"email": "ann@example.com", "first_name": "Ann",
                                     "share_link": "https://x/y"}
    assert profile["events"] == [{"name": "Shared", "time": T,
                                  "properties": {"extole_event_id": "e1"}}]


def test_subscription_groups_are_kept_on_the_profile_group_by_group(bz: FlaskClient) -> None:
    def groups(*states: tuple[str, str]) -> list[dict[str, str]]:
        return [{"subscription_group_id": g, "subscription_state": s} for g, s in states]

    answer = post(bz, {"attributes": [{"external_id": "cust-1", "subscription_groups": groups(
        (GROUP, "subscribed"), (OTHER_GROUP, "subscribed"))}]})
    assert answer.get_json() == {"message": "success", "attributes_processed": 1}
    post(bz, {"attributes": [{"external_id": "cust-1",
                              "subscription_groups": groups((GROUP, "unsubscribed"))}]})
    # A malformed list changes nothing: the object is refused as a whole.
    refused = post(bz, {"attributes": [{"external_id": "cust-1", "first_name": "Ann",
                                        "subscription_groups": groups(
                                            (OTHER_GROUP, "unsubscribed"), ("x", "subscribed"))}],
                        "events": [event()]})
    assert refused.status_code == 201
    assert refused.get_json()["errors"] == [
        {"type": "'subscription_group_id' must be a subscription group id (a UUID)",
         "input_array": "attributes", "index": 0}]
    [profile] = profiles(bz)
    assert profile["subscription_groups"] == {GROUP: "unsubscribed", OTHER_GROUP: "subscribed"}
    assert profile["attributes"] == {}


def test_update_existing_only_does_not_create(bz: FlaskClient) -> None:
    post(bz, {"attributes": [{"external_id": "c", "first_name": "A",
                              "_update_existing_only": True}],
              "events": [event({"external_id": "d"}, _update_existing_only=True)]})
    assert profiles(bz) == []


def test_events_by_unknown_alias_are_dropped(bz: FlaskClient) -> None:
    alias = {"user_alias": {"alias_name": "ann@example.com", "alias_label": "email"}}
    answer = post(bz, {"events": [event(alias)]})
    assert answer.status_code == 201  # Braze accepts it... and drops it later
    assert profiles(bz) == []
    dropped = bz.get("/sandbox/profiles").get_json()["dropped"]["prod"]
    assert dropped[0]["identifier"] == "user_alias" and dropped[0]["index"] == 0
    assert bz.get("/sandbox/stats").get_json()["events_dropped"] == 1


def test_attributes_by_alias_create_only_when_asked(bz: FlaskClient) -> None:
    alias = {"user_alias": {"alias_name": "ann@example.com", "alias_label": "email"}}
    post(bz, {"attributes": [{**alias, "email": "ann@example.com"}], "events": [event(alias)]})
    assert profiles(bz) == []
    post(bz, {"attributes": [{**alias, "email": "ann@example.com",
                              "_update_existing_only": False}],
              "events": [event(alias)]})
    [profile] = profiles(bz)
    assert profile["external_id"] is None and profile["email"] == "ann@example.com"
    assert profile["user_aliases"] == [alias["user_alias"]]
    assert [e["name"] for e in profile["events"]] == ["Shared"]


def test_email_identifier_prefers_a_profile_with_an_external_id(bz: FlaskClient) -> None:
    post(bz, {"attributes": [{"external_id": "old", "email": "ann@example.com"}]})
    post(bz, {"attributes": [{"email": "ann@example.com", "first_name": "Anonymous"}]})
    assert len(profiles(bz)) == 1  # the email attributes object found the external_id profile
    post(bz, {"events": [event({"email": "ANN@example.com"})]})
    [profile] = profiles(bz)
    assert profile["external_id"] == "old" and len(profile["events"]) == 1


def test_email_identifier_picks_most_recent_else_creates(bz: FlaskClient) -> None:
    post(bz, {"events": [event({"email": "bob@example.com"}, name="First")]})
    [created] = profiles(bz)
    assert created["external_id"] is None and created["email"] == "bob@example.com"
    alias = {"user_alias": {"alias_name": "bob@example.com", "alias_label": "email"}}
    post(bz, {"attributes": [{**alias, "email": "bob@example.com",
                              "_update_existing_only": False}]})
    post(bz, {"events": [event({"email": "bob@example.com"}, name="Second")]})
    newest = [p for p in profiles(bz) if p["user_aliases"]][0]
    assert [e["name"] for e in newest["events"]] == ["Second"]


def test_workspaces_are_separate(bz: FlaskClient) -> None:
    post(bz, {"events": [event()]}, key=STAGING)
    assert profiles(bz, "prod") == [] and len(profiles(bz, "staging")) == 1


def test_without_configured_keys_any_key_is_its_own_workspace() -> None:
    bz = create_sandbox_app().test_client()
    assert post(bz, {"events": [event()]}, key="some-key-abcd").status_code == 201
    assert post(bz, {"events": [event()]}, key="other-key-wxyz").status_code == 201
    assert set(bz.get("/sandbox/profiles").get_json()["workspaces"]) == {"key-abcd", "key-wxyz"}


# -- export ----------------------------------------------------------------------------------

def test_export_by_email_returns_requested_fields(bz: FlaskClient) -> None:
    post(bz, {"attributes": [{"external_id": "cust-1", "email": "ann@example.com",
                              "first_name": "Ann"}]})
    answer = post(bz, {"email_address": "ANN@Example.com",
                       "fields_to_export": ["external_id", "braze_id"]}, "/users/export/ids")
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["message"] == "success" and body["invalid_user_ids"] == []
    [user] = body["users"]
    assert set(user) == {"external_id", "braze_id"} and user["external_id"] == "cust-1"
    nobody = post(bz, {"email_address": "zed@example.com", "fields_to_export": ["braze_id"]},
                  "/users/export/ids")
    assert nobody.get_json()["users"] == []


def test_export_by_ids_lists_invalid_ones(bz: FlaskClient) -> None:
    post(bz, {"events": [event()]})
    body = post(bz, {"external_ids": ["cust-1", "ghost"], "fields_to_export": ["external_id",
                                                                               "email"]},
                "/users/export/ids").get_json()
    assert body["users"] == [{"external_id": "cust-1"}]
    assert body["invalid_user_ids"] == ["ghost"]


@pytest.mark.parametrize(("body", "message"), [
    ({"email_address": "a@example.com"}, "fields_to_export"),
    ({"email_address": "a@example.com", "fields_to_export": "braze_id"}, "fields_to_export"),
    ({"fields_to_export": ["braze_id"]}, "exactly one of"),
    ({"email_address": "a@example.com", "braze_id": "x", "fields_to_export": ["braze_id"]},
     "exactly one of"),
    ({"external_ids": [f"c{i}" for i in range(51)], "fields_to_export": ["braze_id"]},
     "1 to 50"),
    ({"email_address": 5, "fields_to_export": ["braze_id"]}, "non-empty string"),
    ({"user_aliases": [{"alias_name": "a"}], "fields_to_export": ["braze_id"]}, "user_alias"),
])
def test_export_validation(bz: FlaskClient, body: dict[str, Any], message: str) -> None:
    answer = post(bz, body, "/users/export/ids")
    assert answer.status_code == 400 and message in answer.get_json()["message"]


# -- rate limits and faults ------------------------------------------------------------------

def test_every_answer_carries_rate_limit_headers_that_count_down(bz: FlaskClient) -> None:
    first, second = post(bz, {"events": [event()]}), post(bz, {"events": [event()]})
    assert first.headers["X-RateLimit-Limit"] == "3000"
    assert int(first.headers["X-RateLimit-Remaining"]) == 2999
    assert int(second.headers["X-RateLimit-Remaining"]) == 2998
    assert int(first.headers["X-RateLimit-Reset"]) >= int(time.time())
    assert "X-RateLimit-Reset" in post(bz, {}, key="bad-key").headers


def test_rate_limit_fault_answers_429(bz: FlaskClient) -> None:
    assert faults(bz, rate_limit="2/60s").status_code == 200
    answers = [post(bz, {"events": [event()]}) for _ in range(3)]
    assert [a.status_code for a in answers] == [201, 201, 429]
    limited = answers[2]
    assert limited.get_json() == {"message": "Rate limit exceeded"}
    assert limited.headers["X-RateLimit-Limit"] == "2"
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    assert 0 < int(limited.headers["X-RateLimit-Reset"]) - time.time() <= 61
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert len(profiles(bz)[0]["events"]) == 2
    # another workspace (and another endpoint) has its own window
    assert post(bz, {"events": [event()]}, key=STAGING).status_code == 201


def test_rate_limit_from_start_config() -> None:
    bz = create_sandbox_app(SandboxConfig(rate_limit="1/30s")).test_client()
    assert [post(bz, {"events": [event()]}, key="k-1234").status_code for _ in range(2)] == [
        201, 429]


def test_fail_rate_answers_the_fail_status_without_processing(bz: FlaskClient) -> None:
    faults(bz, fail_rate=1.0)
    answer = post(bz, {"events": [event()]})
    assert answer.status_code == 503 and profiles(bz) == []
    faults(bz, fail_status=500)
    assert post(bz, {"email_address": "a@example.com", "fields_to_export": ["braze_id"]},
                "/users/export/ids").status_code == 500
    faults(bz, fail_rate=0)
    assert post(bz, {"events": [event()]}).status_code == 201


def test_rejected_keys_answer_401(app: Flask, bz: FlaskClient) -> None:
    bz2 = create_sandbox_app(SandboxConfig(reject_keys=["dead-key-4321"])).test_client()
    answer = post(bz2, {"events": [event()]}, key="dead-key-4321")
    assert answer.status_code == 401
    assert answer.get_json() == {"message": "Invalid API key: 4321"}
    faults(bz, reject_keys=["staging"])  # by workspace name
    assert post(bz, {"events": [event()]}, key=STAGING).status_code == 401
    assert post(bz, {"events": [event()]}, key=PROD).status_code == 201


def test_refused_event_ids_as_errors(bz: FlaskClient) -> None:
    faults(bz, refuse_event_ids=["bad-1"])
    answer = post(bz, {"events": [event(properties={"extole_event_id": "ok-1"}),
                                  event(properties={"extole_event_id": "bad-1"})]})
    assert answer.status_code == 201
    [error] = answer.get_json()["errors"]
    assert (error["input_array"], error["index"]) == ("events", 1)
    assert [e["properties"]["extole_event_id"] for e in profiles(bz)[0]["events"]] == ["ok-1"]


def test_refused_event_ids_as_a_400(bz: FlaskClient) -> None:
    faults(bz, refuse_event_ids=["bad-1", "bad-2"], refuse_mode="400")
    answer = post(bz, {"attributes": [{"external_id": "cust-1", "first_name": "A"}],
                       "events": [event(properties={"extole_event_id": "ok-1"}),
                                  event(properties={"extole_event_id": "bad-2"}),
                                  event(properties={"extole_event_id": "bad-1"})]})
    assert answer.status_code == 400 and "bad-2" in answer.get_json()["message"]
    assert profiles(bz) == []


def test_latency_fault_delays_answers(bz: FlaskClient) -> None:
    faults(bz, latency_ms=60)
    started = time.perf_counter()
    post(bz, {"events": [event()]})
    assert time.perf_counter() - started >= 0.06


@pytest.mark.parametrize(("body", "message"), [
    ({"fail_ratio": 1}, "unknown fault field 'fail_ratio'"),
    ({"fail_rate": 2}, "fail_rate"),
    ({"fail_rate": True}, "fail_rate"),
    ({"fail_status": "503"}, "fail_status"),
    ({"fail_status": 200}, "fail_status"),
    ({"latency_ms": -1}, "latency_ms"),
    ({"rate_limit": "fast"}, "rate limit 'fast'"),
    ({"rate_limit": 20}, "rate_limit"),
    ({"reject_keys": "k"}, "reject_keys"),
    ({"refuse_event_ids": [1]}, "refuse_event_ids"),
    ({"refuse_mode": "drop"}, "refuse_mode"),
    ([1], "JSON object"),
])
def test_faults_are_validated(bz: FlaskClient, body: Any, message: str) -> None:
    answer = bz.post("/sandbox/faults", json=body)
    assert answer.status_code == 400 and message in answer.get_json()["message"]


def test_faults_merge_show_and_reset(bz: FlaskClient) -> None:
    faults(bz, fail_rate=0.5)
    shown = faults(bz, latency_ms=5).get_json()
    assert shown["fail_rate"] == 0.5 and shown["latency_ms"] == 5
    assert bz.get("/sandbox/faults").get_json() == shown
    post(bz, {"events": [event()]})
    assert bz.post("/sandbox/reset").status_code == 200
    assert bz.get("/sandbox/faults").get_json()["fail_rate"] == 0
    assert profiles(bz) == [] and bz.get("/sandbox/requests").get_json()["requests"] == []


def test_stats_count_statuses_events_and_duplicates(bz: FlaskClient) -> None:
    post(bz, {"events": [event(properties={"extole_event_id": "e1"}),
                         event(properties={"extole_event_id": "e2"})]})
    post(bz, {"events": [event(properties={"extole_event_id": "e1"})]})
    post(bz, {"events": [event(time="bad", properties={"extole_event_id": "e3"}),
                         event(properties={"extole_event_id": "e4"})]})
    post(bz, {}, key="bad-key")
    stats = bz.get("/sandbox/stats").get_json()
    assert stats["requests"] == {"201": 3, "401": 1}
    assert stats["events_received"] == 4
    assert stats["event_ids"] == {"e1": 2, "e2": 1, "e4": 1}


def test_requests_are_logged_newest_last(bz: FlaskClient) -> None:
    post(bz, {"events": [event()]})
    post(bz, {"events": [event()]}, key=STAGING)
    post(bz, {"events": [event()]}, "/users/track/")
    logged = bz.get("/sandbox/requests").get_json()["requests"]
    assert [(r["path"], r["workspace"], r["status"]) for r in logged] == [
        ("/users/track", "prod", 201), ("/users/track", "staging", 201),
        ("/users/track/", None, 403)]
    assert logged[0]["body"] == {"events": [event()]} and logged[0]["time"].endswith("Z")


# -- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "expected"), [
    ("20/3s", (20, 3.0)), ("5/s", (5, 1.0)), ("250/minute", (250, 60.0)), ("10/1.5s", (10, 1.5)),
])
def test_parse_rate_limit(spec: str, expected: tuple[int, float]) -> None:
    assert SandboxConfig.parse_rate_limit(spec) == expected


@pytest.mark.parametrize("spec", ["", "20", "20/", "x/3s", "20/3h", "0/3s", "20/0s"])
def test_parse_rate_limit_refuses_nonsense(spec: str) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        SandboxConfig.parse_rate_limit(spec)


@pytest.mark.parametrize("kwargs", [{"fail_rate": 1.5}, {"rate_limit": "lots"},
                                    {"max_objects": 0}, {"api_keys": ["prod="]},
                                    {"refuse_mode": "sometimes"}])
def test_config_refuses_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SandboxConfig(**kwargs)


# -- over a real socket, with the real client ------------------------------------------------

@pytest.fixture
def live() -> Iterator[tuple[str, FlaskClient]]:
    with served_sandbox(SandboxConfig(api_keys=[f"prod={PROD}"])) as (url, app):
        yield url, app.test_client()


def test_braze_client_end_to_end(live: tuple[str, FlaskClient]) -> None:
    url, control = live
    sleeps: list[float] = []
    client = BrazeClient(url, PROD, environment="production", sleep=sleeps.append)
    try:
        result = client.track({
            "attributes": [{"external_id": "cust-9", "email": "Zoe@Example.com"}],
            "events": [event({"external_id": "cust-9"},
                             properties={"extole_event_id": "live-1"})]})
        assert result.exchange.status == 201 and result.errors == []
        assert client.rate_limit_state()["limit"] == 3000
        users, exchange = client.export_ids_by_email("zoe@example.com")
        assert exchange.status == 200 and users[0]["external_id"] == "cust-9"
        assert len(users[0]["braze_id"]) == 24

        control.post("/sandbox/faults", json={"rate_limit": "1/60s"})
        client.track({"events": [event({"external_id": "cust-9"})]})
        with pytest.raises(RateLimited) as info:
            client.track({"events": [event({"external_id": "cust-9"})]})
        assert time.time() < info.value.reset_at <= time.time() + 61
        assert info.value.exchange is not None and info.value.exchange.status == 429
        assert len(sleeps) == 1 and 0 < sleeps[0] <= 60  # it paced itself before the 429
    finally:
        client.close()
    [profile] = control.get("/sandbox/profiles").get_json()["workspaces"]["prod"]
    assert profile["email"] == "zoe@example.com" and len(profile["events"]) == 2


def test_one_client_shared_by_threads(live: tuple[str, FlaskClient]) -> None:
    url, control = live
    client = BrazeClient(url, PROD, environment="production")
    failures: list[BaseException] = []

    def send(worker: int) -> None:
        try:
            for i in range(10):
                client.track({"events": [event({"external_id": f"w{worker}"},
                                                properties={"extole_event_id": f"{worker}-{i}"})]})
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        client.close()
    assert failures == []
    stats = control.get("/sandbox/stats").get_json()
    assert stats["events_received"] == 80 and set(stats["event_ids"].values()) == {1}


# -- campaign and Canvas triggers ------------------------------------------------------------

CAMPAIGN = "/campaigns/trigger/send"
CANVAS = "/canvas/trigger/send"


def sent_triggers(bz: FlaskClient, workspace: str = "prod") -> list[dict[str, Any]]:
    return list(bz.get("/sandbox/triggers").get_json()["workspaces"].get(workspace, []))


def test_a_campaign_trigger_sends_each_recipient_a_message(bz: FlaskClient) -> None:
    post(bz, {"events": [event()]})  # cust-1 exists
    answer = post(bz, {"campaign_id": "cmp-1", "trigger_properties": {"shared": 1},
                       "recipients": [
                           {"external_user_id": "cust-1", "trigger_properties": {"code": "A"}},
                           {"user_alias": {"alias_name": "x@y.z", "alias_label": "email"}}]},
                  CAMPAIGN)
    assert answer.status_code == 201
    assert answer.get_json()["message"] == "success" and answer.get_json()["dispatch_id"]
    [request] = sent_triggers(bz)
    assert request["campaign_id"] == "cmp-1" and request["endpoint"] == CAMPAIGN
    assert request["messages"] == [
        {"recipient": {"external_user_id": "cust-1"}, "properties": {"shared": 1, "code": "A"},
         "profile_found": True},
        {"recipient": {"user_alias": {"alias_name": "x@y.z", "alias_label": "email"}},
         "properties": {"shared": 1}, "profile_found": False}]
    # Sent twice, it is two messages: Braze does not de-duplicate triggers.
    post(bz, {"campaign_id": "cmp-1", "recipients": [{"external_user_id": "cust-1"}]}, CAMPAIGN)
    assert len(sent_triggers(bz)) == 2
    assert bz.get("/sandbox/stats").get_json()["trigger_messages"] == 3


def test_a_canvas_trigger_takes_canvas_entry_properties(bz: FlaskClient) -> None:
    body = {"canvas_id": "cnv-1", "recipients": [
        {"external_user_id": "c-9", "canvas_entry_properties": {"coupon_code": "Z"}}]}
    assert post(bz, body, CANVAS).status_code == 201
    [request] = sent_triggers(bz)
    assert request["canvas_id"] == "cnv-1"
    assert request["messages"][0]["properties"] == {"coupon_code": "Z"}


@pytest.mark.parametrize(("path", "body", "message"), [
    (CAMPAIGN, {"recipients": [{"external_user_id": "c"}]},
     "'campaign_id' is required and must be a non-empty string"),
    (CANVAS, {"canvas_id": "", "recipients": [{"external_user_id": "c"}]},
     "'canvas_id' is required and must be a non-empty string"),
    (CAMPAIGN, {"campaign_id": "c"}, "'recipients' is required unless 'broadcast' is true"),
    (CAMPAIGN, {"campaign_id": "c", "recipients": []},
     "'recipients' must be an array of 1 to 50 recipients"),
    (CAMPAIGN, {"campaign_id": "c", "recipients": [{"external_user_id": f"c{n}"}
                                                   for n in range(51)]},
     "'recipients' must be an array of 1 to 50 recipients"),
    (CAMPAIGN, {"campaign_id": "c", "recipients": [{}]},
     "recipients[0]: exactly one of 'external_user_id' or 'user_alias' is required"),
    (CAMPAIGN, {"campaign_id": "c", "recipients": [
        {"external_user_id": "c", "user_alias": {"alias_name": "a", "alias_label": "b"}}]},
     "recipients[0]: exactly one of 'external_user_id' or 'user_alias' is required"),
    (CAMPAIGN, {"campaign_id": "c", "recipients": [{"user_alias": {"alias_name": "a"}}]},
     "recipients[0]: 'user_alias' must be an object with string 'alias_name' and "
     "'alias_label'"),
    (CAMPAIGN, {"campaign_id": "c", "recipients": [
        {"external_user_id": "c", "canvas_entry_properties": {}}]},
     "recipients[0]: 'canvas_entry_properties' is not a field of this endpoint: use "
     "'trigger_properties'"),
    (CANVAS, {"canvas_id": "c", "recipients": [
        {"external_user_id": "c", "canvas_entry_properties": "x"}]},
     "recipients[0]: 'canvas_entry_properties' must be an object"),
])
def test_trigger_requests_are_checked_as_braze_does(bz: FlaskClient, path: str,
                                                    body: dict[str, Any], message: str) -> None:
    answer = post(bz, body, path)
    assert answer.status_code == 400
    assert answer.get_json()["message"].startswith(message)
    assert sent_triggers(bz) == []


def test_trigger_endpoints_need_the_key(bz: FlaskClient) -> None:
    body = {"campaign_id": "c", "recipients": [{"external_user_id": "c"}]}
    assert post(bz, body, CAMPAIGN, key="wrong-key-1234").status_code == 401
    assert post(bz, body, CAMPAIGN, key=None).status_code == 401
    assert post(bz, body, CAMPAIGN + "/").status_code == 403
    assert post(bz, body, CAMPAIGN, key=STAGING).status_code == 201
    assert sent_triggers(bz) == [] and len(sent_triggers(bz, "staging")) == 1


def test_faults_can_target_the_trigger_endpoints_only(bz: FlaskClient) -> None:
    body = {"campaign_id": "c", "recipients": [{"external_user_id": "c"}]}
    assert faults(bz, fail_rate=1.0, fail_status=502,
                  fault_paths=[CAMPAIGN, CANVAS]).status_code == 200
    assert post(bz, body, CAMPAIGN).status_code == 502
    assert post(bz, {"canvas_id": "c", "recipients": [{"external_user_id": "c"}]},
                CANVAS).status_code == 502
    assert post(bz, {"events": [event()]}).status_code == 201  # /users/track is untouched
    assert sent_triggers(bz) == []
    bad = faults(bz, fault_paths=["/messages/send"])
    assert bad.status_code == 400 and "fault_paths must be an array" in bad.get_json()["message"]


def test_the_two_trigger_endpoints_share_one_rate_limit(bz: FlaskClient) -> None:
    faults(bz, rate_limit="2/60s")
    body = {"campaign_id": "c", "recipients": [{"external_user_id": "c"}]}
    assert post(bz, body, CAMPAIGN).status_code == 201
    assert post(bz, {"canvas_id": "c", "recipients": [{"external_user_id": "c"}]},
                CANVAS).status_code == 201
    limited = post(bz, body, CAMPAIGN)
    assert limited.status_code == 429 and limited.headers["Retry-After"]
    assert post(bz, {"events": [event()]}).status_code == 201  # /users/track's own window
