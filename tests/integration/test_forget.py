"""`relay forget` leaves no trace of the person in any column of any table (nor, on SQLite, in the
database's files), and only theirs: also while a delivery of theirs is in flight, in their
rejected items, and where a raw body spells them with JSON escapes."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from flask import Flask
from sqlalchemy import select, update
from sqlalchemy.engine import make_url

from relay import privacy
from relay.db import Database, get_db, utcnow
from relay.models import (
    AttemptEvent,
    Base,
    DedupKey,
    DeliveryAttempt,
    IdentityCache,
    InboundRequest,
    OutboxEvent,
    QueuedEvent,
)
from relay.outbox import leases
from relay.sandbox import SandboxConfig
from relay.settings import Settings
from relay.worker import Worker
from tests.support import PROD_KEY, sample, sample_json, served_sandbox

ANN_EMAIL, ANN_ID = "ann.lee@example.com", "cust-1036950000"
ANN_TRACES = (ANN_EMAIL, ANN_ID, "refer.example.com/ann1")
ANN_SAMPLES = ("reward_earned.json", "share_link_created.json", "shared.json", "subscribed.json",
               "unsubscribed.json")
OTHER_SAMPLES = ("referred_converted.json", "referred_signed_up_email_only.json", "batch.json")


def traces(db: Database, *needles: str) -> list[str]:
    """Every (table.column #row) whose stored value contains a needle, any case, any type; text
    that is JSON is searched decoded too (`\\u0040` is an @)."""
    found = []
    with db.engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            for number, row in enumerate(connection.execute(table.select())):
                for column, value in row._mapping.items():
                    if value is None:
                        continue
                    if isinstance(value, bytes | memoryview):
                        text = bytes(value).decode("utf-8", "replace")
                    elif isinstance(value, dict | list):
                        text = json.dumps(value, ensure_ascii=False)
                    else:
                        text = str(value)
                    with contextlib.suppress(ValueError):
                        text += json.dumps(json.loads(text), ensure_ascii=False)
                    found += [f"{table.name}.{column} #{number}: {needle}" for needle in needles
                              if needle.lower() in text.lower()]
    return found


def file_traces(database_url: str, *needles: str) -> list[str]:
    """SQLite: the needles (any case, as UTF-8) found in the database file or its -wal."""
    path = Path(make_url(database_url).database or "")
    found = []
    for candidate in (path, Path(f"{path}-wal")):
        if candidate.exists():
            content = candidate.read_bytes().lower()
            found += [f"{candidate.name}: {needle}" for needle in needles
                      if needle.lower().encode() in content]
    return found


def snapshot(db: Database) -> dict[tuple[str, str], dict[str, Any]]:
    """Every row of every table, by table and primary key."""
    rows = {}
    with db.engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            for row in connection.execute(table.select()):
                data = dict(row._mapping)
                key = "/".join(str(data[c.name]) for c in table.primary_key.columns)
                rows[(table.name, key)] = data
    return rows


@pytest.fixture
def db(app: Flask) -> Database:
    return get_db(app)


@pytest.fixture
def populated(app: Flask, db: Database, post_webhook: Any) -> dict[str, int]:
    """Ann's events and other people's, Braze requests carrying both, cached identities."""
    for name in ANN_SAMPLES + OTHER_SAMPLES:
        assert post_webhook(sample(name)).status_code == 200
    mixed = [sample_json("referred_converted.json"), {
        "type": "shared", "event_id": "mx-2", "email": "Ann.Lee@Example.com",
        "partner_user_id": ANN_ID, "first_name": "Ann", "last_name": "Lee"}]
    mixed[0]["event_id"] = "mx-1"
    assert post_webhook(mixed).status_code == 200
    now = utcnow()
    with db.session() as session:
        events = {e.extole_event_id: e.id for e in session.scalars(select(OutboxEvent))}
        track = DeliveryAttempt(
            environment="production", endpoint="/users/track", started_at=now, duration_ms=80.0,
            status_code=201, request_body=json.dumps({
                "attributes": [{"external_id": ANN_ID, "email": ANN_EMAIL, "first_name": "Ann",
                                "last_name": "Lee", "share_link": "https://refer.example.com/ann1"},
                               {"external_id": "cust-3001", "email": "cy@example.net"}],
                "events": [{"external_id": ANN_ID, "name": "Shared", "time": "2026-11-20T00:00Z",
                            "properties": {"share_channel": "EMAIL"}},
                           {"external_id": "cust-3001", "name": "Shared",
                            "time": "2026-11-23T10:00:00.000Z", "properties": {}}]}),
            response_body='{"message": "success", "events_processed": 2}')
        lookup = DeliveryAttempt(
            environment="production", endpoint="/users/export/ids", started_at=now,
            duration_ms=30.0, status_code=201,
            request_body=json.dumps({"email_address": "bo.chen@example.org"}),
            response_body=json.dumps({"users": [{"external_id": "cust-2200431"}]}))
        session.add_all([track, lookup])
        session.flush()
        session.add_all([
            AttemptEvent(attempt_id=track.id, event_id=events["sh09f8e7d6c5b4a3f2e1"]),
            AttemptEvent(attempt_id=track.id, event_id=events["bt-0001"]),
            AttemptEvent(attempt_id=lookup.id, event_id=events["rs5566778899aabbccdd"]),
            IdentityCache(environment="production", email=ANN_EMAIL, external_id=ANN_ID,
                          braze_id="b-ann", found=True, expires_at=now + timedelta(hours=1)),
            IdentityCache(environment="staging", email=ANN_EMAIL, found=False,
                          expires_at=now + timedelta(hours=1)),
            IdentityCache(environment="production", email="bo.chen@example.org",
                          external_id="cust-2200431", found=True,
                          expires_at=now + timedelta(hours=1)),
        ])
        session.add(InboundRequest(
            received_at=now, environment="production", method="POST",
            path="/webhooks/extole/production", remote_addr="10.0.0.9",
            headers={"Content-Type": "application/json", "X-Debug-User": ANN_EMAIL.upper()},
            body=b"\xff\xfe not json, not utf-8: " + ANN_EMAIL.encode(), body_size=40,
            status_code=400, outcome="bad_json", error="body is not valid JSON"))
    return {"track": track.id, "lookup": lookup.id, **events}


def forget(db: Database, **person: str) -> dict[str, int]:
    return privacy.forget(db, **person).counts


def test_forget_by_email_and_external_id_leaves_no_trace(db: Database,
                                                          populated: dict[str, int]) -> None:
    assert len(traces(db, *ANN_TRACES)) > 20  # the search does find them when present
    before = snapshot(db)

    counts = forget(db, email="ANN.LEE@example.com", external_id=ANN_ID)

    assert traces(db, *ANN_TRACES, '"Lee"', '"Ann"') == []
    # 6 own events + Bo's sign-up naming Ann as his advocate; 7 bodies + the odd request;
    # one Braze request; both cache entries.
    assert counts == {"events": 7, "inbound_requests": 8, "delivery_attempts": 1,
                      "identity_cache": 2, "triggers": 0, "dedup_keys": 0}
    after = snapshot(db)
    changed = {key for key in before if before[key] != after.get(key)}
    # Her pending events' queue rows lose their copy of her person key, nothing else of theirs.
    queued = {key for table, key in changed if table == "delivery_queue"}
    assert queued and {after[("delivery_queue", key)]["person_key"] for key in queued} == {None}
    assert len(changed) - len(queued) == sum(counts.values())
    assert {table for table, _ in changed} == {"events", "inbound_requests", "delivery_attempts",
                                               "identity_cache", "delivery_queue"}
    # Other people's rows are exactly as they were.
    others = {e: populated[e] for e in ("rc00112233445566778", "bt-0001", "bt-0002", "bt-0003",
                                        "mx-1")}
    for event_id in others.values():
        assert ("events", str(event_id)) not in changed
    assert ("delivery_attempts", str(populated["lookup"])) not in changed
    assert ("identity_cache", "production/bo.chen@example.org") not in changed


def test_own_events_lose_every_personal_field_but_keep_their_story(
        db: Database, populated: dict[str, int]) -> None:
    forget(db, email=ANN_EMAIL)
    with db.session() as session:
        event = session.get(OutboxEvent, populated["r7k2m9q4x1b8c3d5e6f0"])
        assert (event.email, event.external_id, event.person_key) == (None, None, None)
        assert event.payload == privacy.ERASED_PAYLOAD
        assert (event.attributes, event.properties, event.identity) == (None, None, None)
        assert (event.status, event.braze_event, event.extole_event_id) == (
            "pending", "Earned Reward", "r7k2m9q4x1b8c3d5e6f0")
        inbound = session.get(InboundRequest, event.inbound_id)
        assert inbound.body == privacy.ERASED_BODY
        assert inbound.headers["Content-Type"] == "application/json"
        assert inbound.headers["X-Extole-Signature"] == "[redacted]"


def test_someone_elses_event_loses_only_the_mention(db: Database,
                                                    populated: dict[str, int]) -> None:
    forget(db, external_id=ANN_ID)
    with db.session() as session:
        bo = session.get(OutboxEvent, populated["rs5566778899aabbccdd"])
        assert bo.email == "bo.chen@example.org"
        assert bo.payload["data"] == {"advocate_partner_user_id": privacy.ERASED,
                                      "program": "refer-a-friend"}
        assert bo.payload["first_name"] == "Bo"
        assert bo.properties["advocate_partner_user_id"] == privacy.ERASED
    assert traces(db, ANN_ID) == []


def test_braze_batches_keep_other_peoples_objects(db: Database,
                                                  populated: dict[str, int]) -> None:
    forget(db, email=ANN_EMAIL)
    with db.session() as session:
        track = session.get(DeliveryAttempt, populated["track"])
        body = json.loads(track.request_body)
    assert body["attributes"] == [privacy.ERASED_OBJECT,
                                  {"external_id": "cust-3001", "email": "cy@example.net"}]
    assert body["events"][0]["external_id"] == ANN_ID  # only the email was given: kept
    assert body["events"][1]["external_id"] == "cust-3001"
    forget(db, external_id=ANN_ID)
    with db.session() as session:
        body = json.loads(session.get(DeliveryAttempt, populated["track"]).request_body)
    assert body["events"][0] == privacy.ERASED_OBJECT
    assert body["events"][1]["external_id"] == "cust-3001"


def test_forget_by_external_id_removes_the_cached_email_too(
        db: Database, populated: dict[str, int]) -> None:
    counts = forget(db, external_id=ANN_ID)
    assert counts["identity_cache"] == 1
    with db.session() as session:
        cached = {(r.environment, r.email) for r in session.scalars(select(IdentityCache))}
    # The staging entry names only the email: forgetting the external id cannot know it.
    assert cached == {("staging", ANN_EMAIL), ("production", "bo.chen@example.org")}


def test_forget_matches_whole_identifiers_only(db: Database, app: Flask,
                                               post_webhook: Any) -> None:
    people = [
        {"type": "shared", "event_id": "p1", "email": "ann@example.com", "partner_user_id": "42"},
        {"type": "shared", "event_id": "p2", "email": "joann@example.com",
         "partner_user_id": "420", "data": {"note": "ann@example.com.au and id 42a"}},
        {"type": "shared", "event_id": "p3", "email": "zoë@example.com",
         "data": {"friend": "mail ANN@example.com, thanks", "count": 42}},
    ]
    for person in people:
        assert post_webhook(person).status_code == 200
    counts = forget(db, email="ann@example.com", external_id="42")
    assert counts["events"] == 2 and counts["inbound_requests"] == 2
    with db.session() as session:
        stored = {e.extole_event_id: e for e in session.scalars(select(OutboxEvent))}
    assert stored["p1"].email is None
    joann = stored["p2"]
    assert (joann.email, joann.external_id) == ("joann@example.com", "420")
    assert joann.payload["data"]["note"] == "ann@example.com.au and id 42a"
    zoe = stored["p3"]
    assert zoe.payload["data"] == {"friend": "mail [erased], thanks", "count": privacy.ERASED}
    assert zoe.email == "zoë@example.com"


def test_non_ascii_email_is_found_however_it_is_stored(db: Database, post_webhook: Any) -> None:
    assert post_webhook({"type": "shared", "event_id": "z1", "email": "Zoë@Example.com",
                         "data": {"echo": "zoë@example.com"}}).status_code == 200
    assert post_webhook({"type": "shared", "event_id": "z2", "email": "other@example.com",
                         "data": {"friend": "zoë@example.com"}}).status_code == 200
    raw = '{"type": "shared", "event_id": "z3", "email": "ZOË@example.com"}'.encode()
    assert post_webhook(raw).status_code == 200  # UTF-8 as is, not \u-escaped
    counts = forget(db, email="zoë@example.com")
    assert counts["events"] == 3 and counts["inbound_requests"] == 3
    assert traces(db, "zoë@example.com", "zo\\u00eb@example.com") == []


def test_forget_someone_unknown_changes_nothing(db: Database,
                                                populated: dict[str, int]) -> None:
    before = snapshot(db)
    assert forget(db, email="nobody@example.com", external_id="cust-0") == {
        "events": 0, "inbound_requests": 0, "delivery_attempts": 0, "identity_cache": 0,
        "triggers": 0, "dedup_keys": 0}
    assert snapshot(db) == before


def test_forget_needs_an_identifier(db: Database) -> None:
    with pytest.raises(ValueError, match="email or an external_id"):
        forget(db, email="  ")


@pytest.fixture
def person() -> Callable[..., privacy.Person]:
    return privacy.Person


@pytest.mark.parametrize(("text", "mentioned"), [
    ("ann@example.com", True),
    ("ANN@EXAMPLE.COM", True),
    ('{"email": "ann@example.com"}', True),
    ("https://x.example/?e=ann%40example.com&x=1", True),
    ("see ann@example.com.", True),
    ("joann@example.com", False),
    ("ann@example.com.au", False),
    ("x.ann@example.com", False),
    ("ann+tag@example.com", False),
    ('{"email": "ann\\u0040example.com"}', True),
    ('{"email": "\\u0041NN\\u0040EXAMPLE.COM"}', True),
    ('"\\u0061\\u006E\\u006E\\u0040\\u0065xample.com"', True),
    ('not json: ann\\u0040example.com, cut', True),
    ('{"email": "jo\\u0061nn\\u0040example.com"}', False),
])
def test_email_matching_is_bounded(person: Callable[..., privacy.Person], text: str,
                                   mentioned: bool) -> None:
    assert person("ann@example.com", None).mentioned_in(text) is mentioned


@pytest.mark.parametrize(("text", "mentioned"), [
    ('"external_id": "42"', True), ("id=42&x", True), ('"n": 42}', True),
    ("420", False), ("cust-42", False), ("42-b", False), ("4.42", False), ("42.5", False),
])
def test_external_id_matching_is_bounded(person: Callable[..., privacy.Person], text: str,
                                         mentioned: bool) -> None:
    assert person(None, "42").mentioned_in(text) is mentioned


def test_scrub_keeps_structure(person: Callable[..., privacy.Person]) -> None:
    ann = person("ann@example.com", "cust-1")
    value = {"to": ["ann@example.com", "bo@example.com"], "cust-1": 1,
             "people": [{"email": "ann@example.com", "first_name": "Ann"}, {"email": "bo@x"}],
             "n": 3.5, "ok": True}
    assert ann.scrub(value) == {
        "to": [privacy.ERASED, "bo@example.com"], privacy.ERASED: 1,
        "people": [privacy.ERASED_OBJECT, {"email": "bo@x"}], "n": 3.5, "ok": True}
    assert ann.scrub_text("not json: ann@example.com") == f"not json: {privacy.ERASED}"
    assert ann.scrub_text(None) is None



def test_a_forgotten_pending_event_is_never_sent(app: Flask, db: Database, post_webhook: Any,
                                                 settings: Any) -> None:
    import responses

    from relay.worker import Worker

    assert post_webhook(sample("reward_earned.json")).status_code == 200
    forget(db, email=ANN_EMAIL)
    worker = Worker(settings, db)
    try:
        with responses.RequestsMock():  # any request to Braze would fail the test
            worker.run_once()
    finally:
        worker.close()
    with db.session() as session:
        [event] = session.scalars(select(OutboxEvent))
    assert (event.status, event.last_error) == ("dead", "no identifier")


def test_keys_name_nobody_but_one_that_does_is_deleted(db: Database, app: Flask,
                                                       post_webhook: Any) -> None:
    """Event ids and hashes are kept (they name nobody); a reshaped body whose event `id` is the
    person's id leaves a key naming them, and that key goes with the rest."""
    items = [{"type": "signed_up", "id": f"signup:{ANN_ID}", "partner_user_id": ANN_ID},
             {"type": "shared", "email": ANN_EMAIL},  # no id: keyed by a hash
             {"type": "shared", "id": "ev-other", "email": ANN_EMAIL}]
    assert post_webhook(items).status_code == 200
    with db.session() as session:
        before = set(session.scalars(select(DedupKey.key)))
    assert f"signup:{ANN_ID}" in before and len(before) == 3

    counts = forget(db, email=ANN_EMAIL, external_id=ANN_ID)

    assert counts["dedup_keys"] == 1
    with db.session() as session:
        after = set(session.scalars(select(DedupKey.key)))
    assert after == before - {f"signup:{ANN_ID}"}
    assert traces(db, ANN_EMAIL, ANN_ID) == []
    # The others still recognise a replay.
    assert post_webhook(items[1:]).get_json()["duplicates"] == 2


# --- their rejected items, and raw bodies that spell them with JSON escapes ---------------------

ANNABEL = {"first_name": "Annabel", "last_name": "Leeworth", "phone_number": "+1 555 0100 4242"}
ANNABEL_TRACES = (ANN_EMAIL, "Annabel", "Leeworth", "555 0100 4242")


def escaped(text: str, *, upper: bool = False) -> str:
    """Every character of the text as a JSON \\u escape."""
    return "".join(f"\\u{ord(c):04X}" if upper else f"\\u{ord(c):04x}" for c in text)


def test_rejected_items_and_escaped_spellings_leave_no_trace(db: Database, post_webhook: Any,
                                                             database_url: str) -> None:
    answer = post_webhook([
        {"event_id": "rj-1", "email": "Ann.Lee@Example.com", **ANNABEL},  # no event type
        {"type": "shared", "event_id": "rj-2", "event_time": "last tuesday",
         "person": {"email": ANN_EMAIL, **ANNABEL}},
        # Bo's rejected item names her: it stays Bo's.
        {"event_id": "rj-3", "email": "bo.chen@example.org", "first_name": "Bo",
         "data": {"advocate_email": ANN_EMAIL}},
    ])
    assert (answer.json["accepted"], len(answer.json["rejected"])) == (0, 3)
    bodies = [
        b'{"type": "shared", "event_id": "esc-1", "email": "ANN.LEE\\u0040EXAMPLE.COM", '
        b'"first_name": "\\u0041nnabel", "last_name": "Leeworth"}',
        ('{"type": "shared", "event_id": "esc-2", "email": "bo.chen@example.org", '
         f'"data": {{"friend": "{escaped(ANN_EMAIL, upper=True)}"}}}}').encode(),
    ]
    for body in bodies:
        assert post_webhook(body).status_code == 200
    # Cut short: refused as bad JSON, its body kept in the inbound log.
    cut = f'{{"type": "shared", "email": "{escaped("ann.lee")}@example.com", "first_name": "Ann'
    assert post_webhook(cut.encode()).status_code == 400
    assert len(traces(db, *ANNABEL_TRACES)) > 10

    counts = forget(db, email=ANN_EMAIL)

    assert traces(db, *ANNABEL_TRACES) == []
    # Her two rejected items and esc-1, Bo's rejected item and esc-2; four bodies.
    assert counts == {"events": 5, "inbound_requests": 4, "delivery_attempts": 0,
                      "identity_cache": 0, "triggers": 0, "dedup_keys": 0}
    with db.session() as session:
        stored = {e.extole_event_id: e for e in session.scalars(select(OutboxEvent))}
    assert stored["rj-1"].payload == stored["rj-2"].payload == privacy.ERASED_PAYLOAD
    assert stored["rj-3"].payload == {"event_id": "rj-3", "email": "bo.chen@example.org",
                                      "first_name": "Bo",
                                      "data": {"advocate_email": privacy.ERASED}}
    assert stored["esc-2"].payload["data"] == {"friend": privacy.ERASED}
    assert stored["esc-2"].email == "bo.chen@example.org"
    if database_url.startswith("sqlite"):
        assert file_traces(database_url, *ANNABEL_TRACES, "lee\\u0040example",
                           escaped("ann.lee")) == []


# --- a delivery in flight -------------------------------------------------------------------------

ANN_BY_EMAIL = {"type": "shared", "event_id": "ann-mail-1", "email": "Ann.Lee@example.com",
                "first_name": "Annabel", "last_name": "Leeworth",
                "phone_number": "+1 555 0100 4242"}
BO_NAMING_ANN = {"type": "referred_signed_up", "event_id": "bo-1", "email": "bo.chen@example.org",
                 "partner_user_id": "cust-2200431", "data": {"advocate_email": ANN_EMAIL}}
IN_FLIGHT_TRACES = (ANN_EMAIL, ANN_ID, "Leeworth", "555 0100 4242")


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.02)


