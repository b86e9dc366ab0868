"""Campaign and Canvas triggers: started once an event is delivered, sent at most once.

An event-map entry may name a `campaign_id` or `canvas_id` (README, "Campaign and Canvas
triggers"). When the event is marked delivered, the same transaction stores one trigger per target
(`create_for_delivered`). The worker's trigger job (`TriggerSender`) sends due triggers of one
environment and target together, up to 50 recipients a request.

Every accepted trigger request sends a person a message, and Braze does not de-duplicate them, so
a trigger is never sent twice by the relay itself:
- its state is committed as `sending` (and the request recorded) before the request leaves;
- a 2xx makes it `sent`, a 4xx other than 429 `failed` (nothing was sent);
- a 429, or a connection that could not be opened, returns it to `due`: Braze did not get it;
- a timeout, a 5xx, anything else, or a worker that dies while it is `sending` (its lease expires
  and `sweep_stale` finds it) makes it `uncertain`. Only an operator moves it on (`resend` back to
  `due`, or `drop`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import false, func, select, update
from sqlalchemy.orm import Session

from relay import braze_state, dialect, extole, metrics
from relay.braze import (
    CAMPAIGN_TRIGGER_PATH,
    MAX_TRIGGER_RECIPIENTS,
    TRIGGER_ENDPOINTS,
    BrazeClient,
    BrazeError,
    Exchange,
    RateLimited,
    TransportError,
)
from relay.db import Database, rowcount, utcnow
from relay.eventmap import EventMap, Mapping, reward_state
from relay.exceptions import (
    DatabaseUnavailable,
    FilterError,
    InvalidTransition,
    TriggerNotFound,
)
from relay.limiter import take_token
from relay.models import AttemptEvent, DeliveryAttempt, OutboxEvent, Trigger, TriggerState
from relay.privacy import ERASED_BODY, ERASED_OBJECT
from relay.settings import ENVIRONMENTS, Rate, Settings

log = logging.getLogger(__name__)

KINDS = ("campaign", "canvas")
STATES = tuple(state.value for state in TriggerState)
NO_RECIPIENT = "no recipient id"
IN_FLIGHT = "no answer yet: the request is in flight"
WORKER_LOST = ("no answer recorded: the worker stopped while the request was in flight, so "
               "Braze may have sent the message")
# Braze: 250,000 requests an hour for the trigger endpoints together (shared with /messages/send).
TRIGGER_RATE = Rate(250_000, 3600.0)
MAX_LIMITER_SLEEP = 0.5  # a wait for the limiter up to this long is slept, a longer one is not
# Operators may resend or drop a trigger in these states; the others are in progress or final.
RESENDABLE = (TriggerState.UNCERTAIN.value, TriggerState.FAILED.value)
DROPPABLE = (TriggerState.UNCERTAIN.value, TriggerState.FAILED.value, TriggerState.DUE.value)


def recipient_for(identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """The trigger recipient for the identifier an event was delivered under; None for one
    Braze cannot address a trigger to (a braze_id, an email)."""
    identity = identity or {}
    if isinstance(identity.get("external_id"), str) and identity["external_id"]:
        return {"external_user_id": identity["external_id"]}
    if isinstance(identity.get("user_alias"), dict):
        return {"user_alias": identity["user_alias"]}
    return None


def _transition(triggers: Sequence[tuple[int, int, str]], old: str, new: str,
                note: str = "") -> None:
    """Log and count state changes; each item (trigger id, event id, environment)."""
    for trigger_id, event_id, environment in triggers:
        log.info("trigger %s (event %s): %s -> %s%s", trigger_id, event_id, old, new,
                 f" ({note[:200]})" if note else "")
        metrics.TRIGGERS.labels(environment, new).inc()


# --- created with the delivered mark ------------------------------------------------------------


def create_for_delivered(session: Session, events: Sequence[OutboxEvent],
                         identities: dict[int, dict[str, Any]], event_map: EventMap,
                         delay: float, now: datetime | None = None) -> int:
    """In the delivered mark's transaction: one trigger per delivered event and target of its
    map entry (a reward event's `[rewards.<state>]` entry, as it was named: `extole.entry_for`),
    due `delay` seconds later. An event delivered again (a replay) starts none again.
    Answers how many were stored."""
    now = now or utcnow()
    rows = []
    entries = _entries(session, events, event_map)
    for event in events:
        targets = entries[event.id].triggers
        if not targets:
            continue
        recipient = recipient_for(identities.get(event.id) or event.identity)
        for kind, target_id in targets:
            rows.append({
                "event_id": event.id, "environment": event.environment, "kind": kind,
                "target_id": target_id, "recipient": recipient,
                "state": TriggerState.DUE.value if recipient else TriggerState.FAILED.value,
                "due_at": now + timedelta(seconds=delay) if recipient else None,
                "sends": 0, "last_error": None if recipient else NO_RECIPIENT,
                "created_at": now, "updated_at": now,
            })
    if not rows:
        return 0
    statement = (dialect.insert(session, Trigger).values(rows)
                 .on_conflict_do_nothing(index_elements=["event_id", "kind", "target_id"])
                 .returning(Trigger.id, Trigger.event_id, Trigger.environment, Trigger.state))
    created = session.execute(statement).all()
    for trigger_id, event_id, environment, state in created:
        _transition([(trigger_id, event_id, environment)], "new", state,
                    NO_RECIPIENT if state == TriggerState.FAILED.value else "")
    return len(created)


def _entries(session: Session, events: Sequence[OutboxEvent],
             event_map: EventMap) -> dict[int, Mapping]:
    """Each event's map entry, the one that named it (`extole.stored_entry`).

    A type that is a reward state (`FULFILLED`) is a reward event only when its item has a
    `reward_id`, which only the stored item tells; the claim leaves that out, so it is read here,
    and only for the events whose two possible entries start different campaigns or Canvases.
    """
    entries: dict[int, Mapping] = {}
    undecided: dict[int, str] = {}
    for event in events:
        extole_type = event.extole_type or ""
        by_type = event_map.lookup(extole_type)
        state = reward_state(extole_type)
        if state is not None and event_map.reward(state).triggers != by_type.triggers:
            undecided[event.id] = extole_type
        else:
            entries[event.id] = by_type
    if undecided:
        payloads = session.execute(select(OutboxEvent.id, OutboxEvent.payload)
                                   .where(OutboxEvent.id.in_(list(undecided))))
        for event_id, payload in payloads:
            entries[event_id] = extole.stored_entry(event_map, undecided[event_id], payload)
    return entries


# --- the trigger job ----------------------------------------------------------------------------


@dataclass
class Claimed:
    """One request's worth of triggers, committed `sending`, with the request recorded."""

    environment: str
    kind: str
    target_id: str
    triggers: list[tuple[int, int]]  # (trigger id, event id)
    body: dict[str, Any]
    attempt_id: int


def _naive_utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)


