"""Group commit (README, "Group commit"): single-event webhooks of one process share one
transaction and one commit, each answered with its own receipt, as if stored one by one; a
failed group stores its members one by one, so one bad webhook fails nobody else; a webhook
waits a bounded time and is then answered 503 with nothing of it stored. PostgreSQL only: the
path is PostgreSQL's single statement.

A group is made observable by blocking the writer: the test holds the advisory lock of one
webhook's key, so its group waits while others queue up behind it. Rows committed by one
transaction share their `xmin`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError

from relay import dialect
from relay.db import get_db
from relay.exceptions import DatabaseUnavailable
from relay.models import InboundRequest
from relay.outbox import dedup, ingest
from relay.outbox.groupcommit import GroupWriter
from relay.outbox.ingest import Receipt, SingleRow
from tests.support import POSTGRESQL_ONLY, signed

pytestmark = POSTGRESQL_ONLY


def item(event_id: str, reward_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "EARNED" if reward_id else "shared", "event_id": event_id,
                            "partner_user_id": "cust-1", "event_time": "2026-11-20T10:00:00Z"}
    if reward_id:
        body["reward_id"] = reward_id
    return body


def prepared(app: Flask, body: dict[str, Any]) -> SingleRow:
    inbound = InboundRequest(received_at=datetime.now(UTC).replace(tzinfo=None),
                             environment="production", method="POST", path="/x", headers={},
                             body=json.dumps(body).encode(), body_size=0, status_code=200,
                             outcome="accepted", accepted=0, duplicates=0, rejected=0)
    row = ingest.prepare_single(get_db(app).engine, inbound, body, "production",
                                app.extensions["relay.event_map"])
    assert row is not None
    return row


def counts(receipt: Receipt | None) -> tuple[int, int]:
    assert receipt is not None
    return receipt.accepted, receipt.duplicates


def transactions(app: Flask) -> dict[str, str]:
    """Extole event id -> the transaction that stored the event (its xmin)."""
    with get_db(app).engine.connect() as connection:
        return {event_id: xmin for event_id, xmin in connection.execute(text(
            "SELECT extole_event_id, xmin::text FROM events ORDER BY id"))}


def table_counts(app: Flask) -> tuple[int, int, int]:
    with get_db(app).engine.connect() as connection:
        return tuple(connection.execute(text(  # type: ignore[return-value]
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM inbound_requests),"
            " (SELECT count(*) FROM dedup_keys)")).one())


@contextmanager
def key_held(app: Flask, *keys: str) -> Iterator[Connection]:
    """Another transaction holds the advisory locks of these keys until the block ends: a
    group that includes one of them waits for it."""
    with get_db(app).engine.connect() as connection, connection.begin() as transaction:
        dialect.lock_text_keys(connection, dedup.lock_names("production", keys))
        yield connection
        transaction.rollback()


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `work` in a thread; its result (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(work())
        except BaseException as error:  # noqa: BLE001 - inspected by the test
            out.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(600):
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached within 12 s")


def test_a_group_stores_each_row_as_alone_would_in_one_transaction(app: Flask) -> None:
    """Within the group a later row sees an earlier one's keys: the same reward event and the
    same event again are duplicates, each answered so."""
    rows = [prepared(app, body) for body in (
        item("g-1", reward_id="rw-9"), item("g-2"), item("g-1", reward_id="rw-9"), item("g-2"))]
    receipts = ingest.store_group(get_db(app).engine, rows)
    assert [counts(r) for r in receipts] == [(1, 0), (1, 0), (0, 1), (0, 1)]
    assert receipts[0].ids != receipts[1].ids
    assert [row.inbound.id for row in rows] == sorted({row.inbound.id for row in rows})
    stored = transactions(app)
    assert list(stored) == ["g-1", "g-2"]
    assert len(set(stored.values())) == 1  # one transaction
    with get_db(app).engine.connect() as connection:
        logged = connection.execute(text(
            "SELECT accepted, duplicates, xmin::text FROM inbound_requests ORDER BY id")).all()
        assert [(a, d) for a, d, _ in logged] == [(1, 0), (1, 0), (0, 1), (0, 1)]
        assert {xmin for _, _, xmin in logged} == set(stored.values())
        assert connection.execute(text("SELECT key FROM dedup_keys ORDER BY key")
                                  ).scalars().all() == ["g-1", "g-2", "reward:rw-9:EARNED"]


def test_webhooks_queued_behind_a_group_are_written_together_each_with_its_receipt(
        app: Flask) -> None:
    writer = GroupWriter(get_db(app).engine)
    try:
        with key_held(app, "first"):
            first, first_out = in_thread(lambda: writer.store(prepared(app, item("first"))))
            wait_until(lambda: writer.queued() == 0)  # the first group is waiting for the lock
            others = [in_thread(lambda body=body: writer.store(prepared(app, body)))
                      for body in (item("q-1"), item("q-2"), item("q-1"))]
            wait_until(lambda: writer.queued() == 3)
        for thread, _ in [(first, first_out), *others]:
            thread.join(30)
        assert counts(first_out[0]) == (1, 0)
        answers = sorted(counts(out[0]) for _, out in others)
        assert answers == [(0, 1), (1, 0), (1, 0)]
        stored = transactions(app)
        assert sorted(stored) == ["first", "q-1", "q-2"]
        assert stored["q-1"] == stored["q-2"] != stored["first"]
    finally:
        writer.close()


def test_a_reward_state_again_under_a_new_event_id_is_a_duplicate(
        app: Flask, post_webhook: Any) -> None:
    """One of its keys is held: the single statement answers it a duplicate and adds no key."""
    assert post_webhook(item("r-1", reward_id="rw-r")).get_json()["accepted"] == 1
    again = post_webhook(item("r-2", reward_id="rw-r")).get_json()
    assert (again["accepted"], again["duplicates"]) == (0, 1)
    assert table_counts(app) == (1, 2, 2)


def test_one_failing_webhook_does_not_fail_the_others_of_its_group(app: Flask) -> None:
    """A row the database refuses fails its group; every member is then stored by itself:
    the good ones are stored, the bad one raises and leaves nothing behind."""
    engine = get_db(app).engine
    with engine.begin() as connection:
        connection.execute(text("""
            CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.extole_event_id = 'bad' THEN RAISE EXCEPTION 'refused for the test'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_bad BEFORE INSERT ON events
                FOR EACH ROW EXECUTE FUNCTION refuse_bad();"""))
    writer = GroupWriter(engine)
    try:
        with key_held(app, "first"):
            first, _ = in_thread(lambda: writer.store(prepared(app, item("first"))))
            wait_until(lambda: writer.queued() == 0)
            others = {name: in_thread(lambda name=name: writer.store(prepared(app, item(name))))
                      for name in ("good-1", "bad", "good-2")}
            wait_until(lambda: writer.queued() == 3)
        for thread, _ in [(first, None), *others.values()]:
            thread.join(30)
        assert counts(others["good-1"][1][0]) == (1, 0)
        assert counts(others["good-2"][1][0]) == (1, 0)
        failure = others["bad"][1][0]
        assert isinstance(failure, SQLAlchemyError) and "refused for the test" in str(failure)
        assert sorted(transactions(app)) == ["first", "good-1", "good-2"]
        assert table_counts(app) == (3, 3, 3)  # nothing of the bad one: no event, log or key
    finally:
        writer.close()
        with engine.begin() as connection:
            connection.execute(text("DROP TRIGGER refuse_bad ON events;"
                                    " DROP FUNCTION refuse_bad()"))


def test_a_webhook_that_waits_past_the_bound_is_answered_503_and_nothing_of_it_is_stored(
        app: Flask) -> None:
    """Its group waits for a lock: past the bound it is cancelled, and a webhook queued behind
    it is withdrawn; both are answered 503 and neither is stored, so Extole's retry is new."""
    writer = get_db(app).group_writer()
    writer.wait = 0.5
    client = app.test_client()
    body = json.dumps(item("slow", reward_id="rw-slow")).encode()
    behind = json.dumps(item("behind", reward_id="rw-slow")).encode()

    def post(raw: bytes) -> Any:
        return client.post("/webhooks/extole/production", data=raw, headers=signed(raw))

    with key_held(app, "slow", dedup.reward_key("rw-slow", "EARNED")):
        first, first_out = in_thread(lambda: post(body))
        wait_until(lambda: writer.queued() == 0)
        second, second_out = in_thread(lambda: post(behind))
        first.join(30)
        second.join(30)
    for out in (first_out, second_out):
        assert out[0].status_code == 503
        assert out[0].get_json() == {
            "error": "database unavailable: the event was not stored, retry later"}
    assert table_counts(app) == (0, 0, 0)
    writer.wait = 10.0
    again = post(body)
    assert again.status_code == 200 and again.get_json()["accepted"] == 1


def test_with_group_commit_off_each_webhook_commits_by_itself(
        make_app: Callable[..., Flask]) -> None:
    app = make_app(group_commit="off")
    client = app.test_client()
    for name in ("off-1", "off-2", "off-1"):
        raw = json.dumps(item(name)).encode()
        answer = client.post("/webhooks/extole/production", data=raw, headers=signed(raw))
        assert answer.status_code == 200
    assert list(transactions(app)) == ["off-1", "off-2"]
    assert get_db(app)._group_writer is None  # never made


def test_a_closed_writer_answers_unavailable(app: Flask) -> None:
    writer = GroupWriter(get_db(app).engine)
    writer.close()
    with pytest.raises(DatabaseUnavailable, match="shutting down"):
        writer.store(prepared(app, item("late")))
