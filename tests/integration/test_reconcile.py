"""Reconciliation (README, "Reconciliation"): rewards read from the sandbox's imitation of
Extole's GET /v2/rewards become reward events stored through the receiver's own ingest, each
reward state once, whatever else arrives at the same time; every run is recorded and shown."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from click.testing import CliRunner, Result
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from relay.cli import cli
from relay.db import get_db, utcnow
from relay.exceptions import ReconcileBusy
from relay.extoleapi import ExtoleClient
from relay.models import InboundRequest, OutboxEvent, ReconcileLock, ReconcileRun
from relay.reconcile import LEASE_SECONDS, Reconciler, RunReport
from relay.sandbox import SandboxConfig, create_sandbox_app
from relay.scheduler import reconcile as reconcile_job
from relay.settings import _VARIABLES, Settings
from tests.support import (
    POSTGRESQL_ONLY,
    PROD_KEY,
    STAGING_KEY,
    events_by_extole_id,
    login,
    sample_json,
    serving,
    stored_events,
)

TOKEN = "extole-production-token-0001"
STAGING_TOKEN = "extole-staging-token-0002"
PAGE = sample_json("extole_rewards_page.json")
RELAY = str(Path(sys.executable).parent / "relay")
SENT_ID = "c93e7a1f5b2d4c6e8a0f1b3d"
EARNED_ID = "e5f6a7b8c9d0e1f2a3b4c5d6"


@pytest.fixture
def sandbox() -> Iterator[tuple[str, Any]]:
    """Braze and Extole in one sandbox on a local port: (base URL, its state)."""
    app = create_sandbox_app(SandboxConfig(
        api_keys=[f"production={PROD_KEY}", f"staging={STAGING_KEY}"],
        extole_tokens=[f"production={TOKEN}", f"staging={STAGING_TOKEN}"]))
    with serving(app) as url:
        yield url, app.extensions["relay_sandbox"]


@pytest.fixture
def settings(make_settings: Callable[..., Settings], sandbox: tuple[str, Any]) -> Settings:
    """The test settings with a production Extole token, Extole and Braze at the sandbox."""
    url, _ = sandbox
    return make_settings(extole_api_token=TOKEN, extole_api_url=url, braze_rest_endpoint=url)


SLEEPS: list[float] = []


@pytest.fixture
def reconciler(app: Flask, settings: Settings) -> Callable[..., Reconciler]:
    """Reconcilers on the app's database whose Extole clients sleep in `SLEEPS` (no waiting)."""
    SLEEPS.clear()

    def make(**options: Any) -> Reconciler:
        run_settings: Settings = options.pop("settings", settings)

        def client_for(environment: str) -> ExtoleClient:
            token = run_settings.extole_token(environment)
            assert token
            return ExtoleClient(run_settings.extole_api_url, token, environment=environment,
                                sleep=SLEEPS.append)

        return Reconciler(run_settings, get_db(app), app.extensions["relay.event_map"],
                          client_for=client_for, **options)

    return make


def rewards_now(rewards: list[dict[str, Any]], hours_ago: float = 1) -> list[dict[str, Any]]:
    """The rewards as created `hours_ago` (within the default two-day window)."""
    created = (utcnow() - timedelta(hours=hours_ago)).isoformat(timespec="milliseconds") + "Z"
    return [{**reward, "created_at": created} for reward in rewards]


def extole_has(sandbox: tuple[str, Any], rewards: list[dict[str, Any]],
               program: str = "production") -> None:
    url, _ = sandbox
    answer = requests.post(f"{url}/sandbox/extole/rewards?program={program}", json=rewards,
                           timeout=60)
    assert answer.status_code == 200, answer.text


def reward(reward_id: str, state: str = "EARNED", **fields: Any) -> dict[str, Any]:
    return {"reward_id": reward_id, "state": state, "person_id": f"p-{reward_id}",
            "partner_user_id": f"cust-{reward_id}", "email": None, "face_value": "10.00",
            "face_value_type": "USD", "data": {"journey_name": "ADVOCATE"}, **fields}


