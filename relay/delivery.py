"""From claimed outbox events to Braze: identity resolution, batching, applying Braze's answers.

Every Braze request is recorded once (body, status, answer, duration) and linked to the events it
carried; every outcome becomes a status through `relay.outbox.leases`, never a swallowed exception.

Everything a worker writes about its events (the recorded request, the identity cache, the marks)
is written only for the events it still holds the lease on, checked in the same transaction
(`leases.held_by`). An event taken from it meanwhile (its lease expired, or `relay forget` fenced
it) gets nothing written, and its objects are erased from the recorded request: a delivery that
was in flight cannot write a forgotten person back.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from relay import attributes as person_attributes
from relay import braze_state, dialect, metrics, triggers
from relay.braze import (
    BadRequest,
    BrazeClient,
    BrazeError,
    Exchange,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
)
from relay.db import Database, utcnow
from relay.eventmap import EventMap
from relay.exceptions import DatabaseUnavailable
from relay.extole import braze_time, canonical_json
from relay.limiter import take_token
from relay.models import AttemptEvent, DeliveryAttempt, IdentityCache, OutboxEvent
from relay.outbox import leases
from relay.privacy import ERASED_BODY, ERASED_OBJECT
from relay.retry import RetryPolicy
from relay.settings import Settings

log = logging.getLogger(__name__)

ALIAS_LABEL = "email"
KEY_PAUSE_SECONDS = 15.0
NO_IDENTIFIER = "no identifier"


@dataclass
class Planned:
    """An event with its Braze identifier, ready to be put in a request."""

    event: OutboxEvent
    identity: dict[str, Any]
    create_alias: bool = False
    # Attributes Braze already has newer values of (set by a later event already delivered).
    stale: frozenset[str] = frozenset()

    @property
    def time(self) -> datetime:
        """When the event happened in Extole: every deliverable event has its time (only
        rejected items, which are never delivered, have none)."""
        moment = self.event.event_time
        if moment is None:
            raise ValueError(f"event {self.event.id} has no event time")
        return moment


@dataclass
class TrackRequest:
    """A /users/track body and, per object, the events it came from (to map Braze's indexes)."""

    body: dict[str, Any]
    attribute_sources: list[list[Planned]]
    event_sources: list[Planned]


@dataclass
class Outcome:
    delivered: list[Planned] = field(default_factory=list)
    dead: dict[int, str] = field(default_factory=dict)


def identity_of(planned: Planned) -> str:
    return canonical_json(planned.identity)


def build_track_request(batch: Sequence[Planned], email_identifier: bool = False) -> TrackRequest:
    """Attributes merged per person (later events win), one events object per event."""
    attributes: list[dict[str, Any]] = []
    attribute_sources: list[list[Planned]] = []
    position: dict[str, int] = {}
    events: list[dict[str, Any]] = []
    event_sources: list[Planned] = []
    for planned in sorted(batch, key=lambda p: (p.event.event_time, p.event.id)):
        event = planned.event
        values = person_attributes.without(event.attributes, planned.stale)
        if email_identifier and "email" in planned.identity:
            values.pop("email", None)  # it is the identifier already
        if planned.create_alias:
            values["email"] = event.email
        if values or planned.create_alias:
            key = identity_of(planned)
            if key in position:
                person_attributes.merge(attributes[position[key]], values)
                attribute_sources[position[key]].append(planned)
            else:
                obj = dict(planned.identity)
                if planned.create_alias:
                    obj["_update_existing_only"] = False
                person_attributes.merge(obj, values)
                position[key] = len(attributes)
                attributes.append(obj)
                attribute_sources.append([planned])
        events.append({**planned.identity, "name": event.braze_event,
                       "time": braze_time(planned.time), "properties": event.properties or {}})
        event_sources.append(planned)
    body: dict[str, Any] = {}
    if attributes:
        body["attributes"] = attributes
    body["events"] = events
    return TrackRequest(body, attribute_sources, event_sources)


def objects_needed(planned: Planned, persons_with_attributes: set[str],
                   email_identifier: bool) -> int:
    by_email = email_identifier and "email" in planned.identity
    sent = {k for k in person_attributes.keys(planned.event.attributes)
            if k not in planned.stale and not (by_email and k == "email")}
    has_attributes = planned.create_alias or bool(sent)
    return 1 + (1 if has_attributes and identity_of(planned) not in persons_with_attributes else 0)


def chunk(planned: Sequence[Planned], max_objects: int,
          email_identifier: bool = False) -> list[list[Planned]]:
    """Split into requests of at most `max_objects` objects, attributes and events together."""
    chunks: list[list[Planned]] = []
    current: list[Planned] = []
    persons: set[str] = set()
    used = 0
    for item in sorted(planned, key=lambda p: (p.event.event_time, p.event.id)):
        need = objects_needed(item, persons, email_identifier)
        if current and used + need > max_objects:
            chunks.append(current)
            current, persons, used = [], set(), 0
            need = objects_needed(item, persons, email_identifier)
        current.append(item)
        used += need
        if need == 2:
            persons.add(identity_of(item))
    if current:
        chunks.append(current)
    return chunks


def _naive_utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)


