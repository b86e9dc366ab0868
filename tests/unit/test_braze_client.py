"""The Braze client: exact requests, status mapping, exchanges, pacing, no leaked key."""

from __future__ import annotations

import json
import logging
from datetime import UTC

import pytest
import requests
import responses
import urllib3

from relay.braze import (
    BadRequest,
    BrazeClient,
    BrazeError,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
)

ENDPOINT = "https://rest.iad-01.braze.com"
KEY = "sk-live-0123456789abcdef-SECRET"
NOW = 1_800_000_000.0
TRACK_URL = ENDPOINT + "/users/track"
EXPORT_URL = ENDPOINT + "/users/export/ids"
EVENT = {"external_id": "cust-1", "name": "Shared", "time": "2026-11-20T14:14:18.548Z",
         "properties": {"extole_event_id": "e1"}}


class FakeTime:
    """A clock that only moves when the client sleeps, so pacing is observable."""

    def __init__(self) -> None:
        self.now = NOW
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def client(fake_time: FakeTime) -> BrazeClient:
    return BrazeClient(ENDPOINT + "/", KEY, environment="production",
                       sleep=fake_time.sleep, clock=fake_time.clock)


@pytest.fixture
def mocked() -> responses.RequestsMock:
    with responses.RequestsMock() as rsps:
        yield rsps


def rate_headers(limit: int, remaining: int, reset: float) -> dict[str, str]:
    return {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(int(reset))}


def test_track_sends_exact_request(client: BrazeClient, mocked: responses.RequestsMock) -> None:
    mocked.post(TRACK_URL, status=201, json={"message": "success", "events_processed": 1})
    result = client.track({"events": [EVENT]})
    sent = mocked.calls[0].request
    assert sent.url == TRACK_URL
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.headers["Content-Type"] == "application/json"
    assert json.loads(sent.body) == {"events": [EVENT]}
    assert result.errors == []
    assert result.response == {"message": "success", "events_processed": 1}
    ex = result.exchange
    assert (ex.endpoint, ex.status, ex.error) == ("/users/track", 201, None)
    assert ex.request_body == sent.body.decode()
    assert json.loads(ex.response_body)["events_processed"] == 1
    assert ex.duration_ms >= 0 and ex.started_at.tzinfo is UTC


def test_track_parses_per_object_errors(client: BrazeClient,
                                        mocked: responses.RequestsMock) -> None:
    errors = [{"type": "'name' is required", "input_array": "events", "index": 1}]
    mocked.post(TRACK_URL, status=201, json={"message": "success", "events_processed": 1,
                                             "errors": errors})
    assert client.track({"events": [EVENT, {"external_id": "x"}]}).errors == errors


def test_200_is_success_too(client: BrazeClient, mocked: responses.RequestsMock) -> None:
    mocked.post(TRACK_URL, status=200, json={"message": "success"})
    assert client.track({"events": [EVENT]}).exchange.status == 200


def test_export_by_email_sends_exact_body(client: BrazeClient,
                                          mocked: responses.RequestsMock) -> None:
    users = [{"external_id": "cust-1", "braze_id": "a" * 24}]
    mocked.post(EXPORT_URL, status=201, json={"message": "success", "users": users})
    found, exchange = client.export_ids_by_email("ann@example.com")
    sent = mocked.calls[0].request
    assert sent.url == EXPORT_URL and sent.headers["Authorization"] == f"Bearer {KEY}"
    assert json.loads(sent.body) == {"email_address": "ann@example.com",
                                     "fields_to_export": ["external_id", "braze_id"]}
    assert found == users and exchange.endpoint == "/users/export/ids"


def test_export_without_users_is_empty(client: BrazeClient,
                                       mocked: responses.RequestsMock) -> None:
    mocked.post(EXPORT_URL, status=200, json={"message": "success", "users": [],
                                              "invalid_user_ids": []})
    assert client.export_ids_by_email("nobody@example.com")[0] == []


@pytest.mark.parametrize("status", [401, 403])
def test_refused_key(client: BrazeClient, mocked: responses.RequestsMock, status: int) -> None:
    mocked.post(TRACK_URL, status=status, json={"message": "Invalid API key: CRET"})
    with pytest.raises(Unauthorized) as info:
        client.track({"events": [EVENT]})
    assert info.value.status == status
    assert info.value.exchange is not None and info.value.exchange.status == status


