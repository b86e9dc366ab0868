"""Logging: plain text, or one JSON object per line with RELAY_LOG_FORMAT=json.

Log lines name events by outbox id and Extole event id only: no personal data, no secrets.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# C0 and C1 controls (newlines included) and the bidirectional overrides and isolates: text that
# came from a webhook (an Extole event id) could otherwise forge a log line or disguise one.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class TextFormatter(logging.Formatter):
    """One line per record, whatever its arguments contain; a traceback still follows it."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return _UNSAFE.sub(_escape, super().formatMessage(record))


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever `sys.stderr` is at the time of the record, not at configuration:
    test runners and command runners swap it, and a closed stream must never be written to."""

    relay_handler = True  # how `configure` finds the one it installed

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """Install one handler on the `relay` logger (idempotent: the factory may run many times)."""
    logger = logging.getLogger("relay")
    handler = next((h for h in logger.handlers if getattr(h, "relay_handler", False)), None)
    if handler is None:
        handler = StderrHandler()
        logger.addHandler(handler)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.setLevel(level)
    logger.propagate = True
