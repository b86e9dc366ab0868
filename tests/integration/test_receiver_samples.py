"""Every shared sample posted to the receiver: answers, stored rows, normalised fields."""

from __future__ import annotations

from typing import Any

from flask import Flask
from sqlalchemy import select

from relay.db import get_db
from relay.models import InboundRequest, OutboxEvent
from tests.support import sample


def rows(app: Flask) -> list[OutboxEvent]:
    with get_db(app).session() as session:
        return list(session.scalars(select(OutboxEvent).order_by(OutboxEvent.id)))


def test_reward_earned_is_stored_normalised(app: Flask, post_webhook: Any) -> None:
    response = post_webhook(sample("reward_earned.json"))
    assert response.status_code == 202
    assert response.get_json() == {"accepted": 1, "duplicates": 0, "rejected": [], "ids": [1]}
    [event] = rows(app)
    assert (event.environment, event.status, event.attempts) == ("production", "pending", 0)
    assert event.extole_event_id == event.dedup_key == "r7k2m9q4x1b8c3d5e6f0"
    assert (event.extole_type, event.braze_event) == ("reward_earned", "Earned Reward")
    assert event.external_id == "cust-1036950000"
    assert event.email == "ann.lee@example.com"
    assert event.event_time.isoformat() == "2026-11-20T14:14:18.548000"
    assert event.attributes == {"email": "ann.lee@example.com"}
    assert event.properties["face_value"] == 50
    assert "message" not in event.properties
    with get_db(app).session() as session:
        [inbound] = session.scalars(select(InboundRequest)).all()
        assert (inbound.status_code, inbound.outcome, inbound.accepted) == (202, "accepted", 1)
        assert inbound.body == sample("reward_earned.json")
        assert inbound.auth_method == "signature"
        assert event.inbound_id == inbound.id
