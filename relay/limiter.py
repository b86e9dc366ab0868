"""A rate limiter kept in the database, so every worker process shares one budget.

Braze allows 250 `/users/export/ids` calls per minute for newer workspaces; several workers on
one database must stay under that together. The bucket holds at most one token and refills at
(calls - 1) / period, so no window of `period` seconds ever sees more than `calls` calls.
"""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from relay import dialect
from relay.models import RateLimiter
from relay.settings import Rate


def refill_rate(rate: Rate) -> float:
    return max(rate.calls - 1, 1) / rate.period


def take_token(session: Session, name: str, rate: Rate, now: float | None = None) -> float:
    """Take one call from the bucket: 0.0 when granted, else the seconds to wait for one."""
    now = time.time() if now is None else now
    per_second = refill_rate(rate)
    # Locked before it is read, so two processes cannot both read a full bucket.
    dialect.take_write_lock(session, RateLimiter, RateLimiter.name == name)
    bucket = session.scalar(dialect.for_update(select(RateLimiter).where(RateLimiter.name == name),
                                               session))
    if bucket is None:
        session.add(RateLimiter(name=name, tokens=0.0, updated=now))
        session.flush()
        return 0.0
    tokens = min(1.0, bucket.tokens + max(0.0, now - bucket.updated) * per_second)
    if tokens >= 1.0:
        bucket.tokens, bucket.updated = tokens - 1.0, now
        return 0.0
    bucket.tokens, bucket.updated = tokens, now
    return (1.0 - tokens) / per_second
