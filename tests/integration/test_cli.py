"""`relay` commands through click's runner: their output and what they did to the database."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import responses
from click.testing import CliRunner, Result
from flask import Flask
from sqlalchemy import select, update

from relay import migrate
from relay.cli import cli
from relay.db import get_db, utcnow
from relay.models import InboundRequest, OutboxEvent
from tests.support import (
    BRAZE_URL,
    PROD_KEY,
    PROD_SECRET,
    STAGING_KEY,
    events_by_extole_id,
    free_port,
    sample,
    set_schema_revision,
    write_events,
)

COMMANDS = ("check-config", "db", "events", "forget", "init", "purge", "reconcile", "sandbox",
            "serve", "triggers", "worker")


def set_status(app: Flask, extole_ids: list[str], status: str, **values: Any) -> None:
    with get_db(app).session() as session:
        ids = session.scalars(select(OutboxEvent.id)
                              .where(OutboxEvent.extole_event_id.in_(extole_ids))).all()
        write_events(session, ids, {"status": status, **values})


def post_samples(post_webhook: Any, *names: str) -> None:
    for name in names:
        environment = "staging" if name.startswith("staging") else "production"
        assert post_webhook(sample(name), environment).status_code == 200


# --- help -------------------------------------------------------------------------------------


def test_help_lists_every_command_with_one_line_each(relay: Callable[..., Result]) -> None:
    result = relay("--help")
    assert result.exit_code == 0
    listed = result.stdout.split("Commands:")[1].strip().splitlines()
    assert [line.split()[0] for line in listed] == list(COMMANDS)
    assert all(len(line.split(None, 1)) == 2 and not line.endswith("...") for line in listed)
    assert "--app" not in result.stdout and "--debug" not in result.stdout


@pytest.mark.parametrize("command", [
    ["serve"], ["worker"], ["db", "upgrade"], ["db", "current"], ["db", "history"],
    ["events", "list"], ["events", "show"], ["events", "retry"], ["events", "replay"],
    ["forget"], ["purge"], ["check-config"], ["sandbox"], ["init"], ["reconcile"],
    ["triggers", "list"], ["triggers", "resend"], ["triggers", "drop"]])
def test_every_command_has_help(clean_environment: None, command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.stdout


def test_help_needs_no_valid_settings_and_creates_nothing(clean_environment: None,
                                                           tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--help"], env={"RELAY_LOG_FORMAT": "xml"})
    assert result.exit_code == 0
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_worker_metrics_port_is_documented(clean_environment: None) -> None:
    result = CliRunner().invoke(cli, ["worker", "--help"])
    assert "--metrics-port" in result.stdout


# --- errors -----------------------------------------------------------------------------------


def test_invalid_setting_is_one_line_and_exit_2(relay: Callable[..., Result]) -> None:
    result = relay("events", "list", RELAY_RETENTION_DAYS="soon")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "relay: invalid setting: RELAY_RETENTION_DAYS: expected a whole number, got 'soon'"]
    assert result.stdout == ""


def test_unreachable_database_is_one_line_and_exit_5(clean_environment: None) -> None:
    url = f"postgresql+psycopg://relay@127.0.0.1:{free_port()}/relay"
    result = CliRunner().invoke(cli, ["events", "list"], env={"RELAY_DATABASE_URL": url})
    assert result.exit_code == 5
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("relay: database unavailable: ")
    assert "refused" in line.lower()


def test_database_without_schema_is_one_line(clean_environment: None, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["events", "list"],
                                env={"RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/empty.db"})
    assert result.exit_code == 5
    [line] = result.stderr.strip().splitlines()
    assert "no such table: events" in line


def test_worker_metrics_port_in_use_is_one_line(clean_environment: None, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # where the worker's metrics listen by default
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["worker", "--metrics-port", str(port)],
                                    env={"RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/r.db"})
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"relay: cannot serve metrics on 127.0.0.1:{port}: Address already in use"]


# --- db -----------------------------------------------------------------------------------------


def test_db_upgrade_then_current(clean_environment: None, tmp_path: Path) -> None:
    env = {"RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/new.db"}
    runner = CliRunner()
    assert runner.invoke(cli, ["db", "current"], env=env).stdout.startswith("empty (behind")
    result = runner.invoke(cli, ["db", "upgrade"], env=env)
    assert (result.exit_code, result.stdout) == (0, f"database at {migrate.head_revision()}\n")
    assert runner.invoke(cli, ["db", "current"], env=env).stdout == (
        f"{migrate.head_revision()} (newest)\n")


def test_db_upgrade_refuses_a_schema_newer_than_the_code(clean_environment: None,
                                                         tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/newer.db"
    migrate.upgrade(url)
    set_schema_revision(url, "9999_future")  # as a newer relay leaves it
    runner = CliRunner()
    result = runner.invoke(cli, ["db", "upgrade"], env={"RELAY_DATABASE_URL": url})
    assert (result.exit_code, result.stdout) == (5, "")
    assert result.stderr.splitlines() == [
        "relay: database schema is at 9999_future, newer than this relay knows (its newest is "
        f"{migrate.head_revision()}): install the newer relay"]
    current = runner.invoke(cli, ["db", "current"], env={"RELAY_DATABASE_URL": url})
    assert (current.exit_code, current.stdout) == (
        0, f"9999_future (newer than this relay's {migrate.head_revision()}: install the newer "
           "relay)\n")


def test_db_upgrade_of_a_file_that_is_no_database(clean_environment: None,
                                                  tmp_path: Path) -> None:
    (tmp_path / "broken.db").write_bytes(b"not a database " * 500)
    result = CliRunner().invoke(cli, ["db", "upgrade"],
                                env={"RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/broken.db"})
    assert (result.exit_code, result.stdout) == (5, "")
    assert result.stderr.splitlines() == [
        "relay: database error: DatabaseError: file is not a database"]


def test_db_upgrade_with_postgresql_down(clean_environment: None) -> None:
    url = f"postgresql+psycopg://relay@127.0.0.1:{free_port()}/relay"
    result = CliRunner().invoke(cli, ["db", "upgrade"], env={"RELAY_DATABASE_URL": url})
    assert result.exit_code == 5
    [line] = result.stderr.splitlines()
    assert line.startswith("relay: database unavailable: OperationalError: ")
    assert "refused" in line.lower()


def test_db_upgrade_to_an_unknown_revision(clean_environment: None, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["db", "upgrade", "--revision", "nonesuch"],
                                env={"RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/r.db"})
    assert result.exit_code == 5
    assert result.stderr.splitlines() == [
        "relay: migration to nonesuch failed: Can't locate revision identified by 'nonesuch'"]


# --- events list / show -----------------------------------------------------------------------


def test_events_list_is_a_table_newest_first(relay: Callable[..., Result], app: Flask,
                                             post_webhook: Any) -> None:
    post_samples(post_webhook, "reward_earned.json", "batch.json", "invalid_no_type.json",
                 "staging_named_epoch_seconds.json")
    result = relay("events", "list")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["id", "received", "(UTC)", "env", "status", "tries", "braze",
                              "event", "extole", "event", "id", "person", "last", "error"]
    assert [row.split()[0] for row in rows] == ["6", "5", "4", "3", "2", "1"]
    first = rows[-1].split()
    assert first[3:8] == ["production", "pending", "0", "Earned", "Reward"]
    assert first[8:10] == ["r7k2m9q4x1b8c3d5e6f0", "cust-1036950000"]
    rejected = rows[1]
    assert "rejected" in rejected and "bad-0001" in rejected and "no event type" in rejected


def test_events_list_filters(relay: Callable[..., Result], app: Flask, post_webhook: Any) -> None:
    post_samples(post_webhook, "reward_earned.json", "batch.json", "subscribed.json",
                 "staging_named_epoch_seconds.json")
    set_status(app, ["bt-0002"], "dead", attempts=3, last_error="400 invalid: face value")

    def ids(*args: str) -> list[str]:
        result = relay("events", "list", *args)
        assert result.exit_code == 0, result.output
        return [line.split()[0] for line in result.stdout.splitlines()[1:]]

    assert ids("--status", "dead") == ["3"]
    assert ids("--environment", "staging") == ["6"]
    assert ids("--name", "Earned Reward") == ["4", "1"]
    assert ids("--q", "ANN.LEE@example.com") == ["5", "1"]
    assert ids("--q", "cust-3001") == ["3", "2"]
    assert ids("--q", "bt-0003") == ["4"]
    assert relay("events", "list", "--status", "skipped").stdout == "no events match\n"
    assert relay("events", "list", "--status", "lost").exit_code == 2


def test_events_list_pages_with_before(relay: Callable[..., Result], app: Flask,
                                       post_webhook: Any) -> None:
    post_samples(post_webhook, "batch.json", "reward_earned.json")
    first = relay("events", "list", "--limit", "3").stdout.splitlines()
    assert [line.split()[0] for line in first[1:-1]] == ["4", "3", "2"]
    assert first[-1] == "more: add --before 2"
    second = relay("events", "list", "--limit", "3", "--before", "2").stdout.splitlines()
    assert [line.split()[0] for line in second[1:]] == ["1"]


def test_events_list_cuts_long_errors_to_one_line(relay: Callable[..., Result], app: Flask,
                                                  post_webhook: Any) -> None:
    post_samples(post_webhook, "reward_earned.json")
    set_status(app, ["r7k2m9q4x1b8c3d5e6f0"], "dead", last_error="line one\nline two " + "x" * 300)
    [_, row] = relay("events", "list").stdout.splitlines()
    assert row.endswith("…") and "line one line two" in row and len(row) < 250


def test_events_show_prints_the_whole_story_as_json(relay: Callable[..., Result], app: Flask,
                                                    post_webhook: Any) -> None:
    post_samples(post_webhook, "reward_earned.json")
    result = relay("events", "show", "1")
    assert result.exit_code == 0
    detail = json.loads(result.stdout)
    assert (detail["id"], detail["status"], detail["braze_event"]) == (1, "pending",
                                                                        "Earned Reward")
    assert detail["payload"]["reward_id"] == "a41f0c9e2b7d4e11a3c6f508"
    assert detail["inbound"]["body"] == sample("reward_earned.json").decode()
    assert detail["inbound"]["headers"]["X-Extole-Signature"] == "[redacted]"
    assert detail["attempts_log"] == []


def test_events_show_unknown_id(relay: Callable[..., Result]) -> None:
    result = relay("events", "show", "999")
    assert (result.exit_code, result.stdout) == (3, "")
    assert result.stderr == "relay: no event with id 999\n"


# --- retry / replay ---------------------------------------------------------------------------


def test_events_retry_makes_a_dead_event_due_now(relay: Callable[..., Result], app: Flask,
                                                 post_webhook: Any) -> None:
    post_samples(post_webhook, "reward_earned.json", "subscribed.json")
    long_ago = utcnow() - timedelta(days=2)
    set_status(app, ["r7k2m9q4x1b8c3d5e6f0"], "dead", attempts=7, last_error="503",
               first_failure_at=long_ago, next_attempt_at=long_ago)
    before = utcnow()
    result = relay("events", "retry", "1")
    assert (result.exit_code, result.stdout) == (0, "event 1 is pending, due now\n")
    event = events_by_extole_id(app)["r7k2m9q4x1b8c3d5e6f0"]
    assert (event.status, event.attempts, event.first_failure_at) == ("pending", 0, None)
    assert event.next_attempt_at >= before - timedelta(seconds=1)
    assert event.last_error == "503"  # the history stays readable


def test_events_retry_refuses_a_delivered_event(relay: Callable[..., Result], app: Flask,
                                                post_webhook: Any) -> None:
    post_samples(post_webhook, "reward_earned.json")
    set_status(app, ["r7k2m9q4x1b8c3d5e6f0"], "delivered")
    result = relay("events", "retry", "1")
    assert result.exit_code == 4
    assert result.stderr == ("relay: event 1 is delivered: only dead or retrying events can be "
                             "retried\n")
    assert events_by_extole_id(app)["r7k2m9q4x1b8c3d5e6f0"].status == "delivered"
    assert relay("events", "retry", "42").exit_code == 3


def test_events_replay_dead_prints_the_count(relay: Callable[..., Result], app: Flask,
                                             post_webhook: Any) -> None:
    post_samples(post_webhook, "reward_earned.json", "batch.json", "subscribed.json",
                 "staging_named_epoch_seconds.json")
    set_status(app, ["bt-0001", "bt-0002", "bt-0003", "st-77aa88bb99cc"], "dead", attempts=4)
    set_status(app, ["r7k2m9q4x1b8c3d5e6f0"], "delivered")

    result = relay("events", "replay", "--status", "dead", "--name", "Earned Reward")
    assert (result.exit_code, result.stdout) == (0, "requeued 1 dead event\n")
    assert events_by_extole_id(app)["bt-0003"].status == "pending"

    result = relay("events", "replay", "--status", "dead", "--environment", "staging")
    assert result.stdout == "requeued 1 dead event\n"
    assert events_by_extole_id(app)["st-77aa88bb99cc"].status == "pending"

    result = relay("events", "replay", "--status", "dead")
    assert result.stdout == "requeued 2 dead events\n"
    stored = events_by_extole_id(app)
    assert {stored[i].status for i in ("bt-0001", "bt-0002")} == {"pending"}
    assert stored["r7k2m9q4x1b8c3d5e6f0"].status == "delivered"
    assert relay("events", "replay").stdout == "requeued 0 dead events\n"


def test_events_replay_since(relay: Callable[..., Result], app: Flask, post_webhook: Any) -> None:
    post_samples(post_webhook, "reward_earned.json", "subscribed.json")
    set_status(app, ["r7k2m9q4x1b8c3d5e6f0", "sb1234abcd5678ef9012"], "dead")
    set_status(app, ["r7k2m9q4x1b8c3d5e6f0"], "dead",
               received_at=utcnow() - timedelta(days=3))
    since = (utcnow() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = relay("events", "replay", "--since", since)
    assert result.stdout == "requeued 1 dead event\n"
    stored = events_by_extole_id(app)
    assert (stored["sb1234abcd5678ef9012"].status, stored["r7k2m9q4x1b8c3d5e6f0"].status) == (
        "pending", "dead")
    bad = relay("events", "replay", "--since", "yesterday")
    assert bad.exit_code == 2 and "ISO-8601" in bad.stderr


def test_events_replay_one_event_and_delivered_ones_after_asking(
        relay: Callable[..., Result], app: Flask, post_webhook: Any) -> None:
    post_samples(post_webhook, "reward_earned.json", "subscribed.json", "invalid_no_type.json")
    set_status(app, ["r7k2m9q4x1b8c3d5e6f0", "sb1234abcd5678ef9012"], "delivered")

    assert relay("events", "replay", "1").stdout == "event 1 is pending, due now\n"
    assert events_by_extole_id(app)["r7k2m9q4x1b8c3d5e6f0"].status == "pending"

    declined = relay("events", "replay", "--status", "delivered", input="n\n")
    assert declined.exit_code == 1 and "Send 1 delivered events to Braze again?" in declined.stdout
    assert events_by_extole_id(app)["sb1234abcd5678ef9012"].status == "delivered"
    accepted = relay("events", "replay", "--status", "delivered", input="y\n")
    assert accepted.stdout.endswith("requeued 1 delivered event\n")
    assert events_by_extole_id(app)["sb1234abcd5678ef9012"].status == "pending"

    rejected = relay("events", "replay", "3")
    assert rejected.exit_code == 4 and "cannot be sent" in rejected.stderr
    bulk = relay("events", "replay", "--status", "rejected", "--yes")
    assert bulk.exit_code == 4
    assert bulk.stderr == "relay: rejected events cannot be sent\n"
    assert events_by_extole_id(app)["bad-0001"].status == "rejected"


# --- forget / purge ----------------------------------------------------------------------------


def test_forget_asks_first_then_prints_counts(relay: Callable[..., Result], app: Flask,
                                              post_webhook: Any) -> None:
    post_samples(post_webhook, "reward_earned.json", "referred_converted.json")
    declined = relay("forget", "--email", "Ann.Lee@example.com", input="n\n")
    assert declined.exit_code == 1
    assert "Erase all personal data of email Ann.Lee@example.com" in declined.stdout
    assert events_by_extole_id(app)["r7k2m9q4x1b8c3d5e6f0"].email == "ann.lee@example.com"

    result = relay("forget", "--email", "Ann.Lee@example.com", input="y\n")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[-6:] == [
        "events: 1 redacted", "inbound_requests: 1 redacted", "delivery_attempts: 0 redacted",
        "identity_cache: 0 deleted", "triggers: 0 deleted", "dedup_keys: 0 deleted"]
    stored = events_by_extole_id(app)
    assert stored["r7k2m9q4x1b8c3d5e6f0"].email is None
    assert stored["rc00112233445566778"].email == "bo.chen@example.org"


def test_forget_needs_an_identifier(relay: Callable[..., Result]) -> None:
    result = relay("forget", "--yes")
    assert result.exit_code == 2 and "give --email, --external-id or both" in result.stderr


def test_forget_by_external_id_with_yes(relay: Callable[..., Result], app: Flask,
                                        post_webhook: Any) -> None:
    post_samples(post_webhook, "batch.json")
    result = relay("forget", "--external-id", "cust-3001", "--yes")
    assert result.stdout.splitlines() == [
        "events: 2 redacted", "inbound_requests: 1 redacted", "delivery_attempts: 0 redacted",
        "identity_cache: 0 deleted", "triggers: 0 deleted", "dedup_keys: 0 deleted"]
    stored = events_by_extole_id(app)
    assert stored["bt-0001"].external_id is None and stored["bt-0003"].email == "dee@example.net"


def test_purge_prints_counts_and_deletes(relay: Callable[..., Result], app: Flask,
                                         post_webhook: Any) -> None:
    post_samples(post_webhook, "reward_earned.json", "subscribed.json", "unsubscribed.json")
    old = utcnow() - timedelta(days=10)
    set_status(app, ["r7k2m9q4x1b8c3d5e6f0", "sb1234abcd5678ef9012"], "delivered",
               received_at=old)
    set_status(app, ["us1234abcd5678ef9013"], "dead", received_at=old)
    with get_db(app).session() as session:
        session.execute(update(InboundRequest).values(received_at=old))

    kept = relay("purge")  # RELAY_RETENTION_DAYS defaults to 30
    assert kept.stdout.splitlines()[1:] == ["  events: 0", "  triggers: 0",
                                            "  delivery_attempts: 0", "  inbound_requests: 0",
                                            "  identity_cache: 0", "  refused_request_counts: 0",
                                            "  reconcile_runs: 0", "  dedup_keys: 0"]
    result = relay("purge", RELAY_RETENTION_DAYS="7")
    # The purged events' keys stay (RELAY_DEDUP_DAYS, 400 by default): replays stay duplicates.
    assert result.stdout.splitlines() == [
        "purged rows received more than 7 days ago (keys of purged events: 400 days):",
        "  events: 2", "  triggers: 0", "  delivery_attempts: 0", "  inbound_requests: 2",
        "  identity_cache: 0", "  refused_request_counts: 0", "  reconcile_runs: 0",
        "  dedup_keys: 0"]
    assert set(events_by_extole_id(app)) == {"us1234abcd5678ef9013"}
    assert relay("purge", "--older-than", "0").exit_code == 2


def test_purge_older_than_overrides_the_setting(relay: Callable[..., Result], app: Flask,
                                                post_webhook: Any) -> None:
    post_samples(post_webhook, "reward_earned.json")
    set_status(app, ["r7k2m9q4x1b8c3d5e6f0"], "skipped",
               received_at=utcnow() - timedelta(days=3))
    assert "events: 0" in relay("purge", "--older-than", "4").stdout
    assert "events: 1" in relay("purge", "--older-than", "2").stdout
    assert events_by_extole_id(app) == {}


# --- check-config -----------------------------------------------------------------------------

EXPORT = f"{BRAZE_URL}/users/export/ids"
STAGING_URL = "https://rest.fra-02.braze.eu"


def braze_env(**extra: str) -> dict[str, str]:
    return {"BRAZE_REST_ENDPOINT": BRAZE_URL, "BRAZE_API_KEY": PROD_KEY,
            "BRAZE_STAGING_API_KEY": STAGING_KEY, "BRAZE_STAGING_REST_ENDPOINT": STAGING_URL,
            "RELAY_ADMIN_PASSWORD": "pw", "RELAY_SECRET_KEY": "sk", **extra}


def test_check_config_all_ok(relay: Callable[..., Result]) -> None:
    with responses.RequestsMock() as braze:
        braze.post(EXPORT, json={"users": [], "message": "success"}, status=201)
        braze.post(f"{STAGING_URL}/users/export/ids", json={"users": [], "message": "success"})
        result = relay("check-config", **braze_env())
        calls = list(braze.calls)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "settings: OK",
        f"database: OK ({relay_url(result)}, schema {migrate.head_revision()})",
        "webhook secret production: OK",
        "webhook secret staging: OK",
        "admin: OK (user admin)",
        "braze production: OK",
        "braze staging: OK",
        "extole production: not configured (EXTOLE_API_TOKEN is not set): production is not "
        "reconciled",
        "extole staging: not configured (EXTOLE_STAGING_API_TOKEN is not set): staging is not "
        "reconciled",
    ]
    production, staging = calls
    assert production.request.headers["Authorization"] == f"Bearer {PROD_KEY}"
    assert staging.request.headers["Authorization"] == f"Bearer {STAGING_KEY}"
    assert json.loads(production.request.body) == {
        "external_ids": ["relay-check-config"], "fields_to_export": ["external_id"]}


def relay_url(result: Result) -> str:
    line = next(line for line in result.stdout.splitlines() if line.startswith("database: OK"))
    return line.split("(")[1].split(",")[0]


def test_check_config_names_each_problem_and_never_the_key(relay: Callable[..., Result]) -> None:
    staging_endpoint = f"http://127.0.0.1:{free_port()}"
    with responses.RequestsMock() as braze:
        braze.post(EXPORT, status=401, json={"message": f"Invalid API key: {PROD_KEY}"})
        braze.add_passthru(staging_endpoint)
        result = relay("check-config", **braze_env(
            BRAZE_STAGING_REST_ENDPOINT=staging_endpoint))
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert "braze production: 401 key refused" in lines
    assert "braze staging: connection refused" in lines
    assert result.stderr == "relay: 2 problems found\n"
    assert PROD_KEY not in result.output and STAGING_KEY not in result.output


def test_check_config_tries_each_extole_token(relay: Callable[..., Result]) -> None:
    extole = "https://api.extole.io/v2/rewards"
    with responses.RequestsMock() as mock:
        mock.post(EXPORT, json={"users": [], "message": "success"}, status=201)
        mock.post(f"{STAGING_URL}/users/export/ids", json={"users": [], "message": "success"})
        mock.get(extole, json=[], match=[responses.matchers.header_matcher(
            {"Authorization": "Bearer extole-prod-token"})])
        mock.get(extole, status=403, json={
            "code": "access_denied", "message": "Access denied", "http_status_code": 403,
            "parameters": {}, "unique_id": "u-1"}, match=[responses.matchers.header_matcher(
                {"Authorization": "Bearer extole-staging-token"})])
        result = relay("check-config", **braze_env(
            EXTOLE_API_TOKEN="extole-prod-token", EXTOLE_STAGING_API_TOKEN="extole-staging-token"))
        probe = next(call.request for call in mock.calls if call.request.method == "GET")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-2:] == [
        "extole production: OK (token reads rewards at https://api.extole.io)",
        "extole staging: Extole refused the staging API token (403: access_denied: Access denied "
        "(unique_id u-1)): check EXTOLE_STAGING_API_TOKEN (it needs the scope to read rewards)",
    ]
    assert result.stderr == "relay: 1 problem found\n"
    assert probe.url.startswith("https://api.extole.io/v2/rewards?time_interval=")
    assert "&success_only=false&limit=1&offset=0" in probe.url
    assert "extole-prod-token" not in result.output


def test_check_config_other_braze_answers(relay: Callable[..., Result]) -> None:
    with responses.RequestsMock() as braze:
        braze.post(EXPORT, status=403, json={"message": f"Access denied for {PROD_KEY}"})
        braze.post(f"{STAGING_URL}/users/export/ids", status=500, body="upstream broke")
        result = relay("check-config", **braze_env())
    lines = result.stdout.splitlines()
    assert ("braze production: 403 key lacks permission for /users/export/ids (it needs "
            "users.track and users.export.ids): Access denied for [redacted]") in lines
    assert "braze staging: 500 from Braze: upstream broke" in lines
    assert result.exit_code == 1 and PROD_KEY not in result.output


def test_check_config_missing_keys(relay: Callable[..., Result]) -> None:
    result = relay("check-config", EXTOLE_STAGING_WEBHOOK_SECRET="")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert "braze production: BRAZE_API_KEY is not set: production events wait in the outbox" in (
        lines)
    assert ("braze staging: not configured (BRAZE_STAGING_API_KEY is not set): staging events "
            "are stored and skipped") in lines
    assert ("webhook secret staging: not set (EXTOLE_STAGING_WEBHOOK_SECRET): staging webhooks "
            "are answered 503") in lines
    assert "admin: disabled: set RELAY_ADMIN_PASSWORD and RELAY_SECRET_KEY to enable it" in lines
    assert result.stderr == "relay: 1 problem found\n"  # only production's key is a problem


def test_check_config_key_without_endpoint_and_shared_secrets(
        relay: Callable[..., Result]) -> None:
    result = relay("check-config", BRAZE_API_KEY=PROD_KEY,
                   EXTOLE_STAGING_WEBHOOK_SECRET=PROD_SECRET)
    lines = result.stdout.splitlines()
    assert "braze production: BRAZE_API_KEY is set but BRAZE_REST_ENDPOINT is not" in lines
    assert ("webhook secrets: production and staging use the same secret: each environment "
            "needs its own") in lines
    assert result.exit_code == 1 and PROD_SECRET not in result.output


def test_check_config_database_problem(clean_environment: None, tmp_path: Path) -> None:
    url = f"postgresql+psycopg://relay:hunter2@127.0.0.1:{free_port()}/relay"
    result = CliRunner().invoke(cli, ["check-config"], env={"RELAY_DATABASE_URL": url})
    assert result.exit_code == 1
    [line] = [line for line in result.stdout.splitlines() if line.startswith("database:")]
    assert "relay:***@127.0.0.1" in line and "database unavailable" in line
    assert "hunter2" not in result.output
    empty = CliRunner().invoke(cli, ["check-config"],
                               env={"RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/e.db"})
    assert "schema is missing" in empty.stdout and "run `relay db upgrade`" in empty.stdout


def test_check_config_invalid_setting(relay: Callable[..., Result]) -> None:
    result = relay("check-config", BRAZE_REST_ENDPOINT="rest.iad-01.braze.com")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("relay: invalid setting: BRAZE_REST_ENDPOINT: expected")

