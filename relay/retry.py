"""The retry policy: exponential backoff with full jitter, bounded by the age of the failures.

Only failures count (5xx, timeouts, connection errors). Waiting for a rate limit, a refused key
or the export limiter is not a failure: callers shift `first_failure_at` by such waits so they
never eat into RELAY_RETRY_MAX_AGE.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

MIN_DELAY = 0.5


@dataclass(frozen=True)
class RetryDecision:
    """Either retry at `retry_at`, or give up (`retry_at` is None) because of age."""

    retry_at: datetime | None

    @property
    def dead(self) -> bool:
        return self.retry_at is None


@dataclass(frozen=True)
class RetryPolicy:
    base: float = 5.0
    max_delay: float = 3600.0
    max_age: float = 86400.0

    def delay_cap(self, attempts: int) -> float:
        """The upper bound of the n-th delay: base * 2^(n-1), capped at max_delay."""
        exponent = min(max(attempts - 1, 0), 62)
        return min(self.max_delay, self.base * (2.0**exponent))

    def decide(self, attempts: int, first_failure_at: datetime, now: datetime,
               rng: random.Random | None = None) -> RetryDecision:
        """`attempts` counts the failure just recorded (1 after the first failure)."""
        deadline = first_failure_at + timedelta(seconds=self.max_age)
        if now >= deadline:
            return RetryDecision(None)
        cap = self.delay_cap(attempts)
        delay = max(min(MIN_DELAY, cap), (rng or random).uniform(0, cap))
        # The last try happens at the deadline rather than never.
        return RetryDecision(min(now + timedelta(seconds=delay), deadline))
