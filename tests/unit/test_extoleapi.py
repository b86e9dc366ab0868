"""The Extole API client against the sandbox's imitation of GET /v2/rewards (served on a local
port) and, for answers the sandbox never gives, against recorded answers: paging, the exact
request, retries, and every refusal turned into a clear error."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import responses

from relay.exceptions import (
    ExtoleBadAnswer,
    ExtoleBadRequest,
    ExtoleError,
    ExtoleTokenRefused,
    ExtoleUnavailable,
)
from relay.extoleapi import ExtoleClient, interval
from relay.sandbox import SandboxConfig, create_sandbox_app
from tests.support import free_port, serving

TOKEN = "extole-token-production-1234"
NOW = datetime(2026, 12, 3, 12, 0, 0)
START = NOW - timedelta(days=2)


def reward(number: int, state: str = "EARNED", **fields: Any) -> dict[str, Any]:
    created = START + timedelta(minutes=number)
    return {"reward_id": f"r{number:05d}", "state": state,
            "created_at": created.isoformat() + "Z", "person_id": f"p{number}",
            "partner_user_id": f"cust-{number}", "face_value": 10, "face_value_type": "USD",
            **fields}


@pytest.fixture
def sandbox() -> Iterator[tuple[str, Any]]:
    app = create_sandbox_app(SandboxConfig(extole_tokens=[f"production={TOKEN}"]))
    with serving(app) as url:
        yield url, app.extensions["relay_sandbox"]


def client(url: str, token: str = TOKEN, sleeps: list[float] | None = None,
           **options: Any) -> ExtoleClient:
    slept = sleeps if sleeps is not None else []
    return ExtoleClient(url, token, environment="production", sleep=slept.append, **options)


def post_rewards(url: str, rewards: list[dict[str, Any]]) -> None:
    answer = requests.post(f"{url}/sandbox/extole/rewards", json=rewards, timeout=30)
    assert answer.status_code == 200, answer.text


def extole_requests(state: Any) -> list[dict[str, Any]]:
    return [r for r in state.requests if r["path"] == "/v2/rewards"]


def test_interval_is_the_explicit_start_end_form_covering_the_window() -> None:
    assert interval(datetime(2026, 12, 1, 0, 0, 0, 500), datetime(2026, 12, 3, 0, 0, 0, 1)) == \
        "2026-12-01T00:00:00Z/2026-12-03T00:00:01Z"
    aware = datetime(2026, 12, 1, 1, 0, tzinfo=UTC).astimezone()
    assert interval(aware, datetime(2026, 12, 2)) == "2026-12-01T01:00:00Z/2026-12-02T00:00:00Z"


def test_pages_of_1000_follow_the_offset_until_a_short_page(
        sandbox: tuple[str, Any]) -> None:
    url, state = sandbox
    post_rewards(url, [reward(n) for n in range(2345)])
    pages = list(client(url).reward_pages(START, NOW))
    assert [(offset, len(page)) for offset, page in pages] == [(0, 1000), (1000, 1000),
                                                                (2000, 345)]
    ids = [r["reward_id"] for _, page in pages for r in page]
    assert ids == [f"r{n:05d}" for n in range(2345)]
    sent = extole_requests(state)
    assert [r["body"] for r in sent] == [
        {"time_interval": "2026-12-01T12:00:00Z/2026-12-03T12:00:00Z", "success_only": "false",
         "limit": "1000", "offset": str(offset)} for offset in (0, 1000, 2000)]


def test_a_full_last_page_is_followed_by_an_empty_one(sandbox: tuple[str, Any]) -> None:
    url, _ = sandbox
    post_rewards(url, [reward(n) for n in range(4)])
    pages = list(client(url).reward_pages(START, NOW, limit=2))
    assert [(offset, len(page)) for offset, page in pages] == [(0, 2), (2, 2), (4, 0)]


def test_failed_rewards_are_listed_too(sandbox: tuple[str, Any]) -> None:
    """Extole leaves failed rewards out unless success_only=false, which the client sends."""
    url, _ = sandbox
    post_rewards(url, [reward(1, "FAILED"), reward(2, "FULFILLED")])
    assert [r["state"] for r in client(url).rewards(START, NOW)] == ["FAILED", "FULFILLED"]
    default = requests.get(f"{url}/v2/rewards", headers={"Authorization": f"Bearer {TOKEN}"},
                           timeout=10)
    assert [r["state"] for r in default.json()] == ["FULFILLED"]


def test_a_refused_token_is_a_clear_error_without_the_token(sandbox: tuple[str, Any]) -> None:
    url, _ = sandbox
    sleeps: list[float] = []
    with pytest.raises(ExtoleTokenRefused) as refused:
        client(url, token="wrong-token-5678", sleeps=sleeps).rewards(START, NOW)
    message = str(refused.value)
    assert message.startswith("Extole refused the production API token (401: "
                              "method_unauthorized: The access token is missing, invalid or "
                              "expired (unique_id ")
    assert message.endswith("): check EXTOLE_API_TOKEN (it needs the scope to read rewards)")
    assert "wrong-token" not in message
    assert refused.value.status == 401 and refused.value.code == "method_unauthorized"
    assert sleeps == []  # never retried


def test_403_is_a_refused_token_too(sandbox: tuple[str, Any]) -> None:
    url, state = sandbox
    state.faults["extole_fail_statuses"] = [403]
    with pytest.raises(ExtoleTokenRefused, match=r"\(403: access_denied: sandbox fault"):
        client(url).rewards(START, NOW)


def test_429_and_503_are_retried_with_backoff_then_succeed(sandbox: tuple[str, Any]) -> None:
    url, state = sandbox
    post_rewards(url, [reward(1)])
    state.faults["extole_fail_statuses"] = [429, 503, 502]
    sleeps: list[float] = []
    page = client(url, sleeps=sleeps).rewards(START, NOW)
    assert [r["reward_id"] for r in page] == ["r00001"]
    # Retry-After (1 s) for the 429, then the backoff's 2 and 4 s.
    assert sleeps == [1.0, 2.0, 4.0]
    assert [r["status"] for r in extole_requests(state)] == [429, 503, 502, 200]


def test_an_outage_longer_than_the_attempts_is_unavailable(sandbox: tuple[str, Any]) -> None:
    url, state = sandbox
    state.faults["extole_fail_statuses"] = [503] * 3
    sleeps: list[float] = []
    with pytest.raises(ExtoleUnavailable) as unavailable:
        client(url, sleeps=sleeps, attempts=3).rewards(START, NOW)
    assert str(unavailable.value).startswith(
        "Extole GET /v2/rewards failed 3 times, last: 503: server_error: sandbox fault: "
        "HTTP 503 (unique_id ")
    assert sleeps == [1.0, 2.0]


def test_a_closed_port_is_unavailable_after_retries() -> None:
    sleeps: list[float] = []
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ExtoleUnavailable,
                       match=f"failed 2 times, last: connection to {url} refused"):
        client(url, sleeps=sleeps, attempts=2).rewards(START, NOW)
    assert sleeps == [1.0]


@pytest.mark.parametrize(("malformed", "problem"), [
    ("not_json", "Extole's answer to GET /v2/rewards is not JSON: '<html><body>Service "
                 "Temporarily Unavailable</body></html>'"),
    ("not_list", "Extole's answer to GET /v2/rewards is not a list of rewards but an object"),
])
def test_an_answer_that_is_not_a_list_of_rewards_is_reported(
        sandbox: tuple[str, Any], malformed: str, problem: str) -> None:
    url, state = sandbox
    state.faults["extole_malformed"] = malformed
    with pytest.raises(ExtoleBadAnswer) as bad:
        client(url).rewards(START, NOW)
    assert str(bad.value) == problem


def test_a_400_names_the_parameter() -> None:
    with responses.RequestsMock() as extole:
        extole.get("https://api.extole.io/v2/rewards", status=400, json={
            "code": "time_interval_invalid", "message": "Invalid time interval",
            "http_status_code": 400, "parameters": {"time_interval": "x/y"},
            "unique_id": "abc123"})
        with pytest.raises(ExtoleBadRequest) as bad:
            client("https://api.extole.io").rewards(START, NOW)
    assert str(bad.value) == (
        'Extole refused the request GET /v2/rewards (400: time_interval_invalid: Invalid time '
        'interval (parameters {"time_interval": "x/y"}, unique_id abc123))')
    assert bad.value.code == "time_interval_invalid"


def test_a_wrong_api_url_says_so() -> None:
    with responses.RequestsMock() as extole:
        extole.get("https://example.test/v2/rewards", status=404, body="Not Found")
        with pytest.raises(ExtoleError) as wrong:
            client("https://example.test").rewards(START, NOW)
    assert str(wrong.value) == ("404 from Extole at https://example.test/v2/rewards: Not Found: "
                                "is EXTOLE_API_URL Extole's API?")


def test_the_token_is_sent_as_bearer_and_scrubbed_from_echoed_errors() -> None:
    with responses.RequestsMock() as extole:
        extole.get("https://api.extole.io/v2/rewards", status=400,
                   json={"code": "bad", "message": f"token {TOKEN} is odd"})
        with pytest.raises(ExtoleBadRequest) as bad:
            client("https://api.extole.io").rewards(START, NOW)
        assert extole.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in str(bad.value) and "token [redacted] is odd" in str(bad.value)


def test_limit_above_1000_is_refused_before_asking() -> None:
    with pytest.raises(ValueError, match="limit must be between 1 and 1000, got 1001"):
        client("https://api.extole.io").rewards(START, NOW, limit=1001)
