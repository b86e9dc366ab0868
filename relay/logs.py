"""Logging: plain text, or one JSON object per line with RELAY_LOG_FORMAT=json.

Log lines name events by outbox id and Extole event id only: no personal data, no secrets.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

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


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at the time of the record, not at configuration:
    test runners and command runners swap it, and a closed stream must never be written to."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
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
        handler.relay_handler = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    logger.setLevel(level)
    logger.propagate = True
