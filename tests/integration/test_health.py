"""`/healthz` and `/readyz`: readiness flips to 503 with the reason when the database stops or
its schema is not the newest, and back once it is fixed."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from alembic import command
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from relay import braze_state, create_app, migrate
from relay.db import get_db
from relay.models import Base
from relay.settings import Settings
from tests.support import free_port, set_schema_revision


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert (response.status_code, response.get_json()) == (200, {"status": "ok"})


def test_ready_reports_each_braze_environment(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok",
                                   "braze": {"production": "ok", "staging": "ok"}}


def test_missing_and_refused_keys_keep_the_relay_ready(
        make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(braze_staging_api_key=None), TESTING=True)
    try:
        with get_db(app).session() as session:
            braze_state.mark_refused(session, "production", "401 invalid key", 60)
        response = app.test_client().get("/readyz")
    finally:
        get_db(app).dispose()
    assert response.status_code == 200
    assert response.get_json()["braze"] == {"production": "refused", "staging": "missing"}


@pytest.fixture
def restore_schema(database_url: str) -> Iterator[str]:
    """Put the shared test database back at the newest schema, whatever the test did."""
    yield database_url
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
        for table in (t.name for t in reversed(Base.metadata.sorted_tables)):
            connection.execute(text(f"DROP TABLE IF EXISTS {table}"
                                    + (" CASCADE" if engine.dialect.name == "postgresql"
                                       else "")))
    engine.dispose()
    migrate.upgrade(database_url)


def test_database_migrated_down_to_base_is_not_ready(app: Flask, client: FlaskClient,
                                                     restore_schema: str) -> None:
    assert client.get("/readyz").status_code == 200
    get_db(app).dispose()
    command.downgrade(migrate.alembic_config(restore_schema), "base")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {
        "status": "unavailable",
        "reason": f"database schema is missing (newest is {migrate.head_revision()}): "
                  "run `relay db upgrade`"}
    migrate.upgrade(restore_schema)
    assert client.get("/readyz").status_code == 200


def test_database_without_alembic_version_is_not_ready(client: FlaskClient,
                                                       restore_schema: str) -> None:
    set_schema_revision(restore_schema, None)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "database schema is missing" in response.get_json()["reason"]


def test_old_code_on_a_newer_schema_stays_ready(client: FlaskClient,
                                               restore_schema: str) -> None:
    """Upgrading migrates first, then restarts: the old processes must keep receiving."""
    set_schema_revision(restore_schema, "9999_future")
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["schema"] == (
        "9999_future is newer than this relay: restart it with the new version")


def test_unreachable_database_is_not_ready() -> None:
    url = f"postgresql+psycopg://relay:s3cret-pw@127.0.0.1:{free_port()}/relay"
    app = create_app(Settings(database_url=url), TESTING=True)
    try:
        response = app.test_client().get("/readyz")
    finally:
        get_db(app).dispose()
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["reason"].startswith("database unavailable: OperationalError: ")
    assert "refused" in body["reason"].lower() and "s3cret-pw" not in response.get_data(True)


class Proxy:
    """A TCP forwarder standing in for the database server, so a test can stop it."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def test_readiness_flips_when_the_database_stops_and_returns(postgres_database: str) -> None:
    real = make_url(postgres_database)
    proxy = Proxy((real.host or "127.0.0.1", real.port or 5432))
    url = real.set(port=proxy.port).render_as_string(hide_password=False)
    app = create_app(Settings(database_url=url), TESTING=True)
    client = app.test_client()
    try:
        assert client.get("/readyz").status_code == 200
        proxy.stop()
        down = client.get("/readyz")
        assert down.status_code == 503
        assert down.get_json()["reason"].startswith("database unavailable: ")
        proxy = Proxy(proxy.target, proxy.port)  # the server is back
        assert client.get("/readyz").status_code == 200
    finally:
        proxy.stop()
        get_db(app).dispose()
