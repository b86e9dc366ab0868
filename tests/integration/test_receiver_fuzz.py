"""Property-based fuzzing of the receiver (hypothesis), on SQLite and PostgreSQL.

Random bodies, headers and content types never produce a 500 (nor any answer the README
does not list), every request lands in the inbound log or, a refused one beyond
RELAY_REFUSED_LOG_RATE, in the count of its address and minute, and no authenticated event is
lost.
"""

from __future__ import annotations

import base64
import itertools
import json
from datetime import datetime
from typing import Any
from urllib.parse import quote

from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import undefer_group

from relay.authentication import sign
from relay.db import get_db
from relay.models import InboundRequest, OutboxEvent, RefusedRequestCount
from tests.support import PROD_SECRET, STAGING_SECRET

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ANSWERS = {200, 400, 401, 404, 413, 415}
SECRETS = {"production": PROD_SECRET, "staging": STAGING_SECRET}
_counter = itertools.count()

# Text with the characters that break naive storage: NUL, lone surrogates, BOM, separators.
awkward_chars = st.one_of(st.characters(),
                          st.sampled_from(["\x00", "\ud800", "\udfff", "\ufeff", "\u2028", "é"]))
awkward_text = st.text(awkward_chars, max_size=30)
huge_ints = st.one_of(st.integers(), st.integers(min_value=-(10**300), max_value=10**300),
                      st.sampled_from([2**63, -(2**63) - 1, 10**11, 10**11 + 1, 253402300800000]))
scalars = st.one_of(st.none(), st.booleans(), huge_ints,
                    st.floats(allow_nan=False, allow_infinity=False), awkward_text)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(awkward_text, children, max_size=4)),
    max_leaves=12,
)
FIELD_NAMES = ["type", "event", "event_type", "event_name", "name", "event_id", "id",
               "event_time", "timestamp", "time", "created_at", "partner_user_id", "external_id",
               "email", "email_address", "recipient_email", "first_name", "last_name",
               "phone_number", "share_link", "funnel", "program", "face_value", "reward_id",
               "Type", "EMAIL", "$weird"]
field_names = st.one_of(st.sampled_from(FIELD_NAMES), awkward_text)
# Events whose every known field may hold any JSON type, nested places included.
junk_places = st.dictionaries(field_names, json_values, max_size=6)
junk_events = st.dictionaries(
    field_names, st.one_of(json_values, junk_places), max_size=10
).flatmap(lambda top: st.fixed_dictionaries(
    {}, optional={"person": junk_places, "data": junk_places}).map(lambda more: {**top, **more}))


def _encode(value: Any, ascii_only: bool) -> bytes:
    # ensure_ascii writes lone surrogates as \\ud800 escapes; otherwise they reach the bytes as
    # invalid UTF-8.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    st.binary(max_size=300),
    awkward_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.tuples(json_values, st.booleans()).map(lambda v: _encode(*v)),
    st.tuples(junk_events, st.booleans()).map(lambda v: _encode(*v)),
    st.tuples(st.lists(st.one_of(junk_events, json_values), max_size=5),
              st.booleans()).map(lambda v: _encode(*v)),
    st.sampled_from([b"", b"[]", b"{}", b"[NaN]", b'{"a": 1e999}', b"[" * 5000, b"\xef\xbb\xbf{}",
                     b'"\\ud800"', b'{"type": "x\\u0000"}', b"-0", b"1" * 5000]),
)
content_types = st.one_of(
    st.sampled_from([None, "application/json", "application/json; charset=utf-8",
                     "application/vnd.x+json", "APPLICATION/JSON", "text/plain", "",
                     "application/x-www-form-urlencoded", "multipart/form-data; boundary=zz",
                     "application/json; charset=latin-1", "+json", "json"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40),
)
header_text = st.text(st.characters(min_codepoint=0, max_codepoint=255,
                                    blacklist_characters="\r\n"), max_size=40)
auth_kinds = st.sampled_from(["signature", "prefixed-signature", "bearer", "basic",
                              "basic-user", "none", "wrong-signature", "other-environment",
                              "random-authorization", "random-signature"])
environments = st.one_of(st.sampled_from(["production", "staging", "", "qa"]),
                         st.text(st.characters(blacklist_characters="/?#",
                                               blacklist_categories=["Cs"]),
                                 min_size=1, max_size=12))


def _credentials(kind: str, body: bytes, secret: str, other: str, noise: str) -> dict[str, str]:
    if kind == "signature":
        return {"X-Extole-Signature": sign(body, secret)}
    if kind == "prefixed-signature":
        return {"X-Extole-Signature": "sha256=" + sign(body, secret).upper()}
    if kind == "bearer":
        return {"Authorization": f"Bearer {secret}"}
    if kind == "basic":
        return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}
    if kind == "basic-user":
        return {"Authorization": "Basic " + base64.b64encode(f"u:{secret}".encode()).decode()}
    if kind == "wrong-signature":
        return {"X-Extole-Signature": sign(body + b"x", secret)}
    if kind == "other-environment":
        return {"X-Extole-Signature": sign(body, other)}
    if kind == "random-authorization":
        return {"Authorization": noise}
    if kind == "random-signature":
        return {"X-Extole-Signature": noise}
    return {}


def _counts(app: Flask) -> tuple[int, int]:
    """Outbox rows; requests recorded (inbound log rows plus refused requests only counted)."""
    with get_db(app).session() as session:
        unlogged = session.scalar(select(func.sum(RefusedRequestCount.refused
                                                  - RefusedRequestCount.logged)))
        return (session.scalar(select(func.count()).select_from(OutboxEvent)) or 0,
                (session.scalar(select(func.count()).select_from(InboundRequest)) or 0)
                + (unlogged or 0))


