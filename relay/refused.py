"""Refused webhook requests: what is kept of them, and how many are kept one by one.

Anyone can post to the webhook URL, so whatever a refused request makes the relay store is disk an
attacker can fill without the secret. A refused request therefore keeps no body (its size and,
when it was read whole, its SHA-256), and at most a few KiB of headers; and per client address and
minute only the first RELAY_REFUSED_LOG_RATE get an inbound log row of their own. Every one is
counted in `refused_request_counts`, one row per address and minute, by one atomic upsert that
every process and host shares: a flood from one address costs one row a minute, not one per
request (README, "Refused requests").
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import case
from sqlalchemy.orm import Session

from relay import dialect
from relay.models import InboundRequest, RefusedRequestCount

# Statuses counted in a column of their own; any other refusal counts only in `refused`.
COUNTED_STATUSES = (400, 401, 404, 413, 503)
# Headers kept of a refused request, names and values together (after redaction): a client may
# send a hundred 8 KiB headers, and that must not be the way around the body's absence.
REFUSED_HEADER_BYTES = 2048
UNKNOWN_ADDRESS = "unknown"


def strip(inbound: InboundRequest, body: bytes | None) -> None:
    """What a refused request keeps: no body; its SHA-256 when `body` is all of it; headers
    up to REFUSED_HEADER_BYTES (the rest dropped, and how many said under `...`)."""
    inbound.body = None
    inbound.body_sha256 = hashlib.sha256(body).hexdigest() if body is not None else None
    inbound.headers = _bounded(inbound.headers, REFUSED_HEADER_BYTES)


def _bounded(headers: dict[str, str], budget: int) -> dict[str, str]:
    kept: dict[str, str] = {}
    used = 0
    for name, value in headers.items():
        size = len(json.dumps(name)) + len(json.dumps(value))
        if used + size > budget:
            kept["..."] = f"{len(headers) - len(kept)} more headers not kept"
            break
        kept[name] = value
        used += size
    return kept


def count(session: Session, inbound: InboundRequest, rate: int) -> int:
    """Count one refused request against its address and minute: its number in that minute.
    The first `rate` get an inbound log row of their own (`number <= rate`).

    One INSERT ... ON CONFLICT DO UPDATE ... RETURNING: the row's lock (PostgreSQL) or the
    database's write lock (SQLite) makes concurrent requests, in any process, count one after
    the other, so no more than `rate` are ever logged for one address and minute.
    """
    table = RefusedRequestCount.__table__
    c = table.c
    status = inbound.status_code if inbound.status_code in COUNTED_STATUSES else None
    first: dict[str, Any] = {f"status_{s}": int(s == status) for s in COUNTED_STATUSES}
    first.update(minute=inbound.received_at.replace(second=0, microsecond=0),
                 remote_addr=inbound.remote_addr or UNKNOWN_ADDRESS, refused=1,
                 logged=int(rate >= 1))
    again: dict[str, Any] = {
        "refused": c.refused + 1,
        # `refused` here is the value before this request: it is logged while that is under
        # the rate.
        "logged": c.logged + case((c.refused < rate, 1), else_=0),
    }
    if status is not None:
        again[f"status_{status}"] = c[f"status_{status}"] + 1
    statement = (
        dialect.insert(session, table).values(first)
        .on_conflict_do_update(index_elements=["minute", "remote_addr"], set_=again)
        .returning(c.refused)
    )
    number: int = session.execute(statement).scalar_one()
    return number
