"""The relay's tables, as SQLAlchemy 2.0 typed models.

Alembic migrations (in `relay/migrations/`) are the only source of the schema; a test checks
that these models and the migrations agree. Times are naive UTC in every column, on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import BYTEA, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column
from sqlalchemy.sql import select

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")
Bytes = LargeBinary().with_variant(BYTEA(), "postgresql")


class Status(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"
    SKIPPED = "skipped"
    REJECTED = "rejected"


class TriggerState(enum.StrEnum):
    """A campaign/Canvas trigger's states (README, "Campaign and Canvas triggers").

    `sending` is committed before the request leaves; only what certainly did not reach Braze
    goes back to `due`; what may have reached it becomes `uncertain`, for a person to decide.
    """

    DUE = "due"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    UNCERTAIN = "uncertain"
    DROPPED = "dropped"


class Base(DeclarativeBase):
    # Every model here is mapped to a table (none to a join or a select): say so for the type
    # checker, so Core statements (`OutboxEvent.__table__.update()`) are typed too.
    __table__: ClassVar[Table]


class InboundRequest(Base):
    """Every webhook request as it reached us: the raw record behind the outbox.

    `body` is kept only for requests that passed authentication (and were not refused with
    413): a refused request keeps its size and, when its body was read whole, its SHA-256
    (`body_sha256`), so nobody without the secret can fill the disk (README, "Refused requests").
    """

    __tablename__ = "inbound_requests"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    environment: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(10))
    path: Mapped[str] = mapped_column(String(255))
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    headers: Mapped[dict[str, Any]] = mapped_column(Json)
    body: Mapped[bytes | None] = mapped_column(Bytes)
    body_size: Mapped[int] = mapped_column(Integer)
    body_sha256: Mapped[str | None] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(32))
    auth_method: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)


class RefusedRequestCount(Base):
    """Refused webhook requests (401, 404, 413, 503, an unreadable body before authentication)
    from one client address in one minute, counted by every process in one row.

    The count decides which of them get an inbound log row of their own: the first
    RELAY_REFUSED_LOG_RATE of the minute; the rest are only counted here (and in the metric), so
    a flood costs one row per address and minute. `logged` says how many got their own row;
    the `status_*` columns split `refused` by the status answered.
    """

    __tablename__ = "refused_request_counts"

    # The minute first: retention deletes by it (the primary key's index serves that).
    minute: Mapped[datetime] = mapped_column(DateTime, primary_key=True)
    remote_addr: Mapped[str] = mapped_column(String(64), primary_key=True)
    refused: Mapped[int] = mapped_column(Integer, default=0)
    logged: Mapped[int] = mapped_column(Integer, default=0)
    status_400: Mapped[int] = mapped_column(Integer, default=0)
    status_401: Mapped[int] = mapped_column(Integer, default=0)
    status_404: Mapped[int] = mapped_column(Integer, default=0)
    status_413: Mapped[int] = mapped_column(Integer, default=0)
    status_503: Mapped[int] = mapped_column(Integer, default=0)


class QueuedEvent(Base):
    """A pending event's place in the delivery queue: when it is due and who holds its lease.

    Kept apart from the wide `events` row (README, "The delivery queue"): a claim and a lease
    renewal rewrite this narrow row only, and the event row is written once, when its status
    changes. A row exists exactly while its event is pending; marks delete it with the status
    change, operator actions put it back. `environment`, `person_key` and `event_time` are
    copies of the event's (set when it is stored; `relay forget` erases the person key in both)
    so the claim's per-person order check reads this table alone.
    """

    __tablename__ = "delivery_queue"
    __table_args__ = (
        # The claim: due first, oldest first.
        Index("ix_delivery_queue_due", "next_attempt_at", "event_id"),
        # Per-person order: an earlier queued event of the same person holds later ones back.
        Index("ix_delivery_queue_person", "environment", "person_key", "event_time", "event_id"),
        # The sweep of expired leases.
        Index("ix_delivery_queue_lease_expires_at", "lease_expires_at"),
    )

    event_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("events.id", ondelete="CASCADE"), primary_key=True,
        autoincrement=False)
    environment: Mapped[str] = mapped_column(String(16))
    person_key: Mapped[str | None] = mapped_column(String(330))
    event_time: Mapped[datetime | None] = mapped_column(DateTime)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)


def _queued(column: Mapped[Any], event_id: Mapped[int]) -> Any:
    """An event's read-only, deferred view of one column of its queue row (None when it is not
    queued); the "queue" group loads all of them at once (`undefer_group("queue")`)."""
    return column_property(
        select(column).where(QueuedEvent.event_id == event_id)
        .correlate_except(QueuedEvent).scalar_subquery(), deferred=True, group="queue")


class OutboxEvent(Base):
    """One Extole event on its way to Braze; `relay.outbox` is the only writer of its status."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("environment", "dedup_key", name="uq_events_environment_dedup_key"),
        # Per person, newest delivered attributes (`relay.outbox.leases`), and `relay forget`.
        Index("ix_events_person", "environment", "person_key", "event_time", "id"),
        # Admin filters and searches, newest first.
        Index("ix_events_status_id", "status", "id"),
        Index("ix_events_braze_event_id", "braze_event", "id"),
        Index("ix_events_environment_id", "environment", "id"),
        Index("ix_events_email", "email"),
        Index("ix_events_external_id", "external_id"),
        Index("ix_events_extole_event_id", "extole_event_id"),
        Index("ix_events_received_at", "received_at"),
        # The admin's live stream asks "what changed since" twice a second.
        Index("ix_events_updated_at", "updated_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    environment: Mapped[str] = mapped_column(String(16))
    # Extole's event id (or a hash of the event); NULL for rejected items, which never dedupe.
    dedup_key: Mapped[str | None] = mapped_column(String(255))
    extole_event_id: Mapped[str | None] = mapped_column(String(255))
    extole_type: Mapped[str | None] = mapped_column(String(255))
    braze_event: Mapped[str | None] = mapped_column(String(255))
    external_id: Mapped[str | None] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(320))
    person_key: Mapped[str | None] = mapped_column(String(330))
    event_time: Mapped[datetime | None] = mapped_column(DateTime)
    payload: Mapped[Any] = mapped_column(Json)
    attributes: Mapped[dict[str, Any] | None] = mapped_column(Json)
    properties: Mapped[dict[str, Any] | None] = mapped_column(Json)
    identity: Mapped[dict[str, Any] | None] = mapped_column(Json)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    first_failure_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    inbound_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("inbound_requests.id", ondelete="SET NULL"), index=True
    )
    received_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)

    # Read-only views of the event's queue row (None when it is not queued), loaded only when
    # asked for: the admin shows them; nothing writes through them (`relay.outbox.leases` and
    # `relay.outbox.operator` write `delivery_queue`).
    next_attempt_at: Mapped[datetime | None] = _queued(QueuedEvent.next_attempt_at, id)
    lease_owner: Mapped[str | None] = _queued(QueuedEvent.lease_owner, id)
    lease_expires_at: Mapped[datetime | None] = _queued(QueuedEvent.lease_expires_at, id)