class TriggerSender:
    """Sends due triggers of one worker; the only caller of BrazeClient.trigger."""

    def __init__(self, settings: Settings, db: Database, owner: str,
                 clients: Callable[[str], BrazeClient]) -> None:
        self.settings = settings
        self.db = db
        self.owner = owner
        self.clients = clients
        # A `sending` trigger whose lease expired belongs to a worker that died mid-request: the
        # lease covers the longest a live worker can take (connect and read timeouts; the client
        # does not pace these requests by sleeping: `claim` asks `pacing_delay` first instead).
        self.lease = timedelta(seconds=settings.lease_seconds + settings.braze_connect_timeout
                               + settings.braze_read_timeout)

    def run(self, environments: Sequence[str], max_requests: int = 100,
            stopping: Callable[[], bool] = lambda: False) -> int:
        """Sweep stale `sending` triggers, then send due ones until none is due (or
        `max_requests` requests were sent); answers how many requests were sent."""
        with self.db.session() as session:
            sweep_stale(session)
        sent = 0
        waiting: set[str] = set()
        while sent < max_requests and not stopping():
            ready = [e for e in environments if e not in waiting]
            if not ready:
                break
            claimed, blocked, wait = self.claim(ready)
            if claimed is None:
                if blocked is None:
                    break
                if wait <= MAX_LIMITER_SLEEP:
                    time.sleep(wait)  # our share of Braze's limit refills within a moment
                else:
                    waiting.add(blocked)  # used up for now: the other environment goes on
                continue
            self.send(claimed)
            sent += 1
        return sent

    def claim(self, environments: Sequence[str]) -> tuple[Claimed | None, str | None, float]:
        """Commit up to 50 due triggers of the oldest due target as `sending`, and record the
        request that will carry them, before it leaves: (claimed, None, 0). (None, environment,
        seconds) when that environment must wait for the rate limit: Braze's shared limit for
        these endpoints as its last answer told it, and our own pacing under it (kept in the
        database, for every worker). (None, None, 0) when nothing is due."""
        now = utcnow()
        with self.db.session() as session:
            head = session.execute(
                select(Trigger.environment, Trigger.kind, Trigger.target_id)
                .where(Trigger.state == TriggerState.DUE.value, Trigger.due_at <= now,
                       Trigger.environment.in_(list(environments)))
                .order_by(Trigger.due_at, Trigger.id).limit(1)
            ).first()
            if head is None:
                return None, None, 0.0
            environment, kind, target_id = head
            wait = self.clients(environment).pacing_delay(CAMPAIGN_TRIGGER_PATH)
            if wait <= 0:
                wait = take_token(session, f"triggers:{environment}", TRIGGER_RATE)
            if wait > 0:
                return None, environment, wait
            due = dialect.for_update(
                select(Trigger.id)
                .where(Trigger.state == TriggerState.DUE.value, Trigger.due_at <= now,
                       Trigger.environment == environment, Trigger.kind == kind,
                       Trigger.target_id == target_id)
                .order_by(Trigger.due_at, Trigger.id).limit(MAX_TRIGGER_RECIPIENTS),
                session, skip_locked=True)
            ids = list(session.scalars(due))
            if not ids:
                return None, None, 0.0  # another worker took them meanwhile
            rows = list(session.execute(
                update(Trigger)
                .where(Trigger.id.in_(ids), Trigger.state == TriggerState.DUE.value)
                .values(state=TriggerState.SENDING.value, lease_owner=self.owner,
                        lease_expires_at=now + self.lease, sends=Trigger.sends + 1,
                        updated_at=now)
                .returning(Trigger.id, Trigger.event_id, Trigger.recipient)
                .execution_options(synchronize_session=False)
            ).all())
            rows.sort(key=lambda row: row[0])
            properties: dict[int, dict[str, Any] | None] = {
                event_id: values for event_id, values in session.execute(
                    select(OutboxEvent.id, OutboxEvent.properties)
                    .where(OutboxEvent.id.in_([row.event_id for row in rows])))}
            body = BrazeClient.trigger_body(kind, target_id, [
                {**(row.recipient or {}), "properties": properties.get(row.event_id) or {}}
                for row in rows])
            attempt = DeliveryAttempt(
                environment=environment, endpoint=TRIGGER_ENDPOINTS[kind][0], started_at=now,
                duration_ms=0.0, status_code=None, request_body=BrazeClient.serialise(body),
                response_body=None, error=IN_FLIGHT)
            session.add(attempt)
            session.flush()
            session.execute(AttemptEvent.__table__.insert(), [
                {"attempt_id": attempt.id, "event_id": row.event_id, "outcome": "trigger sending"}
                for row in rows])
            session.execute(update(Trigger).where(Trigger.id.in_([row.id for row in rows]))
                            .values(attempt_id=attempt.id)
                            .execution_options(synchronize_session=False))
        claimed = Claimed(environment, kind, target_id, [(row.id, row.event_id) for row in rows],
                          body, attempt.id)
        _transition([(t, e, environment) for t, e in claimed.triggers], "due", "sending",
                    f"{kind} {target_id}")
        return claimed, None, 0.0

    def send(self, claimed: Claimed) -> None:
        """Send one claimed request and record what Braze's answer makes of its triggers."""
        client = self.clients(claimed.environment)
        try:
            exchange = client.trigger(claimed.kind, claimed.body, pace=False)
        except RateLimited as error:
            self._finish(claimed, error.exchange, TriggerState.DUE, f"{error}",
                         due_at=max(_naive_utc(error.reset_at), utcnow() + timedelta(seconds=1)),
                         rate_limited=True)
            return
        except TransportError as error:
            status = error.exchange.status if error.exchange else None
            if status is not None and 200 <= status < 300:
                # Braze accepted it; only its answer's body was not what it documents.
                self._finish(claimed, error.exchange, TriggerState.SENT, None)
            elif not error.reached:
                self._finish(claimed, error.exchange, TriggerState.DUE,
                             f"{error} (the request did not leave: it will be sent later)",
                             due_at=utcnow() + timedelta(seconds=self.settings.retry_base))
            else:
                self._finish(claimed, error.exchange, TriggerState.UNCERTAIN,
                             f"{error}: Braze may have sent the message")
            return
        except BrazeError as error:
            status = error.exchange.status if error.exchange else None
            if status is not None and 400 <= status < 500:
                self._finish(claimed, error.exchange, TriggerState.FAILED, str(error))
            else:
                self._finish(claimed, error.exchange, TriggerState.UNCERTAIN,
                             f"{error}: Braze may have sent the message")
            return
        except Exception as error:  # noqa: BLE001 - a bug must not leave triggers `sending`
            log.exception("unexpected error sending triggers %s",
                          [t for t, _ in claimed.triggers])
            self._finish(claimed, None, TriggerState.UNCERTAIN,
                         f"internal error while sending: {type(error).__name__}")
            return
        self._finish(claimed, exchange, TriggerState.SENT, None)

    def _finish(self, claimed: Claimed, exchange: Exchange | None, state: TriggerState,
                error: str | None, due_at: datetime | None = None,
                rate_limited: bool = False) -> None:
        """Record the answer on the request recorded at the claim, and move the triggers this
        worker still holds (`sending`, or `uncertain` if a sweep thought it dead) to `state`."""
        now = utcnow()
        ids = [trigger_id for trigger_id, _ in claimed.triggers]
        values: dict[str, Any] = {"state": state.value, "lease_owner": None,
                                  "lease_expires_at": None, "updated_at": now,
                                  "last_error": error[:2000] if error else None}
        if state is TriggerState.SENT:
            values["sent_at"] = now
        if state is TriggerState.DUE:
            values["due_at"] = due_at or now
        try:
            with self.db.session() as session:
                # Locked first: a trigger `relay forget` deleted meanwhile (its person is
                # forgotten) gets nothing of theirs written back into the recorded request.
                dialect.take_write_lock(session, Trigger, false())
                present = set(session.scalars(dialect.for_update(
                    select(Trigger.id).where(Trigger.id.in_(ids)).order_by(Trigger.id),
                    session, no_key=True)))
                _record_answer(session, claimed, exchange, state, error, present)
                changed = set(session.scalars(
                    update(Trigger)
                    .where(Trigger.id.in_(ids), Trigger.lease_owner == self.owner,
                           Trigger.state.in_([TriggerState.SENDING.value,
                                              TriggerState.UNCERTAIN.value]))
                    .values(values).returning(Trigger.id)
                    .execution_options(synchronize_session=False)))
                if rate_limited and due_at is not None:
                    # Braze's limit is the environment's: its other due triggers wait too.
                    session.execute(
                        update(Trigger)
                        .where(Trigger.environment == claimed.environment,
                               Trigger.state == TriggerState.DUE.value, Trigger.due_at < due_at)
                        .values(due_at=due_at)
                        .execution_options(synchronize_session=False))
        except DatabaseUnavailable:
            # The triggers stay `sending` and their lease runs out: the sweep makes them
            # `uncertain` (never due), so a lost answer cannot cause a second message.
            log.error("could not record Braze's answer for triggers %s: they will become "
                      "uncertain", ids)
            raise
        lost = [trigger_id for trigger_id in ids if trigger_id not in changed]
        if lost:
            log.warning("triggers %s were no longer held by %s: left as they are", lost,
                        self.owner)
        _transition([(t, e, claimed.environment) for t, e in claimed.triggers if t in changed],
                    "sending", state.value, error or "")


