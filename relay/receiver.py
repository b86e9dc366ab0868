"""`POST /webhooks/extole/<environment>`: authenticate, store durably, then answer.

Checks run in the order the README documents (404, 413, 503 secret, 401, 415, 400, 413 items,
503 database). Every request is recorded in the inbound log, a refused one without its body and,
beyond RELAY_REFUSED_LOG_RATE per address and minute, only counted (`relay.refused`). Wrong Bearer
or Basic credentials are refused before the body is read. A 2xx is sent only after the commit.
The optional `type` query parameter is the event type of every item that names none.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import ClientDisconnected

from relay import metrics, refused
from relay.authentication import authenticate, authenticate_headers, redact_headers
from relay.db import describe_error, get_db, utcnow
from relay.exceptions import AuthenticationFailed, DatabaseUnavailable, InvalidBody, RelayError
from relay.extole import MAX_ID_LENGTH, decode_json, sanitise, storable_text
from relay.models import InboundRequest
from relay.outbox.ingest import Receipt, prepare_single, store_prepared, store_webhook
from relay.settings import ENVIRONMENTS, Settings
from relay.wakeup import wake_after_commit

log = logging.getLogger(__name__)
bp = Blueprint("receiver", __name__)


class Refusal(RelayError):
    """An answer other than 200, with the outcome recorded in the inbound log."""

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
        environment=storable_text(environment[:32]),
        method=request.method,
        path=storable_text(request.path[:255]),
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
        default_type = _default_type()
        receipt = _store(inbound, items, environment, default_type, settings)
    except Refusal as refusal:
        return _refuse(inbound, refusal, settings)
    metrics.WEBHOOKS.labels(environment, "accepted").inc()
    if receipt.accepted:
        wake_after_commit(environment)
    return jsonify(receipt.as_json()), 200


def _checked_items(settings: Settings, environment: str, inbound: InboundRequest) -> list[Any]:
    limit = settings.max_body_bytes
    if environment not in ENVIRONMENTS:
        # Read within the limit only for the inbound log's size and SHA-256.
        with contextlib.suppress(Refusal):
            _read_within(limit, inbound)
        raise Refusal(404, "not_found", f"unknown environment {environment[:40]!r}: "
                      f"use {' or '.join(ENVIRONMENTS)}")
    if request.content_length is not None and request.content_length > limit:
        raise Refusal(413, "too_large", f"body larger than {limit} bytes")
    secret = settings.webhook_secret(environment)
    if not secret:
        _read_within(limit, inbound)  # a chunked body over the limit is a 413 first
        raise Refusal(503, "not_configured", f"webhook secret for {environment} is not configured")
    try:
        # Missing or wrong Bearer/Basic credentials are refused here, before the body is read:
        # nobody without the secret makes the relay read a megabyte.
        inbound.auth_method = authenticate_headers(request.headers, secret)
        raw = _read_within(limit, inbound)
        if inbound.auth_method is None:  # a signature: only the body can tell
            inbound.auth_method = authenticate(request.headers, raw, secret)
    except AuthenticationFailed as failure:
        raise Refusal(401, "unauthorized", str(failure)) from None
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        shown = request.content_type or "none"
        raise Refusal(415, "unsupported_media_type",
                      f"content type must be application/json, got {shown[:100]!r}")
    try:
        body = decode_json(raw)
        if isinstance(body, list) and len(body) > settings.max_items:
            # Before the items are walked, normalised or stored: a request's cost stays bounded.
            raise Refusal(413, "too_many_items",
                          f"body has {len(body)} items, more than RELAY_MAX_ITEMS "
                          f"({settings.max_items})")
        body = sanitise(body)
    except InvalidBody as invalid:
        raise Refusal(400, "bad_json", str(invalid)) from None
    if isinstance(body, dict):
        return [body]
    if isinstance(body, list):
        return body
    raise Refusal(400, "bad_json", "body must be a JSON object or an array of objects")


def _default_type() -> str | None:
    """The `type` query parameter: given, it must name one type (a 400 otherwise, so a
    misconfigured webhook URL is seen at once instead of typing events wrongly)."""
    values = request.args.getlist("type")
    if not values:
        return None
    if len(values) > 1:
        raise Refusal(400, "bad_request", "query parameter type is given more than once")
    value = values[0].strip()
    if not value:
        raise Refusal(400, "bad_request", "query parameter type is empty")
    if len(value) > MAX_ID_LENGTH:
        raise Refusal(400, "bad_request",
                      f"query parameter type is longer than {MAX_ID_LENGTH} characters")
    return storable_text(value)


def _read_within(limit: int, inbound: InboundRequest) -> bytes:
    """The raw body, recorded in the inbound log; 413 when it is larger than `limit`."""
    if request.content_length is not None and request.content_length > limit:
        raise Refusal(413, "too_large", f"body larger than {limit} bytes")
    try:
        raw = _read_body(limit + 1)
    except ClientDisconnected:
        raise Refusal(400, "bad_request", "body ended before its Content-Length") from None
    except Exception as error:  # noqa: BLE001 - the server's body reader failed
        # Broken chunked framing (gunicorn's InvalidChunkSize, ChunkMissingTerminator), a reset
        # connection: the client's doing, answered 400, never a 500.
        raise Refusal(400, "bad_request",
                      f"body could not be read ({type(error).__name__})") from None
    inbound.body_size = len(raw)
    if len(raw) > limit:
        raise Refusal(413, "too_large", f"body larger than {limit} bytes")
    inbound.body = raw
    return raw


def _read_body(at_most: int) -> bytes:
    """Up to `at_most` bytes: a stream may answer a read with fewer bytes than are coming
    (chunked bodies, slow clients), so read until the limit or the end."""
    chunks: list[bytes] = []
    size = 0
    while size < at_most:
        chunk = request.stream.read(at_most - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _store(inbound: InboundRequest, items: list[Any], environment: str,
           default_type: str | None, settings: Settings) -> Receipt:
    inbound.status_code, inbound.outcome = 200, "accepted"
    db = get_db()
    event_map = current_app.extensions["relay.event_map"]
    external_id_from = settings.external_id_from
    # Extole's usual webhook (one event, PostgreSQL): one statement, committed with the other
    # webhooks queued in this process meanwhile (`relay.outbox.groupcommit`).
    single = prepare_single(db.engine, inbound, items[0], environment, event_map,
                            default_type=default_type,
                            external_id_from=external_id_from) if len(items) == 1 else None
    for attempt in range(1, STORE_ATTEMPTS + 1):
        try:
            if single is not None:
                receipt = (db.group_writer().store(single) if settings.group_commit == "on"
                           else store_prepared(db.engine, single))
                if receipt is not None:
                    return receipt
                single = None  # its keys met a concurrent webhook: the transaction path decides
            with db.session() as session:
                return store_webhook(session, inbound, items, environment, event_map,
                                     default_type=default_type,
                                     external_id_from=external_id_from)
        except (DatabaseUnavailable, SQLAlchemyError) as outage:
            if attempt < STORE_ATTEMPTS and _transient(outage):
                # A deadlock or serialization failure (store_webhook orders its locks, but
                # other writers may not): the victim's rows were rolled back; run it again.
                log.info("webhook for %s: %s, trying again", environment, describe_error(outage))
                continue
            # Any database error (unreachable, locked, schema not migrated, ...) is answered 503
            # so that Extole retries: never a 500, never a 2xx before the commit.
            log.warning("webhook for %s not stored: %s", environment, describe_error(outage))
            raise Refusal(503, "db_unavailable",
                          "database unavailable: the event was not stored, retry later") from None
    raise AssertionError("unreachable")  # pragma: no cover


STORE_ATTEMPTS = 3
# SQLSTATE class 40, transaction rollback: serialization failure, deadlock detected.
_TRANSIENT_SQLSTATES = ("40001", "40P01")


def _transient(error: BaseException) -> bool:
    """A deadlock or serialization failure: the transaction may simply be run again."""
    seen: BaseException | None = error
    while seen is not None:
        if getattr(seen, "sqlstate", None) in _TRANSIENT_SQLSTATES:
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


def _refuse(inbound: InboundRequest, refusal: Refusal,
            settings: Settings) -> tuple[Response, int]:
    metrics.WEBHOOKS.labels(inbound.environment if refusal.status != 404 else "unknown",
                            refusal.outcome).inc()
    inbound.status_code, inbound.outcome, inbound.error = (
        refusal.status, refusal.outcome, refusal.message)
    number = 0  # this refusal's number in its address and minute, when it is counted
    if refusal.outcome != "db_unavailable":
        try:
            with get_db().session() as session:
                if inbound.auth_method is None or refusal.status == 413:
                    # Refused before authentication, or too large: no body, and beyond the
                    # rate per address and minute only a count (README, "Refused requests").
                    refused.strip(inbound, inbound.body)
                    number = refused.count(session, inbound, settings.refused_log_rate)
                    if number <= settings.refused_log_rate:
                        session.add(inbound)
                else:
                    session.add(inbound)  # authenticated: the body is kept for diagnosis
        except (DatabaseUnavailable, SQLAlchemyError) as outage:
            log.warning("inbound log not written (%s): %s", refusal.outcome, describe_error(outage))
    rate = settings.refused_log_rate
    if number <= rate:
        log.info("webhook %s refused %s: %s", inbound.path, refusal.status, refusal.message)
    elif number == rate + 1:
        # Once per address and minute: the log lines are disk too.
        log.warning("refused webhooks from %s: more than %d this minute (RELAY_REFUSED_LOG_RATE),"
                    " the rest of the minute only counted", inbound.remote_addr, rate)
    return jsonify({"error": refusal.message}), refusal.status
