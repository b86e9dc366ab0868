"""`relay check-config`'s Braze probe, answer by answer: one line each, never the key.

The probe goes through `BrazeClient.check_key`, the client delivery uses (README, "Operations").
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
import responses

from relay.checks import probe_braze
from tests.support import BRAZE_URL, PROD_KEY

EXPORT = f"{BRAZE_URL}/users/export/ids"


@pytest.mark.parametrize(("answer", "problem"), [
    ({"status": 201, "json": {"users": [], "message": "success"}}, None),
    ({"status": 200, "body": "<html>not JSON</html>"}, None),
    ({"status": 429, "json": {"message": "Rate limit exceeded"},
      "headers": {"X-RateLimit-Reset": "1"}}, None),
    ({"status": 401, "json": {"message": "Invalid API key"}}, "401 key refused"),
    ({"status": 403, "json": {"errors": ["no permission"]}},
     "403 key lacks permission for /users/export/ids (it needs users.track and "
     "users.export.ids): ['no permission']"),
    ({"status": 404, "body": "Not Found"},
     f"404 at {BRAZE_URL}/users/export/ids: is this your instance's REST endpoint?"),
    ({"status": 302, "body": "", "headers": {"Location": "https://elsewhere.example"}},
     "302 from Braze"),
    ({"status": 503, "json": {"message": "  Service\n Unavailable "}},
     "503 from Braze: Service Unavailable"),
    ({"body": requests.exceptions.ConnectTimeout("timed out")},
     f"no answer from {BRAZE_URL} within 13 s"),
    ({"body": requests.exceptions.SSLError("certificate verify failed")},
     f"TLS handshake with {BRAZE_URL} failed"),
    ({"body": requests.exceptions.ConnectionError("Failed to resolve 'rest.iad-01.braze.com'")},
     f"cannot resolve the host of {BRAZE_URL}"),
    ({"body": requests.exceptions.ConnectionError("[Errno 111] Connection refused")},
     "connection refused"),
    ({"body": requests.exceptions.ConnectionError("reset by peer")},
     f"cannot connect to {BRAZE_URL}"),
    ({"body": requests.exceptions.InvalidHeader("bad header")},
     f"request to {BRAZE_URL} failed: InvalidHeader"),
])
def test_each_answer_is_one_line(answer: dict[str, Any], problem: str | None) -> None:
    with responses.RequestsMock() as braze:
        braze.post(EXPORT, **answer)
        assert probe_braze(BRAZE_URL, PROD_KEY) == problem
        [call] = braze.calls
    assert call.request.headers["Authorization"] == f"Bearer {PROD_KEY}"
    assert json.loads(call.request.body or b"") == {"external_ids": ["relay-check-config"],
                                                    "fields_to_export": ["external_id"]}


def test_an_echoed_key_never_reaches_the_line() -> None:
    with responses.RequestsMock() as braze:
        braze.post(EXPORT, status=500, json={"message": f"bad key {PROD_KEY} for this app"})
        problem = probe_braze(BRAZE_URL, PROD_KEY)
    assert problem == "500 from Braze: bad key [redacted] for this app"


def test_the_probe_prints_its_line_and_logs_no_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="relay")
    with responses.RequestsMock() as braze:
        braze.post(EXPORT, status=401, json={"message": "Invalid API key"})
        assert probe_braze(BRAZE_URL, PROD_KEY) == "401 key refused"
    assert [r for r in caplog.records if r.name == "relay.braze"] == []
