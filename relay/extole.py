"""Parse and normalise Extole webhook events.

Extole lets every client reshape its webhook bodies, so field names vary: names are matched
case-insensitively, and where several names or places could give a value the first listed wins,
top level before `person` before `data`. Unknown fields are kept as event properties.

Reward webhooks left as Extole builds them post the reward itself: its `type` is the reward state
(`FULFILLED`, ...). Those items become reward events (README, "Reward events"), named by the
event map's `[rewards.<state>]` entries and carrying `reward_state` (and `coupon_code`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from relay.eventmap import EventMap, Mapping, is_earned_type, reward_state
from relay.exceptions import InvalidBody, RejectedEvent

log = logging.getLogger(__name__)

EVENT_ID = ("event_id", "id")
EVENT_TYPE = ("type", "event", "event_type", "event_name", "name")
EVENT_TIME = ("event_time", "timestamp", "time", "created_at")
EXTERNAL_ID = ("partner_user_id", "external_id")
EMAIL = ("email", "email_address", "recipient_email")
PROFILE = {"first_name": ("first_name",), "last_name": ("last_name",), "phone": ("phone_number",)}
PASSED_ON = ("funnel", "program", "share_link")
PLACES = ("person", "data")
REWARD_ID = ("reward_id",)
REWARD_STATE_FIELD = ("state",)
SUBSCRIPTION_GROUP = ("subscription_group_id",)
COUPON_KEY_TYPE = "COUPON"
MAX_NUMBER_TEXT = 40  # longer digit strings are not amounts: they stay text
# The Extole event id of a reward event reconciliation recovered from Extole's rewards API:
# `reconciled:<reward_id>:<STATE>` (relay.reconcile), an id Extole itself never makes.
RECONCILED_PREFIX = "reconciled:"

# Fields that are not event properties: identity and profile (top level and `person`), and the
# envelope (top level only: a person's `id` or `name` is not the event's, so it is kept).
_NOT_PERSON_PROPERTIES = frozenset(
    [*EXTERNAL_ID, *EMAIL, "first_name", "last_name", "phone_number", *PLACES]
)
_NOT_PROPERTIES = _NOT_PERSON_PROPERTIES | {*EVENT_ID, *EVENT_TYPE, *EVENT_TIME}
# With RELAY_EXTERNAL_ID=email the email is the identity; partner_user_id is only a property.
_NOT_PERSON_PROPERTIES_BY_EMAIL = _NOT_PERSON_PROPERTIES - set(EXTERNAL_ID)
_NOT_PROPERTIES_BY_EMAIL = _NOT_PROPERTIES - set(EXTERNAL_ID)
MAX_ID_LENGTH = 255
MAX_STRING = 255
MILLISECONDS_ABOVE = 10**11
MAX_EPOCH_SECONDS = 253402300799  # 9999-12-31T23:59:59Z
_EPOCH_END = MAX_EPOCH_SECONDS + 1  # epoch numbers must be below this (seconds)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Event:
    """One usable Extole event, normalised for storage and delivery."""

    dedup_key: str
    extole_event_id: str
    extole_type: str
    braze_event: str
    event_time: datetime
    external_id: str | None
    email: str | None
    attributes: dict[str, Any]
    properties: dict[str, Any]
    payload: dict[str, Any]
    trimmed: list[str] = field(default_factory=list)
    # Set together for a reward event only: the reward and its state (upper case), the key by
    # which a webhook and another copy of the same reward state are recognised.
    reward_id: str | None = None
    reward_state: str | None = None

    @property
    def person_key(self) -> str | None:
        """A person is their external_id, else their email."""
        if self.external_id:
            return "id:" + self.external_id
        if self.email:
            return "email:" + self.email
        return None


def is_reconciled(extole_event_id: str | None) -> bool:
    """Whether an event was recovered by reconciliation rather than posted by Extole."""
    return bool(extole_event_id and extole_event_id.startswith(RECONCILED_PREFIX))


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8", "surrogatepass")).hexdigest()


def _lowered(obj: Any) -> dict[str, Any]:
    """A case-insensitive view of an object: the first spelling of a key wins."""
    view: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            view.setdefault(str(key).lower(), value)
    return view


class _Fields:
    """Looks values up across the top level, `person` and `data`, in that order."""

    def __init__(self, item: dict[str, Any]) -> None:
        self.top = _lowered(item)
        self.places = [self.top, _lowered(self.top.get("person")), _lowered(self.top.get("data"))]

    def first(
        self, names: Iterable[str], *, top_only: bool = False, kind: type | None = None
    ) -> Any:
        """The first value that is present (not null, not blank; of `kind` when given)."""
        for place in self.places[:1] if top_only else self.places:
            for name in names:
                value = place.get(name)
                if value is None or isinstance(value, str) and not value.strip():
                    continue
                if kind is None or isinstance(value, kind):
                    return value
        return None


def parse_time(value: Any) -> datetime:
    """ISO-8601 (offset converted to UTC, none taken as UTC) or epoch seconds/milliseconds."""
    try:
        return _parse_time(value)
    except (OverflowError, OSError, ValueError, ArithmeticError):
        raise RejectedEvent(f"event time {_short(value)!r} is out of range") from None


def _parse_time(value: Any) -> datetime:
    if isinstance(value, bool):
        raise RejectedEvent(f"event time {value!r} is not a time")
    if isinstance(value, str):
        text = value.strip()
        try:
            number: Decimal | None = Decimal(text)
        except ArithmeticError:
            number = None
        if number is None:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                raise RejectedEvent(f"event time {_short(value)!r} does not parse") from None
            if parsed.tzinfo is None:
                return parsed.replace(tzinfo=UTC)
            return parsed.astimezone(UTC)
        return _from_epoch(number, value)
    if isinstance(value, int):
        return _from_epoch(Decimal(value), value)
    if isinstance(value, float):
        # repr() is the shortest text that reads back as this float: the number that was sent.
        return _from_epoch(Decimal(repr(value)), value)
    raise RejectedEvent(f"event time must be a string or a number, not {type(value).__name__}")


def _from_epoch(number: Decimal, original: Any) -> datetime:
    """Epoch seconds, or milliseconds above 10^11, computed exactly (no float rounding)."""
    if not number.is_finite():
        raise RejectedEvent(f"event time {_short(original)!r} is not a time")
    milliseconds = number > MILLISECONDS_ABOVE
    limit = _EPOCH_END * 1000 if milliseconds else _EPOCH_END
    if not 0 <= number < limit:
        raise RejectedEvent(f"event time {_short(original)} is out of range")
    scale = 1000 if milliseconds else 1_000_000
    microseconds = int((number * scale).to_integral_value(ROUND_HALF_EVEN))
    return _EPOCH + timedelta(microseconds=microseconds)


def braze_time(moment: datetime) -> str:
    """Braze's time format: YYYY-MM-DDTHH:MM:SS.mmmZ in UTC."""
    moment = moment.astimezone(UTC) if moment.tzinfo else moment
    # Formatted by hand: strftime's %Y does not pad years before 1000 on every platform.
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
            f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z")


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _scalar_text(value: Any, what: str) -> str | None:
    """Ids may arrive as strings or numbers; anything else is unusable."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RejectedEvent(f"{what} must be a string or a number, not {type(value).__name__}")
    text = value.strip() if isinstance(value, str) else str(value)
    if len(text) > MAX_ID_LENGTH:
        raise RejectedEvent(f"{what} is longer than {MAX_ID_LENGTH} characters")
    return text or None


def normalise_email(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    email = value.strip().lower()
    return email or None


def clean_properties(properties: dict[str, Any], trimmed: list[str]) -> dict[str, Any]:
    """Drop what Braze would refuse: null values, `$` keys; cut strings to 255 characters."""
    cleaned: dict[str, Any] = {}
    for key, value in properties.items():
        if value is None:
            continue
        if str(key).startswith("$"):
            trimmed.append(f"dropped property {key!r}: keys may not start with $")
            continue
        cleaned[key] = _clean_value(key, value, trimmed)
    return cleaned


def _clean_value(key: str, value: Any, trimmed: list[str]) -> Any:
    if isinstance(value, str) and len(value) > MAX_STRING:
        trimmed.append(f"cut property {key!r} from {len(value)} to {MAX_STRING} characters")
        return value[:MAX_STRING]
    if isinstance(value, dict):
        return clean_properties(value, trimmed)
    if isinstance(value, list):
        return [_clean_value(key, v, trimmed) for v in value]
    return value


def normalise(item: Any, event_map: EventMap, received_at: datetime, *,
              default_type: str | None = None,
              external_id_from: str = "partner_user_id") -> Event:
    """Turn one item of a webhook body into an Event, or raise RejectedEvent with the reason.

    `default_type` (the webhook URL's `type` parameter) is the type of an item that names
    none; `external_id_from` is RELAY_EXTERNAL_ID: `partner_user_id` or `email`.
    """
    if not isinstance(item, dict):
        raise RejectedEvent(f"event must be a JSON object, not {_json_kind(item)}")
    fields = _Fields(item)

    extole_type, hashed_item = _event_type(fields, item, default_type)
    event_id = _scalar_text(fields.first(EVENT_ID, top_only=True), "event id")
    raw_time = fields.first(EVENT_TIME, top_only=True)
    event_time = received_at if raw_time is None else parse_time(raw_time)
    email = normalise_email(fields.first(EMAIL, kind=str))
    if external_id_from == "email":
        if email and len(email) > MAX_ID_LENGTH:
            raise RejectedEvent(f"email is longer than {MAX_ID_LENGTH} characters, too long "
                                "for an external_id (RELAY_EXTERNAL_ID=email)")
        external_id = email
    else:
        external_id = _scalar_text(fields.first(EXTERNAL_ID), "partner_user_id/external_id")
    state, reward_id = _reward(fields, extole_type)
    mapping = entry_for(event_map, extole_type, state)
    dedup_key = event_id or "sha256:" + content_hash(hashed_item)

    attributes: dict[str, Any] = {}
    if email:
        attributes["email"] = email
    for attribute, names in PROFILE.items():
        value = fields.first(names)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            attributes[attribute] = str(value).strip()[:MAX_STRING]
    share_link = fields.first(("share_link",))
    if isinstance(share_link, str):
        attributes["share_link"] = share_link.strip()[:MAX_STRING]
    if mapping.email_subscribe:
        attributes["email_subscribe"] = mapping.email_subscribe
    groups = _subscription_groups(fields, mapping)
    if groups:
        attributes["subscription_groups"] = groups

    properties: dict[str, Any] = {}
    data = item_value(item, "data")
    if isinstance(data, dict):
        properties.update(data)
    person = item_value(item, "person")
    by_email = external_id_from == "email"
    for source, excluded in (
            (person, _NOT_PERSON_PROPERTIES_BY_EMAIL if by_email else _NOT_PERSON_PROPERTIES),
            (item, _NOT_PROPERTIES_BY_EMAIL if by_email else _NOT_PROPERTIES)):
        if isinstance(source, dict):
            properties.update(
                (k, v) for k, v in source.items() if str(k).lower() not in excluded
            )
    for name in PASSED_ON:
        value = fields.first((name,))
        if value is not None:
            _set_once(properties, name, value)
    _number_face_value(properties)
    if state:
        _set_once(properties, "reward_state", state)
        coupon = _coupon_code(fields)
        if coupon is not None:
            _set_once(properties, "coupon_code", coupon)
    properties["extole_event_id"] = event_id or dedup_key
    trimmed: list[str] = []
    properties = clean_properties(properties, trimmed)

    return Event(
        dedup_key=dedup_key,
        extole_event_id=event_id or dedup_key,
        extole_type=extole_type,
        braze_event=mapping.braze_event,
        event_time=event_time,
        external_id=external_id,
        email=email,
        attributes=attributes,
        properties=properties,
        payload=item,
        trimmed=trimmed,
        reward_id=reward_id if state else None,
        reward_state=state,
    )


def _event_type(fields: _Fields, item: dict[str, Any],
                default_type: str | None) -> tuple[str, dict[str, Any]]:
    """The item's type and what its content hash is taken of.

    The item's own type wins; without one, a reward's `state` (the rewards API's name for it);
    then the webhook URL's `type`, which is part of the hash so that one body posted under two
    types is two events.
    """
    raw_type = fields.first(EVENT_TYPE, top_only=True)
    if raw_type is None:
        state = fields.first(REWARD_STATE_FIELD, top_only=True, kind=str)
        if state is not None and reward_state(state) and fields.first(REWARD_ID) is not None:
            raw_type = state
    if raw_type is None and default_type is not None and default_type.strip():
        return _checked_type(default_type), {**item, "type": default_type.strip()}
    if raw_type is None:
        raise RejectedEvent("no event type: expected one of " + ", ".join(EVENT_TYPE))
    return _checked_type(raw_type), item


def _checked_type(raw_type: Any) -> str:
    if not isinstance(raw_type, str) or not raw_type.strip():
        raise RejectedEvent("event type must be a non-empty string")
    extole_type = raw_type.strip()
    if len(extole_type) > MAX_ID_LENGTH:
        raise RejectedEvent(f"event type is longer than {MAX_ID_LENGTH} characters")
    return extole_type


def entry_for(event_map: EventMap, extole_type: str, state: str | None) -> Mapping:
    """The map entry that names an event: a reward event's is its state's `[rewards.<state>]`
    entry, except for the older earned types (`earned_reward`, `reward_earned`), which keep
    their `[events]` entry; any other event's is its type's."""
    if state and not is_earned_type(extole_type):
        return event_map.reward(state)
    return event_map.lookup(extole_type)


def stored_entry(event_map: EventMap, extole_type: str, payload: Any) -> Mapping:
    """The map entry of a stored event (its type and the item Extole posted), found as
    `normalise` found it: what starts its campaign or Canvas once delivered is the same entry
    that named it. A payload that is no longer an item (erased) maps by its type alone."""
    state = None
    if isinstance(payload, dict):
        try:
            state, _ = _reward(_Fields(payload), extole_type)
        except RejectedEvent:  # it was accepted, so this does not happen; never guess a state
            state = None
    return entry_for(event_map, extole_type, state)


def _reward(fields: _Fields, extole_type: str) -> tuple[str | None, str | None]:
    """(state, reward_id) of a reward event: a `reward_id` and a type that is a reward state
    (`earned_reward`/`reward_earned` count as EARNED); (None, None) for any other event."""
    state = reward_state(extole_type) or ("EARNED" if is_earned_type(extole_type) else None)
    if state is None:
        return None, None
    reward_id = _scalar_text(fields.first(REWARD_ID), "reward_id")
    return (state, reward_id) if reward_id else (None, None)


def _coupon_code(fields: _Fields) -> Any:
    """The supplier's `partner_reward_id` when it is a coupon (key type COUPON, or none given:
    gift-card ids (`ID`) and links (`LINK`) are not coupon codes)."""
    code = fields.first(("partner_reward_id",))
    key_type = fields.first(("partner_reward_key_type",), kind=str)
    if code is None or isinstance(code, dict | list | bool):
        return None
    if key_type is not None and key_type.strip().upper() != COUPON_KEY_TYPE:
        return None
    return code.strip() if isinstance(code, str) else code


def _subscription_groups(fields: _Fields, mapping: Mapping) -> list[dict[str, str]]:
    """Braze's `subscription_groups` for an event whose type changes a group's state: the
    group named by the event, else the one its event-map entry names."""
    if mapping.subscription_state is None:
        return []
    named = _scalar_text(fields.first(SUBSCRIPTION_GROUP), "subscription_group_id")
    group = named or mapping.subscription_group_id
    if group is None:
        return []
    return [{"subscription_group_id": group, "subscription_state": mapping.subscription_state}]


def _set_once(properties: dict[str, Any], name: str, value: Any) -> None:
    """Under its own name once, whatever the spelling it arrived with (`Funnel`, `FUNNEL`)."""
    for key in [k for k in properties if str(k).lower() == name]:
        del properties[key]
    properties[name] = value


def _number_face_value(properties: dict[str, Any]) -> None:
    """Extole sends a reward's face value as a number or a decimal string ("20.00"): Braze gets
    a number, so that segments and Liquid can compare and add it. Other text is left as it is."""
    for key, value in list(properties.items()):
        if str(key).lower() != "face_value" or not isinstance(value, str):
            continue
        number = decimal_number(value)
        if number is not None:
            properties[key] = number


def decimal_number(text: str) -> int | float | None:
    """A decimal string as a JSON number: whole numbers without a point stay integers."""
    stripped = text.strip()
    if len(stripped) > MAX_NUMBER_TEXT or not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)", stripped):
        return None
    if "." not in stripped:
        return int(stripped)
    number = float(stripped)
    return number if math.isfinite(number) else None


def item_value(item: dict[str, Any], name: str) -> Any:
    """A top-level value by case-insensitive name (first spelling wins)."""
    for key, value in item.items():
        if str(key).lower() == name:
            return value
    return None


def identifiers(item: Any) -> tuple[str | None, str | None]:
    """Whose item this is, (external_id, email), found as `normalise` finds them, also in an
    item it rejected (no type, a bad time): `relay forget` recognises a person's rejected
    items by it. Values `normalise` would refuse count as absent."""
    if not isinstance(item, dict):
        return None, None
    fields = _Fields(item)
    try:
        external_id = _scalar_text(fields.first(EXTERNAL_ID), "partner_user_id/external_id")
    except RejectedEvent:
        external_id = None
    return external_id, normalise_email(fields.first(EMAIL, kind=str))


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


MAX_DEPTH = 64


def _no_constants(name: str) -> Any:
    raise InvalidBody(f"body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    """A number too large for a float (1e400) would become Infinity, which no JSON column,
    Braze request or JSON reader accepts: refuse it like NaN."""
    number = float(text)
    if not math.isfinite(number):
        raise InvalidBody(f"body is not valid JSON: number {_short(text, 40)} is out of range")
    return number


def parse_body(raw: bytes) -> Any:
    """Parse a webhook body strictly: UTF-8, standard JSON, nesting within MAX_DEPTH.

    Strings are made storable everywhere: lone surrogates and NUL characters (which PostgreSQL's
    JSONB refuses) become U+FFFD. The raw bytes stay in the inbound log untouched.
    """
    return sanitise(decode_json(raw))


def decode_json(raw: bytes) -> Any:
    """The first half of `parse_body`: strict UTF-8 and JSON, not yet `sanitise`d. The receiver
    counts an array's items in between, so an oversized one costs no walk over its items."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidBody(f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_no_constants, parse_float=_finite_float)
    except RecursionError:
        raise InvalidBody("body is not valid JSON: nested too deeply to parse") from None
    except ValueError as exc:  # InvalidBody, raised by the hooks above, is not one
        message = str(exc).splitlines()[0][:200]
        raise InvalidBody(f"body is not valid JSON: {message}") from None
    return value


def sanitise(value: Any) -> Any:
    """Replace unstorable characters, iteratively, refusing nesting deeper than MAX_DEPTH."""
    root: list[Any] = [value]
    stack: list[tuple[Any, Any, int]] = [(root, 0, 0)]
    while stack:
        container, key, depth = stack.pop()
        item = container[key]
        if isinstance(item, str):
            container[key] = _clean_text(item)
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise InvalidBody(f"body is not valid JSON: nested deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                if any(_needs_cleaning(k) for k in item):
                    item = {_clean_text(k): v for k, v in item.items()}
                    container[key] = item
                stack.extend((item, k, depth + 1) for k in item)
            else:
                stack.extend((item, i, depth + 1) for i in range(len(item)))
    return root[0]


def _needs_cleaning(text: str) -> bool:
    return "\x00" in text or not text.isascii() and _has_surrogate(text)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def storable_text(text: str) -> str:
    """The text with NUL characters and lone surrogates (unstorable in PostgreSQL) as U+FFFD."""
    return _clean_text(text)


def _clean_text(text: str) -> str:
    if not _needs_cleaning(text):
        return text
    return "".join("\ufffd" if c == "\x00" or "\ud800" <= c <= "\udfff" else c for c in text)
