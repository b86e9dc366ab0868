"""Where SQLite and PostgreSQL differ, in one place; every other module asks here.

relay runs the same statements on both databases wherever it can. What differs: INSERT ... ON
CONFLICT (each dialect has its own construct), building JSON in SQL, locks (PostgreSQL locks rows
and takes advisory locks; SQLite has one writer at a time, so it needs none of them but must take
its write lock before a read-then-write), searching bytes as text, a list of texts as rows, and
PostgreSQL's fast path of one autocommitted statement on the driver's own connection. Engines
themselves (WAL and pragmas for SQLite, timeouts and pools for PostgreSQL) are configured in
`relay.db`.
"""

from __future__ import annotations

import contextlib
import json
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVarTuple

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    String,
    Table,
    Text,
    bindparam,
    cast,
    func,
    inspect,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement, TextClause
from sqlalchemy.sql.functions import Function
from sqlalchemy.sql.selectable import TableValuedAlias

if typing.TYPE_CHECKING:
    import psycopg

POSTGRESQL = "postgresql"
SQLITE = "sqlite"

Bind = Session | Connection | Engine
Insert = postgresql.Insert | sqlite.Insert
Columns = TypeVarTuple("Columns")
# Told how to cancel a running statement, then None when it is over.
Running = Callable[[Callable[[], None] | None], None]


def name(bind: Bind) -> str:
    """`postgresql` or `sqlite`."""
    if isinstance(bind, Session):
        return bind.get_bind().dialect.name
    return bind.dialect.name


def is_postgresql(bind: Bind) -> bool:
    return name(bind) == POSTGRESQL


def is_sqlite(bind: Bind) -> bool:
    return name(bind) == SQLITE


# --- statements ---------------------------------------------------------------------------------


def insert(bind: Bind | str, table: Table | type[Any]) -> Insert:
    """INSERT with the dialect's ON CONFLICT support (`on_conflict_do_nothing/do_update`).
    `bind` may be a dialect name, for statements built once and kept per dialect."""
    dialect = bind if isinstance(bind, str) else name(bind)
    return postgresql.insert(table) if dialect == POSTGRESQL else sqlite.insert(table)