def counts(app: Flask) -> dict[str, int]:
    with get_db(app).session() as session:
        return {name: session.scalar(select(func.count()).select_from(model)) or 0
                for name, model in (("events", OutboxEvent), ("inbound", InboundRequest),
                                    ("runs", ReconcileRun), ("locks", ReconcileLock))}


def extole_ids(app: Flask) -> list[str]:
    return sorted(str(e.extole_event_id) for e in stored_events(app))


def runs(app: Flask) -> list[ReconcileRun]:
    with get_db(app).session() as session:
        return list(session.scalars(select(ReconcileRun).order_by(ReconcileRun.id)))


def numbers(report: RunReport | None) -> tuple[int, int, int, int]:
    assert report is not None
    return report.seen, report.present, report.backfilled, report.errors


# --- what a run stores ---------------------------------------------------------------------------


def test_each_reward_becomes_the_reward_event_its_webhook_would_have_been(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler]) -> None:
    page = rewards_now(PAGE)
    extole_has(sandbox, page)
    report = reconciler().run("production")
    assert report is not None and report.ok, report
    assert numbers(report) == (2, 0, 2, 0)
    assert report.backfilled_ids == [f"reconciled:{SENT_ID}:SENT",
                                     f"reconciled:{EARNED_ID}:EARNED"]
    events = {e.extole_event_id: e for e in stored_events(app)}
    sent = events[f"reconciled:{SENT_ID}:SENT"]
    assert (sent.environment, sent.extole_type, sent.status) == ("production", "SENT", "pending")
    assert sent.event_time == datetime.fromisoformat(page[0]["created_at"][:-1])
    assert (sent.external_id, sent.email) == (None, "bo.chen@example.org")
    # The item is Extole's reward webhook: the state as its type, the envelope first.
    assert sent.payload == {"type": "SENT", "event_id": f"reconciled:{SENT_ID}:SENT",
                            "event_time": page[0]["created_at"],
                            **{k: v for k, v in page[0].items()
                               if k not in ("state", "created_at")}}
    # The webhook's mapping and properties (README, "Reward events").
    assert sent.braze_event == "Reward Sent"
    assert sent.properties is not None
    assert {k: sent.properties[k] for k in ("reward_id", "reward_state", "coupon_code",
                                            "face_value", "extole_event_id")} == {
        "reward_id": SENT_ID, "reward_state": "SENT", "coupon_code": "FRIEND20-7QX4",
        "face_value": 20.0, "extole_event_id": f"reconciled:{SENT_ID}:SENT"}
    earned = events[f"reconciled:{EARNED_ID}:EARNED"]
    assert (earned.braze_event, earned.external_id) == ("Earned Reward", "cust-1036950000")
    assert earned.properties is not None and "coupon_code" not in earned.properties
    # One inbound row for the page, its body the items stored.
    with get_db(app).session() as session:
        inbound = session.scalars(select(InboundRequest)).one()
    assert (inbound.method, inbound.outcome, inbound.status_code, inbound.accepted) == (
        "GET", "reconciled", 200, 2)
    assert inbound.path.startswith("/v2/rewards?time_interval=")
    assert inbound.path.endswith("&success_only=false&limit=1000&offset=0")
    assert json.loads(inbound.body or b"") == [sent.payload, earned.payload]
    assert sent.inbound_id == inbound.id
    [run] = runs(app)
    assert (run.environment, run.trigger, run.seen, run.present, run.backfilled, run.errors,
            run.error) == ("production", "command", 2, 0, 2, 0, None)
    assert run.window_end - run.window_start == timedelta(seconds=172800)
    assert counts(app)["locks"] == 0  # released


def test_a_second_run_backfills_nothing_and_writes_no_inbound_row(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler]) -> None:
    extole_has(sandbox, rewards_now(PAGE))
    assert numbers(reconciler().run("production")) == (2, 0, 2, 0)
    second = reconciler().run("production")
    assert numbers(second) == (2, 2, 0, 0)
    assert second is not None and second.backfilled_ids == []
    assert counts(app) == {"events": 2, "inbound": 1, "runs": 2, "locks": 0}