def _record_answer(session: Session, claimed: Claimed, exchange: Exchange | None,
                   state: TriggerState, error: str | None, present: set[int]) -> None:
    """Complete the request recorded at the claim with Braze's answer (or what went wrong).

    Triggers no longer `present` were deleted by `relay forget` while the request was in
    flight: their recipients are written as `{"erased": true}`, and with none left the request
    and answer are erased whole, as a delivery that lost its lease records them."""
    values: dict[str, Any] = {"error": error[:2000] if error else None}
    if exchange is not None:
        metrics.BRAZE_SECONDS.labels(
            exchange.endpoint, str(exchange.status) if exchange.status else "error"
        ).observe(exchange.duration_ms / 1000.0)
        request_body, response_body = exchange.request_body, exchange.response_body
        if len(present) < len(claimed.triggers):
            request_body, response_body = _without_forgotten(claimed, exchange, present)
        values.update(started_at=exchange.started_at.replace(tzinfo=None),
                      duration_ms=exchange.duration_ms, status_code=exchange.status,
                      request_body=request_body, response_body=response_body,
                      error=exchange.error or values["error"])
    session.execute(update(DeliveryAttempt).where(DeliveryAttempt.id == claimed.attempt_id)
                    .values(values).execution_options(synchronize_session=False))
    session.execute(update(AttemptEvent).where(AttemptEvent.attempt_id == claimed.attempt_id)
                    .values(outcome=f"trigger {state.value}")
                    .execution_options(synchronize_session=False))


