"""Backlog scale: claim-and-mark cycle and the admin's first page at 10,000 and 1,000,000 rows.

On a fresh PostgreSQL database, pending events are generated in SQL (`INSERT ... SELECT
generate_series`, 250,000 persons). At 10,000 rows and again after growing the table to
1,000,000 rows, the benchmark times, in this process:
- one claim-and-mark cycle as the worker runs it: `outbox.leases.claim_due` (500 events, lease)
  in one transaction, then `outbox.leases.mark_delivered` for them in another;
- the admin's first page: `outbox.queries.list_events(limit=50)` (all events, newest first) and
  the same filtered on `status=pending`, each with `event_json` for every row as the page renders
  it.
Then a `relay worker` drains the 1M backlog into the Braze stand-in for a bounded time while its
resident memory is sampled.

Usage: python -m bench.backlog [--rows 1000000] [--small 10000] [--cycles 10] [--drain 60]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from sqlalchemy import create_engine

from bench import common
from bench.delivery import count_delivered, fill

PERSONS = 250_000


def timings(url: str, cycles: int, pages: int) -> dict[str, Any]:
    from relay.db import Database
    from relay.outbox.filters import EventFilter
    from relay.outbox.leases import claim_due, mark_delivered
    from relay.outbox.queries import event_json, list_events

    db = Database(url)
    claim_ms, mark_ms, cycle_ms = [], [], []
    for _ in range(cycles):
        t0 = time.perf_counter()
        with db.session() as session:
            events = claim_due(session, "bench", environments=["production"], limit=500,
                               lease_seconds=120)
        t1 = time.perf_counter()
        with db.session() as session:
            mark_delivered(session, "bench", events,
                           {e.id: {"external_id": e.external_id} for e in events})
        t2 = time.perf_counter()
        if len(events) != 500:
            raise RuntimeError(f"claimed {len(events)} events, expected 500")
        claim_ms.append((t1 - t0) * 1000)
        mark_ms.append((t2 - t1) * 1000)
        cycle_ms.append((t2 - t0) * 1000)
    page_ms: dict[str, list[float]] = {"all": [], "pending": []}
    for _ in range(pages):
        for name, status in (("all", None), ("pending", "pending")):
            t0 = time.perf_counter()
            with db.session() as session:
                events, _cursor = list_events(session, EventFilter(status=status), limit=50)
                [event_json(e) for e in events]
            page_ms[name].append((time.perf_counter() - t0) * 1000)
    db.dispose()
    return {
        "cycle_ms": statistics.median(cycle_ms), "claim_ms": statistics.median(claim_ms),
        "mark_ms": statistics.median(mark_ms), "cycle_ms_all": cycle_ms,
        "first_page_ms": statistics.median(page_ms["all"]),
        "first_page_pending_ms": statistics.median(page_ms["pending"]),
    }


def drain_memory(url: str, seconds: float) -> dict[str, Any]:
    port = common.free_port()
    engine = create_engine(url)
    before = count_delivered(engine)
    rss: list[float] = []
    with common.standin(port), common.worker(
            common.relay_env(url, f"http://127.0.0.1:{port}")) as worker:
        started = worker.wait_for_output(" started on ", timeout=60)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and worker.process.poll() is None:
            rss.append(common.rss_mb(worker.pid))
            time.sleep(0.5)
        elapsed = time.time() - started
    delivered = count_delivered(engine) - before
    engine.dispose()
    return {"seconds": elapsed, "delivered": delivered, "events_per_s": delivered / elapsed,
            "rss_max_mb": max(rss), "rss_first_mb": rss[0] if rss else None,
            "rss_last_mb": rss[-1] if rss else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--pages", type=int, default=30)
    parser.add_argument("--drain", type=float, default=60.0,
                        help="seconds the worker drains the big backlog while RSS is sampled")
    args = parser.parse_args()
    result: dict[str, Any] = {"rows_small": args.small, "rows_large": args.rows,
                              "cycles": args.cycles}
    with common.postgres_database() as url:
        common.say(f"backlog: {args.small} pending events")
        result["fill_small_s"] = fill(url, args.small, persons=PERSONS)
        # Each cycle takes 500 events off the backlog: keep enough for every cycle.
        if args.small < args.cycles * 500 * 2:
            raise SystemExit("--small must hold at least 2 x cycles x 500 events")
        small = timings(url, args.cycles, args.pages)
        common.say(f"  cycle {small['cycle_ms']:.1f} ms (claim {small['claim_ms']:.1f}, mark "
                   f"{small['mark_ms']:.1f}), first page {small['first_page_ms']:.2f} ms, "
                   f"pending page {small['first_page_pending_ms']:.2f} ms")
        common.say(f"backlog: growing to {args.rows} rows")
        result["fill_large_s"] = fill(url, args.rows - args.small, start=args.small + 1,
                                      persons=PERSONS)
        large = timings(url, args.cycles, args.pages)
        common.say(f"  cycle {large['cycle_ms']:.1f} ms (claim {large['claim_ms']:.1f}, mark "
                   f"{large['mark_ms']:.1f}), first page {large['first_page_ms']:.2f} ms, "
                   f"pending page {large['first_page_pending_ms']:.2f} ms")
        common.say(f"backlog: worker draining {args.rows} rows for {args.drain:.0f} s")
        memory = drain_memory(url, args.drain)
        common.say(f"  worker RSS max {memory['rss_max_mb']:.0f} MB, "
                   f"{memory['delivered']} delivered ({memory['events_per_s']:.0f}/s)")
    result.update(small=small, large=large, drain=memory, figures={
        "cycle_ratio": large["cycle_ms"] / small["cycle_ms"],
        "first_page_ratio": large["first_page_ms"] / small["first_page_ms"],
        "first_page_pending_ratio": large["first_page_pending_ms"]
        / small["first_page_pending_ms"],
        "worker_rss_max_mb": memory["rss_max_mb"],
    })
    common.say(f"  ratios 1M/10k: cycle {result['figures']['cycle_ratio']:.2f}, first page "
               f"{result['figures']['first_page_ratio']:.2f}")
    common.save("backlog", result)


if __name__ == "__main__":
    main()
