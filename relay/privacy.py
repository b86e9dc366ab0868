"""The right to be forgotten: erase one person's personal data from every table.

A person is named by email and/or external_id. Their own events (email or external_id equal, or
a rejected item whose own identifiers, as the receiver would read them, are theirs or absent)
are redacted whole: identifiers, payload, attributes, properties and identity. Other rows that
merely mention them are scrubbed precisely, so other people's data survives: in JSON, a list
element (one event or attributes object of a Braze batch) that mentions them is replaced whole
and any other string that mentions them becomes a marker. Raw inbound bodies cannot be edited
safely (they are the exact bytes Extole sent), so a body that mentions them is replaced by a
marker; headers are kept unless a header value itself mentions them. Identity cache entries for
them are deleted, and so are the campaign/Canvas triggers of their events or addressed to them
(a due one is never sent). De-duplication keys are event ids, reward ids and hashes, which name
nobody; a key that does mention them (a reshaped body whose event `id` is a person's id) is
deleted, as their event's own `dedup_key` is erased: a replay of that request is then new again,
which forgetting accepts.

Matching is case-insensitive and bounded by identifier characters, so forgetting ann@example.com
leaves joann@example.com alone and forgetting external id 42 leaves 420 alone. Raw text is also
searched with its JSON escapes decoded (`ann\\u0040example.com`, any character, any case of
hex). SQL narrows the rows with a substring filter (raw text that holds any `\\u` escape is
always looked at); Python makes the exact decision.

A delivery in flight holds the person's data in a worker's memory. `forget` therefore fences
their events first (it takes their leases, as a worker's claim would, so none is claimed
meanwhile) and waits, bounded, for the leases workers hold on them to end; it erases only when
no worker holds any, in one transaction that locks them. Workers write nothing about an event
whose lease they no longer hold (`relay.outbox.leases.held_by`), so not even a worker that
stalled past its lease can write the person back. On SQLite the write-ahead log is then
checkpointed and truncated, so no older copy of a page stays in the `-wal` file; connections run
with `secure_delete` (`relay.db`), so the bytes of deleted and overwritten rows are zeroed, not
left in free space of the database file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from sqlalchemy import Text, cast, false, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from relay import dialect, extole
from relay.db import Database
from relay.exceptions import DeliveryInFlight, RelayError
from relay.models import (
    DedupKey,
    DeliveryAttempt,
    IdentityCache,
    InboundRequest,
    OutboxEvent,
    QueuedEvent,
    Status,
    Trigger,
)
from relay.outbox import leases

log = logging.getLogger(__name__)

ERASED = "[erased]"
ERASED_OBJECT = {"erased": True}
ERASED_BODY = b'{"erased": "personal data removed by relay forget"}'
ERASED_PAYLOAD = {"erased": "personal data removed by relay forget"}
# Characters that continue an email or an id: a match must not touch one on either side.
_BEFORE = r"(?<![A-Za-z0-9_.+@-])"
_AFTER = r"(?![A-Za-z0-9_@+-]|\.[A-Za-z0-9])"
# JSON string escapes: a surrogate pair, one \uXXXX, or a one-letter escape.
_ESCAPE = re.compile(r"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"
                     r"|\\u([0-9a-fA-F]{4})|\\([\"\\/bfnrt])")
_ONE_LETTER = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
               "t": "\t"}

DEFAULT_WAIT_SECONDS = 120.0
# A fence outlives a `forget` that died by this much at most; each poll renews it.
FENCE_SECONDS = 60.0
POLL_SECONDS = 0.2
CHECKPOINT_TRIES = 3


class Person:
    """The identifiers to forget, their spellings as stored, and the exact matcher."""

    def __init__(self, email: str | None, external_id: str | None) -> None:
        self.email = email.strip().lower() if email and email.strip() else None
        self.external_id = external_id.strip() if external_id and external_id.strip() else None
        if not self.email and not self.external_id:
            raise ValueError("give an email or an external_id")
        plain = [v for v in (self.email, self.external_id) if v]
        # As JSON escapes them (non-ASCII) and as URLs encode them (share links, tracking URLs).
        self.spellings = sorted({s for v in plain
                                 for s in (v, json.dumps(v)[1:-1], quote(v, safe=""))},
                                key=len, reverse=True)
        alternatives = "|".join(re.escape(s) for s in self.spellings)
        self._pattern = re.compile(f"{_BEFORE}(?:{alternatives}){_AFTER}", re.IGNORECASE)

    def mentioned_in(self, text: str | bytes | None) -> bool:
        """In the text as it is, or with its JSON escapes decoded."""
        if text is None:
            return False
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if self._pattern.search(text) is not None:
            return True
        return "\\" in text and self._pattern.search(decode_escapes(text)) is not None

    def json_mentions(self, value: Any) -> bool:
        return self.mentioned_in(json.dumps(value, ensure_ascii=False, default=str))

    def scrub(self, value: Any) -> Any:
        """A copy of a JSON value without this person: see the module docstring."""
        if isinstance(value, dict):
            return {(ERASED if self.mentioned_in(k) else k): self.scrub(v)
                    for k, v in value.items()}
        if isinstance(value, list):
            return [ERASED_OBJECT if isinstance(item, dict) and self.json_mentions(item)
                    else self.scrub(item) for item in value]
        if isinstance(value, str):
            return self._pattern.sub(ERASED, value) if self.mentioned_in(value) else value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return ERASED if self.mentioned_in(str(value)) else value
        return value

    def scrub_text(self, text: str | None) -> str | None:
        """Scrub JSON text structurally; text that is not JSON loses the matches."""
        if text is None or not self.mentioned_in(text):
            return text
        try:
            return json.dumps(self.scrub(json.loads(text)), ensure_ascii=False)
        except ValueError:
            scrubbed = self._pattern.sub(ERASED, text)
            if self.mentioned_in(scrubbed):  # spelled with escapes
                scrubbed = self._pattern.sub(ERASED, decode_escapes(scrubbed))
            return scrubbed

    def contains(self, column: Any, *, raw: bool = False) -> ColumnElement[bool]:
        """A superset filter in SQL: the column contains one of the spellings, any case.
        `raw`: text as someone else wrote it, which may spell them with JSON escapes: any text
        holding an escape is a candidate too (what relay serialises itself escapes no ASCII)."""
        needles = self._needles() | ({"\\u"} if raw else set())
        return or_(*(_icontains(cast(column, Text), n) for n in needles))

    def contains_bytes(self, column: Any, bind: dialect.Bind) -> ColumnElement[bool]:
        """`contains(raw=True)` for a bytes column (a raw inbound body)."""
        searchable, spelled = dialect.searchable_bytes(bind, column)
        return or_(*(_icontains(searchable, spelled(n)) for n in self._needles() | {"\\u"}))

    def _needles(self) -> set[str]:
        # Case folding beyond ASCII differs between databases (SQLite folds only ASCII), so SQL
        # looks for the longest ASCII part of each spelling.
        return {_ascii_core(s) for s in self.spellings}


def decode_escapes(text: str) -> str:
    """Text with its JSON string escapes decoded, whether or not the whole is valid JSON (a body
    refused as bad JSON is searched too). A lone surrogate becomes U+FFFD."""

    def one(match: re.Match[str]) -> str:
        high, low, single, letter = match.groups()
        if high:
            return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00))
        if single:
            code = int(single, 16)
            return "\ufffd" if 0xD800 <= code <= 0xDFFF else chr(code)
        return _ONE_LETTER[letter]

    return _ESCAPE.sub(one, text)


def _ascii_core(text: str) -> str:
    runs = re.findall(r"[\x00-\x7f]+", text)
    return max(runs, key=len) if runs else ""


def _icontains(text: ColumnElement[Any], needle: str) -> ColumnElement[bool]:
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return text.ilike(f"%{escaped}%", escape="\\")


@dataclass
class Forgotten:
    """What `forget` did: rows changed per table (identity cache: deleted), how many of the
    person's events it waited for (being delivered when it began), and the SQLite write-ahead
    log: True checkpointed and truncated, False a reader kept it from finishing, None on
    PostgreSQL."""

    counts: dict[str, int]
    waited_for: int
    checkpointed: bool | None


def forget(db: Database, *, email: str | None = None, external_id: str | None = None,
           wait_seconds: float = DEFAULT_WAIT_SECONDS,
           on_wait: Callable[[dict[int, tuple[str, datetime]]], None] | None = None
           ) -> Forgotten:
    """Erase one person, in transactions of its own, once no delivery of theirs is in flight.

    Each pass finds their events and fences them (`leases.fence`); when a worker holds one,
    `on_wait` is told (once) and the pass is repeated, until `wait_seconds` have passed:
    then DeliveryInFlight, and nothing is erased. The pass that finds none held erases in
    the same transaction, with the rows locked, and ends its fences. Raises ValueError without
    an identifier.
    """
    person = Person(email, external_id)
    token = f"forget:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"[:64]
    deadline = time.monotonic() + wait_seconds
    waited: set[int] = set()
    try:
        while True:
            with db.session() as session:
                # SQLite: the write lock first, so the pass reads and erases one state.
                dialect.take_write_lock(session, OutboxEvent, false())
                ids = _candidate_ids(session, person)
                busy = leases.fence(session, token, ids, FENCE_SECONDS)
                if not busy:
                    counts = erase(session, person, ids)
                    leases.unfence(session, token)
                    break
            if not waited and on_wait is not None:
                on_wait(busy)
            waited |= set(busy)
            busy = _wait(db, token, ids, busy, deadline)
            if busy:
                raise DeliveryInFlight(_in_flight(busy, wait_seconds))
    except BaseException:
        with contextlib.suppress(RelayError, SQLAlchemyError), db.session() as session:
            leases.unfence(session, token)
        raise
    checkpointed = _checkpoint(db)
    log.info("forgot a person: %s; waited for %d events in flight; WAL checkpoint: %s",
             ", ".join(f"{k} {v}" for k, v in counts.items()), len(waited),
             {None: "not SQLite", True: "done", False: "busy"}[checkpointed])
    return Forgotten(counts, len(waited), checkpointed)


def _wait(db: Database, token: str, ids: list[int], busy: dict[int, tuple[str, datetime]],
          deadline: float) -> dict[int, tuple[str, datetime]]:
    """Poll (cheaply, by id, renewing the fences) until no worker holds these events or the
    deadline passed; answers those still held."""
    while busy and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        with db.session() as session:
            busy = leases.fence(session, token, ids, FENCE_SECONDS)
    return busy


def _in_flight(busy: dict[int, tuple[str, datetime]], wait_seconds: float) -> str:
    holders = sorted({holder for holder, _ in busy.values()})
    until = max(until for _, until in busy.values())
    ids = ", ".join(str(i) for i in sorted(busy)[:10]) + (", …" if len(busy) > 10 else "")
    return (f"gave up after {wait_seconds:g} s: {len(busy)} of their events (ids {ids}) are "
            f"still being delivered by {', '.join(holders)} (lease until "
            f"{until:%Y-%m-%d %H:%M:%S} UTC); nothing was erased. Run forget again, or wait "
            "longer with --wait")


def _checkpoint(db: Database) -> bool | None:
    result = dialect.checkpoint_wal(db.engine)
    for _ in range(CHECKPOINT_TRIES - 1):
        if result is not False:
            break
        result = dialect.checkpoint_wal(db.engine)
    return result


def erase(session: Session, person: Person, ids: Sequence[int] | None = None) -> dict[str, int]:
    """Erase one person in the caller's transaction; answers how many rows of each table
    changed (identity cache, triggers and de-duplication keys: deleted). `ids`: their events
    as `_candidate_ids` found them (found again when not given). Callers make sure no delivery
    of theirs is in flight (`forget`)."""
    if ids is None:
        ids = _candidate_ids(session, person)
    triggers = _forget_triggers(session, person)  # first: it finds their events by identifier
    counts = {
        "events": _forget_events(session, person, ids),
        "inbound_requests": _forget_inbound(session, person),
        "delivery_attempts": _forget_attempts(session, person),
        "identity_cache": _forget_identity_cache(session, person),
        "triggers": triggers,
        "dedup_keys": _forget_dedup_keys(session, person),
    }
    session.flush()
    return counts


def _own(person: Person) -> ColumnElement[bool]:
    conditions = []
    if person.email:
        conditions.append(OutboxEvent.email == person.email)
    if person.external_id:
        conditions.append(OutboxEvent.external_id == person.external_id)
    return or_(*conditions)


_EVENT_JSON = ("payload", "attributes", "properties", "identity")
_EVENT_TEXT = ("email", "external_id", "person_key", "extole_event_id", "dedup_key", "last_error")


def _candidate_ids(session: Session, person: Person) -> list[int]:
    """Their own events and every event that may mention them, in id order."""
    columns = [getattr(OutboxEvent, name) for name in _EVENT_JSON + _EVENT_TEXT]
    return list(session.scalars(
        select(OutboxEvent.id)
        .where(or_(_own(person), *(person.contains(c) for c in columns)))
        .order_by(OutboxEvent.id)))


def _forget_events(session: Session, person: Person, ids: Sequence[int]) -> int:
    changed = 0
    for start in range(0, len(ids), 500):
        chunk = list(ids[start:start + 500])
        for event in session.scalars(select(OutboxEvent).where(OutboxEvent.id.in_(chunk))):
            changed += (_redact_event(event, person) if _is_own(event, person)
                        else _scrub_event(event, person))
        session.flush()
        # The queue's copy of the person key follows the event's (erased for their own).
        session.execute(
            update(QueuedEvent).where(QueuedEvent.event_id.in_(chunk))
            .values(person_key=select(OutboxEvent.person_key)
                    .where(OutboxEvent.id == QueuedEvent.event_id).scalar_subquery())
            .execution_options(synchronize_session=False))
    return changed


def _is_own(event: OutboxEvent, person: Person) -> bool:
    """Their event. A rejected item has no identifier columns: it is theirs when the
    identifiers the receiver would have read from it are theirs, or when it names nobody and
    mentions them (it is never delivered; nobody else's data is lost with it)."""
    if (person.email is not None and event.email == person.email) or (
            person.external_id is not None and event.external_id == person.external_id):
        return True
    if event.status != Status.REJECTED.value or not person.json_mentions(event.payload):
        return False
    external_id, email = extole.identifiers(event.payload)
    if external_id is None and email is None:
        return True
    return (person.email is not None and email == person.email) or (
        person.external_id is not None and external_id == person.external_id)


def _redact_event(event: OutboxEvent, person: Person) -> int:
    """Their own event: nothing personal stays. Pending, it can no longer be delivered (no
    identifier), which is what forgetting asks for."""
    event.email = event.external_id = event.person_key = None
    event.payload = ERASED_PAYLOAD
    event.attributes = event.properties = event.identity = None
    for name in ("extole_event_id", "dedup_key"):
        if person.mentioned_in(getattr(event, name)):
            setattr(event, name, f"erased-{event.id}")
    if person.mentioned_in(event.last_error):
        event.last_error = person.scrub_text(event.last_error)
    return 1


def _scrub_event(event: OutboxEvent, person: Person) -> int:
    """Someone else's event that mentions them: only the mentions go."""
    changed = False
    for name in _EVENT_JSON:
        value = getattr(event, name)
        if value is not None and person.json_mentions(value):
            setattr(event, name, person.scrub(value))
            changed = True
    for name in _EVENT_TEXT:
        value = getattr(event, name)
        if person.mentioned_in(value):
            setattr(event, name, f"erased-{event.id}" if name in ("extole_event_id", "dedup_key")
                    else person.scrub_text(value))
            changed = True
    return int(changed)


def _forget_inbound(session: Session, person: Person) -> int:
    candidates = session.scalars(select(InboundRequest).where(or_(
        person.contains_bytes(InboundRequest.body, session),
        person.contains(InboundRequest.headers),
        person.contains(InboundRequest.error),
        person.contains(InboundRequest.path),
    )))
    changed = 0
    for inbound in candidates:
        touched = False
        if person.mentioned_in(inbound.body):
            inbound.body = ERASED_BODY
            touched = True
        if inbound.headers and person.json_mentions(inbound.headers):
            inbound.headers = {name: ERASED if person.mentioned_in(value) else value
                               for name, value in inbound.headers.items()}
            touched = True
        for name in ("error", "path"):
            if person.mentioned_in(getattr(inbound, name)):
                setattr(inbound, name, person.scrub_text(getattr(inbound, name)))
                touched = True
        changed += touched
    return changed


def _forget_attempts(session: Session, person: Person) -> int:
    names = ("request_body", "response_body", "error")
    candidates = session.scalars(select(DeliveryAttempt).where(
        or_(*(person.contains(getattr(DeliveryAttempt, name), raw=True) for name in names))))
    changed = 0
    for attempt in candidates:
        touched = False
        for name in names:
            value = getattr(attempt, name)
            if person.mentioned_in(value):
                setattr(attempt, name, person.scrub_text(value))
                touched = True
        changed += touched
    return changed


def _forget_triggers(session: Session, person: Person) -> int:
    """Their events' triggers, and any trigger addressed to them (its recipient): deleted.
    Before their events are redacted: it knows them by their identifiers."""
    own_events = select(OutboxEvent.id).where(_own(person))
    candidates = list(session.scalars(select(Trigger).where(or_(
        Trigger.event_id.in_(own_events), person.contains(Trigger.recipient)))))
    rows = [t for t in candidates
            if person.json_mentions(t.recipient) or _is_own_event(session, t.event_id, person)]
    for row in rows:
        session.delete(row)
    session.flush()
    return len(rows)


def _is_own_event(session: Session, event_id: int, person: Person) -> bool:
    event = session.get(OutboxEvent, event_id)
    return event is not None and _is_own(event, person)


def _forget_identity_cache(session: Session, person: Person) -> int:
    conditions = []
    if person.email:
        conditions.append(func.lower(IdentityCache.email) == person.email)
    if person.external_id:
        conditions.append(IdentityCache.external_id == person.external_id)
    rows = list(session.scalars(select(IdentityCache).where(or_(*conditions))))
    for row in rows:
        session.delete(row)
    return len(rows)



def _forget_dedup_keys(session: Session, person: Person) -> int:
    rows = [row for row in session.scalars(select(DedupKey).where(person.contains(DedupKey.key)))
            if person.mentioned_in(row.key)]
    for row in rows:
        session.delete(row)
    return len(rows)
