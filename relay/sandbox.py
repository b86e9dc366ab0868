"""A local imitation of Braze's /users/track, /users/export/ids, /campaigns/trigger/send and
/canvas/trigger/send, strict where Braze is strict, and of Extole's GET /v2/rewards (the rewards
reconciliation reads).

It keeps profiles and the campaign/Canvas messages it was asked to send in memory per workspace
(per API key) so tests and demos can see what Braze would hold and send, and injects faults
(errors, latency, rate limits, refused keys and events; all endpoints or only some) on demand.
Rewards posted to POST /sandbox/extole/rewards are served by GET /v2/rewards to the token of their
program, with Extole's parameters (`time_interval`, `success_only`, `limit` up to 1000, `offset`)
and Extole's error bodies; its faults (statuses for the next requests, malformed answers, fields
left out) are set through POST /sandbox/faults like Braze's.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from flask import Flask, Response, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.serving import make_server

from relay.eventmap import REWARD_STATES
from relay.exceptions import RelayError

log = logging.getLogger(__name__)

TRACK = "/users/track"
EXPORT = "/users/export/ids"
CAMPAIGN_TRIGGER = "/campaigns/trigger/send"
CANVAS_TRIGGER = "/canvas/trigger/send"
ENDPOINTS = (TRACK, EXPORT, CAMPAIGN_TRIGGER, CANVAS_TRIGGER)
# path -> (the id field, the recipients' properties field)
TRIGGERS = {CAMPAIGN_TRIGGER: ("campaign_id", "trigger_properties"),
            CANVAS_TRIGGER: ("canvas_id", "canvas_entry_properties")}
MAX_RECIPIENTS = 50
# Braze's rate limit of the trigger endpoints is one budget for both (and /messages/send).
_RATE_KEYS = {CAMPAIGN_TRIGGER: "/messages", CANVAS_TRIGGER: "/messages"}
DEFAULT_RATE = (3000, 3.0)
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_PROPERTIES_BYTES = 50 * 1024
MAX_STRING = 255
REQUESTS_KEPT = 10_000
SUBSCRIBE_STATES = ("opted_in", "subscribed", "unsubscribed")
GROUP_STATES = ("subscribed", "unsubscribed")
# Braze's subscription group ids are UUIDs; anything else names no group of the workspace.
_GROUP_ID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                       r"[0-9a-fA-F]{12}$")
NO_VALID_DATA = "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields."
ID_NAMES = "'external_id', 'user_alias', 'braze_id', 'email' or 'phone'"
EXPORT_IDS = ("external_ids", "user_aliases", "braze_id", "email_address", "phone")
EXPORT_FIELDS = ("external_id", "braze_id", "user_aliases", "email", "phone", "first_name",
                 "last_name")
FAULT_FIELDS = ("fail_rate", "fail_status", "latency_ms", "rate_limit", "reject_keys",
                "refuse_event_ids", "refuse_mode", "extole_fail_statuses", "extole_malformed",
                "extole_drop_fields", "fault_paths")
EXTOLE_REWARDS = "/v2/rewards"
EXTOLE_MAX_LIMIT = 1000
EXTOLE_DEFAULT_LIMIT = 100
EXTOLE_DEFAULT_PROGRAM = "production"
# The states Extole's rewards API reports; success_only (its default) leaves the failed ones out.
EXTOLE_REWARD_STATES = REWARD_STATES
EXTOLE_FAILED_STATES = ("FAILED", "FAILED_FULFILLMENT")
EXTOLE_MALFORMED = ("not_json", "not_list")
_EXTOLE_ERROR_CODES = {401: "method_unauthorized", 403: "access_denied", 429: "too_many_requests"}
_DURATION = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]*)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
          "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0}
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _named(entry: str) -> tuple[str | None, str]:
    """"NAME=KEY" → (NAME, KEY); "KEY" → (None, KEY)."""
    name, sep, key = entry.partition("=")
    return (name.strip(), key.strip()) if sep else (None, name.strip())


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def validate_faults(data: Any) -> dict[str, Any]:
    """Check a (partial) faults object; the message says exactly which field is wrong."""
    if not isinstance(data, dict):
        raise ValueError("faults must be a JSON object")
    for name in data:
        if name not in FAULT_FIELDS:
            raise ValueError(f"unknown fault field {name!r} (known: {', '.join(FAULT_FIELDS)})")
    out = dict(data)
    if "fail_rate" in data and not (_is_num(data["fail_rate"]) and 0 <= data["fail_rate"] <= 1):
        raise ValueError("fail_rate must be a number from 0 to 1")
    status = data.get("fail_status", 503)
    if not (isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599):
        raise ValueError("fail_status must be an integer HTTP status from 400 to 599")
    if "latency_ms" in data and not (_is_num(data["latency_ms"]) and data["latency_ms"] >= 0):
        raise ValueError("latency_ms must be a number >= 0")
    if data.get("rate_limit") is not None:
        if not isinstance(data["rate_limit"], str):
            raise ValueError('rate_limit must be a string like "20/3s" or null')
        SandboxConfig.parse_rate_limit(data["rate_limit"])
    for name in ("reject_keys", "refuse_event_ids"):
        if name in data and not _str_list(data[name]):
            raise ValueError(f"{name} must be an array of strings")
        if name in data:
            out[name] = list(data[name])
    if data.get("refuse_mode", "errors") not in ("errors", "400"):
        raise ValueError('refuse_mode must be "errors" or "400"')
    if "extole_fail_statuses" in data:
        statuses = data["extole_fail_statuses"]
        if not (isinstance(statuses, list) and all(
                isinstance(v, int) and not isinstance(v, bool) and 400 <= v <= 599
                for v in statuses)):
            raise ValueError("extole_fail_statuses must be an array of HTTP statuses from 400 "
                             "to 599")
        out["extole_fail_statuses"] = list(statuses)
    if data.get("extole_malformed") not in (None, *EXTOLE_MALFORMED):
        raise ValueError("extole_malformed must be null or one of " + ", ".join(EXTOLE_MALFORMED))
    if "extole_drop_fields" in data:
        if not _str_list(data["extole_drop_fields"]):
            raise ValueError("extole_drop_fields must be an array of strings")
        out["extole_drop_fields"] = list(data["extole_drop_fields"])
    if "fault_paths" in data:
        paths = data["fault_paths"]
        if not _str_list(paths) or any(path not in ENDPOINTS for path in paths):
            raise ValueError("fault_paths must be an array of endpoints among "
                             + ", ".join(ENDPOINTS) + " (empty: all)")
        out["fault_paths"] = list(paths)
    return out


@dataclass
class SandboxConfig:
    """Start-up settings; the fault fields can be changed later through POST /sandbox/faults."""

    api_keys: list[str] = field(default_factory=list)  # "NAME=KEY" or "KEY"
    fail_rate: float = 0.0
    fail_status: int = 503
    latency_ms: float = 0.0
    rate_limit: str | None = None  # "N/Ws"
    reject_keys: list[str] = field(default_factory=list)
    refuse_event_ids: list[str] = field(default_factory=list)
    refuse_mode: str = "errors"
    # The endpoints fail_rate and latency_ms apply to; empty: every endpoint.
    fault_paths: list[str] = field(default_factory=list)
    max_objects: int = 75
    seed: int | None = None  # makes fail_rate reproducible
    # Extole: "PROGRAM=TOKEN" or "TOKEN" (program production); none: any token reads production.
    extole_tokens: list[str] = field(default_factory=list)
    extole_fail_statuses: list[int] = field(default_factory=list)  # answers of the next requests
    extole_malformed: str | None = None  # "not_json" or "not_list": every answer is broken
    extole_drop_fields: list[str] = field(default_factory=list)  # left out of every reward

    def __post_init__(self) -> None:
        self.api_keys = [str(k) for k in self.api_keys]
        self.extole_tokens = [str(k) for k in self.extole_tokens]
        self.reject_keys = [str(k) for k in self.reject_keys]
        self.refuse_event_ids = [str(k) for k in self.refuse_event_ids]
        self.fault_paths = [str(k) for k in self.fault_paths]
        validate_faults(self.faults())
        if not (isinstance(self.max_objects, int) and self.max_objects >= 1):
            raise ValueError("max_objects must be a positive integer")
        if any(not key.rpartition("=")[2].strip() for key in self.api_keys):
            raise ValueError("api_keys has an empty key (expected NAME=KEY or KEY)")
        if any(not key.rpartition("=")[2].strip() for key in self.extole_tokens):
            raise ValueError("extole_tokens has an empty token (expected PROGRAM=TOKEN or TOKEN)")

    def faults(self) -> dict[str, Any]:
        faults = {name: getattr(self, name) for name in FAULT_FIELDS}
        return {name: list(v) if isinstance(v, list) else v for name, v in faults.items()}

    @staticmethod
    def parse_rate_limit(spec: str) -> tuple[int, float]:
        """"20/3s" → (20, 3.0); also "250/minute", "5/s"."""
        match = _RATE.match((spec or "").lower())
        unit = match.group(3) if match else ""
        if not match or unit not in _UNITS or (match.group(2) is None and not unit):
            raise ValueError(f'rate limit {spec!r} is not like "20/3s" (requests per window)')
        count, width = int(match.group(1)), float(match.group(2) or 1) * _UNITS[unit]
        if count < 1 or width <= 0:
            raise ValueError(f"rate limit {spec!r} needs at least 1 request per positive window")
        return count, width


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Profile:
    braze_id: str
    seq: int
    created_at: str
    updated_at: str
    external_id: str | None = None
    user_aliases: list[dict[str, str]] = field(default_factory=list)
    email: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    # subscription group id -> "subscribed" / "unsubscribed", as `subscription_groups` set it
    subscription_groups: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    purchases: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["seq"]
        return data


class _Workspace:
    """Profiles of one Braze workspace, indexed the ways Braze looks users up."""

    def __init__(self) -> None:
        self.profiles: list[_Profile] = []
        self.by_external: dict[str, _Profile] = {}
        self.by_braze: dict[str, _Profile] = {}
        self.by_alias: dict[tuple[str, str], _Profile] = {}
        self.dropped: list[dict[str, Any]] = []
        self.triggers: list[dict[str, Any]] = []  # accepted trigger requests, as received

    def new(self, seq: int) -> _Profile:
        now = _now_iso()
        profile = _Profile(braze_id=secrets.token_hex(12), seq=seq, created_at=now, updated_at=now)
        self.profiles.append(profile)
        self.by_braze[profile.braze_id] = profile
        return profile

    def by_field(self, kind: str, value: str) -> list[_Profile]:
        """Profiles with that email/phone, most recently updated first."""
        if kind == "email":
            found = [p for p in self.profiles if p.email == value]
        else:
            found = [p for p in self.profiles if p.attributes.get("phone") == value]
        return sorted(found, key=lambda p: p.seq, reverse=True)


def _identify(array: str, obj: dict[str, Any]) -> tuple[str, Any]:
    """The identifier Braze would use for this object; ValueError with Braze-like type if none."""
    primary = [k for k in ("external_id", "user_alias", "braze_id") if obj.get(k) is not None]
    secondary = [k for k in ("email", "phone") if obj.get(k) is not None]
    given = primary if array == "attributes" and primary else primary + secondary
    if not given:
        raise ValueError(f"{ID_NAMES} is required")
    if len(given) > 1 and (array != "attributes" or len(primary) > 1):
        raise ValueError(f"only one of {ID_NAMES} may be given")
    kind, value = given[0], obj[given[0]]
    if kind == "user_alias":
        if not (isinstance(value, dict) and isinstance(value.get("alias_name"), str)
                and isinstance(value.get("alias_label"), str)
                and value["alias_name"] and value["alias_label"]):
            raise ValueError("'user_alias' must be an object with string 'alias_name' and "
                             "'alias_label'")
        return kind, (value["alias_name"], value["alias_label"])
    if not (isinstance(value, str) and value.strip()):
        raise ValueError(f"'{kind}' must be a non-empty string")
    if kind == "email":
        value = value.strip().lower()
    return kind, value


def _check_time(obj: dict[str, Any]) -> None:
    value = obj.get("time")
    if value is None:
        raise ValueError("'time' is required")
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError("'time' must be an ISO-8601 time string") from None


def _check_properties(obj: dict[str, Any]) -> None:
    props = obj.get("properties")
    if props is None:
        return
    if not isinstance(props, dict):
        raise ValueError("'properties' must be an object")
    for key, value in props.items():
        if key.startswith("$"):
            raise ValueError(f"property key {key!r} must not start with '$'")
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise ValueError(f"property {key!r} is longer than {MAX_STRING} characters")
    if len(json.dumps(props, separators=(",", ":")).encode()) > MAX_PROPERTIES_BYTES:
        raise ValueError("'properties' is larger than 50 KB")


def _check_subscription_groups(value: Any) -> None:
    """`subscription_groups`: an array of {subscription_group_id, subscription_state}."""
    if not isinstance(value, list):
        raise ValueError("'subscription_groups' must be an array")
    for group in value:
        if not isinstance(group, dict):
            raise ValueError("'subscription_groups' items must be objects")
        unknown = set(group) - {"subscription_group_id", "subscription_state"}
        if unknown:
            raise ValueError(f"'subscription_groups' item has unknown field "
                             f"{sorted(unknown)[0]!r}")
        group_id = group.get("subscription_group_id")
        if not (isinstance(group_id, str) and _GROUP_ID.match(group_id)):
            raise ValueError("'subscription_group_id' must be a subscription group id (a UUID)")
        if group.get("subscription_state") not in GROUP_STATES:
            raise ValueError("'subscription_state' must be one of " + ", ".join(GROUP_STATES))


def _check_object(array: str, obj: Any) -> tuple[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{array} objects must be JSON objects")
    ident = _identify(array, obj)
    if not isinstance(obj.get("_update_existing_only", False), bool):
        raise ValueError("'_update_existing_only' must be true or false")
    if array == "attributes":
        if obj.get("email") is not None and not (
                isinstance(obj["email"], str) and _EMAIL.match(obj["email"].strip())):
            raise ValueError("'email' is not a valid email address")
        if "email_subscribe" in obj and obj["email_subscribe"] not in SUBSCRIBE_STATES:
            raise ValueError("'email_subscribe' must be one of " + ", ".join(SUBSCRIBE_STATES))
        if "subscription_groups" in obj:
            _check_subscription_groups(obj["subscription_groups"])
        return ident
    if array == "events" and not (isinstance(obj.get("name"), str) and obj["name"].strip()):
        raise ValueError("'name' is required and must be a non-empty string")
    if array == "purchases":
        if not (isinstance(obj.get("product_id"), str) and obj["product_id"]):
            raise ValueError("'product_id' is required and must be a non-empty string")
        if not (isinstance(obj.get("currency"), str) and len(obj["currency"]) == 3):
            raise ValueError("'currency' must be a three-letter ISO 4217 code")
        if not _is_num(obj.get("price")):
            raise ValueError("'price' is required and must be a number")
    _check_time(obj)
    _check_properties(obj)
    return ident


def _check_recipient(recipient: Any, properties_field: str, other: str) -> str | None:
    """What is wrong with one trigger recipient, or None."""
    if not isinstance(recipient, dict):
        return "must be an object"
    given = [k for k in ("external_user_id", "user_alias", "email", "braze_id")
             if recipient.get(k) is not None]
    if len(given) != 1:
        return "exactly one of 'external_user_id' or 'user_alias' is required"
    if given[0] in ("email", "braze_id"):
        return f"'{given[0]}' is not supported by the sandbox: use 'external_user_id' or " \
               "'user_alias'"
    if given[0] == "external_user_id" and not (
            isinstance(recipient["external_user_id"], str) and recipient["external_user_id"]):
        return "'external_user_id' must be a non-empty string"
    if given[0] == "user_alias":
        try:
            _identify("events", {"user_alias": recipient["user_alias"]})
        except ValueError as exc:
            return str(exc)
    if other in recipient:
        return f"'{other}' is not a field of this endpoint: use '{properties_field}'"
    if recipient.get(properties_field) is not None and not isinstance(
            recipient[properties_field], dict):
        return f"'{properties_field}' must be an object"
    if "send_to_existing_only" in recipient and not isinstance(
            recipient["send_to_existing_only"], bool):
        return "'send_to_existing_only' must be true or false"
    return None


def _refused_id(obj: Any, refused: list[str]) -> str | None:
    props = obj.get("properties") if isinstance(obj, dict) else None
    event_id = props.get("extole_event_id") if isinstance(props, dict) else None
    return str(event_id) if event_id is not None and str(event_id) in refused else None


class _Sandbox:
    """All state, behind one lock: the Flask views only parse HTTP and call in here."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.keys: dict[str, str] = {}
        for entry in config.api_keys:
            name, key = _named(entry)
            self.keys[key] = name or f"key-{key[-4:]}"
        # Extole: token -> the program whose rewards it reads.
        self.extole_tokens: dict[str, str] = {}
        for entry in config.extole_tokens:
            program, token = _named(entry)
            self.extole_tokens[token] = program or EXTOLE_DEFAULT_PROGRAM
        self.rng = random.Random(config.seed)
        self.reset()

    def reset(self) -> None:
        self.workspaces: dict[str, _Workspace] = {}
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUESTS_KEPT)
        self.statuses: Counter[str] = Counter()
        self.event_ids: Counter[str] = Counter()
        self.events_received = 0
        self.faults = self.config.faults()
        self.windows: dict[tuple[str, str], list[float]] = {}
        self.seq = 0
        # Extole: program -> reward_id -> the reward as the rewards API shows it.
        self.rewards: dict[str, dict[str, dict[str, Any]]] = {}

    def faulty(self, path: str) -> bool:
        """Whether fail_rate and latency_ms apply to this endpoint."""
        return not self.faults["fault_paths"] or path in self.faults["fault_paths"]

    def workspace_name(self, key: str) -> str | None:
        if self.keys:
            return self.keys.get(key)
        return f"key-{key[-4:]}"

    def refused_key(self, key: str, name: str) -> bool:
        """A refused key may be named by the key itself or by its workspace name."""
        return key in self.faults["reject_keys"] or name in self.faults["reject_keys"]

    def rate(self, name: str | None, path: str, now: float) -> tuple[int, int, float, bool]:
        """Fixed window per workspace and endpoint: (limit, remaining, reset, allowed)."""
        spec = self.faults["rate_limit"]
        limit, width = SandboxConfig.parse_rate_limit(spec) if spec else DEFAULT_RATE
        if name is None:
            return limit, limit, now + width, True
        key = (name, _RATE_KEYS.get(path, path))
        window = self.windows.get(key)
        if window is None or now >= window[0] + width:
            window = self.windows[key] = [now, 0]
        allowed = window[1] < limit
        window[1] += allowed
        return limit, int(limit - window[1]), window[0] + width, allowed

    def record(self, path: str, name: str | None, status: int, body: Any) -> None:
        self.statuses[str(status)] += 1
        self.requests.append({"path": path, "method": request.method, "workspace": name,
                              "status": status, "body": body, "time": _now_iso()})

    def touch(self, profile: _Profile) -> None:
        self.seq += 1
        profile.seq, profile.updated_at = self.seq, _now_iso()

    def resolve(self, ws: _Workspace, ident: tuple[str, Any], create: bool) -> _Profile | None:
        kind, value = ident
        if kind in ("email", "phone"):
            found = ws.by_field(kind, value)
            with_id = [p for p in found if p.external_id]
            if with_id or found:
                return (with_id or found)[0]
        else:
            indexes: dict[str, dict[Any, _Profile]] = {
                "external_id": ws.by_external, "braze_id": ws.by_braze, "user_alias": ws.by_alias}
            index = indexes[kind]
            if value in index:
                return index[value]
        if not create or kind == "braze_id":
            return None
        self.seq += 1
        profile = ws.new(self.seq)
        if kind == "external_id":
            profile.external_id = value
            ws.by_external[value] = profile
        elif kind == "user_alias":
            profile.user_aliases.append({"alias_name": value[0], "alias_label": value[1]})
            ws.by_alias[value] = profile
        elif kind == "email":
            profile.email = profile.attributes["email"] = value
        else:
            profile.attributes["phone"] = value
        return profile

    def answer(self, name: str, path: str, problem: tuple[int, dict[str, Any]] | None,
               body: Any) -> tuple[int, dict[str, Any]]:
        """A simulated outage wins over everything, as a real one would."""
        if (self.faults["fail_rate"] and self.faulty(path)
                and self.rng.random() < self.faults["fail_rate"]):
            status = self.faults["fail_status"]
            return status, {"message": f"sandbox fault: HTTP {status}"}
        if problem:
            return problem
        if path in TRIGGERS:
            return self.trigger(name, path, body)
        return (self.track if path == TRACK else self.export)(name, body)

    def trigger(self, name: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """An API-triggered campaign or Canvas: every accepted request sends its recipients a
        message, twice if sent twice (Braze does not de-duplicate them)."""
        id_field, properties_field = TRIGGERS[path]
        other = next(f for p, (_, f) in TRIGGERS.items() if p != path)
        target = body.get(id_field)
        if not (isinstance(target, str) and target.strip()):
            return 400, {"message": f"'{id_field}' is required and must be a non-empty string"}
        if other in body:
            return 400, {"message": f"'{other}' is not a field of {path}: use "
                                    f"'{properties_field}'"}
        if body.get(properties_field) is not None and not isinstance(body[properties_field],
                                                                      dict):
            return 400, {"message": f"'{properties_field}' must be an object"}
        recipients = body.get("recipients")
        if recipients is None:
            return 400, {"message": "'recipients' is required unless 'broadcast' is true "
                                    "(the sandbox does not broadcast)"}
        if not (isinstance(recipients, list) and 0 < len(recipients) <= MAX_RECIPIENTS):
            return 400, {"message": f"'recipients' must be an array of 1 to {MAX_RECIPIENTS} "
                                    "recipients"}
        people: list[tuple[str, Any]] = []
        for index, recipient in enumerate(recipients):
            problem = _check_recipient(recipient, properties_field, other)
            if problem:
                return 400, {"message": f"recipients[{index}]: {problem}"}
            kind = "external_user_id" if "external_user_id" in recipient else "user_alias"
            value = recipient[kind]
            people.append(("external_id", value) if kind == "external_user_id"
                          else ("user_alias", (value["alias_name"], value["alias_label"])))
        ws = self.workspaces.setdefault(name, _Workspace())
        dispatch_id = secrets.token_hex(16)
        messages = []
        for recipient, ident in zip(recipients, people, strict=True):
            profile = self.resolve(ws, ident, create=False)
            messages.append({
                "recipient": {k: v for k, v in recipient.items() if k != properties_field},
                "properties": {**(body.get(properties_field) or {}),
                               **(recipient.get(properties_field) or {})},
                "profile_found": profile is not None})
        ws.triggers.append({"endpoint": path, id_field: target, "dispatch_id": dispatch_id,
                            "messages": messages, "time": _now_iso()})
        return 201, {"dispatch_id": dispatch_id, "message": "success"}

    def track(self, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        arrays: dict[str, list[Any]] = {}
        for array in ("attributes", "events", "purchases"):
            arrays[array] = body.get(array, [])
            if not isinstance(arrays[array], list):
                return 400, {"message": f"'{array}' must be an array"}
        total = sum(len(items) for items in arrays.values())
        if total > self.config.max_objects:
            return 400, {"message": "Max Input Length Exceeded"}
        if total == 0:
            return 400, {"message": NO_VALID_DATA}
        refused = self.faults["refuse_event_ids"]
        if self.faults["refuse_mode"] == "400":
            for obj in arrays["events"]:
                if (event_id := _refused_id(obj, refused)) is not None:
                    return 400, {"message": f"event {event_id} refused (sandbox fault)"}
        errors: list[dict[str, Any]] = []
        valid: dict[str, list[tuple[int, dict[str, Any], tuple[str, Any]]]] = {}
        for array, items in arrays.items():
            valid[array] = []
            for index, obj in enumerate(items):
                try:
                    ident = _check_object(array, obj)
                    if array == "events" and _refused_id(obj, refused) is not None:
                        raise ValueError("event refused (sandbox fault)")
                except ValueError as exc:
                    errors.append({"type": str(exc), "input_array": array, "index": index})
                    continue
                valid[array].append((index, obj, ident))
        if not any(valid.values()):
            return 400, {"message": NO_VALID_DATA, "errors": errors}
        ws = self.workspaces.setdefault(name, _Workspace())
        for _index, obj, ident in valid["attributes"]:
            self.apply_attributes(ws, obj, ident)
        for array in ("events", "purchases"):
            for index, obj, ident in valid[array]:
                self.add_event(ws, array, index, obj, ident)
        answer: dict[str, Any] = {"message": "success"}
        for array in ("attributes", "events", "purchases"):
            if valid[array]:
                answer[f"{array}_processed"] = len(valid[array])
        if errors:
            answer["errors"] = errors
        return 201, answer

    def apply_attributes(self, ws: _Workspace, obj: dict[str, Any],
                         ident: tuple[str, Any]) -> None:
        only = obj.get("_update_existing_only")
        # Braze creates by alias only when asked to, by any other identifier unless told not to.
        create = only is False if ident[0] == "user_alias" else only is not True
        profile = self.resolve(ws, ident, create)
        if profile is None:
            ws.dropped.append({"input_array": "attributes", "identifier": ident[0],
                               "reason": "no such user", "time": _now_iso()})
            return
        for key, value in obj.items():
            if key in ("_update_existing_only", "external_id", "user_alias", "braze_id",
                       ident[0]):
                continue
            if key == "subscription_groups":
                for group in value:
                    profile.subscription_groups[group["subscription_group_id"]] = (
                        group["subscription_state"])
                continue
            if key == "email":
                value = value.strip().lower() if isinstance(value, str) else None
                profile.email = value
            if value is None:
                profile.attributes.pop(key, None)
            else:
                profile.attributes[key] = value
        self.touch(profile)

    def add_event(self, ws: _Workspace, array: str, index: int, obj: dict[str, Any],
                  ident: tuple[str, Any]) -> None:
        if array == "events":
            self.events_received += 1
            event_id = (obj.get("properties") or {}).get("extole_event_id")
            if event_id is not None:
                self.event_ids[str(event_id)] += 1
        create = ident[0] not in ("user_alias", "braze_id") and not obj.get(
            "_update_existing_only")
        profile = self.resolve(ws, ident, create)
        item: dict[str, Any] = {k: obj[k] for k in ("name", "product_id", "currency", "price",
                                                    "time", "properties") if k in obj}
        if profile is None:
            ws.dropped.append({"input_array": array, "index": index, "identifier": ident[0],
                               "reason": "no such user", "object": item, "time": _now_iso()})
            return
        (profile.events if array == "events" else profile.purchases).append(item)
        self.touch(profile)

    def export(self, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        given = [k for k in EXPORT_IDS if k in body]
        if len(given) != 1:
            return 400, {"message": "exactly one of " + ", ".join(EXPORT_IDS) + " is required"}
        kind, value = given[0], body[given[0]]
        fields = body.get("fields_to_export")
        if not (_str_list(fields) and fields):
            return 400, {"message": "'fields_to_export' is required: an array of field names"}
        ws = self.workspaces.get(name, _Workspace())
        invalid: list[str] = []
        if kind == "external_ids":
            if not (_str_list(value) and 0 < len(value) <= 50):
                return 400, {"message": "'external_ids' must be an array of 1 to 50 strings"}
            users = [ws.by_external[v] for v in value if v in ws.by_external]
            invalid = [v for v in value if v not in ws.by_external]
        elif kind == "user_aliases":
            if not (isinstance(value, list) and 0 < len(value) <= 50):
                return 400, {"message": "'user_aliases' must be an array of 1 to 50 aliases"}
            try:
                aliases = [_identify("events", {"user_alias": a})[1] for a in value]
            except ValueError as exc:
                return 400, {"message": str(exc)}
            users = [ws.by_alias[a] for a in aliases if a in ws.by_alias]
        elif not (isinstance(value, str) and value.strip()):
            return 400, {"message": f"'{kind}' must be a non-empty string"}
        elif kind == "braze_id":
            users = [ws.by_braze[value]] if value in ws.by_braze else []
            invalid = [] if users else [value]
        else:
            users = ws.by_field("email" if kind == "email_address" else "phone",
                                value.strip().lower() if kind == "email_address" else value)
        out = []
        for profile in users:
            full = {**profile.attributes, **profile.to_json()}
            out.append({f: full[f] for f in fields
                        if f in EXPORT_FIELDS and full.get(f) is not None})
        return 200, {"message": "success", "users": out, "invalid_user_ids": invalid}

    def stats(self) -> dict[str, Any]:
        dropped = sum(d["input_array"] == "events" for ws in self.workspaces.values()
                      for d in ws.dropped)
        messages = sum(len(t["messages"]) for ws in self.workspaces.values()
                       for t in ws.triggers)
        return {"requests": dict(self.statuses), "events_received": self.events_received,
                "events_dropped": dropped, "event_ids": dict(self.event_ids),
                "trigger_messages": messages}


class _ExtoleRefusal(RelayError):
    """An answer of Extole's with its error body: `{"code", "message", "http_status_code",
    "parameters", "unique_id"}`."""

    def __init__(self, status: int, code: str, message: str,
                 parameters: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.parameters = parameters or {}

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "http_status_code": self.status,
                "parameters": self.parameters, "unique_id": secrets.token_hex(8)}


def _extole_time(value: Any, what: str) -> datetime:
    """An ISO-8601 time with an offset (or Z), as UTC; ValueError naming `what` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be an ISO-8601 time string")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an ISO-8601 time") from None
    if moment.tzinfo is None:
        raise ValueError(f"{what} {value!r} has no offset (add Z or +00:00)")
    return moment.astimezone(UTC)


def _extole_interval(value: str, now: datetime) -> tuple[datetime, datetime]:
    """Extole's `time_interval`: `start/end` (ISO-8601 explicit form) or a duration ending now
    (`P2D`, `PT36H`)."""
    text = value.strip()
    if "/" in text:
        first, _, last = text.partition("/")
        start = _extole_time(first, "time_interval start")
        end = _extole_time(last, "time_interval end")
        if end < start:
            raise ValueError("time_interval ends before it starts")
        return start, end
    match = _DURATION.match(text)
    if not match or not any(match.groups()):
        raise ValueError(f"time_interval {value!r} is neither start/end nor a duration")
    days, hours, minutes, seconds = (int(v or 0) for v in match.groups())
    span = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return datetime.fromtimestamp(now.timestamp() - span, UTC), now


def _extole_number(args: Any, name: str, default: int, low: int, high: int | None,
                   code: str) -> int:
    raw = args.get(name)
    if raw is None:
        return default
    try:
        number = int(raw)
    except ValueError:
        raise _ExtoleRefusal(400, f"invalid_{name}", f"{name} must be a whole number",
                             {name: raw}) from None
    if number < low:
        raise _ExtoleRefusal(400, f"invalid_{name}", f"{name} must be at least {low}",
                             {name: raw})
    if high is not None and number > high:
        raise _ExtoleRefusal(400, code, f"{name} must be at most {high}", {name: raw})
    return number


def _extole_rewards(sandbox: _Sandbox, program: str, args: Any) -> list[dict[str, Any]]:
    """The page GET /v2/rewards answers, or _ExtoleRefusal for a parameter Extole refuses."""
    now = datetime.now(UTC)
    window: tuple[datetime, datetime] | None = None
    if args.get("time_interval") is not None:
        try:
            window = _extole_interval(args["time_interval"], now)
        except ValueError as exc:
            raise _ExtoleRefusal(400, "time_interval_invalid", str(exc),
                                 {"time_interval": args["time_interval"]}) from None
    success_only = args.get("success_only", "true").strip().lower()
    if success_only not in ("true", "false"):
        raise _ExtoleRefusal(400, "invalid_success_only", "success_only must be true or false",
                             {"success_only": args["success_only"]})
    limit = _extole_number(args, "limit", EXTOLE_DEFAULT_LIMIT, 1, EXTOLE_MAX_LIMIT,
                           "max_fetch_size_1000")
    offset = _extole_number(args, "offset", 0, 0, None, "invalid_offset")
    state = args.get("state")
    if state is not None and state.strip().upper() not in EXTOLE_REWARD_STATES:
        raise _ExtoleRefusal(400, "invalid_reward_state", f"unknown reward state {state!r}",
                             {"state": state})
    chosen = []
    for reward in sandbox.rewards.get(program, {}).values():
        created = _extole_time(reward["created_at"], "created_at")
        if window and not window[0] <= created < window[1]:
            continue
        if success_only == "true" and reward["state"] in EXTOLE_FAILED_STATES:
            continue
        if state is not None and reward["state"] != state.strip().upper():
            continue
        chosen.append((created, reward["reward_id"], reward))
    chosen.sort(key=lambda entry: (entry[0], entry[1]))
    dropped = sandbox.faults["extole_drop_fields"]
    return [{k: v for k, v in reward.items() if k not in dropped}
            for _, _, reward in chosen[offset:offset + limit]]


def _checked_rewards(body: Any) -> list[dict[str, Any]]:
    """Rewards posted to POST /sandbox/extole/rewards: one object or an array of them, each with
    a `reward_id`, a `state` Extole knows and a `created_at` with an offset."""
    rewards = body if isinstance(body, list) else [body]
    checked = []
    for index, reward in enumerate(rewards):
        where = f"reward {index}"
        if not isinstance(reward, dict):
            raise ValueError(f"{where} must be a JSON object")
        if not (isinstance(reward.get("reward_id"), str) and reward["reward_id"].strip()):
            raise ValueError(f"{where}: reward_id must be a non-empty string")
        state = reward.get("state")
        if not (isinstance(state, str) and state.strip().upper() in EXTOLE_REWARD_STATES):
            raise ValueError(f"{where}: state must be one of {', '.join(EXTOLE_REWARD_STATES)}")
        _extole_time(reward.get("created_at"), f"{where}: created_at")
        checked.append({**reward, "state": state.strip().upper()})
    return checked


def _extole_view(sandbox: _Sandbox) -> Response:
    """GET /v2/rewards as Extole answers it: token, then faults, then parameters."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    headers: dict[str, str] = {}
    with sandbox.lock:
        faults = sandbox.faults
        try:
            if not token or (sandbox.extole_tokens and token not in sandbox.extole_tokens):
                raise _ExtoleRefusal(401, "method_unauthorized",
                                     "The access token is missing, invalid or expired")
            program = sandbox.extole_tokens.get(token, EXTOLE_DEFAULT_PROGRAM)
            if faults["extole_fail_statuses"]:
                status = faults["extole_fail_statuses"].pop(0)
                if status == 429:
                    headers["Retry-After"] = "1"
                raise _ExtoleRefusal(status, _EXTOLE_ERROR_CODES.get(status, "server_error"),
                                     f"sandbox fault: HTTP {status}")
            page = _extole_rewards(sandbox, program, request.args)
        except _ExtoleRefusal as refusal:
            sandbox.record(EXTOLE_REWARDS, None, refusal.status, dict(request.args))
            response = jsonify(refusal.body())
            response.status_code = refusal.status
            response.headers.update(headers)
            return response
        sandbox.record(EXTOLE_REWARDS, program, 200, dict(request.args))
        malformed = faults["extole_malformed"]
        latency = faults["latency_ms"] / 1000.0
    if latency > 0:
        time.sleep(latency)
    if malformed == "not_json":
        return Response("<html><body>Service Temporarily Unavailable</body></html>",
                        status=200, content_type="text/html")
    if malformed == "not_list":
        return jsonify({"rewards": page})
    return jsonify(page)


def _parse_json(raw: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(raw, parse_constant=no_constants)


def _braze_view(sandbox: _Sandbox, path: str) -> Response:
    """Answer as Braze would, in Braze's order: route, key, rate limit, faults, body."""
    now = time.time()
    name: str | None = None
    body: Any = None
    with sandbox.lock:
        status, payload, (limit, remaining, reset, allowed) = 0, {}, sandbox.rate(None, path, now)
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else ""
        if path.rstrip("/") in ENDPOINTS and path != path.rstrip("/"):
            status, payload = 403, {"message": "Forbidden"}
        elif path not in ENDPOINTS:
            status, payload = 404, {"message": "Not Found"}
        elif request.method != "POST":
            status, payload = 405, {"message": "Method Not Allowed"}
        elif not key or (name := sandbox.workspace_name(key)) is None or sandbox.refused_key(
                key, name):
            status, payload, name = 401, {"message": f"Invalid API key: {key[-4:]}"}, None
        else:
            limit, remaining, reset, allowed = sandbox.rate(name, path, now)
            if not allowed:
                status, payload = 429, {"message": "Rate limit exceeded"}
        latency = sandbox.faults["latency_ms"] / 1000.0 if sandbox.faulty(path) else 0.0
    headers = {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(remaining),
               "X-RateLimit-Reset": str(math.ceil(reset))}
    if status == 429:
        headers["Retry-After"] = str(max(1, math.ceil(reset - now)))
    if not status and latency > 0:
        time.sleep(latency)
    problem: tuple[int, dict[str, Any]] | None = None
    if not status:  # parsed outside the lock: bodies can be megabytes
        problem, body = _read_body()
    with sandbox.lock:
        if not status:
            status, payload = sandbox.answer(name or "", path, problem, body)
        sandbox.record(path, name, status, body)
    response = jsonify(payload)
    response.status_code = status
    response.headers.update(headers)
    return response


def _read_body() -> tuple[tuple[int, dict[str, Any]] | None, Any]:
    """(problem answer or None, body as far as it could be read)."""
    raw = request.get_data(cache=False)
    if len(raw) > MAX_PAYLOAD_BYTES:
        return (413, {"message": "Payload Too Large"}), None
    if request.mimetype != "application/json":
        return (415, {"message": "Content-Type must be application/json"}), None
    try:
        body = _parse_json(raw)
    except (ValueError, RecursionError):
        return (400, {"message": "Invalid JSON"}), raw[:1000].decode("utf-8", "replace")
    if not isinstance(body, dict):
        return (400, {"message": "Invalid JSON: the body must be an object"}), body
    return None, body


def create_sandbox_app(config: SandboxConfig | None = None) -> Flask:
    """The sandbox as a Flask app; its state is app.extensions["relay_sandbox"]."""
    sandbox = _Sandbox(config or SandboxConfig())
    app = Flask(__name__)
    cast(DefaultJSONProvider, app.json).sort_keys = False  # keep Braze's field order
    app.extensions["relay_sandbox"] = sandbox
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]

    @app.route("/", defaults={"path": ""}, methods=methods)
    @app.route("/<path:path>", methods=methods)
    def braze(path: str) -> Response:
        return _braze_view(sandbox, "/" + path)

    @app.get("/sandbox/profiles")
    def profiles() -> Response:
        with sandbox.lock:
            return jsonify({
                "workspaces": {n: [p.to_json() for p in ws.profiles]
                               for n, ws in sandbox.workspaces.items()},
                "dropped": {n: list(ws.dropped) for n, ws in sandbox.workspaces.items()}})

    @app.get("/sandbox/triggers")
    def triggers() -> Response:
        """Accepted trigger requests per workspace, each with the messages it sent (one per
        recipient, with its properties and whether Braze had that profile)."""
        with sandbox.lock:
            return jsonify({"workspaces": {n: list(ws.triggers)
                                           for n, ws in sandbox.workspaces.items()}})

    @app.get("/sandbox/requests")
    def requests_log() -> Response:
        with sandbox.lock:
            return jsonify({"requests": list(sandbox.requests)})

    @app.get("/sandbox/stats")
    def stats() -> Response:
        with sandbox.lock:
            return jsonify(sandbox.stats())

    @app.route("/sandbox/faults", methods=["GET", "POST"])
    def faults() -> Response | tuple[Response, int]:
        if request.method == "POST":
            try:
                update = validate_faults(request.get_json(force=True, silent=True))
            except ValueError as exc:
                return jsonify({"message": str(exc)}), 400
            with sandbox.lock:
                if update.get("rate_limit", sandbox.faults["rate_limit"]) != sandbox.faults[
                        "rate_limit"]:
                    sandbox.windows.clear()
                sandbox.faults.update(update)
        with sandbox.lock:
            return jsonify(sandbox.faults)

    @app.get(EXTOLE_REWARDS)
    def extole_rewards() -> Response:
        return _extole_view(sandbox)

    @app.route("/sandbox/extole/rewards", methods=["GET", "POST"])
    def posted_rewards() -> Response | tuple[Response, int]:
        """POST: rewards (one or an array) into a program (`?program=`, default production); a
        reward posted again replaces the one with its reward_id (a state change). GET: them all.
        """
        if request.method == "POST":
            program = request.args.get("program", EXTOLE_DEFAULT_PROGRAM).strip()
            try:
                rewards = _checked_rewards(_parse_json(request.get_data()))
            except (ValueError, RecursionError) as exc:
                return jsonify({"message": str(exc)}), 400
            with sandbox.lock:
                held = sandbox.rewards.setdefault(program, {})
                for reward in rewards:
                    held[reward["reward_id"]] = reward
                return jsonify({"stored": len(rewards), "rewards": len(held)})
        with sandbox.lock:
            return jsonify({"programs": {name: list(held.values())
                                         for name, held in sandbox.rewards.items()}})

    @app.post("/sandbox/reset")
    def reset() -> Response:
        with sandbox.lock:
            sandbox.reset()
        return jsonify({"message": "reset"})

    return app


def run_sandbox(host: str, port: int, config: SandboxConfig) -> None:
    """Serve the sandbox with threads until interrupted (Ctrl-C)."""
    server = make_server(host, port, create_sandbox_app(config), threaded=True)
    log.info("Braze sandbox listening on http://%s:%d", host, server.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
