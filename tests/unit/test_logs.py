"""Logging: text and JSON lines, and no personal data or secrets in what the relay logs."""

from __future__ import annotations

import json
import logging
import re

import pytest

from relay import logs


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
