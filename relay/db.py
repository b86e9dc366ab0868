"""Engine and sessions for SQLite (embedded default) and PostgreSQL (production).

SQLite runs in WAL mode with a busy timeout and full fsync, so a 2xx always means "on disk", and
with secure_delete, so a row deleted or overwritten (`relay forget`) leaves no copy in the file;
PostgreSQL connections time out quickly so an outage becomes a 503, not a hung request. A SQLite
database holds personal data and admin sessions: its file is created readable by its owner only
(SQLite gives the `-wal` and `-shm` files the database file's mode), and an existing one that
others could read is tightened the same way.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from flask import Flask, current_app
from sqlalchemy import CursorResult, Engine, Result, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from relay.dialect import name as dialect_name
from relay.exceptions import DatabaseUnavailable, RelayError

if TYPE_CHECKING:
    from relay.outbox.groupcommit import GroupWriter
    from relay.wakeup import Notifier

SQLITE_BUSY_TIMEOUT_MS = 5000
PG_CONNECT_TIMEOUT_S = 3
POOL_TIMEOUT_S = 5
PING_AFTER_IDLE_S = 1.0
PRIVATE_FILE_MODE = 0o600
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def utcnow() -> datetime:
    """Naive UTC: the one convention for every time column."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso_time(moment: datetime | None) -> str | None:
    """A time column as the admin API, the CLI and the pages show it: ISO 8601 UTC to the
    millisecond with a `Z`; None stays None."""
    return moment.isoformat(timespec="milliseconds") + "Z" if moment else None


def make_engine(url: str, **kwargs: Any) -> Engine:
    parsed = make_url(url)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_timeout", POOL_TIMEOUT_S)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not parsed.query.get("uri"):
            private_sqlite_file(Path(database))
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 10)
    engine = create_engine(
        url, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S}, **kwargs
    )
    _ping_when_idle(engine)
    return engine


def private_sqlite_file(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it, or tighten an existing one (and its
    companions) that group or others could read. A file owned by someone else is left as it is:
    that is the operator's arrangement, and chmod would fail anyway."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(descriptor)
    for candidate in (path, *(Path(f"{path}{suffix}") for suffix in SQLITE_COMPANIONS)):
        try:
            status = candidate.stat()
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(status.st_mode)
        if mode & 0o077 and status.st_uid == os.geteuid():
            candidate.chmod(mode & 0o700)


def _ping_when_idle(engine: Engine) -> None:
    """pool_pre_ping, but only for connections idle longer than PING_AFTER_IDLE_S.

    A connection handed back moments ago is as good as the answer it just gave; pinging it would
    add a round trip to every webhook. A connection that breaks anyway (the server restarted
    within that second) fails its statement, which becomes a 503 and invalidates the pool.
    """

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is not None and time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:  # noqa: BLE001 - any failure: take a new connection
            raise exc.DisconnectionError(f"connection failed its ping: {error}") from error


def _sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Deleted and overwritten rows are zeroed, not left in free space of the file, where
    # `relay forget` could not reach them (many SQLite builds default to OFF).
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


class Database:
    """The engine and session factory of one app (or one worker process)."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._notifier: Notifier | None = None
        self._notifier_made = False
        self._notifier_lock = threading.Lock()
        self._group_writer: GroupWriter | None = None

    @property
    def dialect(self) -> str:
        """`postgresql` or `sqlite` (`relay.dialect` holds what differs between them)."""
        return dialect_name(self.engine)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success; driver outages become
        DatabaseUnavailable so callers can answer 503 instead of 500."""
        try:
            with self.sessions() as session, session.begin():
                yield session
        except exc.SQLAlchemyError as error:
            if is_outage(error):
                raise DatabaseUnavailable(describe_error(error)) from error
            raise

    def notifier(self) -> Notifier | None:
        """The NOTIFY sender that wakes worker processes (`relay.wakeup`), made on first use;
        None where the database has no NOTIFY."""
        if not self._notifier_made:
            with self._notifier_lock:
                if not self._notifier_made:
                    from relay.wakeup import make_notifier

                    self._notifier = make_notifier(self.engine)
                    self._notifier_made = True
        return self._notifier

    def group_writer(self) -> GroupWriter:
        """The writer that commits this process's single-event webhooks in groups
        (`relay.outbox.groupcommit`), made on first use."""
        if self._group_writer is None:
            with self._notifier_lock:
                if self._group_writer is None:
                    from relay.outbox.groupcommit import GroupWriter

                    self._group_writer = GroupWriter(self.engine)
        return self._group_writer

    def dispose(self) -> None:
        if self._group_writer is not None:
            self._group_writer.close()
        if self._notifier is not None:
            self._notifier.close()
        self.engine.dispose()


def is_outage(error: BaseException) -> bool:
    """The database could not be reached or the connection broke (as opposed to a statement the
    database refused): callers answer 503 and try again later."""
    if isinstance(error, exc.OperationalError | exc.InterfaceError | exc.TimeoutError):
        return True
    return isinstance(error, exc.DBAPIError) and error.connection_invalidated


def describe_error(error: BaseException) -> str:
    """One line naming a database failure, the same in logs, HTTP answers and the command line:
    `database unavailable: ` for an outage, else `database error: `, then the driver's class
    and the first line of its message (which never holds a password)."""
    if isinstance(error, RelayError):
        return str(error)
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines()
    detail = f": {lines[0]}" if lines else ""
    kind = "database unavailable" if is_outage(error) else "database error"
    return f"{kind}: {type(original).__name__}{detail}"[:300]


def rowcount(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE run through a session changed (the session types its
    results generically; they are cursor results)."""
    return int(cast(CursorResult[Any], result).rowcount or 0)


def init_app(app: Flask) -> None:
    app.extensions["relay.db"] = Database(app.config["RELAY_SETTINGS"].database_url)


def get_db(app: Flask | None = None) -> Database:
    db: Database = (app or current_app).extensions["relay.db"]
    return db