@pytest.mark.parametrize("status", [404, 415])
def test_configuration_problems_are_retried_not_fatal(client: BrazeClient,
                                                      mocked: responses.RequestsMock,
                                                      status: int) -> None:
    mocked.post(TRACK_URL, status=status, json={"message": "not here"})
    with pytest.raises(ServerError) as info:
        client.track({"events": [EVENT]})
    assert info.value.status == status
    assert "not here" in str(info.value)


@pytest.mark.parametrize("status", [400, 413, 422])
def test_request_shaped_problems(client: BrazeClient, mocked: responses.RequestsMock,
                                 status: int) -> None:
    mocked.post(TRACK_URL, status=status, json={"message": "Max Input Length Exceeded"})
    with pytest.raises(BadRequest) as info:
        client.track({"events": [EVENT]})
    assert info.value.message == "Max Input Length Exceeded" and info.value.status == status
    assert info.value.exchange is not None
    assert info.value.exchange.error == f"HTTP {status}: Max Input Length Exceeded"


def test_bad_request_without_json_keeps_500_chars(client: BrazeClient,
                                                  mocked: responses.RequestsMock) -> None:
    mocked.post(TRACK_URL, status=400, body="x" * 2000)
    with pytest.raises(BadRequest) as info:
        client.track({"events": [EVENT]})
    assert info.value.message == "x" * 500


def test_bad_request_carries_object_errors(client: BrazeClient,
                                           mocked: responses.RequestsMock) -> None:
    errors = [{"type": "'time' is required", "input_array": "events", "index": 0}]
    mocked.post(TRACK_URL, status=400, json={"message": "no valid data", "errors": errors})
    with pytest.raises(BadRequest) as info:
        client.track({"events": [EVENT]})
    assert info.value.errors == errors


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors(client: BrazeClient, mocked: responses.RequestsMock, status: int) -> None:
    mocked.post(TRACK_URL, status=status, body="<html>oops</html>")
    with pytest.raises(ServerError) as info:
        client.track({"events": [EVENT]})
    assert info.value.status == status and info.value.exchange.response_body == "<html>oops</html>"


def test_rate_limited_uses_reset_header(client: BrazeClient,
                                        mocked: responses.RequestsMock) -> None:
    mocked.post(TRACK_URL, status=429, json={"message": "Rate limit exceeded"},
                headers=rate_headers(3000, 0, NOW + 2))
    with pytest.raises(RateLimited) as info:
        client.track({"events": [EVENT]})
    assert info.value.reset_at == NOW + 2 and info.value.exchange.status == 429


def test_rate_limited_falls_back_to_retry_after_then_one_second(
        client: BrazeClient, fake_time: FakeTime, mocked: responses.RequestsMock) -> None:
    mocked.post(TRACK_URL, status=429, headers={"Retry-After": "7"})
    mocked.post(TRACK_URL, status=429)
    with pytest.raises(RateLimited) as first:
        client.track({"events": [EVENT]})
    assert first.value.reset_at == NOW + 7
    with pytest.raises(RateLimited) as second:
        client.track({"events": [EVENT]})
    assert fake_time.sleeps == [7.0]  # paced by the first 429 before trying again
    assert second.value.reset_at == NOW + 7 + 1


@pytest.mark.parametrize("failure", [requests.ConnectionError("refused"),
                                     requests.Timeout("read timed out"),
                                     requests.TooManyRedirects("loop")])
def test_transport_errors_are_recorded(client: BrazeClient, mocked: responses.RequestsMock,
                                       failure: Exception) -> None:
    mocked.post(TRACK_URL, body=failure)
    with pytest.raises(TransportError) as info:
        client.track({"events": [EVENT]})
    ex = info.value.exchange
    assert ex is not None and ex.status is None and ex.response_body == ""
    assert ex.error and json.loads(ex.request_body) == {"events": [EVENT]}


def test_2xx_that_is_not_json_is_a_transport_error(client: BrazeClient,
                                                   mocked: responses.RequestsMock) -> None:
    mocked.post(TRACK_URL, status=201, body="<html>proxy</html>")
    with pytest.raises(TransportError) as info:
        client.track({"events": [EVENT]})
    assert info.value.exchange.status == 201