def _without_forgotten(claimed: Claimed, exchange: Exchange,
                       present: set[int]) -> tuple[str, str]:
    erased = ERASED_BODY.decode()
    if not present:
        return erased, erased
    body = dict(claimed.body)
    # The recipients are in the order of the claimed triggers (`claim` builds them so).
    body["recipients"] = [
        recipient if trigger_id in present else ERASED_OBJECT
        for recipient, (trigger_id, _) in zip(body["recipients"], claimed.triggers, strict=True)]
    # Braze's answer to a trigger request names no recipient (a dispatch id, or a message).
    return BrazeClient.serialise(body), exchange.response_body


def sweep_stale(session: Session, now: datetime | None = None) -> int:
    """`sending` triggers whose worker's lease expired: that worker died (or lost the database)
    while the request was in flight, so Braze may have it. They become `uncertain`, never due."""
    now = now or utcnow()
    stale = session.execute(
        dialect.for_update(
            select(Trigger.id, Trigger.event_id, Trigger.environment, Trigger.attempt_id)
            .where(Trigger.state == TriggerState.SENDING.value,
                   Trigger.lease_expires_at < now), session, skip_locked=True)
    ).all()
    if not stale:
        return 0
    session.execute(update(Trigger).where(Trigger.id.in_([row.id for row in stale]),
                                          Trigger.state == TriggerState.SENDING.value)
                    .values(state=TriggerState.UNCERTAIN.value, last_error=WORKER_LOST,
                            updated_at=now)
                    .execution_options(synchronize_session=False))
    attempts = [row.attempt_id for row in stale if row.attempt_id is not None]
    if attempts:
        session.execute(update(DeliveryAttempt)
                        .where(DeliveryAttempt.id.in_(attempts),
                               DeliveryAttempt.status_code.is_(None),
                               DeliveryAttempt.error == IN_FLIGHT)
                        .values(error=WORKER_LOST)
                        .execution_options(synchronize_session=False))
        session.execute(update(AttemptEvent)
                        .where(AttemptEvent.attempt_id.in_(attempts),
                               AttemptEvent.outcome == "trigger sending")
                        .values(outcome="trigger uncertain")
                        .execution_options(synchronize_session=False))
    _transition([(row.id, row.event_id, row.environment) for row in stale], "sending",
                "uncertain", "the worker stopped while sending")
    return len(stale)