class Delivery:
    """Delivers claimed events of one worker; the only caller of BrazeClient.track."""

    def __init__(self, settings: Settings, db: Database, owner: str,
                 clients: Callable[[str], BrazeClient], pool: ThreadPoolExecutor | None = None,
                 rng: random.Random | None = None, event_map: EventMap | None = None) -> None:
        self.settings = settings
        # Read at delivery for the triggers an event starts (its campaign_id / canvas_id).
        self.event_map = event_map or EventMap.load(settings.event_map)
        self.db = db
        self.owner = owner
        self.clients = clients
        self.pool = pool
        self.rng = rng or random.Random()
        self.policy = RetryPolicy(settings.retry_base, settings.retry_max_delay,
                                  settings.retry_max_age)

    # -- the whole batch -------------------------------------------------------------------

    def deliver(self, events: Sequence[OutboxEvent]) -> None:
        by_environment: dict[str, list[OutboxEvent]] = {}
        for event in events:
            by_environment.setdefault(event.environment, []).append(event)
        jobs: list[tuple[str, list[Planned]]] = []
        for environment, group in by_environment.items():
            planned = self.resolve(environment, group)
            email_identifier = self.settings.braze_email_identity == "email"
            jobs.extend((environment, c) for c in
                        chunk(planned, self.settings.braze_max_objects, email_identifier))
        if self.pool is not None and len(jobs) > 1:
            futures = [self.pool.submit(self.send, env, c) for env, c in jobs]
            # Every chunk ends before the batch does, even when one raised: a chunk left running
            # would race the next claim of its own events once their leases expire.
            wait(futures)
            for future in futures:
                future.result()
        else:
            for environment, batch in jobs:
                self.send(environment, batch)

    # -- identity --------------------------------------------------------------------------

    def resolve(self, environment: str, events: list[OutboxEvent]) -> list[Planned]:
        """external_id; else email (cache, export, or alias); else dead `no identifier`."""
        planned: list[Planned] = []
        by_email: dict[str, list[OutboxEvent]] = {}
        dead: list[OutboxEvent] = []
        for event in events:
            if event.external_id:
                planned.append(Planned(event, {"external_id": event.external_id}))
            elif event.email and self.settings.braze_email_identity == "email":
                planned.append(Planned(event, {"email": event.email}))
            elif event.email:
                by_email.setdefault(event.email, []).append(event)
            else:
                dead.append(event)
        if dead:
            with self.db.session() as session:
                leases.mark_dead(session, self.owner, {e.id: NO_IDENTIFIER for e in dead}, dead)
        if by_email:
            planned.extend(self._resolve_emails(environment, by_email))
        self._mark_stale(environment, planned)
        return planned

    def _resolve_emails(self, environment: str,
                        by_email: dict[str, list[OutboxEvent]]) -> list[Planned]:
        now = utcnow()
        with self.db.session() as session:
            cached = {
                row.email: row
                for row in session.scalars(select(IdentityCache).where(
                    IdentityCache.environment == environment,
                    IdentityCache.email.in_(list(by_email)),
                    IdentityCache.expires_at > now))
            }
        planned: list[Planned] = []
        for email, events in by_email.items():
            if email in cached:
                metrics.IDENTITY_LOOKUPS.labels("cache_hit").inc(len(events))
                row = cached[email]
                planned.extend(self._plan_email(e, row.found, row.external_id, row.braze_id)
                               for e in events)
                continue
            answer = self._export(environment, email, events)
            if answer is not None:
                found, external_id, braze_id = answer
                planned.extend(self._plan_email(e, found, external_id, braze_id) for e in events)
                metrics.IDENTITY_LOOKUPS.labels("cache_hit").inc(len(events) - 1)
        return planned

    @staticmethod
    def _plan_email(event: OutboxEvent, found: bool, external_id: str | None,
                    braze_id: str | None) -> Planned:
        if found and external_id:
            return Planned(event, {"external_id": external_id})
        if found and braze_id:
            return Planned(event, {"braze_id": braze_id})
        alias = {"alias_name": event.email, "alias_label": ALIAS_LABEL}
        return Planned(event, {"user_alias": alias}, create_alias=True)

    def _export(self, environment: str, email: str,
                events: list[OutboxEvent]) -> tuple[bool, str | None, str | None] | None:
        """Ask Braze who has this email; None when the events had to wait or failed."""
        with self.db.session() as session:
            wait = take_token(session, f"export:{environment}", self.settings.braze_export_rate)
        if wait > 0:
            with self.db.session() as session:
                leases.release(session, self.owner, events, utcnow() + timedelta(seconds=wait),
                               "waiting for the Braze export limiter (BRAZE_EXPORT_RATE)")
            return None
        client = self.clients(environment)
        note, exchange = "lookup", None
        try:
            users, answered = client.export_ids_by_email(email)
            exchange = answered
        except RateLimited as error:
            # The export limit is Braze's own per endpoint: tracking goes on meanwhile.
            until = max(_naive_utc(error.reset_at), utcnow() + timedelta(seconds=1))
            with self.db.session() as session:
                self._record_in(session, environment, error.exchange, events, "rate limited")
                leases.release(session, self.owner, events, until,
                               "waiting: Braze export rate limit")
            return None
        except BadRequest as error:
            # Braze cannot look this address up: treat it as unknown and create the alias.
            log.warning("export for events %s refused (%s): treated as not found",
                        [e.id for e in events], error)
            exchange, users, note = error.exchange, [], "lookup refused"
        except BrazeError as error:
            metrics.IDENTITY_LOOKUPS.labels("error").inc()
            self._handle_error(environment, error, [Planned(e, {}) for e in events],
                               "identity lookup")
            return None
        with_external = [u for u in users if u.get("external_id")]
        chosen = with_external[0] if with_external else (users[0] if users else None)
        found = chosen is not None
        external_id = str(chosen["external_id"]) if chosen and chosen.get("external_id") else None
        braze_id = str(chosen["braze_id"]) if chosen and chosen.get("braze_id") else None
        metrics.IDENTITY_LOOKUPS.labels("found" if found else "not_found").inc()
        values = {"environment": environment, "email": email, "external_id": external_id,
                  "braze_id": braze_id, "found": found,
                  "expires_at": utcnow() + timedelta(seconds=self.settings.identity_ttl)}
        with self.db.session() as session:
            held = self._record_in(session, environment, exchange, events, note)
            if not held:
                # Taken from this worker while Braze answered (forgotten, or the lease
                # expired): neither the answer nor the events are this worker's to use.
                return None
            session.execute(dialect.upsert(session, IdentityCache, values,
                                           ["environment", "email"]))
        return found, external_id, braze_id

    def _mark_stale(self, environment: str, planned: list[Planned]) -> None:
        """An event older than what Braze already has sends none of those attributes.

        Only the attributes a later, delivered event of the person set are stale: the others
        (a first name only the late event carries) are still news to Braze.
        """
        oldest: dict[str, datetime] = {}
        for item in planned:
            key, moment = item.event.person_key, item.event.event_time
            if key and moment is not None:
                oldest[key] = min(oldest.get(key, moment), moment)
        if not oldest:
            return
        with self.db.session() as session:
            newer = leases.newer_delivered_attributes(session, environment, oldest)
        for item in planned:
            times = newer.get(item.event.person_key or "", {})
            item.stale = frozenset(name for name, moment in times.items()
                                   if item.time < moment)

    # -- sending ---------------------------------------------------------------------------

    def send(self, environment: str, batch: list[Planned]) -> None:
        """Send one chunk; a 400 splits it until the refused events are isolated."""
        request = build_track_request(batch, self.settings.braze_email_identity == "email")
        client = self.clients(environment)
        try:
            result = client.track(request.body)
        except BadRequest as error:
            self._bad_request(environment, batch, request, error)
            return
        except BrazeError as error:
            self._handle_error(environment, error, batch, "delivery", request)
            return
        except Exception as error:  # noqa: BLE001 - a bug must not strand leased events
            log.exception("unexpected error delivering events %s", [p.event.id for p in batch])
            self._fail(environment, None, batch, f"internal error: {type(error).__name__}")
            return
        outcome = Outcome()
        for problem in result.errors:
            for planned in self._sources(request, problem):
                outcome.dead.setdefault(planned.event.id, self._refusal(problem))
        outcome.delivered = [p for p in batch if p.event.id not in outcome.dead]
        self._apply(environment, result.exchange, batch, outcome, request=request)

    @staticmethod
    def _sources(request: TrackRequest, problem: dict[str, Any]) -> list[Planned]:
        index = problem.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            return []
        if problem.get("input_array") == "events" and index < len(request.event_sources):
            return [request.event_sources[index]]
        if problem.get("input_array") == "attributes" and index < len(request.attribute_sources):
            return request.attribute_sources[index]
        return []

    @staticmethod
    def _refusal(problem: dict[str, Any]) -> str:
        what = problem.get("input_array", "object")
        return f"Braze refused the {what} object: {problem.get('type') or problem}"[:2000]

    def _bad_request(self, environment: str, batch: list[Planned], request: TrackRequest,
                     error: BadRequest) -> None:
        flagged: dict[int, str] = {}
        for problem in getattr(error, "errors", None) or []:
            for planned in self._sources(request, problem):
                flagged.setdefault(planned.event.id, self._refusal(problem))
        if flagged and len(flagged) < len(batch):
            # Braze named the culprits: they die, the rest is sent again at once.
            self._apply(environment, error.exchange, batch, Outcome(dead=flagged), "split",
                        request)
            self.send(environment, [p for p in batch if p.event.id not in flagged])
            return
        if len(batch) == 1 or flagged:
            status = error.exchange.status if error.exchange else 400
            message = f"Braze refused the request (HTTP {status}): {error}"
            dead = flagged or {p.event.id: message for p in batch}
            self._apply(environment, error.exchange, batch, Outcome(dead=dead), request=request)
            return
        self._record(environment, error.exchange, [p.event for p in batch], "split", request)
        middle = len(batch) // 2
        self.send(environment, batch[:middle])
        self.send(environment, batch[middle:])

    def _handle_error(self, environment: str, error: BrazeError, batch: list[Planned],
                      what: str, request: TrackRequest | None = None) -> None:
        """`request`: the /users/track body sent (None for an identity lookup)."""
        events = [p.event for p in batch]
        now = utcnow()
        if isinstance(error, RateLimited):
            until = max(_naive_utc(error.reset_at), now + timedelta(seconds=1))
            with self.db.session() as session:
                # The environment's row before the events' (`_record_in` locks them): the
                # order every worker transaction takes them in, so none waits in a cycle.
                braze_state.mark_rate_limited(session, environment, until)
                self._record_in(session, environment, error.exchange, events, "rate limited",
                                request=request)
                leases.release(session, self.owner, events, until,
                               f"waiting: Braze rate limit ({what}) until {until:%H:%M:%S} UTC")
            return
        if isinstance(error, Unauthorized):
            with self.db.session() as session:
                paused = braze_state.mark_refused(session, environment, str(error),
                                                  KEY_PAUSE_SECONDS)
                self._record_in(session, environment, error.exchange, events, "key refused",
                                request=request)
                # No credit here: the resume credits the whole refusal to every retrying
                # event (shift_failure_clock), these included; crediting both counted it twice.
                leases.release(session, self.owner, events, paused,
                               f"waiting: Braze refused the {environment} key ({error})",
                               credit_wait=False)
            log.warning("%s delivery paused: %s", environment, error)
            return
        if isinstance(error, ServerError | TransportError):
            self._fail(environment, error.exchange, batch, str(error), request)
            return
        self._fail(environment, error.exchange, batch, f"{what} failed: {error}", request)

    def _fail(self, environment: str, exchange: Exchange | None, batch: list[Planned],
              error: str, request: TrackRequest | None = None) -> None:
        events = [p.event for p in batch]
        with self.db.session() as session:
            self._record_in(session, environment, exchange, events, "failed", request=request)
            leases.mark_failed(session, self.owner, events, error, self.policy, rng=self.rng)

    def _apply(self, environment: str, exchange: Exchange | None, batch: list[Planned],
               outcome: Outcome, note: str | None = None,
               request: TrackRequest | None = None) -> None:
        events = [p.event for p in batch]
        outcomes = {p.event.id: "delivered" for p in outcome.delivered}
        outcomes.update({event_id: "dead" for event_id in outcome.dead})
        identities = {p.event.id: p.identity for p in batch}
        try:
            with self.db.session() as session:
                # Braze answered 2xx or 400: past its key check, so the key works. The
                # environment's row (and the retrying events the resume shifts) before this
                # batch's events, which `_record_in` locks: every worker takes them in this order.
                refused_for = braze_state.mark_ok(session, environment)
                if refused_for:
                    # Waiting for a working key never counts toward RELAY_RETRY_MAX_AGE.
                    leases.shift_failure_clock(session, environment, refused_for)
                    log.info("%s delivery resumed after the key was refused for %.0f s",
                             environment, refused_for)
                self._record_in(session, environment, exchange, events, note, outcomes,
                                request)
                if outcome.delivered:
                    now = utcnow()
                    delivered = leases.mark_delivered(
                        session, self.owner, [p.event for p in outcome.delivered], identities,
                        now)
                    # In the same transaction: an event is delivered with its triggers or not
                    # at all, so no crash can leave a delivered event without them.
                    triggers.create_for_delivered(session, delivered, identities,
                                                  self.event_map, self.settings.trigger_delay,
                                                  now)
                if outcome.dead:
                    leases.mark_dead(session, self.owner, outcome.dead, events, identities)
        except DatabaseUnavailable:
            # Braze has these events; the lease will expire and they will be sent again.
            log.error("could not record Braze's answer for events %s: at-least-once applies",
                      [e.id for e in events])
            raise

    # -- recording -------------------------------------------------------------------------

    def _record(self, environment: str, exchange: Exchange | None,
                events: Sequence[OutboxEvent], outcome: str,
                request: TrackRequest | None = None) -> None:
        with self.db.session() as session:
            self._record_in(session, environment, exchange, events, outcome, request=request)

    def _record_in(self, session: Session, environment: str, exchange: Exchange | None,
                   events: Sequence[OutboxEvent], outcome: str | None,
                   outcomes: dict[int, str] | None = None,
                   request: TrackRequest | None = None) -> set[int]:
        """Record one Braze request, linked to the events this worker still holds; answers
        their ids (locked until the caller's transaction ends).

        The objects of events no longer held are erased from the recorded body (`request` says
        which object came from which event; an identity lookup none of whose events is held is
        erased whole): those events may have been forgotten while Braze answered.
        """
        held = leases.held_by(session, self.owner, [e.id for e in events])
        if exchange is None:
            return held
        metrics.BRAZE_SECONDS.labels(
            exchange.endpoint, str(exchange.status) if exchange.status else "error"
        ).observe(exchange.duration_ms / 1000.0)
        request_body, response_body = exchange.request_body, exchange.response_body
        if len(held) < len(events):
            request_body, response_body = _without_lost(exchange, request, held)
        attempt = DeliveryAttempt(
            environment=environment, endpoint=exchange.endpoint,
            started_at=exchange.started_at.replace(tzinfo=None),
            duration_ms=exchange.duration_ms, status_code=exchange.status,
            request_body=request_body, response_body=response_body,
            error=exchange.error)
        session.add(attempt)
        session.flush()
        linked = [{"attempt_id": attempt.id, "event_id": e.id,
                   "outcome": (outcomes or {}).get(e.id, outcome)} for e in events if e.id in held]
        if linked:
            session.execute(AttemptEvent.__table__.insert(), linked)
        return held


def _without_lost(exchange: Exchange, request: TrackRequest | None,
                  held: set[int]) -> tuple[str, str]:
    """The request and answer to record when some of its events are no longer this worker's."""
    erased = ERASED_BODY.decode()
    if not held:
        return erased, erased
    if request is None:
        # An identity lookup: every event in it has the one email asked about, which some of
        # them still hold (the others' leases expired).
        return exchange.request_body, exchange.response_body
    body = dict(request.body)
    if "attributes" in body:
        body["attributes"] = [
            ERASED_OBJECT if any(p.event.id not in held for p in sources) else obj
            for obj, sources in zip(body["attributes"], request.attribute_sources, strict=True)]
    body["events"] = [obj if planned.event.id in held else ERASED_OBJECT
                      for obj, planned in zip(body["events"], request.event_sources, strict=True)]
    # Braze's answer to /users/track names objects by their index only.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")), exchange.response_body
