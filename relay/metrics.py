"""Prometheus metrics, shared by the web processes and the worker.

With several gunicorn workers, set PROMETHEUS_MULTIPROC_DIR (`relay serve` does) so that every
process writes its samples to that directory and `/metrics` aggregates them.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