def test_a_state_change_between_runs_is_backfilled_as_the_new_state(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler]) -> None:
    extole_has(sandbox, rewards_now([reward("r-1")]))
    assert numbers(reconciler().run("production")) == (1, 0, 1, 0)
    extole_has(sandbox, rewards_now([reward("r-1", "FULFILLED", partner_reward_id="CODE-1")]))
    report = reconciler().run("production")
    assert numbers(report) == (1, 0, 1, 0)
    assert extole_ids(app) == ["reconciled:r-1:EARNED", "reconciled:r-1:FULFILLED"]
    fulfilled = events_by_extole_id(app)["reconciled:r-1:FULFILLED"]
    assert fulfilled.braze_event == "Reward Fulfilled"
    assert fulfilled.properties is not None
    assert (fulfilled.properties["coupon_code"], fulfilled.properties["face_value"]) == (
        "CODE-1", 10.0)


def test_paging_over_more_than_1000_rewards(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler]) -> None:
    _, state = sandbox
    extole_has(sandbox, rewards_now([reward(f"r-{n:04d}") for n in range(2345)]))
    report = reconciler().run("production")
    assert numbers(report) == (2345, 0, 2345, 0)
    assert counts(app)["events"] == 2345
    asked = [r["body"] for r in state.requests if r["path"] == "/v2/rewards"]
    assert [(a["limit"], a["offset"], a["success_only"]) for a in asked] == [
        ("1000", "0", "false"), ("1000", "1000", "false"), ("1000", "2000", "false")]
    start, _, end = asked[0]["time_interval"].partition("/")
    assert start.endswith("Z") and end.endswith("Z") and "T" in start
    assert numbers(reconciler().run("production")) == (2345, 2345, 0, 0)


def test_since_sets_the_start_of_the_window(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler]) -> None:
    extole_has(sandbox, rewards_now([reward("old")], hours_ago=24 * 5))
    extole_has(sandbox, rewards_now([reward("new")]))
    assert numbers(reconciler().run("production")) == (1, 0, 1, 0)
    since = utcnow() - timedelta(days=6)
    report = reconciler().run("production", since=since)
    assert numbers(report) == (2, 1, 1, 0)
    assert report is not None and report.window_start == since


def test_a_dry_run_stores_nothing(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler]) -> None:
    extole_has(sandbox, rewards_now(PAGE))
    report = reconciler().run("production", dry_run=True)
    assert numbers(report) == (2, 0, 2, 0)
    assert report is not None and report.backfilled_ids == [
        f"reconciled:{SENT_ID}:SENT", f"reconciled:{EARNED_ID}:EARNED"]
    assert report.summary().startswith("production: ")
    assert ", would backfill 2, " in report.summary()
    assert counts(app) == {"events": 0, "inbound": 0, "runs": 0, "locks": 0}


# --- Extole's failures ---------------------------------------------------------------------------


def test_a_wrong_token_stops_the_run_with_a_clear_error_and_stores_nothing(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler],
        settings: Settings) -> None:
    extole_has(sandbox, rewards_now(PAGE))
    wrong = Settings(**{**settings.__dict__, "extole_api_token": "not-the-token"})
    report = reconciler(settings=wrong).run("production")
    assert report is not None and not report.ok
    assert report.error is not None and report.error.startswith(
        "Extole refused the production API token (401: method_unauthorized: ")
    assert "not-the-token" not in report.error
    assert SLEEPS == []
    assert counts(app) == {"events": 0, "inbound": 0, "runs": 1, "locks": 0}
    [run] = runs(app)
    assert run.error == report.error and run.seen == 0


def test_429_and_503_are_retried_within_the_run(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler]) -> None:
    _, state = sandbox
    extole_has(sandbox, rewards_now(PAGE))
    state.faults["extole_fail_statuses"] = [429, 503]
    report = reconciler().run("production")
    assert report is not None and report.ok
    assert numbers(report) == (2, 0, 2, 0)
    assert SLEEPS == [1.0, 2.0]


