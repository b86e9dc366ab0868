"""RetryPolicy: exponential caps, full jitter within bounds, death at the age limit, last try."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from relay.retry import MIN_DELAY, RetryPolicy

T0 = datetime(2026, 11, 20, 12, 0, 0)


@pytest.mark.parametrize(("attempts", "cap"), [
    (0, 5.0), (1, 5.0), (2, 10.0), (3, 20.0), (4, 40.0), (10, 2560.0), (11, 3600.0),
    (12, 3600.0), (500, 3600.0),
])
def test_cap_doubles_from_the_base_up_to_the_maximum_delay(attempts: int, cap: float) -> None:
    assert RetryPolicy(base=5.0, max_delay=3600.0).delay_cap(attempts) == cap


def test_delays_are_full_jitter_within_the_cap() -> None:
    policy = RetryPolicy(base=2.0, max_delay=300.0, max_age=10**9)
    rng = random.Random(1234)
    for attempts in range(1, 15):
        cap = policy.delay_cap(attempts)
        delays = []
        for _ in range(300):
            decision = policy.decide(attempts, T0, T0, rng)
            assert not decision.dead and decision.retry_at is not None
            delay = (decision.retry_at - T0).total_seconds()
            assert min(MIN_DELAY, cap) - 1e-6 <= delay <= cap + 1e-6
            delays.append(delay)
        # Full jitter: the whole range is used, not just the top of it.
        assert min(delays) < 0.25 * cap + MIN_DELAY
        assert max(delays) > 0.75 * cap


def test_the_same_seed_gives_the_same_delays() -> None:
    policy = RetryPolicy(base=5.0, max_delay=3600.0, max_age=86400)
    first = [policy.decide(n, T0, T0, random.Random(7)).retry_at for n in range(1, 12)]
    second = [policy.decide(n, T0, T0, random.Random(7)).retry_at for n in range(1, 12)]
    assert first == second
    expected_rng = random.Random(99)
    rng = random.Random(99)
    for attempts in range(1, 12):
        cap = policy.delay_cap(attempts)
        expected = max(min(MIN_DELAY, cap), expected_rng.uniform(0, cap))
        assert policy.decide(attempts, T0, T0, rng).retry_at == T0 + timedelta(seconds=expected)


def test_a_base_below_the_minimum_delay_waits_exactly_the_cap() -> None:
    policy = RetryPolicy(base=0.05, max_delay=0.05, max_age=60)
    rng = random.Random(3)
    for _ in range(50):
        decision = policy.decide(1, T0, T0, rng)
        assert decision.retry_at == T0 + timedelta(seconds=0.05)


def test_failures_spanning_the_max_age_are_dead() -> None:
    policy = RetryPolicy(base=5.0, max_delay=3600.0, max_age=3600)
    deadline = T0 + timedelta(seconds=3600)
    assert policy.decide(7, T0, deadline, random.Random(1)).dead
    assert policy.decide(7, T0, deadline + timedelta(days=3), random.Random(1)).dead
    just_before = deadline - timedelta(microseconds=1)
    decision = policy.decide(7, T0, just_before, random.Random(1))
    assert not decision.dead
    assert decision.retry_at == deadline


def test_the_last_try_happens_at_the_deadline_rather_than_never() -> None:
    policy = RetryPolicy(base=5.0, max_delay=3600.0, max_age=600)
    rng = random.Random(5)
    now, first, attempts = T0, T0, 0
    tries = []
    while True:
        attempts += 1
        decision = policy.decide(attempts, first, now, rng)
        if decision.dead:
            break
        assert decision.retry_at is not None
        assert now < decision.retry_at <= first + timedelta(seconds=600)
        now = decision.retry_at
        tries.append(now)
    assert tries[-1] == first + timedelta(seconds=600)
    assert now == first + timedelta(seconds=600)
    assert attempts == len(tries) + 1


def test_the_first_failure_is_never_dead_with_a_positive_max_age() -> None:
    policy = RetryPolicy(base=5.0, max_delay=3600.0, max_age=1)
    decision = policy.decide(1, T0, T0, random.Random(0))
    assert not decision.dead
    assert decision.retry_at is not None
    assert T0 < decision.retry_at <= T0 + timedelta(seconds=1)
