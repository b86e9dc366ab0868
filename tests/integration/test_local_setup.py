"""`relay init` (what `make run` does first): a secured local setup and a curl that works."""

from __future__ import annotations

import json
import os
import shlex
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from dotenv import dotenv_values
from flask import Flask
from sqlalchemy import select
from sqlalchemy.orm import undefer_group

from relay import create_app, localsetup, migrate
from relay.authentication import sign
from relay.cli import cli
from relay.db import get_db, make_engine
from relay.models import OutboxEvent
from relay.settings import Settings, load_settings

ENV_KEYS = ("EXTOLE_WEBHOOK_SECRET", "EXTOLE_STAGING_WEBHOOK_SECRET", "RELAY_ADMIN_USER",
            "RELAY_ADMIN_PASSWORD", "RELAY_SECRET_KEY")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean working directory and no relay variables in the environment."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("RELAY_", "BRAZE_", "EXTOLE_")):
            monkeypatch.delenv(name)
    return tmp_path


def run_init() -> str:
    result = CliRunner().invoke(cli, ["init"], env={"FLASK_RUN_FROM_CLI": None})
    assert result.exit_code == 0, result.output
    return result.output


def curl_parts(output: str) -> tuple[str, dict[str, str], bytes]:
    [line] = [line for line in output.splitlines() if line.strip().startswith("curl ")]
    words = shlex.split(line)
    url = words[words.index("-X") + 2]
    headers = dict(words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H")
    body = words[words.index("--data-binary") + 1].encode()
    return url, headers, body


def test_init_writes_random_secrets_once(workdir: Path) -> None:
    output = run_init()
    env_file = workdir / "instance" / ".env"
    assert "wrote instance/.env with new random secrets" in output
    values = dotenv_values(env_file)
    assert all(values.get(key) for key in ENV_KEYS)
    assert values["RELAY_ADMIN_USER"] == "admin"
    assert values["EXTOLE_WEBHOOK_SECRET"] != values["EXTOLE_STAGING_WEBHOOK_SECRET"]
    assert len(values["EXTOLE_WEBHOOK_SECRET"] or "") >= 32
    assert len(values["RELAY_SECRET_KEY"] or "") >= 32
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    # The password and secrets are not printed: the output says where to find them.
    for key in ("RELAY_ADMIN_PASSWORD", "RELAY_SECRET_KEY", "EXTOLE_STAGING_WEBHOOK_SECRET"):
        assert (values[key] or "") not in output
    assert "admin page: http://127.0.0.1:8000/admin/ (user admin" in output

    first = env_file.read_bytes()
    second_output = run_init()
    assert "instance/.env exists: kept as it is" in second_output
    assert env_file.read_bytes() == first


def test_two_setups_get_different_secrets(tmp_path: Path) -> None:
    one, two = tmp_path / "a" / ".env", tmp_path / "b" / ".env"
    assert localsetup.write_local_env(one) and localsetup.write_local_env(two)
    assert not localsetup.write_local_env(one)
    first, second = dotenv_values(one), dotenv_values(two)
    assert all(first[key] != second[key] for key in ENV_KEYS if key != "RELAY_ADMIN_USER")


def test_existing_env_file_is_never_overwritten(workdir: Path) -> None:
    env_file = workdir / "instance" / ".env"
    env_file.parent.mkdir()
    env_file.write_text("EXTOLE_WEBHOOK_SECRET=mine\n")
    output = run_init()
    assert env_file.read_text() == "EXTOLE_WEBHOOK_SECRET=mine\n"
    assert "kept as it is" in output
    _, headers, body = curl_parts(output)
    assert headers["X-Extole-Signature"] == sign(body, "mine")


def test_the_printed_curl_is_accepted(workdir: Path, database_url: str) -> None:
    output = run_init()
    settings = load_settings(cwd=workdir)
    url, headers, body = curl_parts(output)
    assert url == "http://127.0.0.1:8000/webhooks/extole/production"
    assert headers["Content-Type"] == "application/json"

    app: Flask = create_app(replace(settings, database_url=database_url), TESTING=True)
    try:
        client = app.test_client()
        response = client.post(url.removeprefix("http://127.0.0.1:8000"), data=body,
                               headers=headers)
        assert response.status_code == 200, response.get_data(as_text=True)
        answer = response.get_json()
        assert (answer["accepted"], answer["duplicates"], answer["rejected"]) == (1, 0, [])
        with get_db(app).session() as session:
            [event] = session.scalars(select(OutboxEvent).options(undefer_group("queue"))).all()
        # A reward as Extole posts it: named by its state, with its coupon and a numeric value.
        assert (event.extole_event_id, event.braze_event, event.status) == (
            "local-test-0001", "Reward Fulfilled", "pending")
        assert event.properties is not None
        assert {k: event.properties[k] for k in ("reward_state", "coupon_code", "face_value")
                } == {"reward_state": "FULFILLED", "coupon_code": "ADVOCATE20-LOCAL",
                      "face_value": 20.0}
        # Tampering with the body breaks the signature: the curl is really signed.
        tampered = client.post("/webhooks/extole/production", data=body.replace(b"20", b"21"),
                               headers=headers)
        assert tampered.status_code == 401
        # The staging secret written by init opens staging, and only staging.
        staging = settings.extole_staging_webhook_secret or ""
        response = client.post("/webhooks/extole/staging", data=body,
                               headers={**headers, "X-Extole-Signature":
                                        sign(body, staging)})
        assert response.status_code == 200
        response = client.post("/webhooks/extole/production", data=body,
                               headers={"Content-Type": "application/json",
                                        "Authorization": f"Bearer {staging}"})
        assert response.status_code == 401
    finally:
        app.extensions["relay.db"].dispose()


def test_instructions_without_secrets_say_what_is_missing() -> None:
    text = localsetup.instructions(Settings())
    assert text.splitlines() == [
        "relay will serve on http://127.0.0.1:8000",
        "BRAZE_API_KEY is not set: events are stored and wait (see instance/.env)",
    ]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_make_run_leaves_every_file_readable_by_its_owner_only(workdir: Path) -> None:
    """`relay init` then `relay db upgrade` (what `make run` does), then a webhook stored: the
    database, its -wal and -shm, and instance/.env are 0600, the instance directory 0700."""
    previous = os.umask(0o022)  # the usual umask, which would leave new files 0644
    try:
        _make_run_and_check(workdir)
    finally:
        os.umask(previous)


def _make_run_and_check(workdir: Path) -> None:
    run_init()
    upgraded = CliRunner().invoke(cli, ["db", "upgrade"], env={"FLASK_RUN_FROM_CLI": None})
    assert upgraded.exit_code == 0, upgraded.output
    instance = workdir / "instance"
    app = create_app(load_settings(cwd=workdir), TESTING=True)
    try:
        body = json.dumps(localsetup.SAMPLE_EVENT).encode()
        secret = dotenv_values(instance / ".env")["EXTOLE_WEBHOOK_SECRET"] or ""
        answer = app.test_client().post("/webhooks/extole/production", data=body, headers={
            "Content-Type": "application/json", "X-Extole-Signature": sign(body, secret)})
        assert answer.status_code == 200
        files = {name: instance / name for name in
                 (".env", "relay.db", "relay.db-wal", "relay.db-shm")}
        assert all(path.exists() for path in files.values()), sorted(os.listdir(instance))
        assert {name: oct(_mode(path)) for name, path in files.items()} == {
            name: "0o600" for name in files}
        assert _mode(instance) == 0o700
    finally:
        get_db(app).dispose()


def test_an_existing_world_readable_database_is_tightened(workdir: Path) -> None:
    database = workdir / "old.db"
    migrate.upgrade(f"sqlite:///{database}")
    for path in (database, Path(f"{database}-wal")):
        path.touch()
        path.chmod(0o644)
    engine = make_engine(f"sqlite:///{database}")
    engine.dispose()
    assert _mode(database) == 0o600
    assert _mode(Path(f"{database}-wal")) == 0o600