@pytest.mark.parametrize("malformed", ["not_json", "not_list"])
def test_an_answer_that_is_not_a_list_of_rewards_is_reported(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler],
        malformed: str) -> None:
    _, state = sandbox
    extole_has(sandbox, rewards_now(PAGE))
    state.faults["extole_malformed"] = malformed
    report = reconciler().run("production")
    assert report is not None and report.error is not None
    assert report.error.startswith("Extole's answer to GET /v2/rewards is not ")
    assert counts(app) == {"events": 0, "inbound": 0, "runs": 1, "locks": 0}


def test_rewards_missing_fields_are_errors_the_others_are_stored(
        app: Flask, settings: Settings, reconciler: Callable[..., Reconciler]) -> None:
    good = rewards_now([reward("good")])[0]
    page = [good, {"reward_id": "no-state", "created_at": good["created_at"]}, "text",
            {"state": "EARNED", "created_at": good["created_at"]},
            {"reward_id": "no-time", "state": "EARNED"},
            {**good, "reward_id": "bad-time", "created_at": "yesterday"}]
    with responses.RequestsMock() as extole:
        extole.get(f"{settings.extole_api_url}/v2/rewards", json=page)
        report = reconciler().run("production")
    assert report is not None and report.ok
    assert numbers(report) == (6, 0, 1, 5)
    assert report.problems == [
        "reward 1 of the window: reward no-state has no state",
        "reward 2 of the window: reward is not a JSON object but str",
        "reward 3 of the window: reward has no reward_id",
        "reward 4 of the window: reward no-time has no created_at",
        "reward 5 of the window: event time 'yesterday' does not parse",
    ]
    assert extole_ids(app) == ["reconciled:good:EARNED"]
    [run] = runs(app)
    assert run.errors == 5 and run.problems == report.problems


def test_a_page_whose_rewards_lack_fields_is_reported_never_a_crash(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler]) -> None:
    _, state = sandbox
    extole_has(sandbox, rewards_now(PAGE))
    state.faults["extole_drop_fields"] = ["created_at"]
    report = reconciler().run("production")
    assert numbers(report) == (2, 0, 0, 2)
    assert report is not None and report.problems == [
        f"reward 0 of the window: reward {SENT_ID} has no created_at",
        f"reward 1 of the window: reward {EARNED_ID} has no created_at"]
    assert counts(app)["events"] == 0


def test_a_worker_shutting_down_stops_its_run_between_pages(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler]) -> None:
    extole_has(sandbox, rewards_now([reward(f"r-{n:04d}") for n in range(1001)]))
    stopping = threading.Event()
    stopping.set()
    report = reconciler(stopping=stopping).run("production", trigger="worker")
    assert report is not None and report.error == "the worker is shutting down"
    assert numbers(report) == (1000, 0, 1000, 0)  # the first page is stored, whole
    assert report.summary().endswith("; stopped: the worker is shutting down")
    [run] = runs(app)
    assert (run.error, run.backfilled) == ("the worker is shutting down", 1000)
    assert numbers(reconciler().run("production")) == (1001, 1000, 1, 0)


# --- concurrency ---------------------------------------------------------------------------------


def test_two_runs_at_once_store_each_reward_state_once(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler]) -> None:
    _, state = sandbox
    extole_has(sandbox, rewards_now([reward(f"r-{n}") for n in range(50)]))
    state.faults["latency_ms"] = 200
    outcomes = _at_once(reconciler(), reconciler())
    reports = [o for o in outcomes if isinstance(o, RunReport)]
    assert all(isinstance(o, RunReport | ReconcileBusy) for o in outcomes), outcomes
    assert sum(r.backfilled for r in reports) == 50
    assert extole_ids(app) == sorted(f"reconciled:r-{n}:EARNED" for n in range(50))
    assert counts(app)["locks"] == 0


