"""Delivery benchmark: a backlog of pending events drained into a fast Braze stand-in.

Per run, on a fresh database: N pending production events (default 100,000, each with an
external_id, 4 events per person, interleaved) are generated in SQL, then one `relay worker`
process (production defaults: batch 500, 4 Braze threads, BRAZE_MAX_OBJECTS 75) delivers them to
`bench/standin.py` on 127.0.0.1. Measured: events/s from the worker's start to the moment the
last event is marked delivered in the database, Braze requests/s (against Braze's limit of
1,000/s), objects per request, worker CPU and PostgreSQL CPU per event.

Usage: python -m bench.delivery [--db postgresql|sqlite] [--runs 3] [--events 100000]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import create_engine, text

from bench import common

BRAZE_LIMIT_PER_S = 1000.0  # /users/track: 3,000 requests per 3 seconds
PERSONS_DIVISOR = 4  # events per person


def template(run: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Payload, attributes and properties exactly as the receiver stores a reward event."""
    from relay.eventmap import EventMap
    from relay.extole import normalise

    event = normalise(common.reward_event(0, run), EventMap.load(None), datetime.now(UTC))
    return event.payload, event.attributes, event.properties


def fill(url: str, count: int, start: int = 1, run: str = "bench",
         persons: int | None = None) -> float:
    """Insert `count` pending events numbered from `start` in one SQL statement; seconds taken.

    Event i belongs to person i % persons (default: 4 events per person, interleaved).
    """
    payload, attributes, properties = template(run)
    persons = persons or max(1, count // PERSONS_DIVISOR)
    now = datetime.now(UTC).replace(tzinfo=None)
    params = {"start": start, "stop": start + count - 1, "persons": persons,
              "payload": json.dumps(payload), "attributes": json.dumps(attributes),
              "properties": json.dumps(properties), "now": now, "run": run}
    if url.startswith("postgresql"):
        sql = """
            INSERT INTO events (environment, dedup_key, extole_event_id, extole_type, braze_event,
                                external_id, email, person_key, event_time, payload, attributes,
                                properties, status, attempts, received_at, updated_at)
            SELECT 'production', :run || '-' || i, :run || '-' || i, 'reward_earned',
                   'Earned Reward', 'cust-' || (i % :persons),
                   'person' || (i % :persons) || '@example.com', 'id:cust-' || (i % :persons),
                   CAST(:now AS timestamp) + i * interval '1 millisecond',
                   CAST(:payload AS jsonb) || jsonb_build_object(
                       'event_id', :run || '-' || i, 'partner_user_id', 'cust-' || (i % :persons)),
                   CAST(:attributes AS jsonb) || jsonb_build_object(
                       'email', 'person' || (i % :persons) || '@example.com'),
                   CAST(:properties AS jsonb) || jsonb_build_object(
                       'extole_event_id', :run || '-' || i, 'reward_id', 'rw' || i),
                   'pending', 0, :now, :now
            FROM generate_series(CAST(:start AS bigint), CAST(:stop AS bigint)) AS i"""
    else:
        sql = """
            WITH RECURSIVE seq(i) AS (
                SELECT :start UNION ALL SELECT i + 1 FROM seq WHERE i < :stop)
            INSERT INTO events (environment, dedup_key, extole_event_id, extole_type, braze_event,
                                external_id, email, person_key, event_time, payload, attributes,
                                properties, status, attempts, received_at, updated_at)
            SELECT 'production', :run || '-' || i, :run || '-' || i, 'reward_earned',
                   'Earned Reward', 'cust-' || (i % :persons),
                   'person' || (i % :persons) || '@example.com', 'id:cust-' || (i % :persons),
                   :now,
                   json_patch(:payload, json_object('event_id', :run || '-' || i,
                                                    'partner_user_id', 'cust-' || (i % :persons))),
                   json_patch(:attributes, json_object(
                       'email', 'person' || (i % :persons) || '@example.com')),
                   json_patch(:properties, json_object('extole_event_id', :run || '-' || i,
                                                       'reward_id', 'rw' || i)),
                   'pending', 0, :now, :now
            FROM seq"""
    started = time.perf_counter()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(sql), params)
        # Each pending event's row in the delivery queue, as the receiver writes it.
        connection.execute(text(
            "INSERT INTO delivery_queue (event_id, environment, person_key, event_time, "
            "next_attempt_at) SELECT id, environment, person_key, event_time, received_at "
            "FROM events WHERE status = 'pending' AND NOT EXISTS "
            "(SELECT 1 FROM delivery_queue AS q WHERE q.event_id = events.id)"))
    if url.startswith("postgresql"):
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE events"))
            connection.execute(text("VACUUM ANALYZE delivery_queue"))
    engine.dispose()
    return time.perf_counter() - started


