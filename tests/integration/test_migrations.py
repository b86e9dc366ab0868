"""Alembic migrations are the only source of the schema: they agree with the models, on SQLite and
PostgreSQL, and `relay db upgrade` / `relay db current` drive them from the command line."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import Connection, Engine, column, func, insert, inspect, select, text
from sqlalchemy import table as sql_table
from sqlalchemy.exc import IntegrityError

from relay import migrate
from relay.cli import cli
from relay.db import make_engine
from relay.models import Base


def _differences(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_migrated_schema_equals_the_models(empty_database_url: str) -> None:
    migrate.upgrade(empty_database_url)
    assert _differences(empty_database_url) == []


def test_migrations_are_at_head_and_downgrade_cleanly(empty_database_url: str) -> None:
    migrate.upgrade(empty_database_url)
    engine = make_engine(empty_database_url)
    try:
        assert migrate.current_revision(engine) == migrate.head_revision()
        tables = set(inspect(engine).get_table_names())
        assert tables == {t.name for t in Base.metadata.sorted_tables} | {"alembic_version"}
        command.downgrade(migrate.alembic_config(empty_database_url), "base")
        engine.dispose()
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert migrate.current_revision(engine) is None
        migrate.upgrade(empty_database_url)  # and back up again
        assert migrate.current_revision(engine) == migrate.head_revision()
    finally:
        engine.dispose()
    assert _differences(empty_database_url) == []


def test_an_unmigrated_database_differs_from_the_models(empty_database_url: str) -> None:
    """The comparison can fail: an empty database is missing every table."""
    differences = _differences(empty_database_url)
    added = {d[1].name for d in differences if isinstance(d, tuple) and d[0] == "add_table"}
    assert added == {t.name for t in Base.metadata.sorted_tables}


def test_cli_upgrades_and_reports_the_head_revision(empty_database_url: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the checkout is read
    runner = CliRunner()
    env = {"RELAY_DATABASE_URL": empty_database_url, "FLASK_RUN_FROM_CLI": None}
    head = migrate.head_revision()
    assert head

    before = runner.invoke(cli, ["db", "current"], env=env)
    assert before.exit_code == 0, before.output
    assert before.output == f"empty (behind {head}: run `relay db upgrade`)\n"

    upgraded = runner.invoke(cli, ["db", "upgrade"], env=env)
    assert upgraded.exit_code == 0, upgraded.output
    assert f"database at {head}" in upgraded.output

    current = runner.invoke(cli, ["db", "current"], env=env)
    assert current.exit_code == 0, current.output
    assert current.output == f"{head} (newest)\n"

    again = runner.invoke(cli, ["db", "upgrade"], env=env)  # idempotent
    assert again.exit_code == 0, again.output
    assert _differences(empty_database_url) == []


# --- a database that already holds rows --------------------------------------------------------

INBOUND_ROW: dict[str, Any] = {
    "environment": "production", "method": "POST", "path": "/webhooks/extole/production",
    "headers": "{}", "body_size": 2, "status_code": 200, "outcome": "accepted", "accepted": 1,
    "duplicates": 0, "rejected": 0}


def _insert(connection: Connection, table: str, values: dict[str, Any]) -> None:
    """One row of `table`, named columns, values bound: these tests write through SQL because
    the models describe only the newest schema."""
    connection.execute(insert(sql_table(table, *map(column, values))).values(values))


def _insert_inbound(connection: Connection, received_at: str, **values: Any) -> None:
    """An inbound request (by default one accepted webhook of `production`), as every revision
    since 0001 can hold it."""
    _insert(connection, "inbound_requests", INBOUND_ROW | {"received_at": received_at} | values)


def _insert_event(connection: Connection, received_at: str, key: str | None = "ev-1", *,
                  status: str = "pending", **values: Any) -> None:
    """An event whose de-duplication key is its Extole event id (`key`), as every revision since
    0001 can hold it; `values` adds or overrides columns."""
    _insert(connection, "events", {
        "environment": "production", "dedup_key": key, "extole_event_id": key, "status": status,
        "attempts": 0, "payload": "{}", "received_at": received_at, "updated_at": received_at,
    } | values)


@contextlib.contextmanager
def _engine_at(url: str, revision: str) -> Iterator[Engine]:
    """The database upgraded to `revision`, and an engine on it, disposed afterwards."""
    migrate.upgrade(url, revision)
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def _downgrade(url: str, engine: Engine, revision: str) -> set[str]:
    """Downgrade to `revision`; answers the tables left (the engine reconnects afresh)."""
    command.downgrade(migrate.alembic_config(url), revision)
    engine.dispose()
    return set(inspect(engine).get_table_names())


def _count(engine: Engine, table: str) -> int:
    with engine.begin() as connection:
        return int(connection.execute(select(func.count()).select_from(sql_table(table)))
                   .scalar_one())


def test_0003_on_a_database_that_holds_rows(empty_database_url: str) -> None:
    """The admin tables arrive beside existing data and leave without touching it."""
    now = "2026-11-20 14:14:18"
    with _engine_at(empty_database_url, "0002") as engine:
        with engine.begin() as connection:
            _insert_inbound(connection, now)
            _insert_event(connection, now, inbound_id=1)
        migrate.upgrade(empty_database_url)
        with engine.begin() as connection:
            assert connection.execute(text(
                "SELECT extole_event_id, status, inbound_id FROM events")).all() == [
                ("ev-1", "pending", 1)]
            connection.execute(text(
                "INSERT INTO admin_sessions (id_hash, user_name, credentials_version, "
                "created_at, last_seen_at, expires_at) VALUES (:h, 'admin', 'v', :t, :t, :t)"),
                {"h": "a" * 64, "t": now})
            connection.execute(text(
                "INSERT INTO admin_login_failures (scope, key_hash, failed_at) VALUES "
                "('user', :h, :t), ('address', :h, :t)"), {"h": "b" * 64, "t": now})
            assert connection.execute(text(
                "SELECT id FROM admin_login_failures ORDER BY id")).scalars().all() == [1, 2]
        assert _differences(empty_database_url) == []
        tables = _downgrade(empty_database_url, engine, "0002")
        assert not tables & {"admin_sessions", "admin_login_failures"}
        assert _count(engine, "events") == 1
        assert _count(engine, "inbound_requests") == 1


def test_0007_on_a_database_that_holds_rows(empty_database_url: str) -> None:
    """The reconciliation tables arrive beside existing events and leave without touching them."""
    before = ScriptDirectory.from_config(
        migrate.alembic_config(empty_database_url)).get_revision("0007").down_revision
    assert isinstance(before, str)
    now = "2026-12-03 12:00:00"
    with _engine_at(empty_database_url, before) as engine:
        with engine.begin() as connection:
            _insert_event(connection, now, status="delivered")
        migrate.upgrade(empty_database_url)
        with engine.begin() as connection:
            assert connection.execute(text(
                "SELECT extole_event_id, status FROM events")).all() == [("ev-1", "delivered")]
            connection.execute(text(
                "INSERT INTO reconcile_runs (environment, trigger, started_at, finished_at, "
                "window_start, window_end, seen, present, backfilled, errors, error, problems, "
                "duration_ms) VALUES ('production', 'worker', :t, :t, :t, :t, 3, 1, 2, 0, NULL, "
                "NULL, 12.5), ('production', 'command', :t, :t, :t, :t, 0, 0, 0, 0, "
                "'Extole refused the token', '[\"reward 1: no state\"]', 3.0)"), {"t": now})
            connection.execute(text(
                "INSERT INTO reconcile_locks (environment, owner, acquired_at, expires_at) "
                "VALUES ('production', 'host:1:abc', :t, :t)"), {"t": now})
            assert connection.execute(text(
                "SELECT id, backfilled, error FROM reconcile_runs ORDER BY id")).all() == [
                (1, 2, None), (2, 0, "Extole refused the token")]
        assert _differences(empty_database_url) == []
        tables = _downgrade(empty_database_url, engine, before)
        assert not tables & {"reconcile_runs", "reconcile_locks"}
        assert _count(engine, "events") == 1


def test_0004_gives_every_stored_event_its_key(empty_database_url: str) -> None:
    """Existing events get their event-id key (rejected items none); the keys are unique per
    environment; the events keep their own constraint; downgrading drops only the keys."""
    old, new = "2026-11-20 14:14:18", "2026-11-27 09:30:00"
    with _engine_at(empty_database_url, "0003") as engine:
        with engine.begin() as connection:
            _insert_inbound(connection, old, accepted=3, rejected=1)
            for environment, key, status, received in (
                    ("production", "ev-1", "delivered", old),
                    ("production", "sha256:" + "ab" * 32, "pending", new),
                    ("staging", "ev-1", "dead", new),
                    ("production", None, "rejected", old)):
                _insert_event(connection, received, key, status=status, environment=environment,
                              inbound_id=1)
        migrate.upgrade(empty_database_url)
        with engine.begin() as connection:
            rows = connection.execute(text(
                "SELECT k.environment, k.key, k.event_id, k.received_at, e.dedup_key "
                "FROM dedup_keys AS k JOIN events AS e ON e.id = k.event_id "
                "ORDER BY k.event_id")).all()
            assert [(r[0], r[1], r[2], str(r[3]), r[4]) for r in rows] == [
                ("production", "ev-1", 1, old, "ev-1"),
                ("production", "sha256:" + "ab" * 32, 2, new, "sha256:" + "ab" * 32),
                ("staging", "ev-1", 3, new, "ev-1")]
            assert connection.execute(text(
                "SELECT extole_event_id, status FROM events ORDER BY id")).all() == [
                ("ev-1", "delivered"), ("sha256:" + "ab" * 32, "pending"), ("ev-1", "dead"),
                (None, "rejected")]
        for statement in (
                "INSERT INTO dedup_keys (environment, key, received_at) VALUES "
                "('production', 'ev-1', :t)",
                "INSERT INTO events (environment, dedup_key, status, attempts, payload, "
                "received_at, updated_at) VALUES ('staging', 'ev-1', 'pending', 0, '{}', :t, :t)"):
            with pytest.raises(IntegrityError), engine.begin() as connection:
                connection.execute(text(statement), {"t": new})
        with engine.begin() as connection:  # another environment's key is another key
            connection.execute(text(
                "INSERT INTO dedup_keys (environment, key, received_at) VALUES "
                "('staging', 'sha256:" + "ab" * 32 + "', :t)"), {"t": new})
            # A purged event leaves its key behind, no longer pointing at it.
            connection.execute(text("DELETE FROM events WHERE id = 1"))
            assert connection.execute(text(
                "SELECT event_id FROM dedup_keys WHERE environment = 'production' "
                "AND key = 'ev-1'")).scalar_one() is None
        assert _differences(empty_database_url) == []
        assert "dedup_keys" not in _downgrade(empty_database_url, engine, "0003")
        assert _count(engine, "events") == 3


def test_0004_gives_stored_reward_events_their_reward_keys(empty_database_url: str) -> None:
    """Reward events stored before the upgrade get `reward:<id>:<STATE>` too (README, "Reward
    events"), so a reconciled or re-sent copy of a reward state received before the upgrade is a
    duplicate; of two old events holding one reward state, the older keeps the key."""
    t = "2026-11-20 14:14:18"
    with _engine_at(empty_database_url, "0003") as engine:
        with engine.begin() as connection:
            _insert_inbound(connection, t, accepted=6)
            for environment, key, extole_type, properties in (
                    ("production", "ev-1", "FULFILLED", {"reward_id": "r-1"}),
                    ("production", "ev-2", "fulfilled", {"reward_id": "r-1"}),  # same state
                    ("production", "ev-3", "reward_earned", {"reward_id": 42}),
                    ("staging", "ev-4", "Failed Fulfillment", {"reward_id": " r-1 "}),
                    ("production", "ev-5", "shared", {"reward_id": "r-9"}),  # not a state
                    ("production", "ev-6", "EARNED", {"person_id": "p-1"})):  # no reward id
                _insert_event(connection, t, key, status="delivered", environment=environment,
                              extole_type=extole_type, properties=json.dumps(properties),
                              inbound_id=1)
        migrate.upgrade(empty_database_url)
        with engine.begin() as connection:
            rows = connection.execute(text(
                "SELECT environment, key, event_id FROM dedup_keys "
                "WHERE key LIKE 'reward:%' ORDER BY event_id")).all()
        assert [tuple(r) for r in rows] == [
            ("production", "reward:r-1:FULFILLED", 1),
            ("production", "reward:42:EARNED", 3),
            ("staging", "reward:r-1:FAILED_FULFILLMENT", 4)]


def test_0005_on_a_database_that_holds_rows(empty_database_url: str) -> None:
    """The body's SHA-256 column and the refused-request counts arrive beside existing data (old
    inbound rows keep their bodies, with no hash) and leave without touching it."""
    now = "2026-11-20 14:14:18"
    with _engine_at(empty_database_url, "0004") as engine:
        with engine.begin() as connection:
            _insert_inbound(connection, now, body=b"{}", status_code=401, outcome="unauthorized",
                            accepted=0)
            _insert_event(connection, now)
        migrate.upgrade(empty_database_url, "0005")
        with engine.begin() as connection:
            assert connection.execute(text(
                "SELECT body, body_size, body_sha256 FROM inbound_requests")).one() == (
                b"{}", 2, None)
            assert connection.execute(text(
                "SELECT extole_event_id, status FROM events")).all() == [("ev-1", "pending")]
            connection.execute(text(
                "INSERT INTO refused_request_counts (minute, remote_addr, refused, logged, "
                "status_400, status_401, status_404, status_413, status_503) VALUES "
                "(:t, '192.0.2.1', 3, 2, 0, 3, 0, 0, 0)"), {"t": now})
            connection.execute(text("UPDATE inbound_requests SET body = NULL, body_sha256 = :h"),
                               {"h": "c" * 64})
        if migrate.head_revision() == "0005":
            assert _differences(empty_database_url) == []
        assert "refused_request_counts" not in _downgrade(empty_database_url, engine, "0004")
        assert "body_sha256" not in {c["name"] for c in inspect(engine).get_columns(
            "inbound_requests")}
        assert _count(engine, "events") == 1
        with engine.begin() as connection:
            assert connection.execute(text(
                "SELECT body_size, status_code FROM inbound_requests")).one() == (2, 401)


def test_0006_on_a_database_that_holds_rows(empty_database_url: str) -> None:
    """The triggers table arrives beside delivered events and leaves without touching them."""
    now = "2026-11-20 14:14:18"
    with _engine_at(empty_database_url, "0005") as engine:
        with engine.begin() as connection:
            _insert_event(connection, now, status="delivered", delivered_at=now)
            connection.execute(text(
                "INSERT INTO delivery_attempts (environment, endpoint, started_at, duration_ms) "
                "VALUES ('production', '/users/track', :t, 5.0)"), {"t": now})
        migrate.upgrade(empty_database_url, "0006")
        with engine.begin() as connection:
            assert connection.execute(text(
                "SELECT extole_event_id, status FROM events")).all() == [("ev-1", "delivered")]
            connection.execute(text(
                "INSERT INTO triggers (event_id, environment, kind, target_id, recipient, state, "
                "due_at, sends, attempt_id, created_at, updated_at) VALUES (1, 'production', "
                "'campaign', 'cmp-1', :r, 'due', :t, 0, 1, :t, :t)"),
                {"t": now, "r": '{"external_user_id": "cust-1"}'})
            duplicate = text(
                "INSERT INTO triggers (event_id, environment, kind, target_id, state, sends, "
                "created_at, updated_at) VALUES (1, 'production', 'campaign', 'cmp-1', 'due', 0, "
                ":t, :t)")
            assert connection.execute(text(
                "SELECT state, recipient FROM triggers")).one()[0] == "due"
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(duplicate, {"t": now})  # one row per event and target
        assert "triggers" not in _downgrade(empty_database_url, engine, "0005")
        assert _count(engine, "events") == 1
        assert _count(engine, "delivery_attempts") == 1


def test_0008_queues_the_pending_events_as_they_were(empty_database_url: str) -> None:
    """Each pending event gets its queue row with its due time and lease as they were (no due
    time: due when received); other statuses none; `events` loses the claim's columns; the
    downgrade puts them back from the queue and drops it, the events untouched."""
    received, due, until = "2026-12-01 10:00:00", "2026-12-01 10:05:00", "2026-12-01 10:01:00"
    with _engine_at(empty_database_url, "0007") as engine:
        with engine.begin() as connection:
            _insert_event(connection, received, "ev-1", person_key="id:cust-1",
                          event_time="2026-12-01 09:59:00", next_attempt_at=due)
            _insert_event(connection, received, "ev-2", person_key="id:cust-1",
                          event_time="2026-12-01 09:59:30", next_attempt_at=due,
                          lease_owner="host:1:abc", lease_expires_at=until)
            _insert_event(connection, received, "ev-3", environment="staging")  # no due time
            _insert_event(connection, received, "ev-4", status="delivered", next_attempt_at=due)
            _insert_event(connection, received, "ev-5", status="dead")
        migrate.upgrade(empty_database_url, "0008")
        with engine.begin() as connection:
            rows = connection.execute(text(
                "SELECT event_id, environment, person_key, event_time, next_attempt_at, "
                "lease_owner, lease_expires_at FROM delivery_queue ORDER BY event_id")).all()
            assert [tuple(str(v) if v is not None and i in (3, 4, 6) else v
                          for i, v in enumerate(row)) for row in rows] == [
                (1, "production", "id:cust-1", "2026-12-01 09:59:00", due, None, None),
                (2, "production", "id:cust-1", "2026-12-01 09:59:30", due, "host:1:abc", until),
                (3, "staging", None, None, received, None, None)]
            assert connection.execute(text(
                "SELECT extole_event_id, status FROM events ORDER BY id")).all() == [
                ("ev-1", "pending"), ("ev-2", "pending"), ("ev-3", "pending"),
                ("ev-4", "delivered"), ("ev-5", "dead")]
            # A queue row goes with its event.
            connection.execute(text("DELETE FROM events WHERE id = 3"))
            assert connection.execute(text(
                "SELECT event_id FROM delivery_queue ORDER BY event_id")).scalars().all() == [1, 2]
        columns = {c["name"] for c in inspect(engine).get_columns("events")}
        assert not columns & {"next_attempt_at", "lease_owner", "lease_expires_at"}
        if migrate.head_revision() == "0008":
            assert _differences(empty_database_url) == []
        assert "delivery_queue" not in _downgrade(empty_database_url, engine, "0007")
        with engine.begin() as connection:
            assert [(r[0], r[1], None if r[2] is None else str(r[2]), r[3]) for r in
                    connection.execute(text(
                        "SELECT extole_event_id, status, next_attempt_at, lease_owner "
                        "FROM events ORDER BY id"))] == [
                ("ev-1", "pending", due, None), ("ev-2", "pending", due, "host:1:abc"),
                ("ev-4", "delivered", None, None), ("ev-5", "dead", None, None)]
