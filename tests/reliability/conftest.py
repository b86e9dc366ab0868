"""Fixtures of the reliability scenarios: processes, a fresh PostgreSQL database, the report row.

Every scenario gets its own database on the local PostgreSQL (created, migrated, dropped after) and
its own process set, killed in teardown whatever happened. `make reliability` sets
RELAY_RELIABILITY_REPORT so the session ends by writing tests/reliability/REPORT.md.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.reliability import report as report_module
from tests.reliability.harness import Db, Processes
from tests.reliability.report import ROWS, Row
from tests.support import PG_ADMIN_URL, create_database, drop_database

_session_started = time.monotonic()


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """The machine's PostgreSQL: required (a scenario that cannot run proves nothing)."""
    engine = create_engine(PG_ADMIN_URL, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:  # noqa: BLE001 - any failure means unreachable
        pytest.fail(f"reliability scenarios need PostgreSQL at {PG_ADMIN_URL}: {error}")
    finally:
        engine.dispose()
    return PG_ADMIN_URL


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.close()
        call = getattr(request.node, "rep_call", None)
        if call is not None and call.failed:
            for proc in processes.procs:
                print(f"--- {proc.name} (pid {proc.pid}) log tail: {proc.log_path}")
                print(proc.tail(40))


@pytest.fixture
def database(pg_admin_url: str, procs: Processes) -> Iterator[tuple[str, Db]]:
    url = create_database("relay_rel", migrated=True, admin_url=pg_admin_url)
    db = Db(url)
    try:
        yield url, db
    finally:
        procs.close()  # nothing may still be using the database when it is dropped
        db.dispose()
        drop_database(url, admin_url=pg_admin_url)


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[int, str], Row]:
    def make(number: int, title: str) -> Row:
        row = Row(number, title)
        ROWS[number] = row
        request.node.reliability_row = row
        return row

    return make


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    result = yield
    setattr(item, f"rep_{result.when}", result)
    row: Row | None = getattr(item, "reliability_row", None)
    if row is None and result.failed:
        # Failed before the scenario made its row (a fixture, PostgreSQL): the report says so.
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        number = re.match(r"test_s(\d+)_", module)
        if number:
            row = Row(int(number.group(1)), item.name.removeprefix("test_").replace("_", " "))
            ROWS.setdefault(row.number, row)
            item.reliability_row = row  # type: ignore[attr-defined]
    if row is not None:
        row.duration += result.duration
        if result.when == "call" or result.failed:
            if result.failed:
                row.outcome = "FAIL"
                text_ = result.longreprtext
                lines = [line for line in text_.splitlines() if line.startswith("E ")]
                row.failure = "\n".join(lines[-20:]) or text_[-2000:]
            elif result.when == "call" and row.outcome != "FAIL":
                row.outcome = "skipped" if result.skipped else "pass"
    return result


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get(report_module.REPORT_ENV)
    if target and ROWS:
        report_module.write(Path(target), time.monotonic() - _session_started)
