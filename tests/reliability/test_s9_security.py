"""Scenario 9: security of the webhook and admin surfaces, against the real gunicorn server.

Wrong secrets and the other environment's secret are refused in every key type; a replayed
request is acknowledged and delivered once; a signature computed over a re-serialised body is
refused (HS256 covers the exact raw bytes); secrets and tokens are compared with
`hmac.compare_digest` (a spy on the running code and the source); admin pages and API refuse a
missing session, wrong credentials and a wrong CSRF token; a session cookie copied before sign-out
is refused after it (by both gunicorn workers); SQL injection strings in every admin filter are
handled as data (exact matches find the one event carrying them, nothing else moves); concurrent
password guesses across the workers get no more checks than the database-wide limit allows.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import hmac
import inspect
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

import relay.admin.auth
import relay.authentication
import relay.exceptions
from relay.authentication import authenticate, sign
from tests.reliability.harness import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    PROD_SECRET,
    STAGING_SECRET,
    Db,
    Processes,
    admin_login,
    audit,
    make_event,
    relay_env,
    run_id,
    wait_drained,
)
from tests.reliability.report import Row

pytestmark = pytest.mark.reliability

INJECTIONS = [
    "' OR '1'='1",
    "'; DROP TABLE events; --",
    '" OR 1=1 --',
    "%' OR 1=1 --",
    "1; SELECT pg_sleep(3)",
    "' UNION SELECT id, body FROM inbound_requests --",
    "\\'; TRUNCATE events CASCADE; --",
    "1) OR (1=1",
    "admin'--",
    "$1",
    "%",
    "_",
]
SECRET_WORDS = ("secret", "password", "token", "signature", "digest", "given", "expected",
                "supplied", "csrf", "decoded")


def _post(session: requests.Session, base: str, body: bytes, headers: dict[str, str],
          environment: str = "production") -> requests.Response:
    return session.post(f"{base}/webhooks/extole/{environment}", data=body, timeout=30,
                        headers={"Content-Type": "application/json", **headers})


def _basic(value: str) -> str:
    return "Basic " + base64.b64encode(value.encode()).decode()


def _secret_comparisons(path: Path) -> list[str]:
    """`==`/`!=` comparisons whose operands name a secret-like value (must be compare_digest)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            names = {n.id.lower() for n in ast.walk(node) if isinstance(n, ast.Name)}
            names |= {n.attr.lower() for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            constant = any(isinstance(n, ast.Constant) and isinstance(n.value, str | bytes)
                           for n in (node.left, *node.comparators))
            # A comparison with a literal (a prefix, a scheme name) reveals nothing secret.
            if not constant and any(word in name for name in names for word in SECRET_WORDS):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_security(database: tuple[str, Db], procs: Processes,
                  report: Callable[[int, str], Row], monkeypatch: pytest.MonkeyPatch) -> None:
    row = report(9, "Security (secrets, replay, signatures, admin, SQL injection)")
    url, db = database
    tag = run_id()
    box = procs.sandbox()
    env = relay_env(url, box)
    server = procs.server(env, workers=2)
    procs.worker(env)
    base = server.url
    checks: dict[str, Any] = {}
    acknowledged: dict[str, str] = {}
    sent = 0

    with requests.Session() as http:
        # -- wrong secrets, the other environment's secret, every key type ----------------
        refused: dict[str, int] = {}
        for environment, own, other in (("production", PROD_SECRET, STAGING_SECRET),
                                        ("staging", STAGING_SECRET, PROD_SECRET)):
            body = json.dumps(make_event(f"{tag}-{environment}-x", "x")).encode()
            for name, secret in (("wrong", "not-the-secret"), ("other environment's", other),
                                 ("own secret + 1 char", own + "x"), ("own prefix", own[:-1])):
                for scheme, headers in (
                        ("signature", {"X-Extole-Signature": sign(body, secret)}),
                        ("sha256= signature", {"X-Extole-Signature": "sha256=" + sign(body,
                                                                                    secret)}),
                        ("bearer", {"Authorization": f"Bearer {secret}"}),
                        ("basic", {"Authorization": _basic(secret)}),
                        ("basic user:secret", {"Authorization": _basic(f"extole:{secret}")})):
                    answer = _post(http, base, body, headers, environment)
                    sent += 1
                    refused[f"{environment} {scheme} {name}"] = answer.status_code
        checks["bad secrets"] = refused
        stored_from_refused = db.scalar("SELECT count(*) FROM events")

        # -- replay: the same signed request three times, then the same id changed --------
        event = make_event(f"{tag}-replayed", f"{tag}-p1", seq=1)
        body = json.dumps(event).encode()
        replies = [_post(http, base, body, {"X-Extole-Signature": sign(body, PROD_SECRET)})
                   for _ in range(3)]
        changed = json.dumps({**event, "face_value": 999}).encode()
        replies.append(_post(http, base, changed,
                             {"X-Extole-Signature": sign(changed, PROD_SECRET)}))
        sent += len(replies)
        checks["replay"] = [(r.status_code, r.json().get("accepted"), r.json().get("duplicates"))
                            for r in replies]
        acknowledged[event["event_id"]] = "production"

        # -- a signature over a re-serialised body ----------------------------------------
        spaced = (b'{ "type": "shared",  "event_id": "' + f"{tag}-reser".encode()
                  + b'", "partner_user_id": "r", "event_time": "2026-11-20T10:00:00Z" }')
        parsed = json.loads(spaced)
        reserialised = [json.dumps(parsed).encode(), json.dumps(parsed, sort_keys=True).encode(),
                        json.dumps(parsed, separators=(",", ":")).encode()]
        resig = [_post(http, base, spaced, {"X-Extole-Signature": sign(other, PROD_SECRET)})
                 .status_code for other in reserialised]
        # ...and the reverse: a proxy re-serialised the body, the signature is the original's.
        resig += [_post(http, base, other, {"X-Extole-Signature": sign(spaced, PROD_SECRET)})
                  .status_code for other in reserialised]
        good = _post(http, base, spaced, {"X-Extole-Signature": sign(spaced, PROD_SECRET)})
        sent += len(resig) + 1
        checks["re-serialised"] = resig
        checks["exact bytes"] = good.status_code
        acknowledged[f"{tag}-reser"] = "production"

        # -- events carrying the injection strings, for the admin searches ----------------
        carriers: dict[str, dict[str, Any]] = {}
        for i, text in enumerate(INJECTIONS):
            carrier = make_event(f"{tag}-sqli-{i}-{text}", f"{tag}-sqli-{i}-{text}", seq=i,
                                 extole_type=f"sqli {i} {text}")
            carrier_body = json.dumps(carrier).encode()
            answer = _post(http, base, carrier_body,
                           {"X-Extole-Signature": sign(carrier_body, PROD_SECRET)})
            sent += 1
            assert answer.status_code == 200 and answer.json()["accepted"] == 1, answer.text
            carriers[text] = {"id": answer.json()["ids"][0], **carrier}
            acknowledged[carrier["event_id"]] = "production"
        drain = wait_drained(db, 60, "the security events to be delivered")
        total_events = db.scalar("SELECT count(*) FROM events")

        # -- admin without a session or with wrong credentials ----------------------------
        some_id = carriers[INJECTIONS[0]]["id"]
        anonymous = {
            "GET /admin/": http.get(f"{base}/admin/", allow_redirects=False, timeout=10),
            f"GET /admin/events/{some_id}": http.get(f"{base}/admin/events/{some_id}",
                                                    allow_redirects=False, timeout=10),
            "GET /admin/replay": http.get(f"{base}/admin/replay", allow_redirects=False,
                                          timeout=10),
            "GET /admin/api/events": http.get(f"{base}/admin/api/events", timeout=10),
            "GET /admin/api/stats": http.get(f"{base}/admin/api/stats", timeout=10),
            f"GET /admin/api/events/{some_id}": http.get(f"{base}/admin/api/events/{some_id}",
                                                        timeout=10),
            "GET /admin/stream": http.get(f"{base}/admin/stream", timeout=10, stream=True),
            "POST /admin/api/replay": http.post(f"{base}/admin/api/replay", json={},
                                                timeout=10),
            f"POST /admin/api/events/{some_id}/replay": http.post(
                f"{base}/admin/api/events/{some_id}/replay", json={}, timeout=10),
            f"POST /admin/events/{some_id}/replay (form)": http.post(
                f"{base}/admin/events/{some_id}/replay", data={"csrf_token": "x"},
                allow_redirects=False, timeout=10),
            "GET /admin/api/stats wrong password": http.get(
                f"{base}/admin/api/stats", auth=(ADMIN_USER, ADMIN_PASSWORD + "x"), timeout=10),
            "GET /admin/api/stats wrong user": http.get(
                f"{base}/admin/api/stats", auth=(ADMIN_USER + "x", ADMIN_PASSWORD), timeout=10),
        }
        for answer in anonymous.values():
            answer.close()
        checks["anonymous"] = {k: (r.status_code, r.headers.get("Location", "")[:40])
                               for k, r in anonymous.items()}

    # -- admin with a session: the CSRF token is required for every change ----------------
    with requests.Session() as admin:
        token = admin_login(admin, base)
        api = f"{base}/admin/api/events/{some_id}/replay"
        csrf = {
            "API without token": admin.post(api, json={}, timeout=10).status_code,
            "API wrong token": admin.post(api, json={}, headers={"X-CSRF-Token": token[:-1] + (
                "A" if token[-1] != "A" else "B")}, timeout=10).status_code,
            "API other session's token": admin.post(api, json={}, headers={
                "X-CSRF-Token": _other_token(base)}, timeout=10).status_code,
            "bulk replay wrong token": admin.post(f"{base}/admin/api/replay", json={},
                                                  headers={"X-CSRF-Token": "0" * 43},
                                                  timeout=10).status_code,
            "form replay wrong token": admin.post(f"{base}/admin/events/{some_id}/replay",
                                                  data={"csrf_token": "wrong"},
                                                  allow_redirects=False, timeout=10).status_code,
            "form bulk replay no token": admin.post(f"{base}/admin/replay", data={},
                                                    allow_redirects=False,
                                                    timeout=10).status_code,
            "form logout wrong token": admin.post(f"{base}/admin/logout",
                                                  data={"csrf_token": "wrong"},
                                                  allow_redirects=False, timeout=10).status_code,
        }
        status_after_refusals = db.scalar("SELECT status FROM events WHERE id = :i", i=some_id)
        # The right token passes the check: the retry is then refused for the event's state
        # (409: a delivered event is not retried), so nothing is sent again.
        csrf["API right token (retry)"] = admin.post(
            f"{base}/admin/api/events/{some_id}/retry", json={},
            headers={"X-CSRF-Token": token}, timeout=10).status_code
        checks["csrf"] = csrf

        # -- SQL injection in every filter -----------------------------------------------
        injection: dict[str, list[int]] = {}
        slowest = 0.0
        wrong_matches: list[str] = []
        for text in INJECTIONS:
            carrier = carriers[text]
            for name, params, expect_ids in (
                    ("q=event id", {"q": carrier["event_id"]}, [carrier["id"]]),
                    ("q=external id", {"q": carrier["partner_user_id"]}, [carrier["id"]]),
                    ("name", {"name": carrier["type"]}, [carrier["id"]]),
                    ("q", {"q": text}, []), ("name", {"name": text}, []),
                    ("status", {"status": text}, None), ("environment", {"environment": text},
                                                         None),
                    ("limit", {"limit": text}, None), ("cursor", {"cursor": text}, None)):
                started = time.monotonic()
                answer = admin.get(f"{base}/admin/api/events", params=params, timeout=30)
                slowest = max(slowest, time.monotonic() - started)
                injection.setdefault(f"events {name}", []).append(answer.status_code)
                if expect_ids is not None and answer.status_code == 200:
                    ids = [e["id"] for e in answer.json()["events"]]
                    if ids != expect_ids:
                        wrong_matches.append(f"{name}={params}: {ids}")
            for path in (f"/admin/api/events/{text}", f"/admin/events/{text}"):
                answer = admin.get(base + path.replace("?", "%3F").replace("#", "%23"),
                                   timeout=30)
                injection.setdefault("event by id", []).append(answer.status_code)
            for field in ("status", "environment", "name", "q", "since"):
                answer = admin.post(f"{base}/admin/api/replay", json={field: text},
                                    headers={"X-CSRF-Token": token}, timeout=30)
                injection.setdefault(f"bulk replay {field}", []).append(answer.status_code)
                if answer.status_code == 200 and answer.json().get("requeued"):
                    wrong_matches.append(f"bulk replay {field}={text!r} requeued "
                                         f"{answer.json()['requeued']}")
            for params in ({"q": text}, {"name": text}, {"status": text},
                           {"environment": text}):
                answer = admin.get(f"{base}/admin/", params=params, timeout=30)
                injection.setdefault(f"page {next(iter(params))}", []).append(answer.status_code)
                answer = admin.get(f"{base}/admin/replay", params=params, timeout=30)
                injection.setdefault(f"replay page {next(iter(params))}", []).append(
                    answer.status_code)
            with admin.get(f"{base}/admin/stream", params={"q": text}, stream=True,
                           timeout=30) as answer:
                injection.setdefault("stream q", []).append(answer.status_code)
        checks["injection"] = {k: sorted(set(v)) for k, v in injection.items()}

        # -- a cookie copied while signed in, replayed after sign-out ----------------------
        copied = admin.cookies.get("relay_admin")
        assert copied, "no session cookie"
        before_logout = _replay_cookie(base, copied, token, some_id, writes=False)
        logout = admin.post(f"{base}/admin/logout", data={"csrf_token": token},
                            allow_redirects=False, timeout=10)
        after_logout = _replay_cookie(base, copied, token, some_id, writes=True)
        checks["copied cookie"] = {"before": before_logout, "logout": logout.status_code,
                                   "after": after_logout}
        status_after_copy = db.scalar("SELECT status FROM events WHERE id = :i", i=some_id)

    # -- constant-time comparison: a spy on the running code, and the source ---------------
    calls: list[int] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(relay.authentication.hmac, "compare_digest", spy)
    probe = b'{"type": "shared"}'
    outcomes = []
    for headers in ({"X-Extole-Signature": sign(probe, PROD_SECRET)},
                    {"X-Extole-Signature": sign(probe, "nope")},
                    {"Authorization": f"Bearer {PROD_SECRET}"}, {"Authorization": "Bearer nope"},
                    {"Authorization": _basic(PROD_SECRET)}, {"Authorization": _basic("u:nope")}):
        before = len(calls)
        try:
            outcomes.append(authenticate(headers, probe, PROD_SECRET))
        except relay.exceptions.AuthenticationFailed:
            outcomes.append("refused")
        outcomes.append(len(calls) - before)
    monkeypatch.undo()
    source_hits = _secret_comparisons(Path(inspect.getfile(relay.authentication)))
    source_hits += _secret_comparisons(Path(inspect.getfile(relay.admin.auth)))
    timing = _timing(PROD_SECRET)

    # -- concurrent password guesses over both workers (last: it locks this address) -------
    prior = int(db.scalar("SELECT count(*) FROM admin_login_failures WHERE scope = 'address'"))
    burst = _guess_burst(base, guesses=24, threads=8)
    checked = burst.get(401, 0)

    result = audit(db, box, acknowledged)
    result.assert_complete()
    received = box.event_counts()
    events_after = db.scalar("SELECT count(*) FROM events")
    row.sent, row.acknowledged = sent, sum(1 for r in replies if r.status_code == 200) + 1 + len(
        carriers)
    row.delivered, row.dead, row.duplicates = result.delivered, result.dead, len(result.duplicates)
    row.drain_seconds = drain
    row.note(f"{len(refused)} requests with a wrong secret, the other environment's secret, or "
             f"a near miss, in signature, sha256=, Bearer, Basic and user:secret forms: answers "
             f"{sorted(set(refused.values()))}; events stored from them: {stored_from_refused}")
    row.note(f"replay (same bytes ×3, then same id with another body): {checks['replay']}; "
             f"Braze received it {received.get(event['event_id'])} time(s)")
    row.note(f"signature over a re-serialised body (both directions): {resig}; over the exact "
             f"bytes: {good.status_code}")
    row.note("anonymous admin: " + "; ".join(f"{k} → {v[0]}{' ' + v[1] if v[1] else ''}"
                                            for k, v in checks["anonymous"].items()))
    row.note("CSRF: " + "; ".join(f"{k} → {v}" for k, v in csrf.items()))
    row.note(f"session cookie copied while signed in, replayed from another client: before "
             f"sign-out {checks['copied cookie']['before']}; sign-out → "
             f"{checks['copied cookie']['logout']}; after "
             f"{checks['copied cookie']['after']}")
    row.note(f"24 concurrent wrong Basic passwords from one address over 2 workers, "
             f"{prior} earlier failures in the window: answers {dict(sorted(burst.items()))} "
             f"(checked {checked} + earlier {prior} = {checked + prior}; the limit is 10)")
    row.note(f"SQL injection ({len(INJECTIONS)} strings): " + "; ".join(
        f"{k} → {v}" for k, v in checks["injection"].items())
        + f"; exact searches found exactly their carrier event: {not wrong_matches}; slowest "
        f"answer {slowest:.2f} s; events before/after: {total_events}/{events_after}")
    row.note(f"compare_digest calls per authentication (signature ok/bad, bearer ok/bad, basic "
             f"ok/bad): {outcomes[1::2]}; `==` on secrets in the source: {len(source_hits)}; "
             f"in-process timing of a bad signature, wrong first vs last hex digit: {timing}")

    assert all(status == 401 for status in refused.values()), refused
    assert stored_from_refused == 0
    assert [r[0] for r in checks["replay"]] == [200] * 4, checks["replay"]
    assert [r[1] for r in checks["replay"]] == [1, 0, 0, 0], checks["replay"]
    assert [r[2] for r in checks["replay"]] == [0, 1, 1, 1], checks["replay"]
    assert received.get(event["event_id"]) == 1
    assert resig == [401] * 6 and good.status_code == 200, (resig, good.status_code)
    anonymous_status = {k: v[0] for k, v in checks["anonymous"].items()}
    for key, status in anonymous_status.items():
        if key.startswith("GET /admin/api") or key.startswith(("GET /admin/stream",
                                                               "POST /admin/api")):
            assert status == 401, (key, status)
        elif key.startswith("GET /admin"):
            assert status == 302 and "/admin/login" in checks["anonymous"][key][1], (key, status)
        else:
            assert status in (302, 403), (key, status)
    assert all(v == 403 for k, v in csrf.items() if "right token" not in k), csrf
    assert status_after_refusals == "delivered", status_after_refusals
    assert csrf["API right token (retry)"] == 409, csrf
    for key, statuses in checks["injection"].items():
        assert all(s in (200, 400, 404) for s in statuses), (key, statuses)
    assert not wrong_matches, wrong_matches
    assert slowest < 2.5, f"an injected pg_sleep ran? slowest answer {slowest:.2f} s"
    assert events_after == total_events
    assert outcomes[0::2] == ["signature", "refused", "bearer", "refused", "basic", "refused"]
    assert all(n >= 1 for n in outcomes[1::2]), outcomes
    assert not source_hits, source_hits
    copy = checks["copied cookie"]
    assert all(status == 200 for status in copy["before"].values()), copy
    assert copy["logout"] == 302, copy
    assert copy["after"] == {"GET /admin/api/events": 401, "POST /admin/api/replay": 401,
                             f"POST /admin/api/events/{some_id}/replay": 401,
                             "GET /admin/": 302, "GET /admin/stream": 401}, copy
    assert status_after_copy == "delivered", status_after_copy
    assert checked + prior == 10 and burst.get(429, 0) == 24 - checked, (prior, burst)
    assert set(burst) <= {401, 429}, burst
    assert result.dead == 0 and not result.duplicates


def _replay_cookie(base: str, cookie: str, token: str, event_id: int,
                   writes: bool) -> dict[str, int]:
    """What a client holding only a copy of the cookie (and the page's token) gets, each request
    on a new connection so both gunicorn workers answer some. `writes` also tries to requeue
    (only after sign-out: it must be refused, nothing may move)."""
    answers: dict[str, int] = {}
    headers = {"X-CSRF-Token": token, "Connection": "close"}
    with requests.Session() as thief:
        thief.cookies.set("relay_admin", cookie, path="/admin")
        answers["GET /admin/api/events"] = thief.get(f"{base}/admin/api/events", timeout=10,
                                                     headers=headers).status_code
        answers["GET /admin/"] = thief.get(f"{base}/admin/", allow_redirects=False, timeout=10,
                                           headers=headers).status_code
        with thief.get(f"{base}/admin/stream", stream=True, timeout=10,
                       headers=headers) as stream:
            answers["GET /admin/stream"] = stream.status_code
        if writes:
            answers["POST /admin/api/replay"] = thief.post(
                f"{base}/admin/api/replay", json={"status": "delivered"}, timeout=10,
                headers=headers).status_code
            answers[f"POST /admin/api/events/{event_id}/replay"] = thief.post(
                f"{base}/admin/api/events/{event_id}/replay", json={}, timeout=10,
                headers=headers).status_code
    return answers


def _guess_burst(base: str, guesses: int, threads: int) -> Counter[int]:
    """`guesses` wrong Basic passwords for the admin user from `threads` threads at once."""
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def guesser(worker: int) -> None:
        with requests.Session() as http:
            start.wait()
            for n in range(worker, guesses, threads):
                answer = http.get(f"{base}/admin/api/stats", timeout=30,
                                  auth=(ADMIN_USER, f"guess-{worker}-{n}"),
                                  headers={"X-Forwarded-For": f"198.51.100.{n}"})
                with lock:
                    statuses[answer.status_code] += 1

    pool = [threading.Thread(target=guesser, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=120)
    return statuses


def _other_token(base: str) -> str:
    with requests.Session() as other:
        return admin_login(other, base)


def _timing(secret: str, rounds: int = 3000) -> str:
    """Median ns of authenticate() for a wrong signature that differs first vs last (info)."""
    body = b'{"type": "shared", "event_id": "t"}'
    right = sign(body, secret)
    first = ("0" if right[0] != "0" else "1") + right[1:]
    last = right[:-1] + ("0" if right[-1] != "0" else "1")
    samples: dict[str, list[int]] = {"first": [], "last": []}
    for _ in range(rounds):
        for name, value in (("first", first), ("last", last)):
            started = time.perf_counter_ns()
            with contextlib.suppress(relay.exceptions.AuthenticationFailed):
                authenticate({"X-Extole-Signature": value}, body, secret)
            samples[name].append(time.perf_counter_ns() - started)
    return (f"{statistics.median(samples['first']) / 1000:.1f} µs vs "
            f"{statistics.median(samples['last']) / 1000:.1f} µs")