def upsert(bind: Bind, table: Table | type[Any], values: dict[str, Any],
           keys: list[str], where: ColumnElement[bool] | None = None) -> Insert:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET values: the row ends up holding `values`.
    With `where`, an existing row is updated only when it matches (else left as it is)."""
    return insert(bind, table).values(**values).on_conflict_do_update(index_elements=keys,
                                                                      set_=values, where=where)


def json_object(bind: Bind, *pairs: Any) -> Function[Any]:
    """A JSON object built in SQL from alternating keys and values."""
    return func.jsonb_build_object(*pairs) if is_postgresql(bind) else func.json_object(*pairs)


def searchable_bytes(bind: Bind,
                     column: ColumnElement[Any]) -> tuple[ColumnElement[Any], Callable[[str], str]]:
    """A bytes column as text a LIKE can search, and how a needle is spelled in that text.

    PostgreSQL's bytea does not cast to characters; `encode(bytes, 'escape')` keeps ASCII
    readable and never fails on bytes that are not UTF-8, so needles are escaped alike. SQLite
    compares a BLOB cast to text directly.
    """
    if is_postgresql(bind):
        return func.encode(column, "escape"), _bytea_escape
    return cast(column, Text), str


def _bytea_escape(text: str) -> str:
    """What PostgreSQL's encode(bytes, 'escape') makes of this text's UTF-8 bytes."""
    parts = []
    for byte in text.encode("utf-8"):
        if byte == 0x5C:
            parts.append("\\\\")  # a backslash comes out doubled
        elif byte == 0 or byte > 0x7F:
            parts.append(f"\\{byte:03o}")
        else:
            parts.append(chr(byte))
    return "".join(parts)


def text_rows(bind: Bind, values: Sequence[str], name: str) -> TableValuedAlias:
    """Texts as the rows of a one-column relation (its column `value`), in one bound parameter.

    For looking values up one by one in a single statement: each row's own subquery on a whole
    primary key, which PostgreSQL answers from the index whatever its statistics say. `IN
    (...)`, which PostgreSQL turns into `= ANY(...)`, was planned, before a table's first
    ANALYZE, as a scan of every row matching the rest of the key with the values as a filter
    (`relay.outbox.dedup.held`). One parameter also keeps the statement's text the same for any
    number of values. PostgreSQL: `unnest` of a varchar array; SQLite: `json_each` of a JSON
    array.
    """
    if is_postgresql(bind):
        array = bindparam(name, list(values), type_=postgresql.ARRAY(String))
        return func.unnest(array).table_valued("value").render_derived(name=name)
    return func.json_each(bindparam(name, json.dumps(list(values)))).table_valued(
        "value").alias(name)


# --- locks --------------------------------------------------------------------------------------


def for_update(query: Select[*Columns], bind: Bind, *, skip_locked: bool = False,
               no_key: bool = False) -> Select[*Columns]:
    """Lock the rows the query reads (PostgreSQL; SQLite has one writer at a time).

    `no_key`: FOR NO KEY UPDATE, the lock an UPDATE of non-key columns takes itself, so it adds
    no conflict of its own (FOR UPDATE would also block foreign-key checks of referencing rows).
    `skip_locked`: leave rows another transaction holds instead of waiting for them.
    """
    if not is_postgresql(bind):
        return query
    return query.with_for_update(skip_locked=skip_locked, key_share=no_key)


def lock_key(session: Session, key: int) -> None:
    """A transaction-scoped advisory lock (PostgreSQL), held until commit: serialises the
    transactions that take it. SQLite's single writer serialises them already."""
    if is_postgresql(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


# Locks are taken in the order of their lock ids (the hashes), not of the texts: two texts with
# the same hash are one lock, and only an order of the locks themselves rules out every cycle.
# The same SQL is part of `relay.outbox.ingest`'s single statement (LOCK_TEXT_KEYS_SQL).
LOCK_TEXT_KEYS_SQL = (
    "SELECT count(pg_advisory_xact_lock(lock_id)) AS locked FROM ("
    "SELECT DISTINCT hashtextextended(name, 0) AS lock_id "
    "FROM unnest(CAST(:lock_names AS text[])) AS name ORDER BY lock_id) AS ordered"
)
_LOCK_TEXT_KEYS = text(LOCK_TEXT_KEYS_SQL)


def lock_text_keys(connection: Connection, keys: Iterable[str]) -> None:
    """Transaction-scoped advisory locks on text keys, taken in one global order (PostgreSQL),
    so two transactions locking overlapping keys cannot deadlock. SQLite: nothing to do."""
    names = sorted(set(keys))
    if names and is_postgresql(connection):
        connection.execute(_LOCK_TEXT_KEYS, {"lock_names": names})


def take_write_lock(session: Session, entity: type[Any], where: ColumnElement[bool]) -> None:
    """SQLite: take the database's write lock now, with an UPDATE that changes nothing, so a
    read-then-write cannot interleave with another process's (two would both read a value, then
    both write). PostgreSQL locks the row itself with SELECT ... FOR UPDATE (`for_update`)."""
    if is_sqlite(session):
        key = inspect(entity).primary_key[0]
        session.execute(update(entity).where(where).values({key.name: key}))


# --- files ----------------------------------------------------------------------------------------


def checkpoint_wal(engine: Engine) -> bool | None:
    """SQLite: copy the write-ahead log into the database file and truncate it to zero bytes,
    so the page images it held (rows as they were before a change, or an erasure) leave the
    `-wal` file. It waits (the busy timeout) for readers of older snapshots and writers;
    False when one kept it from finishing, True when done. PostgreSQL: None (its WAL and old
    row versions are the server's, reclaimed by its own checkpoints and VACUUM)."""
    if not is_sqlite(engine):
        return None
    with engine.connect() as connection:
        busy = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").scalar_one()
    return int(busy) == 0


# --- PostgreSQL's single-statement path ---------------------------------------------------------


def is_foreign_key_violation(error: BaseException) -> bool:
    """PostgreSQL refused a statement for a foreign key (SQLSTATE 23503): nothing of it stayed."""
    return getattr(getattr(error, "orig", None), "sqlstate", None) == "23503"


def driver_sql(statement: TextClause) -> str:
    """A PostgreSQL statement in psycopg's own parameter style, for `execute_autocommit`."""
    return str(statement.compile(dialect=PGDialect_psycopg()))  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def _raw_connection(engine: Engine, sql: str, params: Any,
                    running: Running | None) -> Iterator[psycopg.Connection[Any]]:
    """A pooled psycopg connection for the two paths below, with what they share: `running` told
    how to cancel while it is lent (then None), driver errors raised as SQLAlchemy's with the
    statement's parameters hidden, a lost connection invalidated, the connection given back."""
    import psycopg

    try:
        pooled = engine.raw_connection()
    except psycopg.Error as error:  # the pool hands on the driver's connect error unwrapped
        raise DBAPIError.instance(None, None, error, psycopg.Error,
                                  connection_invalidated=True) from error
    try:
        dbapi = typing.cast("psycopg.Connection[Any]", pooled.dbapi_connection)
        if running is not None:
            running(dbapi.cancel_safe)
        try:
            yield dbapi
        finally:
            if running is not None:
                running(None)
    except psycopg.Error as error:
        lost = isinstance(error, psycopg.OperationalError)
        if lost:
            pooled.invalidate(error)
        raise DBAPIError.instance(sql, params, error, psycopg.Error, hide_parameters=True,
                                  connection_invalidated=lost) from error
    finally:
        pooled.close()


def execute_autocommit(
        engine: Engine, sql: str, params: dict[str, Any],
        running: Running | None = None,
) -> tuple[Any, ...]:
    """One statement, committed by itself, on a pooled psycopg connection (PostgreSQL only).

    It skips SQLAlchemy's per-statement machinery, which costs more CPU than the database does
    for a small statement (psycopg prepares it after a few uses). Driver errors become
    SQLAlchemy's, and a lost connection is invalidated, as if the statement ran through
    SQLAlchemy. `running`: as for `execute_in_one_transaction`.
    """
    with _raw_connection(engine, sql, params, running) as dbapi:
        dbapi.autocommit = True
        try:
            with dbapi.cursor() as cursor:
                cursor.execute(sql, params)
                row = cursor.fetchone()
        finally:
            if not dbapi.closed:
                dbapi.autocommit = False
    assert row is not None
    return tuple(row)


def execute_in_one_transaction(
        engine: Engine, first_sql: str, first_params: dict[str, Any], sql: str,
        params_seq: list[dict[str, Any]],
        running: Running | None = None,
) -> list[tuple[Any, ...]]:
    """`first_sql` once, then `sql` once per parameter set, in ONE transaction committed once
    (PostgreSQL only): the first row each execution of `sql` returns, in order.

    Pipelined (psycopg's pipeline mode): the statements go out together and their answers come
    back together, so a group costs about one round trip and one commit (one WAL flush) instead
    of one each. On any error the transaction is rolled back and the error raised as
    SQLAlchemy's, a lost connection invalidated, as `execute_autocommit` does.

    `running` is told how to cancel the transaction while it runs (then told None): a cancelled
    transaction fails (QueryCanceled) and stores nothing, unless its commit was already done.
    """
    import psycopg

    rows: list[tuple[Any, ...]] = []
    with _raw_connection(engine, sql, params_seq, running) as dbapi:
        try:
            # One cursor per statement and the COMMIT inside the pipeline: everything goes out
            # at once and the answers come back at one synchronisation point (executemany and
            # a commit after the pipeline would wait for the server two more times).
            cursors = [dbapi.cursor() for _ in params_seq]
            with dbapi.pipeline(), dbapi.cursor() as first:
                first.execute(first_sql, first_params)
                for cursor, params in zip(cursors, params_seq, strict=True):
                    cursor.execute(sql, params)
                dbapi.commit()
            for cursor in cursors:
                row = cursor.fetchone()
                assert row is not None
                rows.append(tuple(row))
                cursor.close()
        except BaseException:
            if not dbapi.closed:
                with contextlib.suppress(psycopg.Error):
                    dbapi.rollback()
            raise
    return rows
