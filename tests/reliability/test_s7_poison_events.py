"""Scenario 7: Braze refuses some objects of a batch, as a 201 with `errors` and as a 400.

Only the refused events become dead, with Braze's message; every other event of the same
batches is delivered exactly once (the 400 variant is isolated by splitting the batch).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.reliability.harness import (
    Clients,
    Db,
    Processes,
    audit,
    make_event,
    post_webhook,
    relay_env,
    run_id,
    seeded,
    wait_drained,
)
from tests.reliability.report import Row

pytestmark = pytest.mark.reliability

EVENTS_PER_PHASE = 300
REFUSED_PER_PHASE = 12
SEED = 7


def test_poison_events_only_refused_ones_die(procs: Processes, database: tuple[str, Db],
                                             report: Callable[[int, str], Row]) -> None:
    row = report(7, "Poison events (201-with-errors and 400)")
    url, db = database
    rng = seeded(SEED)
    tag = run_id()
    box = procs.sandbox()
    env = relay_env(url, box)
    server = procs.server(env, workers=2)

    phases = {"errors": f"{tag}-a", "400": f"{tag}-b"}
    refused: dict[str, set[str]] = {}
    acknowledged: dict[str, str] = {}
    no_identifier: set[str] = set()
    sent = 0
    drain = 0.0
    worker = None
    with Clients(4) as clients:
        for number, (mode, prefix) in enumerate(phases.items()):
            events = []
            for i in range(EVENTS_PER_PHASE):
                # Some people have several events, some an email (so attributes objects precede
                # the events in the request and Braze's indexes must be mapped per array).
                person = f"{prefix}-p{rng.randrange(EVENTS_PER_PHASE // 2)}"
                events.append(make_event(f"{prefix}-e{i}", person, seq=i, email=i % 3 == 0))
            ids = [e["event_id"] for e in events]
            refused[mode] = set(rng.sample(ids, REFUSED_PER_PHASE))
            # Events without any identifier die before Braze: the other kind of poison.
            for i in range(2):
                lost = make_event(f"{prefix}-noid{i}", "x", seq=i)
                del lost["partner_user_id"]
                events.append(lost)
                no_identifier.add(lost["event_id"])
            box.faults(refuse_mode=mode, refuse_event_ids=sorted(refused[mode]))
            session = clients.session()
            # One request per 100 events: big claims, so poison shares batches with good events.
            for start in range(0, len(events), 100):
                chunk = events[start:start + 100]
                answer = post_webhook(session, server.url, chunk)
                sent += len(chunk)
                assert answer.status == 200, answer
                assert answer.body["accepted"] == len(chunk), answer.body
                acknowledged.update((e["event_id"], "production") for e in chunk)
            if number == 0:
                worker = procs.worker(env)
            started = time.monotonic()
            wait_drained(db, 120, f"phase {mode} to drain")
            drain = max(drain, time.monotonic() - started)
    assert worker is not None and worker.alive(), "the worker died"

    result = audit(db, box, acknowledged)
    result.assert_complete()
    dead = {row_["extole_event_id"] for row_ in result.rows.values() if row_["status"] == "dead"}
    all_refused = refused["errors"] | refused["400"]
    row.sent, row.acknowledged = sent, len(acknowledged)
    row.delivered, row.dead, row.duplicates = result.delivered, result.dead, len(result.duplicates)
    row.drain_seconds = drain
    reasons = {row_["extole_event_id"]: row_["last_error"] for row_ in result.rows.values()
               if row_["status"] == "dead"}
    row.note(f"{REFUSED_PER_PHASE} events refused per variant among {EVENTS_PER_PHASE} "
             f"(+2 without identifier per phase); dead: {len(dead)}, exactly the refused ones: "
             f"{dead == all_refused | no_identifier}")
    sample_201 = next(iter(sorted(refused["errors"])))
    sample_400 = next(iter(sorted(refused["400"])))
    row.note(f"reason (201 with errors): {reasons.get(sample_201)!r}")
    row.note(f"reason (400): {reasons.get(sample_400)!r}")
    split = db.scalar("SELECT count(DISTINCT attempt_id) FROM attempt_events "
                      "WHERE outcome = 'split'")
    row.note(f"Braze requests answered 400 and split to isolate the refused events: {split}")

    assert dead == all_refused | no_identifier, (
        f"dead but not refused: {sorted(dead - all_refused - no_identifier)[:10]}; "
        f"refused but not dead: {sorted((all_refused | no_identifier) - dead)[:10]}")
    for event_id in refused["errors"]:
        assert "refused" in reasons[event_id] and "sandbox fault" in reasons[event_id], (
            event_id, reasons[event_id])
    for event_id in refused["400"]:
        assert "400" in reasons[event_id] and event_id in reasons[event_id], (
            event_id, reasons[event_id])
    for event_id in no_identifier:
        assert reasons[event_id] == "no identifier"
    assert result.delivered == len(acknowledged) - len(dead)
    counts = box.event_counts()
    assert not result.duplicates, f"sent twice: {result.duplicates}"
    assert not [e for e in all_refused if counts.get(e)], "Braze stored a refused event"
