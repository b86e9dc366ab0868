"""`POST /webhooks/extole/<environment>`: authenticate, store durably, then answer.

Checks run in the contract's order (404, 413, 503 secret, 401, 415, 400, 503 database) and every
request, accepted or not, lands in the inbound log. A 2xx is sent only after the commit.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from relay import metrics
from relay.authentication import AuthenticationFailed, authenticate, redact_headers
from relay.db import get_db, utcnow
from relay.exceptions import DatabaseUnavailable
from relay.extole import InvalidBody, parse_body
from relay.models import InboundRequest
from relay.outbox import store_webhook
from relay.settings import ENVIRONMENTS, Settings

log = logging.getLogger(__name__)
bp = Blueprint("receiver", __name__)


class Refusal(Exception):
    """An answer other than 202, with the outcome recorded in the inbound log."""

    def __init__(self, status: int, outcome: str, message: str) -> None:
        super().__init__(message)
        self.status, self.outcome, self.message = status, outcome, message


@bp.post("/webhooks/extole")
def receive_production() -> tuple[Response, int]:
    """`/webhooks/extole` is an alias of production."""
    return receive("production")


@bp.post("/webhooks/extole/<environment>")
def receive(environment: str) -> tuple[Response, int]:
    settings: Settings = current_app.config["RELAY_SETTINGS"]
    inbound = InboundRequest(
        received_at=utcnow(),
        environment=environment[:32],
        method=request.method,
        path=request.path[:255],
        remote_addr=(request.remote_addr or "")[:64] or None,
        headers=redact_headers(request.headers),
        body=None,
        body_size=request.content_length or 0,
        accepted=0,
        duplicates=0,
        rejected=0,
    )
    try:
        items = _checked_items(settings, environment, inbound)
        receipt = _store(inbound, items, environment)
    except Refusal as refusal:
        return _refuse(inbound, refusal)
    metrics.WEBHOOKS.labels(environment, "accepted").inc()
    waker = current_app.extensions.get("relay.waker")
    if waker is not None and receipt.accepted:
        waker.wake()
    return jsonify(receipt.as_json()), 202


def _checked_items(settings: Settings, environment: str, inbound: InboundRequest) -> list[Any]:
    if environment not in ENVIRONMENTS:
        raise Refusal(404, "not_found", f"unknown environment {environment[:40]!r}: "
                      f"use {' or '.join(ENVIRONMENTS)}")
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Refusal(413, "too_large", f"body larger than {limit} bytes")
    raw = request.stream.read(limit + 1)
    inbound.body_size = len(raw)
    if len(raw) > limit:
        raise Refusal(413, "too_large", f"body larger than {limit} bytes")
    inbound.body = raw
    secret = settings.webhook_secret(environment)
    if not secret:
        raise Refusal(503, "not_configured", f"webhook secret for {environment} is not configured")
    try:
        inbound.auth_method = authenticate(request.headers, raw, secret)
    except AuthenticationFailed as failure:
        raise Refusal(401, "unauthorized", str(failure)) from None
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        shown = request.content_type or "none"
        raise Refusal(415, "unsupported_media_type",
                      f"content type must be application/json, got {shown[:100]!r}")
    try:
        body = parse_body(raw)
    except InvalidBody as invalid:
        raise Refusal(400, "bad_json", str(invalid)) from None
    if isinstance(body, dict):
        return [body]
    if isinstance(body, list):
        return body
    raise Refusal(400, "bad_json", "body must be a JSON object or an array of objects")


def _store(inbound: InboundRequest, items: list[Any], environment: str) -> Any:
    inbound.status_code, inbound.outcome = 202, "accepted"
    try:
        with get_db().session() as session:
            return store_webhook(session, inbound, items, environment,
                                 current_app.extensions["relay.event_map"])
    except DatabaseUnavailable as outage:
        log.warning("webhook for %s not stored: %s", environment, outage)
        raise Refusal(503, "db_unavailable",
                      "database unavailable: the event was not stored, retry later") from None


def _refuse(inbound: InboundRequest, refusal: Refusal) -> tuple[Response, int]:
    metrics.WEBHOOKS.labels(inbound.environment if refusal.status != 404 else "unknown",
                            refusal.outcome).inc()
    inbound.status_code, inbound.outcome, inbound.error = (
        refusal.status, refusal.outcome, refusal.message)
    if refusal.outcome != "db_unavailable":
        try:
            with get_db().session() as session:
                session.add(inbound)
        except DatabaseUnavailable as outage:
            log.warning("inbound log not written (%s): %s", refusal.outcome, outage)
    log.info("webhook %s refused %s: %s", inbound.path, refusal.status, refusal.message)
    return jsonify({"error": refusal.message}), refusal.status
