"""Logging: text and JSON lines, and no personal data or secrets in what the relay logs."""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from relay import logs
from relay.db import get_db
from relay.settings import Settings
from tests.support import (
    BRAZE_URL,
    PROD_KEY,
    PROD_SECRET,
    SAMPLES,
    STAGING_KEY,
    STAGING_SECRET,
    sample,
)


@pytest.fixture
def relay_logger() -> Iterator[logging.Logger]:
    """The `relay` logger, restored to text afterwards (configure() is process-wide)."""
    yield logging.getLogger("relay")
    logs.configure("text")


def test_text_lines(relay_logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("text")
    logging.getLogger("relay.outbox").info("event %s (%s): pending -> delivered", 7, "ev-7")
    line = capsys.readouterr().err
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO relay\.outbox: "
                        r"event 7 \(ev-7\): pending -> delivered\n", line), line


def test_text_lines_escape_what_could_forge_or_disguise_a_line(
        relay_logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("text")
    hostile = "ev-8\n2026-11-26 00:00:00,000 INFO relay.outbox: forged\r\x1b[2J\u202egnp.exe\x85"
    logging.getLogger("relay.outbox").info("event %s (%s): pending -> delivered", 8, hostile)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("relay.worker").exception("failed")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith(
        "INFO relay.outbox: event 8 (ev-8\\x0a2026-11-26 00:00:00,000 INFO relay.outbox: forged"
        "\\x0d\\x1b[2J\\u202egnp.exe\\x85): pending -> delivered"), lines[0]
    assert lines[1].endswith("ERROR relay.worker: failed")
    assert lines[2] == "Traceback (most recent call last):"  # tracebacks keep their lines
    assert lines[-1] == "ValueError: boom"


def test_json_lines_carry_extra_fields(relay_logger: logging.Logger,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json")
    log = logging.getLogger("relay.delivery")
    log.info("event %s delivered", 7, extra={"event_id": 7, "extole_event_id": "ev-7",
                                             "status": 201, "when": object()})
    log.warning("second line")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["message"] == "event 7 delivered"
    assert (first["level"], first["logger"]) == ("info", "relay.delivery")
    assert (first["event_id"], first["extole_event_id"], first["status"]) == (7, "ev-7", 201)
    assert first["when"].startswith("<object object")  # not JSON: shown, never a crash
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["time"])
    assert second["level"] == "warning" and "event_id" not in second


def test_json_exceptions_stay_on_one_line(relay_logger: logging.Logger,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("relay.worker").exception("batch failed")
    [line] = capsys.readouterr().err.splitlines()
    entry = json.loads(line)
    assert entry["message"] == "batch failed" and "RuntimeError: boom" in entry["exception"]


def test_configure_is_idempotent_and_switches_format(relay_logger: logging.Logger,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for log_format in ("json", "json", "text", "json"):
        logs.configure(log_format)
    handlers = [h for h in relay_logger.handlers if getattr(h, "relay_handler", False)]
    assert len(handlers) == 1
    relay_logger.info("once")
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_the_app_logs_json_when_asked(settings: Settings, relay_logger: logging.Logger,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    from relay import create_app

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
        app: Flask, client: FlaskClient, post_webhook: Any, settings: Settings,
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
            from relay.worker import Worker

            worker = Worker(settings, get_db(app))
            try:
                worker.drain(max_seconds=10)
            finally:
                worker.close()
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