def count_delivered(engine: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(
            text("SELECT count(*) FROM events WHERE status = 'delivered'")).scalar() or 0)


def drain(url: str, count: int, timeout: float, port: int,
          extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one worker until `count` events are delivered (or `timeout`); the measurements."""
    env = common.relay_env(url, f"http://127.0.0.1:{port}", **(extra_env or {}))
    engine = create_engine(url)
    common.post_json(port, "/reset")
    rss: list[float] = []
    with common.worker(env) as worker:
        started = worker.wait_for_output(" started on ", timeout=60)
        meter = common.CpuMeter([worker.pid], url)
        finished = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rss.append(common.rss_mb(worker.pid))
            if worker.process.poll() is not None:
                raise RuntimeError(f"worker exited:\n{worker.output()[-3000:]}")
            # The stand-in's counter until it has seen every event, the database after: counting
            # delivered rows over the whole table five times a second took PostgreSQL about a
            # fifth of the CPU the worker's own statements did, competing with what is measured.
            if (common.get_json(port, "/stats")["events"] >= count
                    and count_delivered(engine) >= count):
                finished = time.time()
                break
            time.sleep(0.1)
        cpu = meter.stop()
        delivered = count_delivered(engine)
        log_lines = worker.output().count("\n")
    engine.dispose()
    stats = common.get_json(port, "/stats")
    seconds = (finished or time.time()) - started
    return {
        "events": count, "delivered": delivered, "complete": finished is not None,
        "seconds": seconds, "events_per_s": delivered / seconds,
        "braze_requests": stats["requests"], "braze_events": stats["events"],
        "braze_requests_per_s": stats["requests"] / seconds,
        "share_of_braze_limit": stats["requests"] / seconds / BRAZE_LIMIT_PER_S,
        "events_per_request": stats["events"] / max(1, stats["requests"]),
        "max_objects_seen": stats["max_objects_seen"], "over_cap": stats["over_cap"],
        "with_external_id": stats["with_external_id"],
        "worker_cpu_ms_per_event": 1000 * cpu["process_cpu_s"] / max(1, delivered),
        "db_cpu_ms_per_event": 1000 * cpu["db_cpu_s"] / max(1, delivered),
        "worker_rss_max_mb": max(rss) if rss else None, "worker_log_lines": log_lines,
        "load_average": cpu["load_average"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    runs = []
    port = common.free_port()
    with common.standin(port):
        for index in range(args.runs):
            with common.database(args.db) as url:
                common.say(f"delivery on {args.db}, run {index + 1}/{args.runs}: "
                           f"filling {args.events} pending events")
                filled = fill(url, args.events)
                result = drain(url, args.events, args.timeout, port)
                result["fill_seconds"] = filled
                runs.append(result)
                common.say(
                    f"  {result['events_per_s']:.0f} events/s ({result['delivered']} in "
                    f"{result['seconds']:.1f} s), {result['braze_requests_per_s']:.0f} Braze "
                    f"requests/s, {result['events_per_request']:.1f} events/request (max "
                    f"{result['max_objects_seen']} objects), worker "
                    f"{result['worker_cpu_ms_per_event']:.3f} ms CPU/event, database "
                    f"{result['db_cpu_ms_per_event']:.3f} ms, load {result['load_average']:.1f}")
    figures = {
        "events_per_s": common.summary([r["events_per_s"] for r in runs]),
        "braze_requests_per_s": common.summary([r["braze_requests_per_s"] for r in runs]),
        "events_per_request": common.summary([r["events_per_request"] for r in runs]),
        "max_objects_seen": max(r["max_objects_seen"] for r in runs),
        "worker_cpu_ms_per_event": common.summary([r["worker_cpu_ms_per_event"] for r in runs]),
    }
    common.save(f"delivery-{args.db}", {"database": args.db, "events": args.events,
                                        "figures": figures, "runs": runs})


if __name__ == "__main__":
    main()
