"""The reliability report: one row per scenario, written to REPORT.md by `make reliability`.

Each scenario fills a `Row` as it measures; the conftest adds pass/fail and writes the file at the
end of the session when RELAY_RELIABILITY_REPORT names it (so a single scenario run by hand does
not overwrite the committed report).
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPORT_ENV = "RELAY_RELIABILITY_REPORT"


@dataclass
class Row:
    number: int
    title: str
    sent: int | None = None
    acknowledged: int | None = None
    delivered: int | None = None
    dead: int | None = None
    duplicates: int | None = None
    drain_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    outcome: str = "not run"
    failure: str | None = None
    duration: float = 0.0

    def note(self, text: str) -> None:
        self.notes.append(text)


ROWS: dict[int, Row] = {}


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = next(int(line.split()[1]) // 1024 for line in
                      Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        memory = 0
    return (f"{platform.node()}: {os.cpu_count()} CPU ({cpu or platform.machine()}), "
            f"{memory} MiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def _postgres_version() -> str:
    try:
        done = subprocess.run(["psql", "--version"], capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).parent)
        return done.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip()
                                      else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def render(rows: list[Row], total_seconds: float) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reliability report",
        "",
        "Written by `make reliability` (tests/reliability): each scenario runs real processes",
        "(gunicorn `relay serve`, `relay worker`, `relay sandbox`, PostgreSQL) on 127.0.0.1 and",
        "breaks something. \"Events sent\" counts events posted, every copy and every refused",
        "attempt included (scenario 8: requests); \"Acknowledged\" counts those answered 2xx (a",
        "duplicate copy is acknowledged too; scenario 8: the events its 200 answers accepted).",
        "Every acknowledged event must end delivered (Braze received it) or dead with a reason.",
        "\"Duplicates at Braze\" counts Extole event ids the sandbox received more often than",
        "they were sent.",
        "",
        f"- Date: {now}",
        f"- Machine: {_machine()}",
        f"- PostgreSQL: {_postgres_version()}",
        f"- Commit: {_commit()}",
        f"- Total time: {total_seconds / 60:.1f} min",
        "",
        "| # | Scenario | Events sent | Acknowledged | Delivered | Dead | Duplicates at Braze "
        "| Time to drain (s) | Result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.number} | {row.title} | {_cell(row.sent)} | {_cell(row.acknowledged)} | "
            f"{_cell(row.delivered)} | {_cell(row.dead)} | {_cell(row.duplicates)} | "
            f"{_cell(row.drain_seconds)} | {row.outcome} ({row.duration:.0f} s) |")
    lines += ["", "## Measurements and notes", ""]
    for row in rows:
        lines.append(f"### {row.number}. {row.title} — {row.outcome}")
        lines.append("")
        for note in row.notes:
            lines.append(f"- {note}")
        if row.failure:
            lines.append("")
            lines.append("Failure:")
            lines.append("")
            lines.append("```")
            lines.extend(row.failure.splitlines()[:40])
            lines.append("```")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write(path: Path, total_seconds: float) -> None:
    rows = [ROWS[n] for n in sorted(ROWS)]
    if rows:
        path.write_text(render(rows, total_seconds))
