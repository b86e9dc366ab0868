"""Constants and helpers shared by tests (fixtures live in conftest.py): samples, signatures,
free ports, and PostgreSQL databases made and dropped on the test server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from relay.authentication import sign

SAMPLES = Path(__file__).parent / "samples"
PG_ADMIN_URL = os.environ.get(
    "RELAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
PROD_SECRET = "prod-secret-0123456789"
STAGING_SECRET = "staging-secret-9876543210"
BRAZE_URL = "https://rest.iad-01.braze.com"
PROD_KEY = "prod-braze-key-aaaa"
STAGING_KEY = "staging-braze-key-bbbb"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def sample_json(name: str) -> Any:
    return json.loads(sample(name))


def signed(body: bytes, secret: str = PROD_SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Extole-Signature": sign(body, secret)}


def free_port() -> int:
    """A port of 127.0.0.1 nobody listens on at this moment: to serve on, or to find closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def create_database(prefix: str = "relay_test", *, migrated: bool = False,
                    admin_url: str = PG_ADMIN_URL) -> str:
    """A new, empty PostgreSQL database on the test server (migrated when asked); its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    if migrated:
        from relay import migrate

        migrate.upgrade(url)
    return url


def drop_database(url: str, admin_url: str = PG_ADMIN_URL) -> None:
    """Drop a database made by `create_database`, ending the sessions still connected to it."""
    name = url.rsplit("/", 1)[1]
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name})
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()


@contextlib.contextmanager
def fresh_database(prefix: str = "relay_test", *, migrated: bool = False) -> Iterator[str]:
    """`create_database` for the length of a `with` block, dropped afterwards whatever happens."""
    url = create_database(prefix, migrated=migrated)
    try:
        yield url
    finally:
        drop_database(url)
