"""`GET /metrics`, parsed with prometheus-client's own parser, after real traffic.

Counters live for the whole test process, so tests compare a scrape before and after.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from relay import create_app, metrics
from relay.db import Database, get_db, utcnow
from relay.models import OutboxEvent
from relay.outbox import operator
from relay.outbox.filters import EventFilter
from relay.settings import Settings
from tests.support import BRAZE_URL, free_port, sample

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(client: FlaskClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(response.get_data(as_text=True))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_webhooks_received_by_environment_and_outcome(client: FlaskClient,
                                                      post_webhook: Any) -> None:
    before = scrape(client)
    post_webhook(sample("reward_earned.json"))
    post_webhook(sample("batch.json"))
    post_webhook(sample("staging_named_epoch_seconds.json"), "staging")
    post_webhook(sample("subscribed.json"), secret="wrong")
    post_webhook(sample("subscribed.json"), "qa")
    post_webhook(b"{not json")
    after = scrape(client)
    name = "relay_webhooks_received_total"
    assert delta(before, after, name, environment="production", outcome="accepted") == 2
    assert delta(before, after, name, environment="staging", outcome="accepted") == 1
    assert delta(before, after, name, environment="production", outcome="unauthorized") == 1
    assert delta(before, after, name, environment="unknown", outcome="not_found") == 1
    assert delta(before, after, name, environment="production", outcome="bad_json") == 1


def test_outbox_depth_and_oldest_pending_age(app: Flask, client: FlaskClient,
                                             post_webhook: Any) -> None:
    empty = scrape(client)
    assert value(empty, "relay_outbox_events", status="pending") == 0
    assert value(empty, "relay_outbox_oldest_pending_seconds") == 0
    post_webhook(sample("batch.json"))
    post_webhook(sample("invalid_no_type.json"))
    with get_db(app).session() as session:
        session.execute(update(OutboxEvent).where(OutboxEvent.extole_event_id == "bt-0003")
                        .values(status="dead"))
        session.execute(update(OutboxEvent).where(OutboxEvent.extole_event_id == "bt-0001")
                        .values(received_at=utcnow() - timedelta(minutes=5)))
    samples = scrape(client)
    assert {status: value(samples, "relay_outbox_events", status=status)
            for status in ("pending", "delivered", "dead", "skipped", "rejected")} == {
        "pending": 2, "delivered": 0, "dead": 1, "skipped": 0, "rejected": 1}
    assert 300 <= value(samples, "relay_outbox_oldest_pending_seconds") < 330


def test_operator_transitions_are_counted(app: Flask, client: FlaskClient,
                                          post_webhook: Any) -> None:
    post_webhook(sample("batch.json"))
    with get_db(app).session() as session:
        session.execute(update(OutboxEvent).values(status="dead"))
    before = scrape(client)
    with get_db(app).session() as session:
        operator.retry(session, 1)
        operator.replay_matching(session, EventFilter(status="dead"))
    after = scrape(client)
    assert delta(before, after, "relay_events_total", environment="production",
                 status="pending") == 3


@pytest.fixture
def braze() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(f"{BRAZE_URL}/users/track", status=201,
                  json={"message": "success", "events_processed": 1})
        mock.post(f"{BRAZE_URL}/users/export/ids", status=201,
                  json={"users": [], "message": "success"})
        yield mock


def test_delivery_counts_events_braze_latency_and_identity_lookups(
        app: Flask, client: FlaskClient, post_webhook: Any, settings: Settings,
        braze: responses.RequestsMock) -> None:
    from relay.worker import Worker

    post_webhook(sample("reward_earned.json"))
    post_webhook(sample("referred_signed_up_email_only.json"))
    before = scrape(client)
    worker = Worker(settings, get_db(app))
    try:
        assert worker.run_once() == 2
    finally:
        worker.close()
    after = scrape(client)
    assert delta(before, after, "relay_events_total", environment="production",
                 status="delivered") == 2
    assert delta(before, after, "relay_braze_request_seconds_count", endpoint="/users/track",
                 status="201") == 1
    assert delta(before, after, "relay_braze_request_seconds_count",
                 endpoint="/users/export/ids", status="201") == 1
    assert delta(before, after, "relay_braze_request_seconds_bucket", endpoint="/users/track",
                 status="201", le="+Inf") == 1
    assert delta(before, after, "relay_identity_lookups_total", result="not_found") == 1
    assert value(after, "relay_outbox_events", status="delivered") == 2
    assert value(after, "relay_outbox_events", status="pending") == 0


@pytest.mark.parametrize("url", ["postgresql", "empty-sqlite"])
def test_scrape_survives_a_database_problem(make_settings: Callable[..., Settings], url: str,
                                            tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    database_url = (f"postgresql+psycopg://relay@127.0.0.1:{free_port()}/relay"
                    if url == "postgresql" else f"sqlite:///{tmp_path}/empty.db")
    app = create_app(make_settings(database_url=database_url), TESTING=True)
    try:
        with caplog.at_level(logging.WARNING, logger="relay.metrics"):
            response = app.test_client().get("/metrics")
    finally:
        get_db(app).dispose()
    assert response.status_code == 200
    names = {name for name, _ in parse(response.get_data(as_text=True))}
    assert "relay_outbox_events" not in names
    assert "relay_outbox_oldest_pending_seconds" not in names
    assert any("outbox gauges left out of this scrape" in r.getMessage() for r in caplog.records)


WRITER = """
import sys
from relay import metrics
metrics.WEBHOOKS.labels("production", "accepted").inc(int(sys.argv[1]))
metrics.BRAZE_SECONDS.labels("/users/track", "201").observe(0.2)
"""


def test_multiprocess_mode_adds_up_every_process(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """What several gunicorn workers do: each writes its files, one scrape sums them."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    for count in (2, 3):
        subprocess.run([sys.executable, "-c", WRITER, str(count)], env=env, check=True,
                       cwd=Path(__file__).parents[2], timeout=60)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    samples = parse(generate_latest(metrics.scrape_registry()).decode())
    assert value(samples, "relay_webhooks_received_total", environment="production",
                 outcome="accepted") == 5
    assert value(samples, "relay_braze_request_seconds_count", endpoint="/users/track",
                 status="201") == 2


def test_worker_exposes_its_own_metrics(database_url: str, post_webhook: Any) -> None:
    post_webhook(sample("batch.json"))
    db = Database(database_url)
    port = free_port()
    server = metrics.serve_worker_metrics(port, db)
    try:
        assert server.server_address[:2] == ("127.0.0.1", port)  # loopback unless told
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            samples = parse(response.read().decode())
    finally:
        server.shutdown()
        server.server_close()
        db.dispose()
    assert value(samples, "relay_outbox_events", status="pending") == 3
    assert ("relay_webhooks_received_total", frozenset(
        {("environment", "production"), ("outcome", "accepted")})) in samples
