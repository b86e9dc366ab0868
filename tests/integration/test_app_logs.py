"""What the running relay logs (receiver, admin, delivery), on SQLite and PostgreSQL: JSON lines
when asked, and never personal data or a secret. The formatters alone are tests/unit/test_logs.py.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from relay import create_app, logs
from relay.db import get_db
from relay.settings import Settings
from relay.worker import Worker
from tests.support import (
    BRAZE_URL,
    PROD_KEY,
    PROD_SECRET,
    SAMPLES,
    STAGING_KEY,
    STAGING_SECRET,
    sample,
)


def test_the_app_logs_json_when_asked(settings: Settings, relay_logger: logging.Logger,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    app = create_app(replace(settings, log_format="json"), TESTING=True)
    try:
        app.test_client().post("/webhooks/extole/production", data=b"{}",
                               headers={"Authorization": "Bearer wrong"})
    finally:
        get_db(app).dispose()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert any(entry["logger"] == "relay.receiver" and "401" in entry["message"]
               for entry in lines)


# --- nothing personal, nothing secret --------------------------------------------------------

SECRETS = (PROD_SECRET, STAGING_SECRET, PROD_KEY, STAGING_KEY, "admin-password",
           "test-secret-key")


def personal_values() -> set[str]:
    """Every email, external id, name and phone number in the sample bodies."""
    found: set[str] = set()
    pattern = re.compile(r'"(?:[a-z_]*email[a-z_]*|partner_user_id|[a-z_]*external_id|'
                         r'first_name|last_name|phone_number)"\s*:\s*"([^"]+)"', re.IGNORECASE)
    for path in SAMPLES.glob("*.json"):
        found |= {value.strip().lower() for value in pattern.findall(path.read_text())}
    return found


def test_logs_of_receiver_admin_and_delivery_hold_no_personal_data_or_secret(
        app: Flask, client: FlaskClient, post_webhook: Any, make_worker: Callable[..., Worker],
        caplog: pytest.LogCaptureFixture) -> None:
    people = personal_values()
    assert {"ann.lee@example.com", "cust-1036950000", "flo.ng@example.com", "lee"} <= people
    admin = {"Authorization": "Basic " + base64.b64encode(b"admin:admin-password").decode()}
    with caplog.at_level(logging.INFO, logger="relay"):
        for path in sorted(SAMPLES.glob("*.json")):
            post_webhook(path.read_bytes(), "staging" if "staging" in path.name else "production")
        post_webhook(sample("reward_earned.json"), secret="wrong-secret")
        client.post("/webhooks/extole/staging", data=sample("subscribed.json"),
                    headers={"Content-Type": "application/json",
                             "Authorization": f"Bearer {STAGING_SECRET}"})
        client.post("/webhooks/extole/production", data=sample("subscribed.json"),
                    headers={"Content-Type": "text/plain",
                             "Authorization": f"Bearer {PROD_SECRET}"})
        client.post("/webhooks/extole/production", data=b'{"email": "ann.lee@example.com"',
                    headers={"Content-Type": "application/json",
                             "Authorization": f"Bearer {PROD_SECRET}"})
        with responses.RequestsMock(assert_all_requests_are_fired=False) as braze:
            braze.post(f"{BRAZE_URL}/users/track", status=201, json={"message": "success"})
            braze.post(f"{BRAZE_URL}/users/export/ids", status=201,
                       json={"users": [{"external_id": "cust-2200431"}], "message": "success"})
            make_worker().drain(max_seconds=10)
        for path in ("/admin/api/events?q=ann.lee@example.com", "/admin/api/events/1",
                     "/admin/api/stats", "/admin/api/events?status=dead"):
            assert client.get(path, headers=admin).status_code == 200
        client.post("/admin/api/events/1/retry", json={}, headers=admin)
        client.post("/admin/api/events/1/replay", json={}, headers=admin)
        client.post("/admin/api/replay", json={"status": "delivered", "q": "ann.lee@example.com"},
                    headers=admin)
        client.get("/admin/api/events", headers={"Authorization": "Basic " + base64.b64encode(
            b"admin:not-the-password").decode()})
    records = [r for r in caplog.records if r.name.startswith("relay")]
    assert len(records) > 20
    lines = []
    for formatter in (logs.JsonFormatter(), logging.Formatter("%(message)s")):
        lines += [formatter.format(record) for record in records]
    text = "\n".join(lines).lower()
    leaked = sorted(value for value in people | {s.lower() for s in SECRETS}
                    if re.search(rf"(?<![\w.@-]){re.escape(value)}(?![\w@-])", text))
    assert leaked == [], [line for line in lines if any(v in line.lower() for v in leaked)][:5]
