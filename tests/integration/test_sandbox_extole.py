"""The sandbox's imitation of Extole's GET /v2/rewards is as strict as Extole: the token, the
parameters (`time_interval`, `success_only`, `limit` up to 1000, `offset`) and Extole's error
bodies, over the rewards posted to POST /sandbox/extole/rewards."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from relay.sandbox import SandboxConfig, create_sandbox_app
from tests.support import sample_json

TOKEN = "prod-extole-token"
STAGING_TOKEN = "staging-extole-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def extole() -> FlaskClient:
    app = create_sandbox_app(SandboxConfig(
        extole_tokens=[f"production={TOKEN}", f"staging={STAGING_TOKEN}"]))
    return app.test_client()


def post(extole: FlaskClient, rewards: Any, program: str = "production") -> Any:
    return extole.post(f"/sandbox/extole/rewards?program={program}", json=rewards)


def error_body(answer: Any) -> dict[str, Any]:
    body = dict(answer.json)
    assert isinstance(body.pop("unique_id"), str)
    return body


def test_the_sample_page_is_served_to_its_programs_token(extole: FlaskClient) -> None:
    page = sample_json("extole_rewards_page.json")
    assert post(extole, page).json == {"stored": 2, "rewards": 2}
    answer = extole.get("/v2/rewards?time_interval=2026-11-01T00:00:00Z/2026-12-01T00:00:00Z",
                        headers=AUTH)
    assert answer.status_code == 200
    assert answer.json == page
    staging = extole.get("/v2/rewards", headers={"Authorization": f"Bearer {STAGING_TOKEN}"})
    assert staging.json == []


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_a_missing_or_unknown_token_gets_extoles_401(extole: FlaskClient,
                                                     headers: dict[str, str]) -> None:
    answer = extole.get("/v2/rewards", headers=headers)
    assert answer.status_code == 401
    assert error_body(answer) == {"code": "method_unauthorized",
                                  "message": "The access token is missing, invalid or expired",
                                  "http_status_code": 401, "parameters": {}}


@pytest.mark.parametrize(("query", "status", "code", "parameters"), [
    ("time_interval=yesterday", 400, "time_interval_invalid", {"time_interval": "yesterday"}),
    ("time_interval=2026-12-01T00:00:00/2026-12-02T00:00:00Z", 400, "time_interval_invalid",
     {"time_interval": "2026-12-01T00:00:00/2026-12-02T00:00:00Z"}),
    ("time_interval=2026-12-02T00:00:00Z/2026-12-01T00:00:00Z", 400, "time_interval_invalid",
     {"time_interval": "2026-12-02T00:00:00Z/2026-12-01T00:00:00Z"}),
    ("limit=1001", 400, "max_fetch_size_1000", {"limit": "1001"}),
    ("limit=0", 400, "invalid_limit", {"limit": "0"}),
    ("limit=ten", 400, "invalid_limit", {"limit": "ten"}),
    ("offset=-1", 400, "invalid_offset", {"offset": "-1"}),
    ("success_only=maybe", 400, "invalid_success_only", {"success_only": "maybe"}),
])
def test_parameters_extole_refuses(extole: FlaskClient, query: str, status: int, code: str,
                                   parameters: dict[str, str]) -> None:
    answer = extole.get(f"/v2/rewards?{query}", headers=AUTH)
    assert answer.status_code == status
    body = error_body(answer)
    assert body["code"] == code and body["parameters"] == parameters
    assert body["http_status_code"] == status


def test_window_paging_and_success_only(extole: FlaskClient) -> None:
    rewards = [{"reward_id": f"r{n}", "state": "FAILED" if n == 2 else "earned",
                "created_at": f"2026-12-01T0{n}:00:00Z"} for n in range(5)]
    post(extole, rewards)
    window = "time_interval=2026-12-01T01:00:00Z/2026-12-01T04:00:00Z"
    every = extole.get(f"/v2/rewards?{window}&success_only=false", headers=AUTH).json
    assert [r["reward_id"] for r in every] == ["r1", "r2", "r3"]  # the end is exclusive
    assert every[0]["state"] == "EARNED"
    assert [r["reward_id"] for r in extole.get(f"/v2/rewards?{window}", headers=AUTH).json] == [
        "r1", "r3"]
    paged = extole.get(f"/v2/rewards?{window}&success_only=false&limit=2&offset=2",
                       headers=AUTH).json
    assert [r["reward_id"] for r in paged] == ["r3"]
    duration = extole.get("/v2/rewards?time_interval=P3650D&limit=1000", headers=AUTH).json
    assert [r["reward_id"] for r in duration] == ["r0", "r1", "r3", "r4"]


def test_a_reward_posted_again_changes_its_state(extole: FlaskClient) -> None:
    reward = {"reward_id": "r1", "state": "EARNED", "created_at": "2026-12-01T00:00:00Z"}
    post(extole, reward)
    assert post(extole, {**reward, "state": "FULFILLED"}).json == {"stored": 1, "rewards": 1}
    assert [r["state"] for r in extole.get("/v2/rewards", headers=AUTH).json] == ["FULFILLED"]
    assert extole.get("/sandbox/extole/rewards").json == {
        "programs": {"production": [{**reward, "state": "FULFILLED"}]}}


@pytest.mark.parametrize(("reward", "message"), [
    ("text", "reward 0 must be a JSON object"),
    ({"state": "EARNED", "created_at": "2026-12-01T00:00:00Z"},
     "reward 0: reward_id must be a non-empty string"),
    ({"reward_id": "r", "state": "PENDING", "created_at": "2026-12-01T00:00:00Z"},
     "reward 0: state must be one of EARNED, FULFILLED, SENT, REDEEMED, FAILED, "
     "FAILED_FULFILLMENT, CANCELED, REVOKED, EXPIRED"),
    ({"reward_id": "r", "state": "EARNED", "created_at": "2026-12-01T00:00:00"},
     "reward 0: created_at '2026-12-01T00:00:00' has no offset (add Z or +00:00)"),
])
def test_posted_rewards_are_checked(extole: FlaskClient, reward: Any, message: str) -> None:
    answer = post(extole, [reward])
    assert answer.status_code == 400
    assert answer.json == {"message": message}


def test_faults_for_extole_are_checked_and_consumed(extole: FlaskClient) -> None:
    refused = extole.post("/sandbox/faults", json={"extole_fail_statuses": [200]})
    assert refused.status_code == 400
    assert refused.json == {"message": "extole_fail_statuses must be an array of HTTP statuses "
                                       "from 400 to 599"}
    assert extole.post("/sandbox/faults", json={"extole_fail_statuses": [429],
                                                "extole_drop_fields": ["state"]}).status_code \
        == 200
    post(extole, {"reward_id": "r", "state": "EARNED", "created_at": "2026-12-01T00:00:00Z"})
    limited = extole.get("/v2/rewards", headers=AUTH)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    assert error_body(limited)["code"] == "too_many_requests"
    assert extole.get("/v2/rewards", headers=AUTH).json == [
        {"reward_id": "r", "created_at": "2026-12-01T00:00:00Z"}]
