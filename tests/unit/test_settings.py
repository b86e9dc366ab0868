"""Settings (README, "Configuration"): defaults, one-line validation naming the variable,
sources."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.exceptions import SettingsError
from relay.settings import Rate, Settings, load_settings

# Every secret a deployment can set, to check that none is ever shown.
SECRETS = {
    "BRAZE_API_KEY": "braze-prod-key-SECRET1",
    "BRAZE_STAGING_API_KEY": "braze-staging-key-SECRET2",
    "EXTOLE_WEBHOOK_SECRET": "extole-prod-SECRET3",
    "EXTOLE_STAGING_WEBHOOK_SECRET": "extole-staging-SECRET4",
    "RELAY_ADMIN_PASSWORD": "admin-pw-SECRET5",
    "RELAY_SECRET_KEY": "session-key-SECRET6",
}


def load(tmp_path: Path, **environ: str) -> Settings:
    return load_settings(environ=environ, cwd=tmp_path)


def test_defaults_are_the_readme_table(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert settings.database_url == "sqlite:///instance/relay.db"
    assert settings.braze_rest_endpoint is None
    assert settings.braze_api_key is None
    assert settings.braze_staging_api_key is None
    assert settings.braze_staging_rest_endpoint is None
    assert settings.extole_webhook_secret is None
    assert settings.extole_staging_webhook_secret is None
    assert settings.admin_user == "admin"
    assert settings.admin_password is None
    assert settings.secret_key is None
    assert settings.braze_max_objects == 75
    assert settings.braze_export_rate == Rate(250, 60.0)
    assert settings.braze_email_identity == "lookup"
    assert settings.identity_ttl == 3600
    assert settings.event_map is None
    assert (settings.retry_base, settings.retry_max_delay) == (5.0, 3600.0)
    assert settings.log_format == "text"
    assert settings.max_body_bytes == 1048576
    assert (settings.max_items, settings.refused_log_rate) == (1000, 60)
    assert settings.retry_max_age == 86400
    assert settings.retention_days == 30
    assert settings.dedup_days == 400
    assert settings.trigger_delay == 0.0
    assert settings == Settings()


def test_staging_endpoint_defaults_to_the_production_endpoint(tmp_path: Path) -> None:
    settings = load(tmp_path, BRAZE_REST_ENDPOINT="https://rest.iad-01.braze.com/")
    assert settings.braze_endpoint("production") == "https://rest.iad-01.braze.com"
    assert settings.braze_endpoint("staging") == "https://rest.iad-01.braze.com"
    other = load(tmp_path, BRAZE_REST_ENDPOINT="https://rest.iad-01.braze.com",
                 BRAZE_STAGING_REST_ENDPOINT="https://rest.fra-01.braze.eu")
    assert other.braze_endpoint("production") == "https://rest.iad-01.braze.com"
    assert other.braze_endpoint("staging") == "https://rest.fra-01.braze.eu"


def test_keys_and_secrets_belong_to_one_environment(tmp_path: Path) -> None:
    settings = load(tmp_path, **SECRETS)
    assert settings.braze_key("production") == SECRETS["BRAZE_API_KEY"]
    assert settings.braze_key("staging") == SECRETS["BRAZE_STAGING_API_KEY"]
    assert settings.webhook_secret("production") == SECRETS["EXTOLE_WEBHOOK_SECRET"]
    assert settings.webhook_secret("staging") == SECRETS["EXTOLE_STAGING_WEBHOOK_SECRET"]
    only_production = load(tmp_path, BRAZE_API_KEY="k", EXTOLE_WEBHOOK_SECRET="s")
    assert only_production.braze_key("staging") is None
    assert only_production.webhook_secret("staging") is None


def test_valid_values_are_parsed(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        RELAY_DATABASE_URL="postgresql://relay:pw@db.example/relay",
        BRAZE_MAX_OBJECTS=" 50 ",
        BRAZE_EXPORT_RATE="100 / seconds",
        BRAZE_EMAIL_IDENTITY="EMAIL",
        RELAY_IDENTITY_TTL="0",
        RELAY_RETRY_BASE="0.5",
        RELAY_RETRY_MAX_DELAY="60",
        RELAY_LOG_FORMAT="JSON",
        RELAY_MAX_BODY_BYTES="2048",
        RELAY_MAX_ITEMS="10000",
        RELAY_REFUSED_LOG_RATE="0",
        RELAY_ADMIN_USER="  ",
        EXTOLE_WEBHOOK_SECRET="  padded  ",
    )
    assert settings.database_url == "postgresql+psycopg://relay:pw@db.example/relay"
    assert settings.braze_max_objects == 50
    assert settings.braze_export_rate == Rate(100, 1.0)
    assert settings.braze_export_rate.per_second == 100
    assert settings.braze_email_identity == "email"
    assert settings.identity_ttl == 0
    assert (settings.retry_base, settings.retry_max_delay) == (0.5, 60.0)
    assert settings.log_format == "json"
    assert settings.max_body_bytes == 2048
    assert (settings.max_items, settings.refused_log_rate) == (10000, 0)
    assert settings.admin_user == "admin"
    assert settings.extole_webhook_secret == "padded"
    assert load(tmp_path, RELAY_DATABASE_URL="postgres://h/db").database_url == (
        "postgresql+psycopg://h/db")
    assert load(tmp_path, BRAZE_EXPORT_RATE="15000/hour").braze_export_rate == Rate(15000, 3600.0)
    assert load(tmp_path, RELAY_TRIGGER_DELAY="0").trigger_delay == 0.0
    assert load(tmp_path, RELAY_TRIGGER_DELAY="90.5").trigger_delay == 90.5


def test_external_id_source(tmp_path: Path) -> None:
    assert load(tmp_path).external_id_from == "partner_user_id"
    assert load(tmp_path, RELAY_EXTERNAL_ID=" Email ").external_id_from == "email"
    # `external_id` is the other name Extole bodies give partner_user_id: the same choice.
    assert load(tmp_path, RELAY_EXTERNAL_ID="external_id").external_id_from == "partner_user_id"
    assert load(tmp_path, RELAY_EXTERNAL_ID="PARTNER_USER_ID").external_id_from == (
        "partner_user_id")


def test_invalid_external_id_source_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, RELAY_EXTERNAL_ID="person_id")
    assert str(caught.value) == ("RELAY_EXTERNAL_ID: must be one of partner_user_id, external_id, "
                                 "email, got 'person_id'")


def test_blank_values_mean_the_default(tmp_path: Path) -> None:
    settings = load(tmp_path, RELAY_RETRY_BASE="", RELAY_LOG_FORMAT="   ",
                    EXTOLE_WEBHOOK_SECRET=" ")
    assert (settings.retry_base, settings.log_format) == (5.0, "text")
    assert settings.extole_webhook_secret is None


INVALID = [
    ("RELAY_DATABASE_URL", "mysql://user:hunter2@db/relay"),
    ("RELAY_DATABASE_URL", "instance/relay.db"),
    ("RELAY_DATABASE_URL", "postgres+psycopg://h/db"),
    ("BRAZE_REST_ENDPOINT", "rest.iad-01.braze.com"),
    ("BRAZE_REST_ENDPOINT", "ftp://rest.iad-01.braze.com"),
    ("BRAZE_STAGING_REST_ENDPOINT", "https://"),
    ("BRAZE_MAX_OBJECTS", "76"),
    ("BRAZE_MAX_OBJECTS", "1"),
    ("BRAZE_MAX_OBJECTS", "seventy"),
    ("BRAZE_EXPORT_RATE", "fast"),
    ("BRAZE_EXPORT_RATE", "0/minute"),
    ("BRAZE_EXPORT_RATE", "250/day"),
    ("BRAZE_EMAIL_IDENTITY", "phone"),
    ("RELAY_EXTERNAL_ID", "person_id"),
    ("RELAY_EXTERNAL_ID", "e-mail"),
    ("RELAY_IDENTITY_TTL", "-1"),
    ("RELAY_IDENTITY_TTL", "1h"),
    ("RELAY_EVENT_MAP", "/nonexistent/events.toml"),
    ("RELAY_RETRY_BASE", "abc"),
    ("RELAY_RETRY_BASE", "0"),
    ("RELAY_RETRY_BASE", "-1"),
    ("RELAY_RETRY_BASE", "nan"),
    ("RELAY_RETRY_BASE", "inf"),
    ("RELAY_RETRY_MAX_DELAY", "0"),
    ("RELAY_RETRY_MAX_DELAY", "1"),  # below the retry base (5)
    ("RELAY_RETRY_MAX_AGE", "0"),
    ("RELAY_RETRY_MAX_AGE", "1.5"),
    ("RELAY_LOG_FORMAT", "xml"),
    ("RELAY_LOG_FORMAT", "js\non"),
    ("RELAY_MAX_BODY_BYTES", "0"),
    ("RELAY_MAX_BODY_BYTES", "1MB"),
    ("RELAY_MAX_ITEMS", "0"),
    ("RELAY_MAX_ITEMS", "10001"),
    ("RELAY_REFUSED_LOG_RATE", "-1"),
    ("RELAY_REFUSED_LOG_RATE", "60/minute"),
    ("RELAY_RETENTION_DAYS", "0"),
    ("RELAY_DEDUP_DAYS", "0"),
    ("RELAY_DEDUP_DAYS", "a year"),
    ("RELAY_DEDUP_DAYS", "29"),  # below the retention (30): keys would go before their events
    ("RELAY_TRIGGER_DELAY", "-1"),
    ("RELAY_TRIGGER_DELAY", "soon"),
    ("RELAY_WORKER_BATCH_SIZE", "0"),
    ("RELAY_WORKER_THREADS", "65"),
    ("RELAY_LEASE_SECONDS", "5"),
    ("RELAY_POLL_INTERVAL", "0"),
    ("BRAZE_CONNECT_TIMEOUT", "-1"),
    ("BRAZE_READ_TIMEOUT", "x"),
    ("RELAY_PROXY_FIX", "11"),
]


@pytest.mark.parametrize(("variable", "value"), INVALID)
def test_invalid_value_names_its_variable_in_one_line(tmp_path: Path, variable: str,
                                                      value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, **{variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}: "), message
    assert "\n" not in message
    assert len(message) < 200
    assert "hunter2" not in message  # a database password is not repeated


def test_dedup_days_default_and_bounds(tmp_path: Path) -> None:
    assert load(tmp_path).dedup_days == 400
    assert load(tmp_path, RELAY_DEDUP_DAYS="30").dedup_days == 30
    with pytest.raises(SettingsError, match=r"^RELAY_DEDUP_DAYS: must be at least "
                                            r"RELAY_RETENTION_DAYS \(400 < 500\)$"):
        load(tmp_path, RELAY_RETENTION_DAYS="500")
    assert load(tmp_path, RELAY_RETENTION_DAYS="500", RELAY_DEDUP_DAYS="500").dedup_days == 500


def test_admin_password_needs_a_secret_key(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^RELAY_SECRET_KEY: required when "
                                            r"RELAY_ADMIN_PASSWORD"):
        load(tmp_path, RELAY_ADMIN_PASSWORD="pw")
    assert load(tmp_path, RELAY_ADMIN_PASSWORD="pw", RELAY_SECRET_KEY="k").admin_password == "pw"


def test_event_map_content_is_checked_at_start_up(tmp_path: Path) -> None:
    broken = tmp_path / "events.toml"
    broken.write_text('[events.reward_fulfilled]\nbraze_name = "Reward Fulfilled"\n')
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, RELAY_EVENT_MAP=str(broken))
    assert str(caught.value).startswith("RELAY_EVENT_MAP")
    assert "unknown keys: braze_name" in str(caught.value)
    assert load(tmp_path, RELAY_EVENT_MAP="config/events.toml").event_map == "config/events.toml"


def test_environment_beats_dotenv_beats_instance_dotenv(tmp_path: Path) -> None:
    (tmp_path / "instance").mkdir()
    (tmp_path / "instance" / ".env").write_text(
        "RELAY_LOG_FORMAT=json\nRELAY_RETENTION_DAYS=7\nRELAY_IDENTITY_TTL=60\n"
        "EXTOLE_WEBHOOK_SECRET=from-instance\n")
    (tmp_path / ".env").write_text("RELAY_RETENTION_DAYS=14\nRELAY_IDENTITY_TTL=120\n")
    settings = load_settings(environ={"RELAY_IDENTITY_TTL": "240"}, cwd=tmp_path)
    assert settings.identity_ttl == 240            # environment
    assert settings.retention_days == 14           # .env
    assert settings.log_format == "json"           # instance/.env
    assert settings.extole_webhook_secret == "from-instance"
    assert settings.retry_base == 5.0              # default


def test_invalid_value_in_a_dotenv_file_is_named_too(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("RELAY_MAX_BODY_BYTES=lots\n")
    with pytest.raises(SettingsError, match=r"^RELAY_MAX_BODY_BYTES: "):
        load(tmp_path)
    # The environment's valid value wins over the file's invalid one.
    assert load(tmp_path, RELAY_MAX_BODY_BYTES="10").max_body_bytes == 10


def test_unreadable_dotenv_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"RELAY_LOG_FORMAT=\xff\xfe\n")
    with pytest.raises(SettingsError) as caught:
        load(tmp_path)
    assert str(caught.value) == f"{tmp_path / '.env'}: cannot be read (not UTF-8 text)"


def test_process_environment_is_the_default_source(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_RETENTION_DAYS", "3")
    assert load_settings(cwd=tmp_path).retention_days == 3


def test_repr_shows_no_secret(tmp_path: Path) -> None:
    settings = load(tmp_path, RELAY_DATABASE_URL="postgresql+psycopg://relay:db-pw-SECRET7@h/r",
                    **SECRETS)
    for shown in (repr(settings), str(settings), f"{settings}"):
        for secret in [*SECRETS.values(), "db-pw-SECRET7"]:
            assert secret not in shown
    assert "postgresql+psycopg://relay:***@h/r" in repr(settings)
    assert "retry_base=5.0" in repr(settings)


def test_invalid_setting_stops_the_command_line_with_one_line(tmp_path: Path) -> None:
    relay = Path(sys.executable).parent / "relay"
    assert relay.exists(), "the relay console script is installed in the virtualenv"
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("RELAY_", "BRAZE_", "EXTOLE_"))}
    environ["RELAY_RETRY_BASE"] = "abc"
    environ["RELAY_DATABASE_URL"] = f"sqlite:///{tmp_path / 'relay.db'}"
    result = subprocess.run([str(relay), "db", "current"], cwd=tmp_path, env=environ,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "RELAY_RETRY_BASE" in lines[0]
    assert "abc" in lines[0]
    assert "Traceback" not in result.stderr
