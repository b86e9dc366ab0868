"""Ingest benchmark: signed single-event webhooks into gunicorn + the receiver.

Per round, on a fresh database, with the production gunicorn settings (`config/gunicorn.conf.py`:
2 gthread workers x 8 threads) on 127.0.0.1:
1. the bare Flask endpoint (`bench/bareapp.py`, 200 without a database) at saturation (wrk);
2. the relay at saturation (wrk): accepted webhooks/s counted in the database afterwards;
3. the relay at a steady rate (default 500 requests/s, open-loop asyncio client): p50/p99.
The ratio relay / bare is taken within each round. Every body is a distinct, HMAC-signed Extole
reward event (`X-Extole-Signature`), so each accepted request commits one new outbox row.

Usage: python -m bench.ingest [--db postgresql|sqlite] [--rounds 3] [--seconds 30]
       [--variant RELAY_GROUP_COMMIT=off] [--variant-revision 0005]  (A/B in the same rounds)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import common
from bench.loadgen import run_steady, signed_webhooks

CONNECTIONS = 32


def write_bodies(path: Path, count: int, run: str) -> None:
    with path.open("w") as out:
        for n in range(count):
            body, signature = common.signed_body(n, run)
            out.write(f"{signature}\t{body.decode()}\n")


def wrk(port: int, bodies: Path, seconds: float, connections: int = CONNECTIONS,
        server: common.Child | None = None, url: str | None = None) -> dict[str, Any]:
    """wrk at saturation; answers its JSON summary (requests, errors, latency, CPU used)."""
    meter = common.CpuMeter(common.process_tree(server.pid), url) if server else None
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s",
            "-s", str(common.BENCH / "signed.lua"), f"http://127.0.0.1:{port}", "--",
            str(bodies), "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120,
                          check=True)
    match = re.search(r"^JSON (.*)$", done.stdout, re.M)
    if not match:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    summary = json.loads(match.group(1))
    summary["seconds"] = summary["duration_us"] / 1e6
    summary["requests_per_s"] = summary["requests"] / summary["seconds"]
    if meter is not None:
        cpu = meter.stop()
        summary["cpu"] = cpu
        # CPU cost per request: what the throughput would be on dedicated cores follows from it.
        summary["server_cpu_ms_per_request"] = 1000 * cpu["process_cpu_s"] / summary["requests"]
        summary["db_cpu_ms_per_request"] = 1000 * cpu["db_cpu_s"] / summary["requests"]
    return summary


def warm_up(port: int, bodies: Path) -> None:
    """A few seconds of load first: connection pools filled, code paths compiled and cached."""
    wrk(port, bodies, 2)


def steady(port: int, rate: float, seconds: float, run: str) -> dict[str, Any]:
    count = int(rate * seconds)
    results = run_steady(port, signed_webhooks(count, run), rate)
    latencies = [r.latency * 1000 for r in results if r.status == 200]
    return {"rate": rate, "sent": count, "answered_200": len(latencies),
            "errors": count - len(latencies),
            "p50_ms": common.percentile(latencies, 50),
            "p99_ms": common.percentile(latencies, 99),
            "max_ms": max(latencies) if latencies else None}


def one_round(kind: str, index: int, bodies: Path, seconds: float, rate: float,
              with_bare: bool, steady_seconds: float,
              variant: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bare Flask, then the relay; with a variant (other settings or schema revision) the relay
    is measured both ways in the round, in alternating order, each on a fresh database, so
    both ratios share the round's bare figure."""
    result: dict[str, Any] = {"round": index}
    if with_bare:
        with common.database(kind) as url:
            port = common.free_port()
            with common.gunicorn("bare", "bench.bareapp:app", port, common.relay_env(url)) as bare:
                warm_up(port, bodies)
                result["bare"] = wrk(port, bodies, seconds, server=bare)
        common.say(f"  bare Flask: {result['bare']['requests_per_s']:.0f} req/s, "
                   f"{result['bare']['server_cpu_ms_per_request']:.2f} ms CPU/request")
    runs: list[tuple[str, dict[str, str], str]] = [("relay", {}, "head")]
    if variant is not None:
        runs.append(("variant", variant["env"], variant["revision"]))
        if index % 2:
            runs.reverse()
    for name, extra_env, revision in runs:
        label = "relay" if name == "relay" else f"variant {variant}"
        result[name] = measure_relay(kind, bodies, seconds, rate, steady_seconds, extra_env,
                                     revision, label)
        if with_bare:
            ratio = result[name]["accepted_per_s"] / result["bare"]["requests_per_s"]
            result[name]["ratio"] = ratio
            common.say(f"  ratio {label}/bare: {ratio:.2f}")
    if with_bare:
        result["ratio"] = result["relay"]["ratio"]
    result["steady"] = result["relay"].pop("steady")
    return result


