"""An event's de-duplication keys (README, "Duplicates"): its event-id key first; reward keys."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from relay.eventmap import EventMap
from relay.extole import normalise
from relay.outbox.dedup import MAX_KEY_LENGTH, keys_of, lock_names, reward_key

RECEIVED = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def test_an_event_is_keyed_by_its_event_id_or_its_content() -> None:
    events = EventMap.load()
    assert keys_of(normalise({"type": "shared", "event_id": " e-1 "}, events, RECEIVED)) == (
        "e-1",)
    hashed = normalise({"type": "shared", "email": "a@example.com"}, events, RECEIVED)
    assert keys_of(hashed) == (hashed.dedup_key,)
    assert hashed.dedup_key.startswith("sha256:")


def test_reward_key_names_the_reward_and_its_state_in_upper_case() -> None:
    assert reward_key("a41f0c9e2b7d4e11a3c6f508", "fulfilled") == (
        "reward:a41f0c9e2b7d4e11a3c6f508:FULFILLED")
    assert reward_key(" r-1 ", " Failed_Fulfillment ") == "reward:r-1:FAILED_FULFILLMENT"


def test_a_reward_id_too_long_for_the_column_is_hashed() -> None:
    long_id = "r" * 300
    key = reward_key(long_id, "EARNED")
    assert len(key) <= MAX_KEY_LENGTH
    assert key == f"reward:sha256:{hashlib.sha256(long_id.encode()).hexdigest()}:EARNED"
    assert reward_key("r" * 301, "EARNED") != key


def test_lock_names_are_per_environment() -> None:
    assert lock_names("production", ["a", "b"]) == ["production a", "production b"]
    assert lock_names("staging", ["a"]) != lock_names("production", ["a"])


def test_a_reward_event_is_also_keyed_by_its_reward_state() -> None:
    """README, "Reward events": a reward event is a duplicate when its event id was seen or the
    environment holds the same reward in the same state."""
    events = EventMap.load()
    fulfilled = normalise({"type": "fulfilled", "event_id": "e-1", "reward_id": "r-1"},
                          events, RECEIVED)
    assert keys_of(fulfilled) == ("e-1", "reward:r-1:FULFILLED")
    legacy = normalise({"type": "reward_earned", "event_id": "e-2", "reward_id": "r-1"},
                       events, RECEIVED)
    assert keys_of(legacy) == ("e-2", "reward:r-1:EARNED")
    # A state without a reward id, or a reward id on another type, is no reward event.
    assert keys_of(normalise({"type": "FULFILLED", "event_id": "e-3"}, events, RECEIVED)) == (
        "e-3",)
    assert keys_of(normalise({"type": "shared", "event_id": "e-4", "reward_id": "r-1"},
                             events, RECEIVED)) == ("e-4",)
