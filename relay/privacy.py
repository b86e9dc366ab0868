"""The right to be forgotten: erase one person's personal data from every table.

A person is named by email and/or external_id. Their own events (email or external_id equal) are
redacted whole: identifiers, payload, attributes, properties and identity. Other rows that merely
mention them are scrubbed precisely, so other people's data survives: in JSON, a list element
(one event or attributes object of a Braze batch) that mentions them is replaced whole and any
other string that mentions them becomes a marker. Raw inbound bodies cannot be edited safely (they
are the exact bytes Extole sent), so a body that mentions them is replaced by a marker; headers are
kept unless a header value itself mentions them. Identity cache entries for them are deleted, and
so are the campaign/Canvas triggers of their events or addressed to them (a due one is never
sent).

Matching is case-insensitive and bounded by identifier characters, so forgetting ann@example.com
leaves joann@example.com alone and forgetting external id 42 leaves 420 alone. SQL narrows the rows
with a substring filter; Python makes the exact decision.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import quote

from sqlalchemy import Text, cast, func, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from relay import dialect
from relay.models import DeliveryAttempt, IdentityCache, InboundRequest, OutboxEvent, Trigger

log = logging.getLogger(__name__)

ERASED = "[erased]"
ERASED_OBJECT = {"erased": True}
ERASED_BODY = b'{"erased": "personal data removed by relay forget"}'
ERASED_PAYLOAD = {"erased": "personal data removed by relay forget"}
# Characters that continue an email or an id: a match must not touch one on either side.
_BEFORE = r"(?<![A-Za-z0-9_.+@-])"
_AFTER = r"(?![A-Za-z0-9_@+-]|\.[A-Za-z0-9])"


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
        if text is None:
            return False
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._pattern.search(text) is not None

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
            return self._pattern.sub(ERASED, text)

    def contains(self, column: Any) -> ColumnElement[bool]:
        """A superset filter in SQL: the column contains one of the spellings, any case."""
        return or_(*(_icontains(cast(column, Text), n) for n in self._needles()))

    def contains_bytes(self, column: Any, bind: dialect.Bind) -> ColumnElement[bool]:
        """`contains` for a bytes column (a raw inbound body)."""
        searchable, spelled = dialect.searchable_bytes(bind, column)
        return or_(*(_icontains(searchable, spelled(n)) for n in self._needles()))

    def _needles(self) -> set[str]:
        # Case folding beyond ASCII differs between databases (SQLite folds only ASCII), so SQL
        # looks for the longest ASCII part of each spelling.
        return {_ascii_core(s) for s in self.spellings}


def _ascii_core(text: str) -> str:
    runs = re.findall(r"[\x00-\x7f]+", text)
    return max(runs, key=len) if runs else ""


def _icontains(text: ColumnElement[Any], needle: str) -> ColumnElement[bool]:
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return text.ilike(f"%{escaped}%", escape="\\")


def forget(
    session: Session, *, email: str | None = None, external_id: str | None = None
) -> dict[str, int]:
    """Erase one person in the caller's transaction; answers how many rows of each table
    changed (identity cache and triggers: deleted)."""
    person = Person(email, external_id)
    triggers = _forget_triggers(session, person)  # first: it finds their events by identifier
    counts = {
        "events": _forget_events(session, person),
        "inbound_requests": _forget_inbound(session, person),
        "delivery_attempts": _forget_attempts(session, person),
        "identity_cache": _forget_identity_cache(session, person),
        "triggers": triggers,
    }
    session.flush()
    log.info("forgot a person: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
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


def _forget_events(session: Session, person: Person) -> int:
    columns = [getattr(OutboxEvent, name) for name in _EVENT_JSON + _EVENT_TEXT]
    candidates = session.scalars(
        select(OutboxEvent).where(or_(_own(person), *(person.contains(c) for c in columns)))
    )
    changed = 0
    for event in candidates:
        own = (person.email is not None and event.email == person.email) or (
            person.external_id is not None and event.external_id == person.external_id)
        changed += _redact_event(event, person) if own else _scrub_event(event, person)
    return changed


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
        or_(*(person.contains(getattr(DeliveryAttempt, name)) for name in names))))
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
    """Their events' triggers, and any trigger addressed to them (its recipient): deleted."""
    own_events = select(OutboxEvent.id).where(_own(person))
    candidates = session.scalars(select(Trigger).where(or_(
        Trigger.event_id.in_(own_events), person.contains(Trigger.recipient))))
    rows = [t for t in candidates
            if person.json_mentions(t.recipient) or _is_own_event(session, t.event_id, person)]
    for row in rows:
        session.delete(row)
    session.flush()
    return len(rows)


def _is_own_event(session: Session, event_id: int, person: Person) -> bool:
    event = session.get(OutboxEvent, event_id)
    return event is not None and (
        (person.email is not None and event.email == person.email)
        or (person.external_id is not None and event.external_id == person.external_id))


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