def measure_relay(kind: str, bodies: Path, seconds: float, rate: float, steady_seconds: float,
                  extra_env: dict[str, str], revision: str, label: str) -> dict[str, Any]:
    """The relay at saturation, then (when saturation allows) at the steady rate."""
    with common.database(kind, revision) as url:
        env = common.relay_env(url, **extra_env)
        port = common.free_port()
        with common.gunicorn("relay", "wsgi:app", port, env) as server:
            warm_up(port, bodies)
            before = common.scalar(url, "SELECT count(*) FROM events")
            sat = wrk(port, bodies, seconds, server=server, url=url)
            accepted = common.scalar(url, "SELECT count(*) FROM events") - before
            sat["accepted"] = accepted
            sat["accepted_per_s"] = accepted / sat["seconds"]
            common.say(f"  {label} saturation: {sat['accepted_per_s']:.0f} accepted/s "
                       f"(p99 {sat['p99_ms']:.1f} ms, {sat['status_errors']} non-2xx), CPU/request "
                       f"{sat['server_cpu_ms_per_request']:.2f} ms relay + "
                       f"{sat['db_cpu_ms_per_request']:.2f} ms database, "
                       f"load {sat['cpu']['load_average']:.1f}")
            time.sleep(2)
            if sat["accepted_per_s"] < rate * 1.1:
                # An open-loop client above the server's capacity only measures its queue.
                sat["steady"] = {"rate": rate, "skipped": "saturation below the rate",
                                 "p50_ms": None, "p99_ms": None, "errors": 0}
                common.say(f"  {label} steady {rate:.0f}/s skipped: saturation is below it")
            else:
                sat["steady"] = steady(port, rate, steady_seconds,
                                       f"steady-{uuid.uuid4().hex[:6]}")
                common.say(f"  {label} steady {rate:.0f}/s: p50 {sat['steady']['p50_ms']:.1f} ms,"
                           f" p99 {sat['steady']['p99_ms']:.1f} ms, "
                           f"{sat['steady']['errors']} errors")
            sat["server_log_tail"] = server.output()[-500:]
    return sat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--steady-seconds", type=float, default=None,
                        help="length of the steady-rate measurement (default: --seconds)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare Flask baseline")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE",
                        help="A/B: also measure the relay with this environment variable set, "
                             "in the same rounds (repeatable: all apply to the variant)")
    parser.add_argument("--variant-revision", default=None, metavar="REV",
                        help="A/B: the variant's database migrated only up to this revision")
    args = parser.parse_args()
    variant = None
    if args.variant or args.variant_revision:
        variant = {"env": dict(pair.split("=", 1) for pair in args.variant),
                   "revision": args.variant_revision or "head"}
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk (make bench does it)")
    rounds = []
    with tempfile.TemporaryDirectory(prefix="relay-bench-ingest-") as directory:
        bodies = Path(directory) / "bodies.txt"
        write_bodies(bodies, int(7000 * args.seconds), uuid.uuid4().hex[:8])
        for index in range(args.rounds):
            common.say(f"ingest on {args.db}, round {index + 1}/{args.rounds}")
            rounds.append(one_round(args.db, index, bodies, args.seconds, args.rate,
                                    not args.no_bare, args.steady_seconds or args.seconds,
                                    variant))
    figures: dict[str, Any] = {
        "saturation_accepted_per_s": common.summary(
            [r["relay"]["accepted_per_s"] for r in rounds]),
        "saturation_p99_ms": common.summary([r["relay"]["p99_ms"] for r in rounds]),
    }
    steady_rounds = [r["steady"] for r in rounds if r["steady"].get("p99_ms") is not None]
    if steady_rounds:
        figures["steady_p50_ms"] = common.summary([r["p50_ms"] for r in steady_rounds])
        figures["steady_p99_ms"] = common.summary([r["p99_ms"] for r in steady_rounds])
    if not args.no_bare:
        figures["bare_per_s"] = common.summary([r["bare"]["requests_per_s"] for r in rounds])
        figures["ratio"] = common.summary([r["ratio"] for r in rounds])
    if variant is not None:
        figures["variant"] = variant
        figures["variant_accepted_per_s"] = common.summary(
            [r["variant"]["accepted_per_s"] for r in rounds])
        if not args.no_bare:
            figures["variant_ratio"] = common.summary([r["variant"]["ratio"] for r in rounds])
        common.say(f"relay ratio median {figures.get('ratio', {}).get('median')}, "
                   f"variant {variant} ratio median "
                   f"{figures.get('variant_ratio', {}).get('median')}")
    common.save(f"ingest-{args.db}", {"database": args.db, "seconds": args.seconds,
                                      "rate": args.rate, "connections": CONNECTIONS,
                                      "figures": figures, "rounds": rounds})


if __name__ == "__main__":
    main()
