"""build_track_request and chunk: objects counted as Braze counts them, attributes merged."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import pytest

from relay.delivery import Planned, build_track_request, chunk, objects_needed
from relay.models import OutboxEvent

T0 = datetime(2026, 11, 20, 14, 0, 0)
ALIAS = {"alias_name": "zoe@example.com", "alias_label": "email"}


def event(event_id: int, *, seconds: float = 0, external_id: str | None = None,
          email: str | None = None, attributes: dict[str, Any] | None = None,
          name: str = "Shared") -> OutboxEvent:
    return OutboxEvent(
        id=event_id, environment="production", braze_event=name, external_id=external_id,
        email=email, person_key=f"id:{external_id}" if external_id else f"email:{email}",
        event_time=T0 + timedelta(seconds=seconds), attributes=attributes or {},
        properties={"extole_event_id": f"e{event_id}"}, status="pending", attempts=0)


def planned(event_id: int, **kwargs: Any) -> Planned:
    item = event(event_id, **kwargs)
    return Planned(item, {"external_id": item.external_id})


def objects(body: dict[str, Any]) -> int:
    return sum(len(body.get(array, [])) for array in ("attributes", "events", "purchases"))


def test_one_event_with_attributes_is_two_objects() -> None:
    item = planned(1, external_id="c1", attributes={"email": "a@example.com", "first_name": "A"})
    request = build_track_request([item])
    assert request.body == {
        "attributes": [{"external_id": "c1", "email": "a@example.com", "first_name": "A"}],
        "events": [{"external_id": "c1", "name": "Shared", "time": "2026-11-20T14:00:00.000Z",
                    "properties": {"extole_event_id": "e1"}}],
    }
    assert request.attribute_sources == [[item]]
    assert request.event_sources == [item]
    assert objects_needed(item, set(), False) == 2


def test_an_event_without_attributes_sends_no_attributes_array() -> None:
    item = planned(1, external_id="c1")
    request = build_track_request([item])
    assert request.body == {"events": [{"external_id": "c1", "name": "Shared",
                                        "time": "2026-11-20T14:00:00.000Z",
                                        "properties": {"extole_event_id": "e1"}}]}
    assert request.attribute_sources == []
    assert objects_needed(item, set(), False) == 1


def test_attributes_of_one_person_are_merged_and_the_later_event_wins() -> None:
    later = planned(1, seconds=60, external_id="c1",
                    attributes={"email": "new@example.com", "email_subscribe": "unsubscribed"})
    earlier = planned(2, seconds=0, external_id="c1",
                      attributes={"email": "old@example.com", "first_name": "Ann",
                                  "email_subscribe": "opted_in"})
    other = planned(3, seconds=30, external_id="c2", attributes={"last_name": "Lee"})
    request = build_track_request([later, other, earlier])
    assert request.body["attributes"] == [
        {"external_id": "c1", "email": "new@example.com", "first_name": "Ann",
         "email_subscribe": "unsubscribed"},
        {"external_id": "c2", "last_name": "Lee"},
    ]
    # Events in time order; each attributes object knows every event that contributed to it.
    assert [e["properties"]["extole_event_id"] for e in request.body["events"]] == [
        "e2", "e3", "e1"]
    assert request.event_sources == [earlier, other, later]
    assert request.attribute_sources == [[earlier, later], [other]]


def test_alias_objects_create_the_profile_and_address_the_event() -> None:
    item = Planned(event(1, email="zoe@example.com", attributes={"email": "zoe@example.com"}),
                   {"user_alias": ALIAS}, create_alias=True)
    request = build_track_request([item])
    assert request.body == {
        "attributes": [{"user_alias": ALIAS, "_update_existing_only": False,
                        "email": "zoe@example.com"}],
        "events": [{"user_alias": ALIAS, "name": "Shared", "time": "2026-11-20T14:00:00.000Z",
                    "properties": {"extole_event_id": "e1"}}],
    }
    assert objects_needed(item, set(), False) == 2


def test_an_alias_is_created_even_when_every_attribute_is_stale() -> None:
    item = Planned(event(1, email="zoe@example.com",
                         attributes={"email": "zoe@example.com", "first_name": "Zoe"}),
                   {"user_alias": ALIAS}, create_alias=True,
                   stale=frozenset({"email", "first_name"}))
    request = build_track_request([item])
    assert request.body["attributes"] == [
        {"user_alias": ALIAS, "_update_existing_only": False, "email": "zoe@example.com"}]
    assert objects_needed(item, set(), False) == 2


def test_email_identity_drops_the_email_attribute() -> None:
    only_email = Planned(event(1, email="a@example.com", attributes={"email": "a@example.com"}),
                         {"email": "a@example.com"})
    request = build_track_request([only_email], email_identifier=True)
    assert request.body == {"events": [{"email": "a@example.com", "name": "Shared",
                                        "time": "2026-11-20T14:00:00.000Z",
                                        "properties": {"extole_event_id": "e1"}}]}
    assert objects_needed(only_email, set(), True) == 1

    named = Planned(event(2, email="b@example.com",
                          attributes={"email": "b@example.com", "first_name": "Bo"}),
                    {"email": "b@example.com"})
    request = build_track_request([named], email_identifier=True)
    assert request.body["attributes"] == [{"email": "b@example.com", "first_name": "Bo"}]
    assert objects_needed(named, set(), True) == 2


def test_email_identity_keeps_the_email_attribute_of_an_external_id() -> None:
    item = planned(1, external_id="c1", email="a@example.com",
                   attributes={"email": "a@example.com"})
    request = build_track_request([item], email_identifier=True)
    assert request.body["attributes"] == [{"external_id": "c1", "email": "a@example.com"}]
    assert objects_needed(item, set(), True) == 2
    assert [len(c) for c in chunk([item] * 1, 75, email_identifier=True)] == [1]


def test_stale_attributes_are_left_out_and_not_counted() -> None:
    item = planned(1, external_id="c1",
                   attributes={"email": "a@example.com", "email_subscribe": "opted_in"})
    item.stale = frozenset({"email_subscribe"})
    assert build_track_request([item]).body["attributes"] == [
        {"external_id": "c1", "email": "a@example.com"}]
    assert objects_needed(item, set(), False) == 2
    item.stale = frozenset({"email", "email_subscribe"})
    assert "attributes" not in build_track_request([item]).body
    assert objects_needed(item, set(), False) == 1


GROUP_A = "aaaaaaaa-0000-4000-8000-000000000001"
GROUP_B = "bbbbbbbb-0000-4000-8000-000000000002"


def groups(*states: tuple[str, str]) -> dict[str, Any]:
    return {"subscription_groups": [{"subscription_group_id": g, "subscription_state": s}
                                    for g, s in states]}


def test_subscription_groups_of_one_person_are_merged_group_by_group() -> None:
    first = planned(1, seconds=0, external_id="c1", attributes=groups((GROUP_A, "subscribed")))
    second = planned(2, seconds=10, external_id="c1", attributes=groups((GROUP_B, "subscribed")))
    third = planned(3, seconds=20, external_id="c1",
                    attributes={"email_subscribe": "unsubscribed",
                                **groups((GROUP_A, "unsubscribed"))})
    request = build_track_request([third, first, second])
    assert request.body["attributes"] == [{
        "external_id": "c1", "email_subscribe": "unsubscribed",
        "subscription_groups": [
            {"subscription_group_id": GROUP_A, "subscription_state": "unsubscribed"},
            {"subscription_group_id": GROUP_B, "subscription_state": "subscribed"}]}]


def test_a_stale_group_is_left_out_and_the_others_sent() -> None:
    item = planned(1, external_id="c1", attributes={
        "email_subscribe": "opted_in", **groups((GROUP_A, "subscribed"), (GROUP_B, "subscribed"))})
    item.stale = frozenset({"email_subscribe", f"subscription_groups:{GROUP_A}"})
    assert build_track_request([item]).body["attributes"] == [
        {"external_id": "c1", **groups((GROUP_B, "subscribed"))}]
    assert objects_needed(item, set(), False) == 2
    item.stale = frozenset({"email_subscribe", f"subscription_groups:{GROUP_A}",
                            f"subscription_groups:{GROUP_B}"})
    assert "attributes" not in build_track_request([item]).body
    assert objects_needed(item, set(), False) == 1


def test_a_person_already_in_the_request_costs_one_object_more() -> None:
    item = planned(1, external_id="c1", attributes={"email": "a@example.com"})
    assert objects_needed(item, {'{"external_id":"c1"}'}, False) == 1


@pytest.mark.parametrize(("with_attributes", "per_chunk"), [(True, 37), (False, 75)])
def test_chunks_respect_the_object_cap(with_attributes: bool, per_chunk: int) -> None:
    items = [planned(i, seconds=i, external_id=f"c{i}",
                     attributes={"email": f"p{i}@example.com"} if with_attributes else None)
             for i in range(1, 201)]
    chunks = chunk(items, 75)
    assert [len(c) for c in chunks] == [per_chunk] * (200 // per_chunk) + [200 % per_chunk]
    assert [p.event.id for c in chunks for p in c] == list(range(1, 201))
    for part in chunks:
        assert objects(build_track_request(part).body) <= 75


def test_one_persons_many_events_share_one_attributes_object_per_chunk() -> None:
    items = [planned(i, seconds=i, external_id="c1", attributes={"first_name": f"N{i}"})
             for i in range(1, 101)]
    chunks = chunk(items, 75)
    assert [len(c) for c in chunks] == [74, 26]
    first = build_track_request(chunks[0]).body
    assert objects(first) == 75
    assert first["attributes"] == [{"external_id": "c1", "first_name": "N74"}]


def test_email_identity_chunks_events_whose_only_attribute_is_the_email_as_one_object() -> None:
    items = [Planned(event(i, seconds=i, email=f"p{i}@example.com",
                           attributes={"email": f"p{i}@example.com"}),
                     {"email": f"p{i}@example.com"}) for i in range(1, 151)]
    assert [len(c) for c in chunk(items, 75, email_identifier=True)] == [75, 75]
    assert [len(c) for c in chunk(items, 75)] == [37, 37, 37, 37, 2]


def test_random_mixtures_never_exceed_the_cap_and_lose_nothing() -> None:
    rng = random.Random(2026)
    for _ in range(200):
        size, cap = rng.randint(1, 160), rng.randint(2, 75)
        items = []
        for i in range(1, size + 1):
            person = rng.randint(1, 12)
            kind = rng.choice(["external", "alias", "email", "braze"])
            attributes = rng.choice([{}, {"email": f"p{person}@example.com"},
                                     {"first_name": "X", "email": f"p{person}@example.com"}])
            item = event(i, seconds=rng.randint(0, 50), external_id=f"c{person}",
                         email=f"p{person}@example.com", attributes=attributes)
            if kind == "external":
                items.append(Planned(item, {"external_id": f"c{person}"}))
            elif kind == "alias":
                alias = {"alias_name": f"p{person}@example.com", "alias_label": "email"}
                items.append(Planned(item, {"user_alias": alias}, create_alias=True))
            elif kind == "email":
                items.append(Planned(item, {"email": f"p{person}@example.com"}))
            else:
                items.append(Planned(item, {"braze_id": f"b{person}"},
                                     stale=frozenset(rng.choice([(), ("email",)]))))
        email_identifier = rng.random() < 0.3
        chunks = chunk(items, cap, email_identifier)
        assert sorted(p.event.id for c in chunks for p in c) == list(range(1, size + 1))
        for part in chunks:
            body = build_track_request(part, email_identifier).body
            assert objects(body) <= cap
            assert len(body["events"]) == len(part)