def sendable_environments(session: Session, settings: Settings,
                          environments: Sequence[str]) -> list[str]:
    """Environments with a key whose delivery is not paused (a refused key would fail them)."""
    ready = []
    for environment in environments:
        if not (settings.braze_key(environment) and settings.braze_endpoint(environment)):
            continue
        if braze_state.paused_until(session, environment) is None:
            ready.append(environment)
    return ready


# --- operators ----------------------------------------------------------------------------------


def get_trigger(session: Session, trigger_id: int) -> Trigger:
    trigger = session.get(Trigger, trigger_id)
    if trigger is None:
        raise TriggerNotFound(f"no trigger with id {trigger_id}")
    return trigger


def resend(session: Session, trigger_id: int, now: datetime | None = None) -> Trigger:
    """An operator's decision: an `uncertain` (or `failed`) trigger is sent again, once."""
    now = now or utcnow()
    trigger = get_trigger(session, trigger_id)
    old = trigger.state
    if old not in RESENDABLE:
        raise InvalidTransition(f"trigger {trigger_id} is {old}: only an uncertain or failed "
                                "trigger can be resent")
    if trigger.recipient is None:
        raise InvalidTransition(f"trigger {trigger_id} has no recipient Braze can address "
                                f"({NO_RECIPIENT})")
    _operator_update(session, trigger, old, state=TriggerState.DUE.value, due_at=now,
                     last_error=None, updated_at=now)
    log.info("trigger %s (event %s): %s -> due (resent by an operator)", trigger.id,
             trigger.event_id, old)
    metrics.TRIGGERS.labels(trigger.environment, TriggerState.DUE.value).inc()
    return trigger


