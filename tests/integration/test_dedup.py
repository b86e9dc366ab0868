"""De-duplication keys (README, "Duplicates"): a replay is a duplicate also after its event was
purged, until RELAY_DEDUP_DAYS; an event with several keys is a duplicate when any of them is
held, adds none of them then, and concurrent webhooks sharing a key store exactly one event."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import responses
from flask import Flask
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import insert, select, text

from relay import retention
from relay.db import Database, get_db, utcnow
from relay.extole import normalise
from relay.models import DedupKey, InboundRequest
from relay.outbox import dedup, ingest
from relay.worker import Worker
from tests.support import (
    BRAZE_URL,
    POSTGRESQL_ONLY,
    fresh_database,
    post_concurrently,
    signed,
    stored_events,
    update_event,
)

TRACK = f"{BRAZE_URL}/users/track"


def event(event_id: str, **extra: Any) -> dict[str, Any]:
    return {"type": "shared", "event_id": event_id, "partner_user_id": "cust-1",
            "event_time": "2026-11-20T10:00:00Z", **extra}


def reward(event_id: str, reward_id: str = "rw-1", state: str = "EARNED") -> dict[str, Any]:
    return {"type": state, "event_id": event_id, "reward_id": reward_id,
            "partner_user_id": "cust-1", "event_time": "2026-11-20T10:00:00Z"}


def keys(app: Flask) -> list[tuple[str, str, int | None]]:
    with get_db(app).session() as session:
        return [(k.environment, k.key, k.event_id) for k in session.scalars(
            select(DedupKey).order_by(DedupKey.environment, DedupKey.key))]


def answer_of(response: Any) -> tuple[int, int, int]:
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    return response.status_code, body["accepted"], body["duplicates"]


# --- a replay after the purge ---------------------------------------------------------------


@pytest.mark.parametrize("as_array", [False, True], ids=["single", "array"])
def test_a_replay_after_the_purge_is_a_duplicate_until_dedup_days(
        app: Flask, post_webhook: Any, make_worker: Callable[..., Worker],
        as_array: bool) -> None:
    """One event alone takes PostgreSQL's single statement, in an array the transaction path;
    SQLite always the latter. Both keep the key past the purge."""
    body = [event("rp-1")] if as_array else event("rp-1")
    assert answer_of(post_webhook(body)) == (200, 1, 0)
    [original] = stored_events(app)
    assert keys(app) == [("production", "rp-1", original.id)]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as braze:
        braze.post(TRACK, json={"message": "success"}, status=201)
        make_worker().drain(max_seconds=10)
        assert len([c for c in braze.calls if c.request.url == TRACK]) == 1
    db = get_db(app)
    purged = retention.purge(db, 30, dedup_days=400, now=utcnow() + timedelta(days=31))
    assert (purged["events"], purged["dedup_keys"]) == (1, 0)
    assert stored_events(app) == []
    assert keys(app) == [("production", "rp-1", None)]  # outlives its event

    # Extole's retry, or a captured request replayed: 200, a duplicate, nothing to deliver.
    assert answer_of(post_webhook(body)) == (200, 0, 1)
    assert stored_events(app) == []
    with responses.RequestsMock(assert_all_requests_are_fired=False) as braze:
        braze.post(TRACK, json={"message": "success"}, status=201)
        make_worker().drain(max_seconds=5)
        assert len(braze.calls) == 0

    # Still a duplicate one day before RELAY_DEDUP_DAYS have passed since its receipt...
    kept = retention.purge(db, 30, dedup_days=400, now=utcnow() + timedelta(days=399))
    assert kept["dedup_keys"] == 0
    assert answer_of(post_webhook(body)) == (200, 0, 1)
    # ...and new again once they have: the key is gone.
    gone = retention.purge(db, 30, dedup_days=400, now=utcnow() + timedelta(days=401))
    assert gone["dedup_keys"] == 1
    assert keys(app) == []
    assert answer_of(post_webhook(body)) == (200, 1, 0)
    [again] = stored_events(app)
    assert keys(app) == [("production", "rp-1", again.id)]


def test_a_kept_event_keeps_its_keys_however_old(app: Flask, post_webhook: Any) -> None:
    """A dead event stays (for an operator); its key stays with it past RELAY_DEDUP_DAYS."""
    assert answer_of(post_webhook([event("dead-1")])) == (200, 1, 0)
    [stored] = stored_events(app)
    update_event(app, stored.id, status="dead")
    counts = retention.purge(get_db(app), 30, dedup_days=30, now=utcnow() + timedelta(days=900))
    assert (counts["events"], counts["dedup_keys"]) == (0, 0)
    assert keys(app) == [("production", "dead-1", stored.id)]
    assert answer_of(post_webhook(event("dead-1"))) == (200, 0, 1)


def test_keys_are_per_environment(app: Flask, post_webhook: Any) -> None:
    assert answer_of(post_webhook(event("both"))) == (200, 1, 0)
    assert answer_of(post_webhook(event("both"), environment="staging")) == (200, 1, 0)
    assert [k[:2] for k in keys(app)] == [("production", "both"), ("staging", "both")]


# --- several keys: any one held makes a duplicate --------------------------------------------


def test_the_same_reward_state_under_another_event_id_is_a_duplicate(
        app: Flask, post_webhook: Any) -> None:
    assert answer_of(post_webhook(reward("ev-a"))) == (200, 1, 0)
    [first] = stored_events(app)
    assert keys(app) == [("production", "ev-a", first.id),
                         ("production", "reward:rw-1:EARNED", first.id)]
    # Another event id, the same reward state: a duplicate, alone or in an array.
    assert answer_of(post_webhook(reward("ev-b"))) == (200, 0, 1)
    assert answer_of(post_webhook([reward("ev-b"), event("plain-1")])) == (200, 1, 1)
    # None of the duplicate's keys was added: its event id is still free...
    assert "ev-b" not in {k for _, k, _ in keys(app)}
    # ...and the reward's next state is a new event.
    assert answer_of(post_webhook(reward("ev-c", state="fulfilled"))) == (200, 1, 0)
    assert answer_of(post_webhook(event("ev-b"))) == (200, 1, 0)
    # The same event id with another reward state: its event-id key is held.
    assert answer_of(post_webhook(reward("ev-a", state="SENT"))) == (200, 0, 1)
    assert sorted(e.extole_event_id for e in stored_events(app)) == [
        "ev-a", "ev-b", "ev-c", "plain-1"]
    assert sorted(k for _, k, _ in keys(app)) == [
        "ev-a", "ev-b", "ev-c", "plain-1", "reward:rw-1:EARNED", "reward:rw-1:FULFILLED"]


def test_one_webhook_with_two_copies_of_a_reward_state_stores_the_first(
        app: Flask, post_webhook: Any) -> None:
    response = post_webhook([reward("w-1"), reward("w-2"), reward("w-3", state="SENT")])
    assert answer_of(response) == (200, 2, 1)
    assert [e.extole_event_id for e in stored_events(app)] == ["w-1", "w-3"]
    assert sorted(k for _, k, _ in keys(app)) == [
        "reward:rw-1:EARNED", "reward:rw-1:SENT", "w-1", "w-3"]


def test_store_events_dedupes_reconciled_copies_against_webhooks(
        app: Flask, post_webhook: Any) -> None:
    """Reconciliation's path: `reconciled:<reward_id>:<state>` meets the webhook's copy."""
    assert answer_of(post_webhook(reward("hook-1"))) == (200, 1, 0)
    event_map = app.extensions["relay.event_map"]
    now = utcnow()
    copies = [normalise(reward(f"reconciled:rw-1:{state}", state=state), event_map, now)
              for state in ("EARNED", "FULFILLED", "FULFILLED")]
    with get_db(app).session() as session:
        ids = ingest.store_events(session, "production", copies, now)
    assert ids[0] is None and ids[1] is not None and ids[2] is None
    with get_db(app).session() as session:  # a second run finds everything held
        assert ingest.store_events(session, "production", copies, now) == [None, None, None]
    assert [e.extole_event_id for e in stored_events(app)] == ["hook-1",
                                                               "reconciled:rw-1:FULFILLED"]
    assert [e.inbound_id is None for e in stored_events(app)] == [False, True]


def inbound_row() -> InboundRequest:
    return InboundRequest(received_at=datetime.now(UTC).replace(tzinfo=None),
                          environment="production", method="POST", path="/x", headers={},
                          body_size=0, status_code=200, outcome="accepted", accepted=0,
                          duplicates=0, rejected=0)


@POSTGRESQL_ONLY
def test_the_single_statement_stores_keys_and_finds_a_held_one(app: Flask) -> None:
    """PostgreSQL's one-statement path, called directly: it stores an event with both keys and
    answers a later copy under another event id as a duplicate itself (no fallback)."""
    engine, event_map = get_db(app).engine, app.extensions["relay.event_map"]
    first = ingest.store_single(engine, inbound_row(), reward("fs-1"), "production", event_map)
    assert first is not None and (first.accepted, first.duplicates) == (1, 0)
    again = ingest.store_single(engine, inbound_row(), reward("fs-2"), "production", event_map)
    assert again is not None and (again.accepted, again.duplicates) == (0, 1)
    plain = ingest.store_single(engine, inbound_row(), event("fs-3"), "production", event_map)
    assert plain is not None and plain.accepted == 1
    assert keys(app) == [("production", "fs-1", first.ids[0]),
                         ("production", "fs-3", plain.ids[0]),
                         ("production", "reward:rw-1:EARNED", first.ids[0])]
    with engine.connect() as connection:
        assert connection.execute(text(
            "SELECT accepted, duplicates FROM inbound_requests ORDER BY id")).all() == [
            (1, 0), (0, 1), (1, 0)]


# --- the lookup of a transaction's keys ---------------------------------------------------------


def add_keys(db: Database, environment: str, keys: list[str]) -> None:
    """Keys of purged events (no event row needed), straight into the table."""
    received = utcnow()
    with db.session() as session:
        session.execute(insert(DedupKey), [
            {"environment": environment, "key": key, "event_id": None, "received_at": received}
            for key in keys])


def test_held_answers_the_keys_its_environment_holds_among_thousands_asked(app: Flask) -> None:
    db = get_db(app)
    add_keys(db, "production", [f"k-{i}" for i in range(0, 3000, 2)])
    add_keys(db, "staging", ["k-1", "k-3"])
    asked = {f"k-{i}" for i in range(3000)} | {"reward:rw-1:EARNED", "k-1 "}
    with db.engine.connect() as connection:
        assert dedup.held(connection, "production", asked) == {
            f"k-{i}" for i in range(0, 3000, 2)}
        assert dedup.held(connection, "staging", asked) == {"k-1", "k-3"}
        assert dedup.held(connection, "staging", {"k-2"}) == set()
        assert dedup.held(connection, "production", set()) == set()


def explained(db: Database, keys: set[str]) -> tuple[set[str], list[dict[str, Any]]]:
    """What `held` answers, and every plan node of EXPLAIN ANALYZE of the very statement it ran
    that reads `dedup_keys`."""
    ran: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        ran.append((statement, parameters))

    with db.engine.connect() as connection:
        sqlalchemy_event.listen(db.engine, "before_cursor_execute", capture)
        try:
            answer = dedup.held(connection, "production", keys)
        finally:
            sqlalchemy_event.remove(db.engine, "before_cursor_execute", capture)
        [(statement, parameters)] = ran
        [plan] = connection.exec_driver_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters).scalar_one()
    nodes, reading = [plan["Plan"]], []
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", []))
        if node.get("Relation Name") == "dedup_keys":
            reading.append(node)
    return answer, reading


def test_held_reads_each_key_from_the_primary_key_before_the_first_analyze(
        postgres_server: None) -> None:
    """On a new database `dedup_keys` has no statistics until autovacuum's first ANALYZE (held
    off here, so the test does not race it). `key IN (...)` was then planned as a scan of every
    key of the environment with the keys as a filter (3,999 rows removed at 4,000 keys, the
    cost of each webhook growing with the table); each key must be one probe of the index."""
    with fresh_database("relay_plan", migrated=True) as url:
        db = Database(url)
        try:
            with db.engine.begin() as connection:
                connection.execute(text(
                    "ALTER TABLE dedup_keys SET (autovacuum_enabled = false)"))
            stored = 0
            for size in (1000, 4000, 8000):
                add_keys(db, "production", [f"ev-{i}" for i in range(stored, size)])
                stored = size
                with db.engine.connect() as connection:
                    assert connection.execute(text(
                        "SELECT count(*) FROM pg_stats WHERE tablename = 'dedup_keys'"
                    )).scalar_one() == 0
                asked = {"ev-7", f"ev-{size - 1}", "ev-absent"}
                answer, reading = explained(db, asked)
                assert answer == {"ev-7", f"ev-{size - 1}"}
                assert reading, size
                for node in reading:
                    assert node["Node Type"] in ("Index Scan", "Index Only Scan"), (size, node)
                    assert node["Index Name"] == "dedup_keys_pkey", (size, node)
                    assert "(environment = " in node["Index Cond"], (size, node)
                    assert "(key = " in node["Index Cond"], (size, node)
                    assert "Filter" not in node, (size, node)
                    assert node["Actual Rows"] <= 1, (size, node)
                    assert node["Actual Loops"] == len(asked), (size, node)
        finally:
            db.engine.dispose()


# --- concurrency (PostgreSQL: SQLite has one writer at a time) ---------------------------------


@POSTGRESQL_ONLY
@pytest.mark.parametrize("round_", range(3))
def test_concurrent_copies_of_a_reward_state_under_different_event_ids_store_one(
        app: Flask, round_: int, caplog: pytest.LogCaptureFixture) -> None:
    """Eight webhooks at once, each its own event id, all the same reward state; half alone (the
    single statement), half beside an event of their own (the transaction path)."""
    caplog.set_level(logging.INFO, logger="relay")
    reward_id = f"race-{round_}"
    bodies = [json.dumps(reward(f"c{round_}-{i}", reward_id) if i % 2 else
                         [reward(f"c{round_}-{i}", reward_id), event(f"own{round_}-{i}")]
                         ).encode() for i in range(8)]
    answers = post_concurrently(app, bodies)
    assert [a.status_code for a in answers] == [200] * 8
    receipts = [a.get_json() for a in answers]
    assert sum(r["duplicates"] for r in receipts) == 7
    stored = stored_events(app)
    rewards = [e for e in stored if e.extole_event_id.startswith(f"c{round_}-")]
    assert len(rewards) == 1
    assert sum(r["accepted"] for r in receipts) == 1 + 4
    assert len(stored) == 5
    held = keys(app)
    assert [(k, i) for _, k, i in held if k.startswith(("c", "reward:"))] == [
        (rewards[0].extole_event_id, rewards[0].id), (f"reward:{reward_id}:EARNED",
                                                      rewards[0].id)]
    assert {i for _, _, i in held} == {e.id for e in stored}  # no key without its event
    assert not any("deadlock" in r.getMessage() or "not stored" in r.getMessage()
                   for r in caplog.records)


@POSTGRESQL_ONLY
def test_a_single_statement_that_meets_a_concurrent_key_stores_nothing_and_falls_back(
        app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    """The single statement's snapshot predates its wait for a lock: a transaction holding the
    reward key commits meanwhile, the statement's NOT EXISTS misses it, ON CONFLICT skips it and
    its event-id key goes in alone. The foreign key then refuses the whole statement, and the
    transaction path answers: a duplicate, and no key of it is left behind."""
    caplog.set_level(logging.INFO, logger="relay")
    db: Database = get_db(app)
    event_map = app.extensions["relay.event_map"]
    answers: list[Any] = []
    with db.session() as session:
        holder = ingest.store_webhook(session, inbound_row(), [reward("tx-1")], "production",
                                      event_map)
        assert holder.accepted == 1  # locks held, not committed yet
        body = json.dumps(reward("fast-1")).encode()
        poster = threading.Thread(target=lambda: answers.append(app.test_client().post(
            "/webhooks/extole/production", data=body, headers=signed(body))))
        poster.start()
        with db.engine.connect() as watcher:  # until the statement waits for our lock
            while not watcher.execute(text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND NOT granted")).scalar():
                watcher.rollback()
                assert poster.is_alive()
                time.sleep(0.01)
    poster.join(timeout=30)
    [response] = answers
    assert answer_of(response) == (200, 0, 1)
    assert any("keys met a concurrent webhook" in r.getMessage() for r in caplog.records)
    [stored] = stored_events(app)
    assert stored.extole_event_id == "tx-1"
    assert keys(app) == [("production", "reward:rw-1:EARNED", stored.id),
                         ("production", "tx-1", stored.id)]
    with db.engine.connect() as connection:
        assert connection.execute(text(
            "SELECT accepted, duplicates FROM inbound_requests ORDER BY id")).all() == [
            (1, 0), (0, 1)]