def test_runs_that_overlap_anyway_store_each_reward_state_once(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler]) -> None:
    """A run whose lease expired (a stalled process) overlaps the run that took it over: the
    ingest still stores each reward state once, and the first run learns it lost the lock."""
    _, state = sandbox
    extole_has(sandbox, rewards_now([reward(f"r-{n:03d}") for n in range(1500)]))
    state.faults["latency_ms"] = 400
    later = utcnow() + timedelta(seconds=LEASE_SECONDS + 60)
    first, second = reconciler(), reconciler(clock=lambda: later)
    outcomes: list[Any] = []
    thread = threading.Thread(target=lambda: outcomes.append(first.run("production")))
    thread.start()
    while not _lock_owner(app) and thread.is_alive():
        time.sleep(0.01)
    assert _lock_owner(app) in (first.owner, None)
    taken_over = second.run("production")  # the first one's lease looks expired to it
    thread.join(timeout=120)
    reports = [*outcomes, taken_over]
    assert all(isinstance(r, RunReport) for r in reports), reports
    assert sum(r.backfilled for r in reports) == 1500
    assert all(r.seen == r.present + r.backfilled for r in reports if r.ok)
    assert counts(app)["events"] == 1500
    assert counts(app)["locks"] == 0


def _lock_owner(app: Flask) -> str | None:
    with get_db(app).session() as session:
        return session.scalar(select(ReconcileLock.owner))


def _at_once(*reconcilers: Reconciler) -> list[Any]:
    barrier = threading.Barrier(len(reconcilers))
    outcomes: list[Any] = [None] * len(reconcilers)

    def run(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = reconcilers[index].run("production")
        except ReconcileBusy as busy:
            outcomes[index] = busy

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reconcilers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return outcomes


def test_a_run_while_another_holds_the_environment_is_refused(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler]) -> None:
    holder = reconciler(owner="host-a:1:abc")
    assert holder._acquire("production", utcnow())
    with pytest.raises(ReconcileBusy, match=r"^production: another run \(host-a:1:abc\) has "
                                            r"been in progress since 20"):
        reconciler().run("production")
    assert reconciler().run("production", only_if_due=True) is None
    # A dry run reads only: it needs no lock.
    assert reconciler().run("production", dry_run=True) is not None
    holder._release("production")
    assert reconciler().run("production") is not None


# --- the worker's job ----------------------------------------------------------------------------


def test_the_job_runs_each_environment_once_per_interval_across_workers(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler],
        settings: Settings) -> None:
    extole_has(sandbox, rewards_now(PAGE))
    extole_has(sandbox, rewards_now([reward("s-1")]), program="staging")
    both = Settings(**{**settings.__dict__, "extole_staging_api_token": STAGING_TOKEN})
    one, other = reconciler(settings=both), reconciler(settings=both)
    reconcile_job(one)
    reconcile_job(other)  # another worker, within the interval: nothing to do
    assert [(r.environment, r.trigger, r.backfilled) for r in runs(app)] == [
        ("production", "worker", 2), ("staging", "worker", 1)]
    later = utcnow() + timedelta(seconds=both.reconcile_interval)
    reconcile_job(reconciler(settings=both, clock=lambda: later))
    assert [(r.environment, r.backfilled) for r in runs(app)][2:] == [
        ("production", 0), ("staging", 0)]
    staging = [e for e in stored_events(app) if e.environment == "staging"]
    assert [e.extole_event_id for e in staging] == ["reconciled:s-1:EARNED"]


# --- delivery, admin, metrics --------------------------------------------------------------------


