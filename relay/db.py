"""Engine and sessions for SQLite (embedded default) and PostgreSQL (production).

SQLite runs in WAL mode with a busy timeout and full fsync, so a 2xx always means "on disk";
PostgreSQL connections time out quickly so an outage becomes a 503, not a hung request.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Flask, current_app
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from relay.exceptions import DatabaseUnavailable

SQLITE_BUSY_TIMEOUT_MS = 5000
PG_CONNECT_TIMEOUT_S = 3
POOL_TIMEOUT_S = 5


def utcnow() -> datetime:
    """Naive UTC: the one convention for every time column."""
    return datetime.now(UTC).replace(tzinfo=None)


def make_engine(url: str, **kwargs: Any) -> Engine:
    parsed = make_url(url)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_timeout", POOL_TIMEOUT_S)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 10)
    return create_engine(
        url, pool_pre_ping=True, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S}, **kwargs
    )


def _sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Database:
    """The engine and session factory of one app (or one worker process)."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success; driver outages become
        DatabaseUnavailable so callers can answer 503 instead of 500."""
        try:
            with self.sessions() as session, session.begin():
                yield session
        except (exc.OperationalError, exc.InterfaceError, exc.TimeoutError) as error:
            raise DatabaseUnavailable(_describe(error)) from error
        except exc.DBAPIError as error:
            if error.connection_invalidated:
                raise DatabaseUnavailable(_describe(error)) from error
            raise

    def dispose(self) -> None:
        self.engine.dispose()


def _describe(error: Exception) -> str:
    original = getattr(error, "orig", None) or error
    first_line = str(original).strip().splitlines()[0] if str(original).strip() else ""
    return f"database unavailable: {type(original).__name__}: {first_line}"[:300]


def init_app(app: Flask) -> None:
    app.extensions["relay.db"] = Database(app.config["RELAY_SETTINGS"].database_url)


def get_db(app: Flask | None = None) -> Database:
    return (app or current_app).extensions["relay.db"]
