"""Shared fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL is the local server (RELAY_TEST_POSTGRES_URL, default the machine's 127.0.0.1:5432).
When it cannot be reached its tests are skipped and the run says so loudly at the end; with
RELAY_REQUIRE_POSTGRES=1 (as .ci/run sets) an unreachable server fails the run instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from relay import create_app, logs, migrate
from relay.cli import cli
from relay.models import Base
from relay.settings import _VARIABLES, Settings
from relay.worker import Worker
from tests.support import (
    BRAZE_URL,
    PG_ADMIN_URL,
    PROD_KEY,
    PROD_SECRET,
    STAGING_KEY,
    STAGING_SECRET,
    fresh_database,
    served_sandbox,
    signed,
)

_pg_problem: str | None = None


def _postgres_reachable() -> str | None:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # noqa: BLE001 - any failure means "not reachable"
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _pg_problem
    _pg_problem = _postgres_reachable()
    if _pg_problem and os.environ.get("RELAY_REQUIRE_POSTGRES") == "1":
        raise pytest.UsageError(f"PostgreSQL required but unreachable at {PG_ADMIN_URL}: "
                                f"{_pg_problem}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _pg_problem:
        bar = "!" * 78
        terminalreporter.write_line(bar, red=True, bold=True)
        terminalreporter.write_line(
            f"POSTGRESQL TESTS WERE SKIPPED: {PG_ADMIN_URL} unreachable ({_pg_problem})",
            red=True, bold=True)
        terminalreporter.write_line(bar, red=True, bold=True)


@pytest.fixture
def relay_logger() -> Iterator[logging.Logger]:
    """The `relay` logger, restored to text afterwards (configure() is process-wide)."""
    yield logging.getLogger("relay")
    logs.configure("text")


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "relay.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_server() -> None:
    """Skips the test when the PostgreSQL test server cannot be reached."""
    if _pg_problem:
        pytest.skip(f"PostgreSQL unreachable: {_pg_problem}")


@pytest.fixture(scope="session")
def postgres_database(postgres_server: None) -> Iterator[str]:
    """One migrated PostgreSQL database for the whole run, emptied before each test."""
    with fresh_database("relay_test", migrated=True) as url:
        yield url


def truncate_all(url: str) -> None:
    engine = create_engine(url)
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "relay.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_database")
    truncate_all(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A brand-new database without any table (not migrated), of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    request.getfixturevalue("postgres_server")  # skips when PostgreSQL is unreachable
    with fresh_database("relay_empty") as url:
        yield url


@pytest.fixture
def make_settings(database_url: str) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "extole_webhook_secret": PROD_SECRET,
            "extole_staging_webhook_secret": STAGING_SECRET,
            "braze_rest_endpoint": BRAZE_URL,
            "braze_api_key": PROD_KEY,
            "braze_staging_api_key": STAGING_KEY,
            "admin_password": "admin-password",
            "secret_key": "test-secret-key",
            "retry_base": 5.0,
        }
        values.update(overrides)
        return Settings(**values)

    return factory


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    application = create_app(settings, TESTING=True)
    yield application
    application.extensions["relay.db"].dispose()


@pytest.fixture
def make_app(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Flask]]:
    """Apps with settings of their own (`make_app(max_items=3)`) on the test's database; two
    of them stand for two processes sharing it."""
    apps: list[Flask] = []

    def factory(**overrides: Any) -> Flask:
        application = create_app(make_settings(**overrides), TESTING=True)
        apps.append(application)
        return application

    yield factory
    for application in apps:
        application.extensions["relay.db"].dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def make_worker(app: Flask, settings: Settings) -> Iterator[Callable[..., Worker]]:
    """Delivery workers on the app's database (the test's settings unless given), each closed
    at the end of the test."""
    made: list[Worker] = []

    def factory(worker_settings: Settings | None = None) -> Worker:
        worker = Worker(worker_settings or settings, app.extensions["relay.db"])
        made.append(worker)
        return worker

    yield factory
    for worker in made:
        worker.close()


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """For `relay` commands: no setting leaks in from the machine or a developer's .env."""
    for name in _VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def relay(clean_environment: None, database_url: str) -> Callable[..., Result]:
    """Run `relay ARGS` against the test database; extra keyword arguments are settings."""

    def run(*args: str, input: str | None = None, **env: str) -> Result:
        settings = {"RELAY_DATABASE_URL": database_url, "EXTOLE_WEBHOOK_SECRET": PROD_SECRET,
                    "EXTOLE_STAGING_WEBHOOK_SECRET": STAGING_SECRET, **env}
        return CliRunner().invoke(cli, list(args), env=settings, input=input,
                                  catch_exceptions=False)

    return run


@pytest.fixture
def post_webhook(client: FlaskClient) -> Callable[..., Any]:
    """Post a body (bytes, or JSON-able) signed with the environment's secret."""

    def post(body: Any, environment: str = "production", headers: dict[str, str] | None = None,
             secret: str | None = None, query: str = "") -> Any:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        secret = secret or (STAGING_SECRET if environment == "staging" else PROD_SECRET)
        return client.post(f"/webhooks/extole/{environment}{query}", data=raw,
                           headers=headers if headers is not None else signed(raw, secret))

    return post


@pytest.fixture
def sandbox_url() -> Iterator[str]:
    """The Braze sandbox (PROD_KEY is workspace `prod`, STAGING_KEY `staging`) served by
    werkzeug on a free port, in a thread (`served_sandbox`); its base URL."""
    with served_sandbox() as (url, _):
        yield url
