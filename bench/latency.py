"""End-to-end latency: from the receiver's 200 to the Braze stand-in receiving the event.

Per run, on a fresh PostgreSQL database: gunicorn with the production settings serves the
receiver; `relay worker` runs as its own process, woken by LISTEN/NOTIFY; the stand-in records
the wall-clock time each event arrives (by `extole_event_id`). An open-loop client posts signed
single-event webhooks at a steady rate (default 200/s) and notes the wall-clock time of each
200. Latency = arrival at the stand-in - 200 at the client (both on this machine's clock; it can
be slightly negative when the worker delivers before the 200 has reached the client).

Usage: python -m bench.latency [--runs 3] [--seconds 20] [--rate 200]
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

from bench import common
from bench.loadgen import run_steady, signed_webhooks


def one_run(rate: float, seconds: float, warmup: float = 3.0) -> dict[str, Any]:
    """`warmup` seconds of the same traffic first (pools, caches), left out of the figures."""
    braze_port, port = common.free_port(), common.free_port()
    run = f"lat-{uuid.uuid4().hex[:6]}"
    skipped = int(rate * warmup)
    count = int(rate * seconds) + skipped
    requests = signed_webhooks(count, run)
    with common.postgres_database() as url, common.standin(braze_port, receipts=True):
        env = common.relay_env(url, f"http://127.0.0.1:{braze_port}")
        with common.gunicorn("relay", "wsgi:app", port, env) as server, \
                common.worker(env) as worker:
            worker.wait_for_output("listening for new events", timeout=60)
            meter = common.CpuMeter(common.process_tree(server.pid) + [worker.pid], url)
            results = run_steady(port, requests, rate)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if common.get_json(braze_port, "/stats")["events"] >= len(results):
                    break
                time.sleep(0.2)
            cpu = meter.stop()
            receipts = common.get_json(braze_port, "/receipts")
    latencies, missing = [], 0
    results = results[skipped:]
    for result in results:
        if result.status != 200:
            continue
        arrived = receipts.get(f"{run}-{result.index}")
        if arrived is None:
            missing += 1
            continue
        latencies.append((arrived - result.answered_at) * 1000)
    errors = sum(1 for r in results if r.status != 200)
    statuses: dict[str, int] = {}
    for result in results:
        statuses[str(result.status)] = statuses.get(str(result.status), 0) + 1
    return {"rate": rate, "seconds": seconds, "sent": len(results), "warmup_sent": skipped,
            "errors": errors,
            "statuses": statuses,
            "delivered": len(latencies), "missing": missing,
            "p50_ms": common.percentile(latencies, 50), "p99_ms": common.percentile(latencies, 99),
            "max_ms": max(latencies) if latencies else None,
            "min_ms": min(latencies) if latencies else None,
            "ingest_p99_ms": common.percentile(
                [r.latency * 1000 for r in results if r.status == 200], 99),
            "load_average": cpu["load_average"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=200.0)
    args = parser.parse_args()
    runs = []
    for index in range(args.runs):
        common.say(f"latency, run {index + 1}/{args.runs}: {args.rate:.0f} events/s for "
                   f"{args.seconds:.0f} s")
        result = one_run(args.rate, args.seconds)
        runs.append(result)
        common.say(f"  p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, max "
                   f"{result['max_ms']:.0f} ms; {result['delivered']} delivered, "
                   f"{result['missing']} missing, {result['errors']} errors, "
                   f"load {result['load_average']:.1f}")
    figures = {"p50_ms": common.summary([r["p50_ms"] for r in runs]),
               "p99_ms": common.summary([r["p99_ms"] for r in runs])}
    common.save("latency", {"database": "postgresql", "rate": args.rate,
                            "seconds": args.seconds, "figures": figures, "runs": runs})


if __name__ == "__main__":
    main()