def post_in_flight_people(post_webhook: Any) -> None:
    """Ann by external_id (a reward), Ann by email only (looked up in Braze first), and Bo's
    sign-up naming her as his advocate."""
    assert post_webhook(sample("reward_earned.json")).status_code == 200
    assert post_webhook([ANN_BY_EMAIL, BO_NAMING_ANN]).status_code == 200


def test_forget_while_her_delivery_is_in_flight_leaves_nothing(
        db: Database, post_webhook: Any, make_settings: Callable[..., Settings],
        make_worker: Callable[..., Worker], relay: Callable[..., Result],
        database_url: str) -> None:
    post_in_flight_people(post_webhook)
    slow = SandboxConfig(api_keys=[f"prod={PROD_KEY}"], latency_ms=1500)
    with served_sandbox(slow) as (url, _):
        worker = make_worker(make_settings(braze_rest_endpoint=url))
        delivering = threading.Thread(target=worker.drain, kwargs={"max_seconds": 60})
        delivering.start()
        try:
            def leased() -> bool:
                with db.session() as session:
                    return worker.owner in session.scalars(select(QueuedEvent.lease_owner))

            wait_until(leased, "the worker's claim")
            # Braze is answering the lookup of her email (1.5 s), then /users/track (1.5 s).
            result = relay("forget", "--email", ANN_EMAIL, "--external-id", ANN_ID, "--yes")
        finally:
            delivering.join(timeout=60)
    assert result.exit_code == 0, result.output
    assert "waiting (up to 120 s) for 3 of their events being delivered right now" in (
        result.stderr)
    # The delivery in flight ended as it would have; then she was forgotten.
    with db.session() as session:
        statuses = {e.id: e.status for e in session.scalars(select(OutboxEvent))}
    assert set(statuses.values()) == {"delivered"}
    assert traces(db, *IN_FLIGHT_TRACES) == []
    if database_url.startswith("sqlite"):
        assert file_traces(database_url, *IN_FLIGHT_TRACES) == []


