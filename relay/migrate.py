"""Alembic, driven from code: migrations are the only source of the schema.

The scripts ship inside the package (`relay/migrations/`, found through importlib.resources), so
`relay db upgrade` works wherever relay is installed, from a wheel as from a checkout. Alembic's
own errors become `MigrationError`, one line the command line can print.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, pool

from relay.exceptions import MigrationError

PACKAGE = "relay.migrations"


def script_location() -> Path:
    """The directory of the Alembic scripts inside the installed package."""
    location = resources.files(PACKAGE)
    if not isinstance(location, Path):  # a zipped install: Alembic needs real files
        raise MigrationError(f"relay's migrations are not on the file system ({location}): "
                             "install relay unpacked (pip install, not a zip)")
    if not (location / "env.py").is_file() or not (location / "versions").is_dir():
        raise MigrationError(f"relay's migrations are missing from {location}: reinstall relay")
    return location


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    # Percent signs in passwords would otherwise be taken for interpolation.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the migrations up to `revision`; a database at a revision this code does not know
    (a newer relay migrated it) is refused with one line rather than Alembic's traceback."""
    from relay.db import make_engine

    engine = make_engine(url, poolclass=pool.NullPool)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    if current is not None and not is_known(current):
        raise MigrationError(f"database schema is at {current}, newer than this relay knows "
                             f"(its newest is {head_revision()}): install the newer relay")
    try:
        command.upgrade(alembic_config(url), revision)
    except CommandError as error:
        raise MigrationError(f"migration to {revision} failed: {error}") from error


def head_revision() -> str | None:
    return _scripts().get_current_head()


def is_known(revision: str) -> bool:
    """Whether this code has a migration with exactly this revision id."""
    return any(script.revision == revision for script in _scripts().walk_revisions())


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def schema_problem(current: str | None) -> str | None:
    """Why this code cannot work on the schema, or None when it can.

    A schema newer than the code (a revision it does not know) is no problem: upgrading runs
    `relay db upgrade` first, then restarts, and migrations keep the previous release working,
    so the processes still running the old code must stay ready meanwhile.
    """
    head = head_revision()
    if current == head:
        return None
    if current is None:
        return f"database schema is missing (newest is {head}): run `relay db upgrade`"
    if not is_known(current):
        return None
    return f"database schema is at {current}, newest is {head}: run `relay db upgrade`"


def history() -> list[tuple[str, str | None, str]]:
    """(revision, down revision, message), newest first."""
    return [
        (rev.revision, rev.down_revision if isinstance(rev.down_revision, str) else None,
         rev.doc or "")
        for rev in _scripts().walk_revisions()
    ]
