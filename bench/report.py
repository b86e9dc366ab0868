"""Write bench/RESULTS.md from the JSON files the benchmarks leave in bench/results/.

Usage: python -m bench.report
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import BENCH, RESULTS_DIR


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def verdict(value: float | None, target: float | None, higher_is_better: bool) -> str:
    if value is None or target is None:
        return ""
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "**missed**"


def row(label: str, figure: dict[str, Any] | None, target: float | None, higher: bool,
        unit: str = "", digits: int = 0, target_text: str | None = None) -> str:
    if figure is None:
        return f"| {label} | {target_text or ''} | – | – | – | – | |"
    shown = target_text or ("" if target is None else
                            f"{'≥' if higher else '≤'} {fmt(target, digits)}{unit}")
    return (f"| {label} | {shown} | {fmt(figure['median'], digits)}{unit} | "
            f"{fmt(figure['min'], digits)}{unit} | {fmt(figure['max'], digits)}{unit} | "
            f"{figure['runs']} | {verdict(figure['median'], target, higher)} |")


HEAD = "| figure | target | median | min | max | runs | |\n|---|---|---|---|---|---|---|"


def machine_line(data: dict[str, Any]) -> str:
    m = data["machine"]
    database = data.get("database", "postgresql")
    version = m["postgresql"] if database == "postgresql" else m["sqlite"]
    return (f"Machine: {m['cores']} cores, {database} {version}, Python {m['python']}; "
            f"{m['date']}; load average before the run {m['load_before']:.1f}.")


def ingest(lines: list[str], database: str) -> None:
    data = load(f"ingest-{database}")
    lines.append(f"### Ingest on {'PostgreSQL' if database == 'postgresql' else 'SQLite'}\n")
    if data is None:
        lines.append("Not run.\n")
        return
    f = data["figures"]
    lines.append(f"gunicorn `config/gunicorn.conf.py` (2 gthread workers x 8 threads), signed "
                 f"single-event webhooks, {data['seconds']:.0f} s per measurement, wrk with "
                 f"{data['connections']} connections at saturation, an open-loop client at "
                 f"{data['rate']:.0f} requests/s for the steady latency.\n")
    lines.append(HEAD)
    lines.append(row("accepted webhooks/s at saturation", f["saturation_accepted_per_s"],
                     2000, True, "/s"))
    if "steady_p99_ms" in f:
        lines.append(row(f"p99 latency at {data['rate']:.0f} requests/s", f["steady_p99_ms"], 25,
                         False, " ms", 1))
        lines.append(row(f"p50 latency at {data['rate']:.0f} requests/s", f["steady_p50_ms"],
                         None, False, " ms", 1))
    else:
        lines.append(f"| p99 latency at {data['rate']:.0f} requests/s | ≤ 25.0 ms | not "
                     "measured: saturation is below this rate | | | | |")
    if "ratio" in f:
        lines.append(row("ratio to bare Flask 200 (same run)", f["ratio"], 0.5, True, "", 2))
        lines.append(row("bare Flask 200 requests/s", f["bare_per_s"], None, True, "/s"))
    cpu = [r["relay"].get("server_cpu_ms_per_request") for r in data["rounds"]]
    db = [r["relay"].get("db_cpu_ms_per_request") for r in data["rounds"]]
    if all(c is not None for c in cpu):
        lines.append(f"| relay CPU per webhook (gunicorn processes) | | "
                     f"{fmt(sorted(cpu)[len(cpu) // 2], 2)} ms | {fmt(min(cpu), 2)} ms | "
                     f"{fmt(max(cpu), 2)} ms | {len(cpu)} | |")
    if database == "postgresql" and all(c is not None for c in db):
        lines.append(f"| PostgreSQL CPU per webhook | | {fmt(sorted(db)[len(db) // 2], 2)} ms | "
                     f"{fmt(min(db), 2)} ms | {fmt(max(db), 2)} ms | {len(db)} | |")
    if database == "postgresql" and all(c is not None for c in cpu + db):
        per_request = sorted(c + d for c, d in zip(cpu, db, strict=True))[len(cpu) // 2]
        cores = data["machine"]["cores"]
        lines.append(f"| CPU-bound ceiling on {cores} dedicated cores "
                     f"({cores} s / CPU per webhook) | | {1000 * cores / per_request:,.0f}/s "
                     "| | | | |")
    bare_cpu = [r["bare"].get("server_cpu_ms_per_request") for r in data["rounds"]
                if "bare" in r]
    if bare_cpu and all(c is not None for c in bare_cpu):
        lines.append(f"| bare Flask CPU per request | | "
                     f"{fmt(sorted(bare_cpu)[len(bare_cpu) // 2], 2)} ms | "
                     f"{fmt(min(bare_cpu), 2)} ms | {fmt(max(bare_cpu), 2)} ms | "
                     f"{len(bare_cpu)} | |")
    lines.append("")
    lines.append(machine_line(data) + "\n")


def delivery(lines: list[str], database: str) -> None:
    data = load(f"delivery-{database}")
    lines.append(f"### Delivery on {'PostgreSQL' if database == 'postgresql' else 'SQLite'}\n")
    if data is None:
        lines.append("Not run.\n")
        return
    f = data["figures"]
    from relay.settings import Settings

    defaults = Settings()
    lines.append(f"{data['events']:,} pending events (external_id, 4 per person) drained by one "
                 f"`relay worker` (defaults: batch {defaults.worker_batch_size}, "
                 f"{defaults.worker_threads} Braze threads, {defaults.braze_max_objects} objects "
                 "per request) into the stand-in; from the worker's start to the last event "
                 "marked delivered.\n")
    lines.append(HEAD)
    lines.append(row("events delivered/s", f["events_per_s"], 5000, True, "/s"))
    lines.append(row("Braze /users/track requests/s", f["braze_requests_per_s"], None, True,
                     "/s", 0, "Braze allows 1,000/s"))
    lines.append(row("events per request", f["events_per_request"], None, True, "", 1))
    lines.append(row("worker CPU per event", f["worker_cpu_ms_per_event"], None, False, " ms",
                     3))
    db_cpu = sorted(r["db_cpu_ms_per_event"] for r in data["runs"])
    worker_cpu = sorted(r["worker_cpu_ms_per_event"] for r in data["runs"])
    if database == "postgresql":
        lines.append(f"| PostgreSQL CPU per event | | {db_cpu[len(db_cpu) // 2]:.3f} ms | "
                     f"{db_cpu[0]:.3f} ms | {db_cpu[-1]:.3f} ms | {len(db_cpu)} | |")
        per_event = worker_cpu[len(worker_cpu) // 2] + db_cpu[len(db_cpu) // 2]
        cores = data["machine"]["cores"]
        lines.append(f"| CPU-bound ceiling on {cores} dedicated cores | | "
                     f"{1000 * cores / per_event:,.0f}/s | | | | |")
    most = f["max_objects_seen"]
    lines.append(f"| most objects in one request | ≤ 75 | {most} | | | | "
                 f"{'met' if most <= 75 else '**missed**'} |")
    share = f["braze_requests_per_s"]["median"] / 1000
    lines.append("")
    partial = [r for r in data["runs"] if not r.get("complete", True)]
    if partial:
        lines.append(f"{len(partial)} of {len(data['runs'])} runs reached the time limit before "
                     "the last event: their rate is the events delivered over the time run.\n")
    lines.append(f"At the median rate the relay uses {share:.0%} of Braze's 1,000 requests/s "
                 f"for /users/track.\n")
    lines.append(machine_line(data) + "\n")


def latency(lines: list[str]) -> None:
    data = load("latency")
    lines.append("## 3. Latency end to end\n")
    if data is None:
        lines.append("Not run.\n")
        return
    f = data["figures"]
    lines.append(f"{data['rate']:.0f} events/s for {data['seconds']:.0f} s per run (after a 3 s "
                 "warm-up), gunicorn receiver + `relay worker` in its own process woken by "
                 "LISTEN/NOTIFY, PostgreSQL; from the 200 at the client to the event's arrival "
                 "at the Braze stand-in.\n")
    lines.append(HEAD)
    lines.append(row("p50", f["p50_ms"], 200, False, " ms"))
    lines.append(row("p99", f["p99_ms"], 1000, False, " ms"))
    lost = sum(r["missing"] for r in data["runs"])
    errors = sum(r["errors"] for r in data["runs"])
    lines.append("")
    lines.append(f"Events acknowledged but not delivered within 30 s: {lost}; non-200 answers: "
                 f"{errors}.\n")
    lines.append(machine_line(data) + "\n")


def backlog(lines: list[str]) -> None:
    data = load("backlog")
    lines.append("## 4. Scale of the backlog\n")
    if data is None:
        lines.append("Not run.\n")
        return
    s, big, d = data["small"], data["large"], data["drain"]
    lines.append(f"PostgreSQL, pending events generated in SQL; medians of {data['cycles']} "
                 "claim-and-mark cycles (claim_due 500 + mark_delivered) and of 30 first pages "
                 "(`outbox.list_events`, 50 rows, with `event_json`).\n")
    lines.append(f"| figure | {data['rows_small']:,} rows | {data['rows_large']:,} rows | "
                 "ratio | target | |\n|---|---|---|---|---|---|")
    for label, key in (("claim-and-mark cycle", "cycle_ms"), ("  claim", "claim_ms"),
                       ("  mark delivered", "mark_ms"), ("admin first page", "first_page_ms"),
                       ("admin first page, status=pending", "first_page_pending_ms")):
        ratio = big[key] / s[key]
        target = "≤ 2x" if label.strip() in ("claim-and-mark cycle", "admin first page") else ""
        met = ("met" if ratio <= 2 else "**missed**") if target else ""
        lines.append(f"| {label} | {s[key]:.1f} ms | {big[key]:.1f} ms | {ratio:.2f}x | "
                     f"{target} | {met} |")
    lines.append("")
    lines.append(f"| worker while draining the {data['rows_large']:,}-row backlog | value | "
                 "target | |\n|---|---|---|---|")
    lines.append(f"| resident memory, max | {d['rss_max_mb']:.0f} MB | ≤ 150 MB | "
                 f"{'met' if d['rss_max_mb'] <= 150 else '**missed**'} |")
    lines.append(f"| events delivered in {d['seconds']:.0f} s | {d['delivered']:,} "
                 f"({d['events_per_s']:,.0f}/s) | | |")
    lines.append("")
    lines.append(machine_line(data) + "\n")


def main() -> None:
    lines = ["# Benchmark results\n",
             "Written by `make bench` (`python -m bench.report`) from `bench/results/*.json`; "
             "method, causes and limits in `bench/README.md`. Medians of several runs; ratios "
             "are taken within one run. The machine is shared: the load average before each "
             "benchmark is shown with it.\n",
             "## 1. Ingest\n"]
    ingest(lines, "postgresql")
    ingest(lines, "sqlite")
    lines.append("## 2. Delivery\n")
    delivery(lines, "postgresql")
    delivery(lines, "sqlite")
    latency(lines)
    backlog(lines)
    path: Path = BENCH / "RESULTS.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