def drop(session: Session, trigger_id: int, now: datetime | None = None) -> Trigger:
    """An operator's decision: the trigger is never sent (again)."""
    now = now or utcnow()
    trigger = get_trigger(session, trigger_id)
    old = trigger.state
    if old not in DROPPABLE:
        raise InvalidTransition(f"trigger {trigger_id} is {old}: only a due, uncertain or "
                                "failed trigger can be dropped")
    _operator_update(session, trigger, old, state=TriggerState.DROPPED.value, due_at=None,
                     updated_at=now)
    log.info("trigger %s (event %s): %s -> dropped (by an operator)", trigger.id,
             trigger.event_id, old)
    metrics.TRIGGERS.labels(trigger.environment, TriggerState.DROPPED.value).inc()
    return trigger


def _operator_update(session: Session, trigger: Trigger, old: str, **values: Any) -> None:
    """Change the trigger only if it is still in the state the operator saw (a worker may have
    claimed a due trigger meanwhile)."""
    changed = rowcount(session.execute(
        update(Trigger).where(Trigger.id == trigger.id, Trigger.state == old).values(values)
        .execution_options(synchronize_session=False)))
    if not changed:
        raise InvalidTransition(f"trigger {trigger.id} changed meanwhile: look again")
    session.refresh(trigger)


# --- read-only ----------------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="milliseconds") + "Z" if moment else None


def trigger_json(trigger: Trigger) -> dict[str, Any]:
    """A trigger as the admin API and `relay triggers` show it."""
    return {
        "id": trigger.id,
        "event_id": trigger.event_id,
        "environment": trigger.environment,
        "kind": trigger.kind,
        "target_id": trigger.target_id,
        "state": trigger.state,
        "recipient": trigger.recipient,
        "sends": trigger.sends,
        "due_at": _iso(trigger.due_at) if trigger.state == TriggerState.DUE.value else None,
        "sent_at": _iso(trigger.sent_at),
        "created_at": _iso(trigger.created_at),
        "updated_at": _iso(trigger.updated_at),
        "last_error": trigger.last_error,
    }


def parse_filter(state: str | None = None, environment: str | None = None,
                 kind: str | None = None) -> dict[str, str]:
    """The triggers list's filters, checked: a bad value names the parameter."""
    chosen: dict[str, str] = {}
    for name, value, allowed in (("state", state, STATES), ("environment", environment,
                                                             ENVIRONMENTS), ("kind", kind, KINDS)):
        value = (value or "").strip()
        if not value:
            continue
        if value not in allowed:
            raise FilterError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        chosen[name] = value
    return chosen


def list_triggers(session: Session, filters: dict[str, str] | None = None, *, limit: int = 50,
                  cursor: int | None = None, event_id: int | None = None
                  ) -> tuple[list[Trigger], int | None]:
    """Newest first, keyset-paginated on id; filters from `parse_filter`."""
    query = select(Trigger)
    for name, value in (filters or {}).items():
        query = query.where(getattr(Trigger, name) == value)
    if event_id is not None:
        query = query.where(Trigger.event_id == event_id)
    if cursor is not None:
        query = query.where(Trigger.id < cursor)
    found = list(session.scalars(query.order_by(Trigger.id.desc()).limit(limit + 1)))
    next_cursor = found[limit - 1].id if len(found) > limit else None
    return found[:limit], next_cursor


def counts_by_state(session: Session) -> dict[str, int]:
    """Triggers per state, every state present."""
    counts = {state: 0 for state in STATES}
    for state, count in session.execute(
            select(Trigger.state, func.count()).group_by(Trigger.state)):
        counts[state] = count
    return counts
