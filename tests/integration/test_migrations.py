"""Alembic migrations are the only source of the schema: they agree with the models, on SQLite and
PostgreSQL, and `relay db upgrade` / `relay db current` drive them from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import inspect

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