def test_a_worker_whose_lease_was_taken_writes_nothing_of_her_back(
        db: Database, post_webhook: Any, make_settings: Callable[..., Settings],
        make_worker: Callable[..., Worker]) -> None:
    post_in_flight_people(post_webhook)
    assert post_webhook({"type": "shared", "event_id": "cy-1", "partner_user_id": "cust-3001",
                         "email": "cy@example.net"}).status_code == 200
    with served_sandbox() as (url, _):
        worker = make_worker(make_settings(braze_rest_endpoint=url))
        with db.session() as session:
            claimed = leases.claim_due(session, worker.owner, environments=["production"],
                                       limit=10, lease_seconds=120)
        assert len(claimed) == 4
        # The worker stalls past its lease (say its host was suspended): nobody renews it, and
        # forget takes the expired leases of the events about her over instead of waiting.
        with db.session() as session:
            session.execute(update(QueuedEvent).values(
                lease_expires_at=utcnow() - timedelta(seconds=1)))
        assert privacy.forget(db, email=ANN_EMAIL, external_id=ANN_ID).waited_for == 0
        # It wakes up with her data in memory and goes on delivering.
        worker.delivery.deliver(claimed)

    assert traces(db, *IN_FLIGHT_TRACES) == []
    with db.session() as session:
        events = {e.extole_event_id: e for e in session.scalars(select(OutboxEvent))}
        attempts = {a.endpoint: a for a in session.scalars(select(DeliveryAttempt))}
        links = session.execute(select(AttemptEvent.attempt_id, AttemptEvent.event_id)).all()
        assert session.scalars(select(IdentityCache)).all() == []
    # Only Cy's event was still the worker's: the others (hers, and Bo's that names her) wait
    # to be sent as forget left them.
    assert {e: events[e].status for e in events} == {
        "r7k2m9q4x1b8c3d5e6f0": "pending", "ann-mail-1": "pending", "bo-1": "pending",
        "cy-1": "delivered"}
    # Her lookup is recorded erased whole; the /users/track request keeps only Cy's objects.
    lookup, track = attempts["/users/export/ids"], attempts["/users/track"]
    assert lookup.request_body == lookup.response_body == privacy.ERASED_BODY.decode()
    body = json.loads(track.request_body)
    assert [e if e == privacy.ERASED_OBJECT else e["external_id"] for e in body["events"]] == [
        privacy.ERASED_OBJECT, privacy.ERASED_OBJECT, "cust-3001"]
    assert body["attributes"] == [privacy.ERASED_OBJECT, privacy.ERASED_OBJECT,
                                  {"external_id": "cust-3001", "email": "cy@example.net"}]
    assert links == [(track.id, events["cy-1"].id)]


def test_forget_gives_up_on_a_delivery_that_does_not_end(
        app: Flask, db: Database, post_webhook: Any, relay: Callable[..., Result]) -> None:
    post_in_flight_people(post_webhook)
    with db.session() as session:
        [claimed] = leases.claim_due(session, "host-b:4242:abcdef", environments=["production"],
                                     limit=1, lease_seconds=120)
    before = snapshot(db)

    result = relay("forget", "--email", ANN_EMAIL, "--wait", "0.5", "--yes")

    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"relay: gave up after 0.5 s: 1 of their events (ids {claimed.id}) are still being "
        "delivered by host-b:4242:abcdef (lease until ")
    assert result.stderr.splitlines()[-1].endswith(
        "UTC); nothing was erased. Run forget again, or wait longer with --wait")
    # Nothing erased, and the other events it had fenced meanwhile are free again.
    assert snapshot(db) == before
