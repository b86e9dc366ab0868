"""Ingest benchmark: signed single-event webhooks into gunicorn + the receiver.

Per round, on a fresh database, with the production gunicorn settings (`config/gunicorn.conf.py`:
2 gthread workers x 8 threads) on 127.0.0.1:
1. the bare Flask endpoint (`bench/bareapp.py`, 200 without a database) at saturation (wrk);
2. the relay at saturation (wrk): accepted webhooks/s counted in the database afterwards;
3. the relay at a steady rate (default 500 requests/s, open-loop asyncio client): p50/p99.
The ratio relay / bare is taken within each round. Every body is a distinct, HMAC-signed Extole
reward event (`X-Extole-Signature`), so each accepted request commits one new outbox row.

Usage: python -m bench.ingest [--db postgresql|sqlite] [--rounds 3] [--seconds 30]
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
              with_bare: bool, steady_seconds: float) -> dict[str, Any]:
    result: dict[str, Any] = {"round": index}
    with common.database(kind) as url:
        env = common.relay_env(url)
        if with_bare:
            port = common.free_port()
            with common.gunicorn("bare", "bench.bareapp:app", port, env) as bare:
                warm_up(port, bodies)
                result["bare"] = wrk(port, bodies, seconds, server=bare)
            common.say(f"  bare Flask: {result['bare']['requests_per_s']:.0f} req/s, "
                       f"{result['bare']['server_cpu_ms_per_request']:.2f} ms CPU/request")
        port = common.free_port()
        with common.gunicorn("relay", "wsgi:app", port, env) as server:
            warm_up(port, bodies)
            before = common.scalar(url, "SELECT count(*) FROM events")
            sat = wrk(port, bodies, seconds, server=server, url=url)
            accepted = common.scalar(url, "SELECT count(*) FROM events") - before
            sat["accepted"] = accepted
            sat["accepted_per_s"] = accepted / sat["seconds"]
            result["relay"] = sat
            common.say(f"  relay saturation: {sat['accepted_per_s']:.0f} accepted/s "
                       f"(p99 {sat['p99_ms']:.1f} ms, {sat['status_errors']} non-2xx), CPU/request "
                       f"{sat['server_cpu_ms_per_request']:.2f} ms relay + "
                       f"{sat['db_cpu_ms_per_request']:.2f} ms database, "
                       f"load {sat['cpu']['load_average']:.1f}")
            if with_bare:
                result["ratio"] = sat["accepted_per_s"] / result["bare"]["requests_per_s"]
                common.say(f"  ratio relay/bare: {result['ratio']:.2f}")
            time.sleep(2)
            if sat["accepted_per_s"] < rate * 1.1:
                # An open-loop client above the server's capacity only measures its queue.
                result["steady"] = {"rate": rate, "skipped": "saturation below the rate",
                                    "p50_ms": None, "p99_ms": None, "errors": 0}
                common.say(f"  steady {rate:.0f}/s skipped: saturation is below it")
                result["server_log_tail"] = server.output()[-500:]
                return result
            result["steady"] = steady(port, rate, steady_seconds,
                                      f"steady-{uuid.uuid4().hex[:6]}")
            common.say(f"  relay steady {rate:.0f}/s: p50 {result['steady']['p50_ms']:.1f} ms, "
                       f"p99 {result['steady']['p99_ms']:.1f} ms, "
                       f"{result['steady']['errors']} errors")
            result["server_log_tail"] = server.output()[-500:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--steady-seconds", type=float, default=None,
                        help="length of the steady-rate measurement (default: --seconds)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare Flask baseline")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk (make bench does it)")
    rounds = []
    with tempfile.TemporaryDirectory(prefix="relay-bench-ingest-") as directory:
        bodies = Path(directory) / "bodies.txt"
        write_bodies(bodies, int(7000 * args.seconds), uuid.uuid4().hex[:8])
        for index in range(args.rounds):
            common.say(f"ingest on {args.db}, round {index + 1}/{args.rounds}")
            rounds.append(one_round(args.db, index, bodies, args.seconds, args.rate,
                                    not args.no_bare, args.steady_seconds or args.seconds))
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
    common.save(f"ingest-{args.db}", {"database": args.db, "seconds": args.seconds,
                                      "rate": args.rate, "connections": CONNECTIONS,
                                      "figures": figures, "rounds": rounds})


if __name__ == "__main__":
    main()
