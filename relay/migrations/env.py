"""Alembic environment: the URL comes from relay's settings (see relay/migrate.py)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from relay import dialect
from relay.db import make_engine
from relay.exceptions import MigrationError
from relay.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise MigrationError("no database URL given to the migrations (relay.migrate sets it)")
    engine = make_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=dialect.is_sqlite(connection),
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
