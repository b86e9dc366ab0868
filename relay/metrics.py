"""Prometheus metrics, shared by the web processes and the worker.

Counters and the histogram below are incremented where things happen (receiver, outbox, delivery).
The outbox gauges are computed from the database at scrape time, so every process reports the same
truth. With several gunicorn workers, PROMETHEUS_MULTIPROC_DIR (which `relay serve` sets before
forking) makes every process write its samples to files that a scrape aggregates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from datetime import UTC
from typing import Any

from flask import Blueprint, Flask, Response
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from relay.db import Database, describe_error, get_db
from relay.exceptions import DatabaseUnavailable, RelayError
from relay.outbox import queries

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# What `generate_latest` writes (prometheus-client's newest constant names a format it does not).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

WEBHOOKS = Counter(
    "relay_webhooks_received",
    "Webhook requests received, by environment and outcome.",
    ["environment", "outcome"],
)
EVENTS = Counter(
    "relay_events",
    "Event status transitions, by environment and the status entered.",
    ["environment", "status"],
)
BRAZE_SECONDS = Histogram(
    "relay_braze_request_seconds",
    "Braze request latency, by endpoint and HTTP status (or 'error').",
    ["endpoint", "status"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
IDENTITY_LOOKUPS = Counter(
    "relay_identity_lookups",
    "Email to Braze identity resolutions, by result (cache_hit, found, not_found, error).",
    ["result"],
)
RECONCILE_REWARDS = Counter(
    "relay_reconcile_rewards",
    "Rewards reconciliation read from Extole, by environment and result (present, backfilled, "
    "error).",
    ["environment", "result"],
)
TRIGGERS = Counter(
    "relay_triggers",
    "Campaign/Canvas trigger state transitions, by environment and the state entered.",
    ["environment", "state"],
)


class OutboxCollector(Collector):
    """Outbox depth by status, the age of the oldest pending event and when each environment's
    reconciliation last succeeded, read at scrape time (whichever process ran it).

    A database outage must not turn a scrape into a 500 (Prometheus would lose every other metric
    too), so these gauges are left out and the problem is logged.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        try:
            with self.db.session() as session:
                counts = queries.counts_by_status(session)
                oldest = queries.oldest_pending_age(session)
                reconciled = queries.last_reconcile_success(session)
        except (DatabaseUnavailable, SQLAlchemyError) as error:
            log.warning("outbox gauges left out of this scrape: %s", describe_error(error))
            return
        depth = GaugeMetricFamily("relay_outbox_events", "Events in the outbox, by status.",
                                  labels=["status"])
        for status, count in sorted(counts.items()):
            depth.add_metric([status], count)
        yield depth
        yield GaugeMetricFamily(
            "relay_outbox_oldest_pending_seconds",
            "Age of the oldest pending event (0 when none is pending).",
            value=oldest,
        )
        success = GaugeMetricFamily(
            "relay_reconcile_last_success_timestamp_seconds",
            "When the environment's last successful reconciliation run finished (Unix time).",
            labels=["environment"])
        for environment, finished in sorted(reconciled.items()):
            success.add_metric([environment], finished.replace(tzinfo=UTC).timestamp())
        yield success


class _ProcessMetrics(Collector):
    """This process's own counters (the default registry), for single-process mode."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def scrape_registry(db: Database | None = None) -> CollectorRegistry:
    """A registry holding everything one scrape reports.

    In multiprocess mode the counters come from every process's files (a fresh registry, as
    prometheus-client requires); otherwise from this process. The outbox gauges are added when a
    database is given.
    """
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ProcessMetrics())
    if db is not None:
        registry.register(OutboxCollector(db))
    return registry


bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape() -> Response:
    return Response(generate_latest(scrape_registry(get_db())), headers={
        "Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"})


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)


def serve_worker_metrics(port: int, db: Database | None = None,
                         host: str = "127.0.0.1") -> Any:
    """Expose this (worker) process's metrics on `port` from a daemon thread; answers the HTTP
    server (its `shutdown()` stops it).

    `relay worker --metrics-port N [--metrics-host H]` calls this; pass the worker's database to
    include the outbox gauges as well. Loopback by default: the metrics name environments and
    counts, so listening elsewhere is the operator's explicit choice.
    """
    from prometheus_client import start_http_server

    try:
        server = start_http_server(port, addr=host, registry=scrape_registry(db))
    except OSError as error:  # in use, not allowed: the operator's to fix, in one line
        raise RelayError(f"cannot serve metrics on {host}:{port}: "
                         f"{error.strerror or error}") from error
    log.info("worker metrics on http://%s:%d/metrics", host, port)
    return server[0] if isinstance(server, tuple) else server