@FUZZ
@given(body=bodies, content_type=content_types, auth=auth_kinds, environment=environments,
       noise=header_text,
       extra=st.dictionaries(st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True), header_text,
                             max_size=3))
def test_random_requests_never_get_a_500(app: Flask, client: FlaskClient, body: bytes,
                                         content_type: str | None, auth: str, environment: str,
                                         noise: str, extra: dict[str, str]) -> None:
    secret = SECRETS.get(environment, PROD_SECRET)
    other = STAGING_SECRET if secret == PROD_SECRET else PROD_SECRET
    headers = {**extra, **_credentials(auth, body, secret, other, noise)}
    if content_type is not None:
        headers["Content-Type"] = content_type
    events_before, inbound_before = _counts(app)
    path = "/webhooks/extole" if environment == "" else f"/webhooks/extole/{quote(environment)}"
    response = client.post(path, data=body, headers=headers)

    assert response.status_code in ANSWERS, response.get_data(as_text=True)
    answer = response.get_json()
    events_after, inbound_after = _counts(app)
    assert inbound_after == inbound_before + 1  # every request is logged or counted
    if response.status_code == 200:
        items = json.loads(body.decode("utf-8-sig"))
        count = len(items) if isinstance(items, list) else 1
        assert answer["accepted"] + answer["duplicates"] + answer["rejected_count"] == count
        assert len(answer["rejected"]) == min(answer["rejected_count"], 100)
        assert len(answer["ids"]) == answer["accepted"]
        # Nothing that passed authentication is lost: accepted and rejected items are rows.
        assert events_after == events_before + answer["accepted"] + answer["rejected_count"]
    else:
        assert set(answer) == {"error"} and answer["error"]
        assert events_after == events_before


# --- valid events of random shapes are all stored ----------------------------------------------

TYPE_KEYS = ["type", "event", "event_type", "event_name", "name", "TYPE", "Event_Type"]
TYPES = ["shared", "Share Link Created", "reward_earned", "EXTOLE-CONVERTED", "subscribed",
         "something_custom", "unsubscribed", "  registered  "]
times = st.one_of(
    st.none(),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(9000, 1, 1),
                 timezones=st.none()).map(lambda d: d.isoformat()),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(9000, 1, 1),
                 timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.integers(min_value=0, max_value=10**11),
    st.integers(min_value=10**11 + 1, max_value=253402300799999),
    st.integers(min_value=0, max_value=10**11).map(str),
    st.floats(min_value=0, max_value=1e11),
    st.just("2026-11-20T14:14:18.548Z"),
)
extra_fields = st.dictionaries(st.text(max_size=8).map(lambda k: "x_" + k), json_values,
                               max_size=4)
identity = st.fixed_dictionaries({}, optional={
    "partner_user_id": st.one_of(st.text(min_size=1, max_size=40),
                                 st.integers(min_value=-(10**18), max_value=10**18)),
    "email": awkward_text,
    "first_name": awkward_text,
    "share_link": awkward_text,
    "funnel": st.sampled_from(["advocate", "friend"]),
})


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {draw(st.sampled_from(TYPE_KEYS)): draw(st.sampled_from(TYPES))}
    event[draw(st.sampled_from(["event_id", "id", "EVENT_ID"]))] = (
        f"fz-{next(_counter)}-{draw(st.text(max_size=6))}")
    moment = draw(times)
    if moment is not None:
        event[draw(st.sampled_from(["event_time", "timestamp", "time", "created_at"]))] = moment
    place = draw(st.sampled_from(["top", "person", "data"]))
    who = draw(identity)
    if place == "top":
        event.update(who)
    else:
        event[place] = who
    event.update(draw(extra_fields))
    if draw(st.booleans()):
        event.setdefault("data", {}).update(draw(extra_fields))
    return event


@FUZZ
@given(items=st.lists(valid_events(), min_size=1, max_size=5), as_array=st.booleans(),
       ascii_only=st.booleans(),
       auth=st.sampled_from(["signature", "prefixed-signature", "bearer", "basic", "basic-user"]),
       environment=st.sampled_from(["production", "staging"]),
       content_type=st.sampled_from(["application/json", "application/json; charset=utf-8",
                                     "application/vnd.extole+json"]))
def test_authenticated_valid_events_are_all_stored(
    app: Flask, client: FlaskClient, items: list[dict[str, Any]], as_array: bool,
    ascii_only: bool, auth: str, environment: str, content_type: str
) -> None:
    value: Any = items if as_array or len(items) > 1 else items[0]
    # Lone surrogates cannot be sent as raw UTF-8: those bodies go out escaped.
    body = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        body = json.dumps(value).encode()
    secret = SECRETS[environment]
    headers = {"Content-Type": content_type,
               **_credentials(auth, body, secret, "", "")}
    events_before, _ = _counts(app)
    response = client.post(f"/webhooks/extole/{environment}", data=body, headers=headers)

    assert response.status_code == 200, response.get_data(as_text=True)
    answer = response.get_json()
    assert answer["rejected"] == []
    assert (answer["accepted"], answer["duplicates"]) == (len(items), 0)
    with get_db(app).session() as session:
        stored = list(session.scalars(
            select(OutboxEvent).options(undefer_group("queue")).where(OutboxEvent.id.in_(answer["ids"])).order_by(OutboxEvent.id)))
    assert [e.id for e in stored] == answer["ids"]
    assert all(e.status == "pending" and e.environment == environment for e in stored)
    assert all(e.braze_event and e.event_time is not None for e in stored)
    assert _counts(app)[0] == events_before + len(items)
