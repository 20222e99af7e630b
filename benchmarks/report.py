"""Benchmark rows: how rounds are combined, the ratios, and the printed tables."""

from __future__ import annotations

import os
import platform
import pstats
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.targets import Target


@dataclass
class Row:
    """One (target, K) measurement."""

    server: str
    concurrency: int
    messages: int
    accepted: int
    failed: int
    rate: float  # accepted messages per second
    p50_ms: float | None  # None: the client measured no latencies (smtp-source)
    p99_ms: float | None
    ratio: float | None = None  # rate / bare rate at the same K
    delivered: int | None = None
    e2e_rate: float | None = None  # delivered per second, from load start to empty queue
    drain_s: float | None = None  # seconds after the load until the queue was empty
    cpu_ms: float | None = None  # server CPU per accepted message (all threads, to drained)
    cpu_ratio: float | None = None  # bare cpu_ms / cpu_ms: the ratio if both were CPU-bound
    ratio_low: float | None = None  # paired runs: the lowest and highest per-pair ratio
    ratio_high: float | None = None
    errors: list[str] = field(default_factory=list)


def combine(runs: list[Row]) -> Row:
    """The median run of a target (by rate); counts are summed over all runs."""
    if len(runs) == 1:
        return runs[0]
    ordered = sorted(runs, key=lambda r: r.rate)
    median = ordered[len(ordered) // 2]
    cpus = sorted(r.cpu_ms for r in runs if r.cpu_ms is not None)
    return Row(
        server=median.server,
        concurrency=median.concurrency,
        messages=sum(r.messages for r in runs),
        accepted=sum(r.accepted for r in runs),
        failed=sum(r.failed for r in runs),
        rate=median.rate,
        p50_ms=median.p50_ms,
        p99_ms=median.p99_ms,
        delivered=None if median.delivered is None else sum(r.delivered or 0 for r in runs),
        e2e_rate=median.e2e_rate,
        drain_s=median.drain_s,
        cpu_ms=cpus[len(cpus) // 2] if cpus else None,
        errors=[e for r in runs for e in r.errors][:5],
    )


def set_ratios(rows: list[Row], bare: list[Target]) -> None:
    """Throughput ratio and CPU ratio (bare CPU per message / this CPU per message)."""
    base = next((r for r in rows if bare and r.server == bare[0].name), None)
    if base is None:
        return
    for r in rows:
        if base.rate:
            r.ratio = round(r.rate / base.rate, 3)
        if base.cpu_ms and r.cpu_ms:
            r.cpu_ratio = round(base.cpu_ms / r.cpu_ms, 3)


def set_paired_ratios(rows: list[Row], pairs: dict[str, list[tuple[Row, Row]]]) -> None:
    """Ratios from (bare run, target run) pairs measured back to back: the median pair
    (and the range over pairs) instead of the ratio of two medians taken at different
    times. Rows without pairs keep their ratios."""
    for r in rows:
        runs = pairs.get(r.server)
        if not runs:
            continue
        ratios = sorted(t.rate / b.rate for b, t in runs if b.rate)
        if ratios:
            r.ratio = round(ratios[len(ratios) // 2], 3)
            r.ratio_low, r.ratio_high = round(ratios[0], 3), round(ratios[-1], 3)
        cpu = sorted(b.cpu_ms / t.cpu_ms for b, t in runs if b.cpu_ms and t.cpu_ms)
        if cpu:
            r.cpu_ratio = round(cpu[len(cpu) // 2], 3)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def file_system(path: Path) -> str:
    """The file system ``path`` is on, e.g. ``ext4 /dev/vda (no journal)`` (Linux; else "").

    Worth printing with the figures: on ext4 without a journal, creating a file
    skips every inode freed in the last one to five minutes (the kernel's
    ``recently_deleted`` check), so Maildir delivery slows down for minutes after
    many files were deleted (a previous run's work directory, a test suite).
    """
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    target = os.path.realpath(path)
    best: tuple[str, str, str] | None = None  # mount point, type, device
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fields[sep + 1], fields[sep + 2])
    if best is None:
        return ""
    _, fs_type, device = best
    described = f"{fs_type} {device}"
    if fs_type == "ext4":
        name = os.path.basename(device)
        journal = Path("/proc/fs/jbd2").is_dir() and any(
            entry.name.startswith(f"{name}-") for entry in Path("/proc/fs/jbd2").iterdir()
        )
        described += "" if journal else " (no journal)"
    return described


def machine(workdir: Path | None = None) -> dict[str, Any]:
    description = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model() or platform.processor(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    if workdir is not None:
        description["workdir_fs"] = file_system(workdir)
    return description


def print_tables(rows: list[Row], out: Any = sys.stdout) -> None:
    for k in sorted({r.concurrency for r in rows}):
        group = [r for r in rows if r.concurrency == k]
        counts = sorted({r.messages for r in group})
        line = f"\nK={k} connections, {counts[0]} messages per server"
        if len(counts) > 1:  # paired runs: the bare server ran once before each target
            line += f" ({counts[-1]} for the bare server, one run before each target)"
        print(line, file=out)
        header = (
            f"{'server':<34} {'msgs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6} "
            f"{'range':>10} {'failed':>6} {'delivered':>9} {'e2e/s':>7} {'cpu ms/msg':>10} "
            f"{'cpu ratio':>9}"
        )
        print(header, file=out)
        print("-" * len(header), file=out)
        for r in group:
            ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
            spread = "-"
            if r.ratio_low is not None and r.ratio_high is not None:
                spread = f"{r.ratio_low:.2f}-{r.ratio_high:.2f}"
            delivered = "-" if r.delivered is None else str(r.delivered)
            e2e = "-" if r.e2e_rate is None else f"{r.e2e_rate:.0f}"
            if r.delivered is not None and r.drain_s is None:
                e2e = "timeout"
            cpu = "-" if r.cpu_ms is None else f"{r.cpu_ms:.2f}"
            cpu_ratio = "-" if r.cpu_ratio is None else f"{r.cpu_ratio:.2f}"
            p50 = "-" if r.p50_ms is None else f"{r.p50_ms:.2f}"
            p99 = "-" if r.p99_ms is None else f"{r.p99_ms:.2f}"
            print(
                f"{r.server:<34} {r.rate:>8.0f} {p50:>8} {p99:>8} {ratio:>6} {spread:>10} "
                f"{r.failed:>6} {delivered:>9} {e2e:>7} {cpu:>10} {cpu_ratio:>9}",
                file=out,
            )
            for err in r.errors[:2]:
                print(f"    error: {err}", file=out)


def print_profile(path: Path, top: int = 25, out: Any = sys.stdout) -> None:
    print(
        f"\n=== cProfile of {path.name} (top {top} by cumulative, then by own time) ===", file=out
    )
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