def test_backfilled_rewards_arrive_in_braze_and_the_admin_says_what_the_run_did(
        app: Flask, client: FlaskClient, sandbox: tuple[str, Any],
        reconciler: Callable[..., Reconciler], make_worker: Callable[..., Any]) -> None:
    url, _ = sandbox
    extole_has(sandbox, rewards_now(PAGE))
    reconciler().run("production")
    make_worker().drain()
    profiles = requests.get(f"{url}/sandbox/profiles", timeout=10).json()["workspaces"]
    sent = {e["properties"]["extole_event_id"]: e for p in profiles["production"]
            for e in p["events"]}
    assert set(sent) == {f"reconciled:{SENT_ID}:SENT", f"reconciled:{EARNED_ID}:EARNED"}
    assert all(e["status"] == "delivered" for e in
               client.get("/admin/api/events", auth=("admin", "admin-password")).json["events"])

    auth = ("admin", "admin-password")
    stats = client.get("/admin/api/stats", auth=auth).json["reconciliation"]
    production = stats["production"]
    assert {k: production[k] for k in ("seen", "present", "backfilled", "errors", "error",
                                       "trigger", "configured")} == {
        "seen": 2, "present": 0, "backfilled": 2, "errors": 0, "error": None,
        "trigger": "command", "configured": True}
    assert production["last_run_at"].endswith("Z") and production["last_success_at"]
    assert stats["staging"]["last_run_at"] is None and stats["staging"]["configured"] is False

    listed = client.get("/admin/api/events", auth=auth).json["events"]
    assert {e["reconciled"] for e in listed} == {True}
    event_id = listed[0]["id"]
    assert client.get(f"/admin/api/events/{event_id}", auth=auth).json["reconciled"] is True
    login(client)
    page = client.get("/admin/").get_data(as_text=True)
    assert "Reconciliation from Extole" in page
    assert ("seen <b>2</b>, present <b>0</b>, backfilled <b>2</b>, errors <b>0</b>"
            in " ".join(page.split()))
    assert "not configured (no Extole API token)" in page
    event_page = client.get(f"/admin/events/{event_id}").get_data(as_text=True)
    assert "recovered from Extole's rewards API by reconciliation" in event_page


def test_the_admin_page_shows_why_a_run_stopped(
        app: Flask, client: FlaskClient, sandbox: tuple[str, Any],
        reconciler: Callable[..., Reconciler], settings: Settings) -> None:
    wrong = Settings(**{**settings.__dict__, "extole_api_token": "not-the-token"})
    reconciler(settings=wrong).run("production")
    login(client)
    page = " ".join(client.get("/admin/").get_data(as_text=True).split())
    assert "Stopped: Extole refused the production API token (401: method_unauthorized" in page
    assert "No successful run yet." in page


def test_metrics_count_rewards_by_result_and_the_last_success(
        app: Flask, client: FlaskClient, sandbox: tuple[str, Any],
        reconciler: Callable[..., Reconciler]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = client.get("/metrics").get_data(as_text=True)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples
                if s.name.startswith("relay_reconcile")}

    before = samples()
    extole_has(sandbox, rewards_now(PAGE))
    reconciler().run("production")
    reconciler().run("production")
    after = samples()

    def grew(result: str) -> float:
        key = ("relay_reconcile_rewards_total", (("environment", "production"),
                                                 ("result", result)))
        return after.get(key, 0) - before.get(key, 0)

    assert (grew("backfilled"), grew("present"), grew("error")) == (2, 2, 0)
    [last] = [v for (name, labels), v in after.items()
              if name == "relay_reconcile_last_success_timestamp_seconds"
              and labels == (("environment", "production"),)]
    assert abs(last - datetime.now().timestamp()) < 600


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture
def relay_reconcile(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, database_url: str,
                    sandbox: tuple[str, Any]) -> Callable[..., Result]:
    """`relay reconcile ARGS` on the test database against the sandbox, no other setting."""
    for name in _VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    url, _ = sandbox

    def run(*args: str, **env: str | None) -> Result:
        settings: dict[str, str | None] = {
            "RELAY_DATABASE_URL": database_url, "EXTOLE_API_TOKEN": TOKEN,
            "EXTOLE_API_URL": url, **env}
        return CliRunner().invoke(cli, ["reconcile", *args], env=settings,
                                  catch_exceptions=False)

    return run