def test_pacing_sleeps_until_reset_when_nothing_remains(
        client: BrazeClient, fake_time: FakeTime, mocked: responses.RequestsMock) -> None:
    mocked.post(TRACK_URL, status=201, json={"message": "success"},
                headers=rate_headers(3000, 0, NOW + 2))
    mocked.post(TRACK_URL, status=201, json={"message": "success"},
                headers=rate_headers(3000, 2999, NOW + 5))
    client.track({"events": [EVENT]})
    assert fake_time.sleeps == []
    assert client.rate_limit_state() == {"limit": 3000, "remaining": 0, "reset": NOW + 2}
    client.track({"events": [EVENT]})
    assert fake_time.sleeps == [2.0]
    assert client.rate_limit_state()["remaining"] == 2999


@pytest.mark.parametrize(("remaining", "reset_in", "expected"), [
    (29, 1.5, [1.5]),     # below 1% of 3000
    (30, 1.5, []),        # 1% left: go on
    (0, -1.0, []),        # the window has already reset
    (0, 600.0, [60.0]),   # one sleep is capped at a minute
])
def test_pacing_thresholds(client: BrazeClient, fake_time: FakeTime,
                           mocked: responses.RequestsMock, remaining: int, reset_in: float,
                           expected: list[float]) -> None:
    headers = {"x-ratelimit-limit": "3000", "x-ratelimit-remaining": str(remaining),
               "x-ratelimit-reset": str(NOW + reset_in)}
    mocked.post(TRACK_URL, status=201, json={"message": "success"}, headers=headers)
    mocked.post(TRACK_URL, status=201, json={"message": "success"})
    client.track({"events": [EVENT]})
    client.track({"events": [EVENT]})
    assert fake_time.sleeps == expected


def test_out_of_order_answers_keep_the_lowest_remaining(client: BrazeClient,
                                                        mocked: responses.RequestsMock) -> None:
    for remaining in (10, 12):
        mocked.post(TRACK_URL, status=201, json={}, headers=rate_headers(3000, remaining, NOW + 2))
    mocked.post(TRACK_URL, status=201, json={}, headers=rate_headers(3000, 2999, NOW + 5))
    client.track({"events": [EVENT]})
    client.track({"events": [EVENT]})
    assert client.rate_limit_state()["remaining"] == 10
    client.track({"events": [EVENT]})  # a new window: its own count
    assert client.rate_limit_state()["remaining"] == 2999


def test_pacing_is_per_endpoint(client: BrazeClient, fake_time: FakeTime,
                                mocked: responses.RequestsMock) -> None:
    mocked.post(EXPORT_URL, status=200, json={"users": []}, headers=rate_headers(250, 0, NOW + 30))
    mocked.post(TRACK_URL, status=201, json={"message": "success"})
    client.export_ids_by_email("a@example.com")
    client.track({"events": [EVENT]})
    assert fake_time.sleeps == []


def test_rate_limited_answer_paces_the_next_call(client: BrazeClient, fake_time: FakeTime,
                                                 mocked: responses.RequestsMock) -> None:
    mocked.post(TRACK_URL, status=429, headers={"Retry-After": "3"})
    mocked.post(TRACK_URL, status=201, json={"message": "success"})
    with pytest.raises(RateLimited):
        client.track({"events": [EVENT]})
    client.track({"events": [EVENT]})
    assert fake_time.sleeps == [3.0]


