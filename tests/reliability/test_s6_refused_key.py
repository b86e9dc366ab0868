"""Scenario 6: Braze refuses the production key (401) for 30 s while webhooks keep coming.

Production delivery pauses (a probe every pause, no attempt counted), staging keeps flowing with
its own key, `/readyz` (still 200) and the admin (stats API and page banner) say the production
key is refused, and production resumes by itself once the key works again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
import requests

from tests.reliability.harness import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    PROD_KEY,
    Clients,
    Db,
    Processes,
    admin_login,
    audit,
    make_event,
    post_webhook,
    relay_env,
    run_id,
    wait_drained,
    wait_until,
)
from tests.reliability.report import Row

pytestmark = pytest.mark.reliability

REFUSED_FOR = 30.0
EVERY = 0.5  # one production and one staging event per interval
KEY_PAUSE = 15.0  # relay.delivery.KEY_PAUSE_SECONDS


def _utc(moment: float) -> datetime:
    return datetime.fromtimestamp(moment, UTC).replace(tzinfo=None)


def test_refused_production_key(database: tuple[str, Db], procs: Processes,
                                report: Callable[[int, str], Row]) -> None:
    row = report(6, "Refused production key (401 for 30 s)")
    url, db = database
    tag = run_id()
    box = procs.sandbox()
    env = relay_env(url, box)
    server = procs.server(env, workers=2)
    procs.worker(env)
    acknowledged: dict[str, str] = {}
    auth = (ADMIN_USER, ADMIN_PASSWORD)
    sent = 0

    def post(session: requests.Session, environment: str, name: str, seq: int) -> None:
        nonlocal sent
        event = make_event(f"{tag}-{name}", f"{tag}-{environment}-p{seq % 20}", seq=seq)
        answer = post_webhook(session, server.url, event, environment=environment)
        sent += 1
        assert answer.status == 200 and answer.body["accepted"] == 1, answer
        acknowledged[event["event_id"]] = environment

    def views(session: requests.Session) -> dict[str, object]:
        ready = session.get(server.url + "/readyz", timeout=10)
        stats = session.get(server.url + "/admin/api/stats", auth=auth, timeout=10)
        page = page_session.get(server.url + "/admin/", timeout=10)
        return {"readyz": ready.status_code, "readyz_braze": ready.json().get("braze"),
                "stats": stats.status_code, "stats_braze": stats.json().get("braze"),
                "banner": "Braze refused the production key" in page.text}

    with Clients(1) as clients, requests.Session() as page_session:
        session = clients.session()
        admin_login(page_session, server.url)
        for i in range(10):
            post(session, "production", f"before-p{i}", i)
            post(session, "staging", f"before-s{i}", i)
        wait_drained(db, 60, "the first events to be delivered")
        before = views(session)

        box.faults(reject_keys=[PROD_KEY])
        refused_at = time.time()
        during: dict[str, object] = {}
        i = 0
        while time.time() - refused_at < REFUSED_FOR:
            i += 1
            post(session, "production", f"during-p{i}", 100 + i)
            post(session, "staging", f"during-s{i}", 100 + i)
            if not during and time.time() - refused_at > 5:
                during = wait_until(lambda: (v := views(session))["banner"] and v, 20,
                                    "the admin and /readyz to say the key is refused")
            time.sleep(EVERY)
        box.faults(reject_keys=[])
        healed_at = time.time()
        drain = wait_drained(db, 60, "production to resume by itself")
        resumed = time.time() - healed_at
        after = wait_until(lambda: (v := views(session))["readyz_braze"] == {
            "production": "ok", "staging": "ok"} and v, 20, "the refusal to be cleared")

    result = audit(db, box, acknowledged)
    result.assert_complete()
    rows = db.rows("SELECT environment, extole_event_id, received_at, delivered_at, attempts, "
                   "status FROM events")
    window = (_utc(refused_at + 1.0), _utc(healed_at))
    prod_in_window = [r for r in rows if r.environment == "production" and r.delivered_at
                      and window[0] < r.delivered_at < window[1]]
    staging_during = [r for r in rows if r.environment == "staging"
                      and window[0] < r.received_at < _utc(healed_at - 3)]
    staging_lag = max((r.delivered_at - r.received_at).total_seconds() for r in staging_during)
    prod_attempts = {r.attempts for r in rows if r.environment == "production"}
    requests_log = box.requests_log()
    refusals = [r for r in requests_log if r["status"] == 401]
    resumed_first = min(r.delivered_at for r in rows if r.environment == "production"
                        and r.received_at > window[0])

    row.sent, row.acknowledged = sent, len(acknowledged)
    row.delivered, row.dead, row.duplicates = result.delivered, result.dead, len(result.duplicates)
    row.drain_seconds = drain
    row.note(f"{i} production and {i} staging events posted during the {REFUSED_FOR:.0f} s "
             f"refusal; production delivered meanwhile: {len(prod_in_window)}; Braze answered "
             f"401 {len(refusals)} times (one probe per {KEY_PAUSE:.0f} s pause, no attempt "
             f"counted: production attempts {sorted(prod_attempts)})")
    row.note(f"staging during the refusal: {len(staging_during)} events, slowest delivered "
             f"{staging_lag:.1f} s after receipt")
    row.note(f"during: /readyz {during.get('readyz')} {during.get('readyz_braze')}, "
             f"/admin/api/stats {during.get('stats')} {during.get('stats_braze')}, admin banner "
             f"shown: {during.get('banner')}; after: {after.get('readyz_braze')}, banner shown: "
             f"{after.get('banner')}")
    row.note(f"production resumed by itself: first delivery "
             f"{(resumed_first - _utc(healed_at)).total_seconds():.1f} s and backlog drained "
             f"{resumed:.1f} s after the key worked again")

    assert before["readyz_braze"] == {"production": "ok", "staging": "ok"}, before
    assert during["readyz"] == 200 and during["stats"] == 200, during
    assert during["readyz_braze"] == {"production": "refused", "staging": "ok"}, during
    assert during["stats_braze"] == {"production": "refused", "staging": "ok"}, during
    assert during["banner"] is True and after["banner"] is False, (during, after)
    assert after["stats_braze"] == {"production": "ok", "staging": "ok"}, after
    assert not prod_in_window, "production was delivered while its key was refused"
    assert staging_during and staging_lag < 5.0, staging_lag
    assert prod_attempts == {0}, f"refusals were counted as attempts: {prod_attempts}"
    assert len(refusals) <= REFUSED_FOR / KEY_PAUSE + 3, f"{len(refusals)} probes: no pause"
    assert resumed < KEY_PAUSE + 10
    assert result.dead == 0 and result.delivered == len(acknowledged)
    assert not result.duplicates, result.duplicates