class DedupKey(Base):
    """One de-duplication key of one stored event, kept after the event itself is purged.

    An event is a duplicate when any of its keys (`relay.outbox.dedup.keys_of`) is already here
    for its environment; a stored event adds all of its keys, a duplicate none. Retention purges
    the event after RELAY_RETENTION_DAYS but keeps its keys (then `event_id` is NULL) until
    `received_at` + RELAY_DEDUP_DAYS, so a request replayed long after is still a duplicate.
    Keys are event ids, reward ids with a state, or SHA-256 hashes: no personal data.
    """

    __tablename__ = "dedup_keys"
    __table_args__ = (
        # Both "the keys of this event" (ON DELETE SET NULL, retention) and "purged events'
        # keys past their time" (event_id IS NULL AND received_at < cutoff) use this index.
        Index("ix_dedup_keys_event_id_received_at", "event_id", "received_at"),
    )

    environment: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # The event that holds the key; NULL once retention purged it. The foreign key also makes
    # PostgreSQL's single-statement insert all-or-nothing (`relay.outbox.ingest`).
    event_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("events.id", ondelete="SET NULL"))
    received_at: Mapped[datetime] = mapped_column(DateTime)


class DeliveryAttempt(Base):
    """One request to Braze, recorded once, linked to the events it carried."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    environment: Mapped[str] = mapped_column(String(16))
    endpoint: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    duration_ms: Mapped[float] = mapped_column(Float)
    status_code: Mapped[int | None] = mapped_column(Integer)
    request_body: Mapped[str | None] = mapped_column(Text)
    response_body: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)


class AttemptEvent(Base):
    __tablename__ = "attempt_events"

    attempt_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("delivery_attempts.id", ondelete="CASCADE"), primary_key=True
    )
    event_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("events.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    outcome: Mapped[str | None] = mapped_column(String(32))


class Trigger(Base):
    """One API-triggered campaign or Canvas to start for one delivered event: at most once.

    Created in the transaction that marks the event delivered, one per event and target. The
    recipient is the identifier the event was delivered under; the properties are read from the
    event when the request is built. `attempt_id` is the last Braze request that carried it
    (recorded before it left, so a request whose answer never came is still on the event page).
    """

    __tablename__ = "triggers"
    __table_args__ = (
        UniqueConstraint("event_id", "kind", "target_id", name="uq_triggers_event_target"),
        # The trigger job's "next due triggers" query.
        Index("ix_triggers_due", "state", "due_at", "id"),
        # Admin lists by state, newest first.
        Index("ix_triggers_state_id", "state", "id"),
        Index("ix_triggers_lease_expires_at", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[int] = mapped_column(BigId, ForeignKey("events.id", ondelete="CASCADE"))
    environment: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))
    target_id: Mapped[str] = mapped_column(String(64))
    recipient: Mapped[dict[str, Any] | None] = mapped_column(Json)
    state: Mapped[str] = mapped_column(String(16))
    due_at: Mapped[datetime | None] = mapped_column(DateTime)
    sends: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    attempt_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("delivery_attempts.id", ondelete="SET NULL"), index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)


class IdentityCache(Base):
    """What Braze answered for an email, reused for RELAY_IDENTITY_TTL seconds."""

    __tablename__ = "identity_cache"

    environment: Mapped[str] = mapped_column(String(16), primary_key=True)
    email: Mapped[str] = mapped_column(String(320), primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(255))
    braze_id: Mapped[str | None] = mapped_column(String(64))
    found: Mapped[bool] = mapped_column(Boolean)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class EnvironmentState(Base):
    """Delivery state of one Braze environment, shared by every worker through the database."""

    __tablename__ = "environment_state"

    environment: Mapped[str] = mapped_column(String(16), primary_key=True)
    key_state: Mapped[str] = mapped_column(String(16), default="ok")
    paused_until: Mapped[datetime | None] = mapped_column(DateTime)
    rate_limited_until: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class RateLimiter(Base):
    """A token bucket in the database, so every worker shares one Braze export budget."""

    __tablename__ = "rate_limiters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class AdminSession(Base):
    """A signed-in admin session, so signing out ends it on the server, not just in the browser.

    The cookie carries a random session id; only its SHA-256 is stored, so the table alone signs
    nobody in. `credentials_version` names the admin credentials the session was opened with: a
    password change makes every older session invalid.
    """

    __tablename__ = "admin_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(255))
    credentials_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class AdminLoginFailure(Base):
    """One failed (or still unfinished) admin sign-in, counted against a user name or an address.

    `key_hash` is a keyed hash of the scope and the value (a user name typed by anyone, perhaps a
    password typed in the wrong field, is never stored in clear). Rows older than the throttle's
    window no longer count and are deleted.
    """

    __tablename__ = "admin_login_failures"
    __table_args__ = (Index("ix_admin_login_failures_key_hash_failed_at", "key_hash", "failed_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64))
    failed_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class ReconcileRun(Base):
    """One finished reconciliation run of one environment (README, "Reconciliation").

    `seen` rewards Extole listed in the window; `present` of them the environment already held
    (by reward and state); `backfilled` stored now as reward events; `errors` rewards that could
    not be used (their reasons, the first few, in `problems`). `error` says why a run stopped
    early (a refused token, Extole unavailable, an answer that is not a list of rewards): such a
    run is not a success.
    """

    __tablename__ = "reconcile_runs"
    __table_args__ = (Index("ix_reconcile_runs_environment_id", "environment", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    environment: Mapped[str] = mapped_column(String(16))
    trigger: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime] = mapped_column(DateTime)
    window_start: Mapped[datetime] = mapped_column(DateTime)
    window_end: Mapped[datetime] = mapped_column(DateTime)
    seen: Mapped[int] = mapped_column(Integer, default=0)
    present: Mapped[int] = mapped_column(Integer, default=0)
    backfilled: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    problems: Mapped[list[str] | None] = mapped_column(Json)
    duration_ms: Mapped[float] = mapped_column(Float)


class ReconcileLock(Base):
    """Who runs an environment's reconciliation now: one row per environment while a run holds
    it, until `expires_at` (renewed after every page), so a run whose process died frees the
    environment by itself. Shared by every worker and host through the database."""

    __tablename__ = "reconcile_locks"

    environment: Mapped[str] = mapped_column(String(16), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    acquired_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