def test_key_never_leaks(client: BrazeClient, mocked: responses.RequestsMock,
                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.braze")
    mocked.post(TRACK_URL, status=401, json={"message": f"Invalid API key: {KEY}"})
    mocked.post(TRACK_URL, body=requests.ConnectionError(f"cannot send with {KEY}"))
    errors: list[BrazeError] = []
    for _ in range(2):
        with pytest.raises(BrazeError) as info:
            client.track({"events": [EVENT]})
        errors.append(info.value)
    assert KEY not in repr(client) and KEY not in str(client.__dict__.get("_session"))
    for err in errors:
        assert KEY not in str(err) and KEY not in repr(err)
        assert KEY not in err.exchange.response_body and KEY not in (err.exchange.error or "")
    assert KEY not in caplog.text


def test_logs_one_line_without_body(client: BrazeClient, mocked: responses.RequestsMock,
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.braze")
    mocked.post(TRACK_URL, status=201, json={"message": "success"})
    client.track({"events": [EVENT]})
    records = [r for r in caplog.records if r.name == "relay.braze"]
    assert len(records) == 1
    line = records[0].getMessage()
    assert "/users/track" in line and "201" in line and "production" in line
    assert "cust-1" not in line and "Shared" not in line


def test_endpoint_trailing_slash_is_dropped(client: BrazeClient) -> None:
    assert client.endpoint == ENDPOINT


def test_empty_key_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="staging"):
        BrazeClient(ENDPOINT, "", environment="staging")


def test_close_leaves_a_given_session_open() -> None:
    session = requests.Session()
    BrazeClient(ENDPOINT, KEY, environment="production", session=session).close()
    assert session.adapters  # still usable: the caller owns it
    session.close()


# -- campaign and Canvas triggers ------------------------------------------------------------

CAMPAIGN_URL = ENDPOINT + "/campaigns/trigger/send"


def test_trigger_bodies_name_each_kinds_fields() -> None:
    recipients = [{"external_user_id": "c-1", "properties": {"coupon_code": "X-1"}},
                  {"user_alias": {"alias_name": "a@b.c", "alias_label": "email"},
                   "properties": {}}]
    assert BrazeClient.trigger_body("campaign", "cmp-1", recipients) == {
        "campaign_id": "cmp-1", "recipients": [
            {"external_user_id": "c-1", "trigger_properties": {"coupon_code": "X-1"}},
            {"user_alias": {"alias_name": "a@b.c", "alias_label": "email"}}]}
    assert BrazeClient.trigger_body("canvas", "cnv-1", recipients[:1]) == {
        "canvas_id": "cnv-1", "recipients": [
            {"external_user_id": "c-1", "canvas_entry_properties": {"coupon_code": "X-1"}}]}
    with pytest.raises(ValueError, match="1 to 50 recipients"):
        BrazeClient.trigger_body("campaign", "cmp-1", recipients * 26)


def test_trigger_sends_the_exact_body(client: BrazeClient,
                                      mocked: responses.RequestsMock) -> None:
    mocked.post(CAMPAIGN_URL, json={"dispatch_id": "d-1", "message": "success"}, status=201)
    body = BrazeClient.trigger_body("campaign", "cmp-1", [{"external_user_id": "c-1"}])
    exchange = client.trigger("campaign", body)
    assert exchange.status == 201 and exchange.endpoint == "/campaigns/trigger/send"
    assert json.loads(mocked.calls[0].request.body) == body
    assert mocked.calls[0].request.headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(("failure", "reached"), [
    (requests.ConnectTimeout("connect timed out"), False),
    (requests.exceptions.SSLError("handshake failed"), False),
    (requests.ConnectionError(urllib3.exceptions.MaxRetryError(
        None, "/", urllib3.exceptions.NewConnectionError(None, "refused"))), False),  # type: ignore[arg-type]
    (requests.ReadTimeout("read timed out"), True),
    (requests.ConnectionError(urllib3.exceptions.ProtocolError("connection aborted")), True),
    (requests.ConnectionError("reset"), True),
])
def test_a_transport_error_says_whether_the_request_may_have_reached_braze(
        client: BrazeClient, mocked: responses.RequestsMock, failure: Exception,
        reached: bool) -> None:
    """Only a connection that was never opened certainly sent nothing (a trigger may be tried
    again); anything later may have reached Braze."""
    mocked.post(CAMPAIGN_URL, body=failure)
    with pytest.raises(TransportError) as info:
        client.trigger("campaign", {"campaign_id": "c", "recipients": []})
    assert info.value.reached is reached


def test_trigger_endpoints_share_one_pacing_state(client: BrazeClient, fake_time: FakeTime,
                                                  mocked: responses.RequestsMock) -> None:
    mocked.post(CAMPAIGN_URL, json={"message": "success"}, status=201,
                headers=rate_headers(250000, 0, NOW + 30))
    client.trigger("campaign", {"campaign_id": "c", "recipients": []})
    # Braze's limit for /campaigns/trigger/send is shared with /canvas/trigger/send.
    assert client.pacing_delay("/canvas/trigger/send") == 30
    assert client.pacing_delay("/users/track") == 0
    assert client.rate_limit_state("/canvas/trigger/send")["remaining"] == 0
    fake_time.now += 31
    assert client.pacing_delay("/campaigns/trigger/send") == 0