SUMMARY = (r"production: \S+Z/\S+Z: seen (\d+), present (\d+), {verb} (\d+), errors (\d+) "
           r"\(\d+\.\d s\)")


def summary(line: str, verb: str = "backfilled") -> tuple[str, ...]:
    """(seen, present, backfilled, errors) of a run's summary line."""
    found = re.fullmatch(SUMMARY.format(verb=verb), line)
    assert found, line
    return found.groups()


def test_the_command_prints_what_it_saw_and_backfilled(
        app: Flask, sandbox: tuple[str, Any], relay_reconcile: Callable[..., Result]) -> None:
    extole_has(sandbox, rewards_now(PAGE))
    dry = relay_reconcile("--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = dry.stdout.splitlines()
    assert summary(lines[0], "would backfill") == ("2", "0", "2", "0")
    assert lines[1:] == [f"  would backfill reconciled:{SENT_ID}:SENT",
                         f"  would backfill reconciled:{EARNED_ID}:EARNED"]
    assert counts(app)["events"] == 0

    done = relay_reconcile()
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert summary(lines[0]) == ("2", "0", "2", "0")
    assert lines[1:] == [f"  backfilled reconciled:{SENT_ID}:SENT",
                         f"  backfilled reconciled:{EARNED_ID}:EARNED"]
    again = relay_reconcile("--environment", "production")
    assert summary(again.stdout.strip()) == ("2", "2", "0", "0")


def test_the_command_fails_clearly(
        app: Flask, sandbox: tuple[str, Any], relay_reconcile: Callable[..., Result]) -> None:
    extole_has(sandbox, rewards_now(PAGE))
    refused = relay_reconcile(EXTOLE_API_TOKEN="wrong-token")
    assert refused.exit_code == 1
    assert "; stopped: Extole refused the production API token (401: method_unauthorized: " in (
        refused.stdout)
    assert refused.stderr.splitlines()[-1] == "relay: 1 environment not reconciled"
    assert "wrong-token" not in refused.output
    assert counts(app)["events"] == 0

    none = relay_reconcile(EXTOLE_API_TOKEN=None)
    assert none.exit_code == 1
    assert none.stderr == ("relay: no Extole API token is set (EXTOLE_API_TOKEN, "
                           "EXTOLE_STAGING_API_TOKEN): nothing to reconcile\n")
    staging = relay_reconcile("--environment", "staging")
    assert staging.exit_code == 1
    assert staging.stderr == ("relay: EXTOLE_STAGING_API_TOKEN is not set: staging is not "
                              "reconciled\n")
    since = relay_reconcile("--since", "last tuesday")
    assert since.exit_code == 2
    assert "Error: Invalid value for --since: since must be an ISO-8601 time" in since.stderr
    future = relay_reconcile("--since", "2999-01-01T00:00:00Z")
    assert future.exit_code == 1
    assert future.stderr == "relay: --since 2999-01-01T00:00:00Z is not in the past\n"


@POSTGRESQL_ONLY
def test_two_reconcile_processes_at_once_store_each_reward_state_once(
        app: Flask, sandbox: tuple[str, Any], database_url: str, tmp_path: Any) -> None:
    url, state = sandbox
    extole_has(sandbox, rewards_now([reward(f"r-{n:04d}") for n in range(1200)]))
    state.faults["latency_ms"] = 300
    env = {k: v for k, v in os.environ.items() if k not in _VARIABLES}
    env.update(RELAY_DATABASE_URL=database_url, EXTOLE_API_TOKEN=TOKEN, EXTOLE_API_URL=url)
    processes = [subprocess.Popen([RELAY, "reconcile"], env=env, cwd=tmp_path, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
    outputs = [process.communicate(timeout=120) for process in processes]
    backfilled = 0
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        if process.returncode == 0:
            backfilled += int(summary(stdout.splitlines()[0])[2])
        else:  # the other one held the environment
            assert process.returncode == 1, stderr
            assert re.fullmatch(r"production: another run \(\S+\) has been in progress since "
                                r"\S+Z: not started\n", stdout), stdout
    assert backfilled == 1200
    assert extole_ids(app) == sorted(f"reconciled:r-{n:04d}:EARNED" for n in range(1200))


# --- reconciliation and webhooks meet (README, "Reward events": the duplicate rule) -------------


def webhook_item(reward_id: str, state: str, event_id: str, **fields: Any) -> dict[str, Any]:
    """A reward webhook as Extole posts it when the body is left as is."""
    return {"event_id": event_id, "type": state, "reward_id": reward_id,
            "event_time": (utcnow() - timedelta(hours=1)).isoformat() + "Z",
            "partner_user_id": f"cust-{reward_id}", "face_value": "10.00",
            "face_value_type": "USD", **fields}


def test_missing_states_are_backfilled_and_none_of_the_present_ones_resent(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler],
        post_webhook: Callable[..., Any]) -> None:
    """Webhooks came for two reward states; Extole now lists one of them as it is, one reward
    moved on (FULFILLED → SENT) and one reward whose webhook never came."""
    fulfilled = sample_json("reward_fulfilled_coupon.json")  # reward c93e…, FULFILLED
    earned = webhook_item(EARNED_ID, "EARNED", "wh-earned-1")
    assert post_webhook([fulfilled, earned]).json["accepted"] == 2
    never = reward("never-came", "FULFILLED", partner_reward_id="CODE-9")
    extole_has(sandbox, rewards_now([*PAGE, never]))
    report = reconciler().run("production")
    assert numbers(report) == (3, 1, 2, 0)
    assert report is not None and report.backfilled_ids == [
        f"reconciled:{SENT_ID}:SENT", "reconciled:never-came:FULFILLED"]
    assert extole_ids(app) == sorted([fulfilled["event_id"], "wh-earned-1",
                                      f"reconciled:{SENT_ID}:SENT",
                                      "reconciled:never-came:FULFILLED"])
    assert numbers(reconciler().run("production")) == (3, 3, 0, 0)


def test_a_webhook_after_the_run_for_the_same_reward_state_is_a_duplicate(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler],
        post_webhook: Callable[..., Any]) -> None:
    extole_has(sandbox, rewards_now([reward("late")]))
    assert numbers(reconciler().run("production")) == (1, 0, 1, 0)
    answer = post_webhook(webhook_item("late", "EARNED", "wh-late-1"))
    assert answer.status_code == 200
    assert (answer.json["accepted"], answer.json["duplicates"]) == (0, 1)
    assert extole_ids(app) == ["reconciled:late:EARNED"]
    # Another state of the same reward is another event.
    assert post_webhook(webhook_item("late", "FULFILLED", "wh-late-2")).json["accepted"] == 1


def test_a_run_overlapping_webhooks_for_the_same_reward_states_stores_each_once(
        app: Flask, sandbox: tuple[str, Any], reconciler: Callable[..., Reconciler],
        post_webhook: Callable[..., Any]) -> None:
    """Webhooks for the same reward states arrive while a run reads and stores them: whichever
    comes second is a duplicate, on both sides."""
    _, state = sandbox
    count = 300
    extole_has(sandbox, rewards_now([reward(f"o-{n:03d}") for n in range(count)]))
    state.faults["latency_ms"] = 50
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(reconciler().run("production")))
    thread.start()
    answers = [post_webhook(webhook_item(f"o-{n:03d}", "EARNED", f"wh-o-{n:03d}")).json
               for n in range(count)]
    thread.join(timeout=120)
    [report] = outcome
    assert numbers(report) == (count, count - report.backfilled, report.backfilled, 0)
    accepted = sum(a["accepted"] for a in answers)
    assert sum(a["duplicates"] for a in answers) == count - accepted
    assert accepted + report.backfilled == count
    with get_db(app).session() as session:
        rewards = session.scalars(select(OutboxEvent.properties)).all()
    assert sorted(p["reward_id"] for p in rewards if p) == [f"o-{n:03d}" for n in range(count)]
