"""SMTP throughput benchmark: mailflow vs. a bare aiosmtpd server, in the same run.

    python -m benchmarks.smtp_load                      # defaults: N=500, K=1,10,50
    python -m benchmarks.smtp_load -n 2000 -k 10 --json
    python -m benchmarks.smtp_load --plugins bayes,attachments --targets bare,maildir+plugins

For each concurrency K it pushes N messages (about ``--size`` bytes, multipart)
over K reused connections to every target and prints messages/s, p50/p99 latency
(MAIL FROM to the reply after DATA) and the ratio to the bare server. Mailflow
targets are then waited on until their queue is empty, giving the delivered count
and the end-to-end rate (accept start to last delivery).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import pstats
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import postfix_source
from benchmarks.postfix_source import run_smtp_source
from benchmarks.sample import DEFAULT_SIZE, MessageFactory, message_template
from benchmarks.smtp_client import run_load
from benchmarks.targets import REPO, BareTarget, MailflowTarget, Sink, Target

DRAIN_TIMEOUT = 60.0  # seconds to wait for a mailflow queue to empty after a load
DRAIN_POLL = 0.02
TARGET_NAMES = ("bare", "maildir", "relay", "maildir+plugins", "relay+plugins")
DEFAULT_TARGETS = "bare,maildir,relay,maildir+plugins"
# The "builtin chain": builtin plugins that work offline, with their settings. SPF and
# DMARC need DNS for every message and are left out; DKIM and ARC only look keys up
# for signed mail, and the test message is unsigned. DNS points at a closed port.
OFFLINE_CHAIN: tuple[dict[str, object], ...] = (
    {"name": "dkim"},
    {"name": "arc"},
    {"name": "bayes"},
    {"name": "rules", "settings": {"files": [str(REPO / "rules" / "content-policy.yaml")]}},
    {"name": "authres"},
)


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
    errors: list[str] = field(default_factory=list)


def wait_drained(target: Target, timeout: float) -> float | None:
    """Seconds until ``target.queued()`` is 0, or None on timeout."""
    start = time.perf_counter()
    while target.queued():
        if time.perf_counter() - start > timeout:
            return None
        time.sleep(DRAIN_POLL)
    return time.perf_counter() - start


def measure(
    target: Target,
    count: int,
    concurrency: int,
    factory: MessageFactory,
    drain_timeout: float,
    message_file: Path | None = None,
) -> Row:
    """One load run against ``target``; with ``message_file``, postfix's smtp-source sends."""
    before = target.delivered()
    cpu_before = target.cpu()
    started = time.perf_counter()
    if message_file is not None:
        sender, recipients = target.addressing(0)
        result = run_smtp_source(
            "127.0.0.1", target.port, count, concurrency, message_file, sender, recipients[0]
        )
    else:
        result = asyncio.run(
            run_load(
                "127.0.0.1", target.port, count, concurrency, factory.payload, target.addressing
            )
        )
    row = Row(
        server=target.name,
        concurrency=concurrency,
        messages=count,
        accepted=result.sent,
        failed=result.failed,
        rate=round(result.rate, 1),
        p50_ms=round(result.percentile(0.50) * 1000, 2) if result.latencies else None,
        p99_ms=round(result.percentile(0.99) * 1000, 2) if result.latencies else None,
        errors=result.errors,
    )
    if before is not None:
        drain = wait_drained(target, drain_timeout)
        after = target.delivered()
        row.delivered = (after or 0) - before
        if drain is not None:
            total = time.perf_counter() - started
            row.drain_s = round(drain, 2)
            row.e2e_rate = round(row.delivered / total, 1) if total > 0 else None
    cpu_after = target.cpu()
    if cpu_before is not None and cpu_after is not None and row.accepted:
        row.cpu_ms = round((cpu_after - cpu_before) * 1000 / row.accepted, 2)
    return row


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


def build_targets(
    names: list[str],
    workdir: Path,
    plugins: list[dict[str, object]],
    profile: Path | None,
    py_spy: Path | None = None,
    what_ifs: list[str] | None = None,
    log_level: str = "INFO",
    relay_pool: int = 8,
) -> list[Target]:
    targets: list[Target] = []
    for spec in names:
        # "maildir@direct-maildir@fast-newlines": a target with what-ifs of its own.
        name, *own_what_ifs = spec.split("@")
        if name not in TARGET_NAMES:
            raise SystemExit(f"unknown target {name!r}; choose from {', '.join(TARGET_NAMES)}")
        mode, _, extra = name.partition("+")
        if mode == "bare":
            targets.append(BareTarget(workdir))
            continue
        chain = plugins if extra == "plugins" else []
        if extra == "plugins" and not chain:
            print(f"skipping {name}: no plugins selected or installed", file=sys.stderr)
            continue
        slug = spec.replace("+", "-").replace("@", "-")
        sink = Sink(workdir / slug) if mode == "relay" else None
        if sink is not None:
            sink.workdir.mkdir(parents=True, exist_ok=True)
        prof = profile / f"{slug}.prof" if profile else None
        spy = py_spy / f"{slug}.txt" if py_spy else None
        targets.append(
            MailflowTarget(
                workdir,
                mode,
                chain,
                sink,
                prof,
                spy,
                [*(what_ifs or []), *own_what_ifs],
                log_level,
                relay_pool,
            )
        )
    return targets


def select_plugins(spec: str) -> list[dict[str, object]]:
    """``auto``: the installed part of :data:`OFFLINE_CHAIN`; ``none``; or names, in order.

    Named plugins get their :data:`OFFLINE_CHAIN` settings when they have any.
    """
    if spec == "none":
        return []
    known = {str(p["name"]): p for p in OFFLINE_CHAIN}
    if spec != "auto":
        names = [n.strip() for n in spec.split(",") if n.strip()]
        return [dict(known.get(n, {"name": n})) for n in names]
    from mailflow.pipeline import available_plugins

    installed = available_plugins()
    return [dict(p) for p in OFFLINE_CHAIN if p["name"] in installed]


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def print_tables(rows: list[Row], out: Any = sys.stdout) -> None:
    for k in sorted({r.concurrency for r in rows}):
        group = [r for r in rows if r.concurrency == k]
        n = group[0].messages
        print(f"\nK={k} connections, {n} messages per server", file=out)
        header = (
            f"{'server':<34} {'msgs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6} "
            f"{'failed':>6} {'delivered':>9} {'e2e/s':>7} {'cpu ms/msg':>10} {'cpu ratio':>9}"
        )
        print(header, file=out)
        print("-" * len(header), file=out)
        for r in group:
            ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
            delivered = "-" if r.delivered is None else str(r.delivered)
            e2e = "-" if r.e2e_rate is None else f"{r.e2e_rate:.0f}"
            if r.delivered is not None and r.drain_s is None:
                e2e = "timeout"
            cpu = "-" if r.cpu_ms is None else f"{r.cpu_ms:.2f}"
            cpu_ratio = "-" if r.cpu_ratio is None else f"{r.cpu_ratio:.2f}"
            p50 = "-" if r.p50_ms is None else f"{r.p50_ms:.2f}"
            p99 = "-" if r.p99_ms is None else f"{r.p99_ms:.2f}"
            print(
                f"{r.server:<34} {r.rate:>8.0f} {p50:>8} {p99:>8} {ratio:>6} "
                f"{r.failed:>6} {delivered:>9} {e2e:>7} {cpu:>10} {cpu_ratio:>9}",
                file=out,
            )
            for err in r.errors[:2]:
                print(f"    error: {err}", file=out)


def print_profile(path: Path, top: int = 25) -> None:
    print(f"\n=== cProfile of {path.name} (top {top} by cumulative, then by own time) ===")
    stats = pstats.Stats(str(path))
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", "--messages", type=int, default=500, help="messages per run")
    p.add_argument("-k", "--concurrency", default="1,10,50", help="comma-separated K values")
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds per K; the median round is reported"
    )
    p.add_argument(
        "--client",
        choices=["python", "smtp-source"],
        default="python",
        help="load generator: this package's client (latencies) or postfix's smtp-source "
        "(C, lighter on a small machine; rates only)",
    )
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="message size in bytes")
    p.add_argument(
        "--targets",
        default=DEFAULT_TARGETS,
        help=f"from: {', '.join(TARGET_NAMES)}; append @WHAT-IF to patch one target only",
    )
    p.add_argument(
        "--plugins",
        default="auto",
        help="plugin chain for +plugins targets: 'auto' (installed offline builtins), "
        "'none', or names, comma-separated",
    )
    p.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--profile", type=Path, help="run mailflow under cProfile; stats go here")
    p.add_argument("--py-spy", type=Path, help="sample mailflow with py-spy; stacks go here")
    p.add_argument(
        "--what-if",
        action="append",
        default=[],
        help="run mailflow with a proposed change patched in: direct-maildir, lean-queue, "
        "fast-newlines, no-fsync (analysis only: no durability); repeatable",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="mailflow's log.level (INFO logs a line per message and per delivery)",
    )
    p.add_argument(
        "--relay-pool",
        type=int,
        default=8,
        help="relay.pool_size for the relay targets (default 8 = queue.workers)",
    )
    p.add_argument("--workdir", type=Path, help="keep servers' files here (default: temp)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start every target, load each at each K, stop everything; return the report."""
    ks = [int(k) for k in str(args.concurrency).split(",") if k.strip()]
    plugins = select_plugins(args.plugins)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mailflow-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for out in (args.profile, args.py_spy):
        if out:
            out.mkdir(parents=True, exist_ok=True)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    targets = build_targets(
        names,
        workdir,
        plugins,
        args.profile,
        args.py_spy,
        args.what_if,
        args.log_level,
        args.relay_pool,
    )
    factory = MessageFactory(args.size, run=f"b{os.getpid()}")
    message_file = None
    if args.client == "smtp-source":
        if not postfix_source.usable():
            raise SystemExit(f"--client smtp-source: {postfix_source.SMTP_SOURCE} not found")
        template = message_template(args.size)
        message_file = postfix_source.write_message(template, workdir / "message.txt")
    rows: list[Row] = []
    all_runs: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        for t in targets:
            t.start()
        for k in ks:
            # Rounds interleave the targets, so a burst of load from other processes
            # on the machine hits all of them rather than one.
            runs: dict[str, list[Row]] = {t.name: [] for t in targets}
            for _ in range(args.repeat):
                for t in targets:
                    runs[t.name].append(
                        measure(t, args.messages, k, factory, args.drain_timeout, message_file)
                    )
            combined = [combine(r) for r in runs.values()]
            set_ratios(combined, [t for t in targets if isinstance(t, BareTarget)])
            rows += combined
            all_runs += [asdict(r) for rs in runs.values() for r in rs]
    finally:
        for t in targets:
            t.stop()
            if isinstance(t, MailflowTarget) and t.sink is not None:
                extra[f"{t.name} sink received (total)"] = t.sink_received
                extra[f"{t.name} sink"] = t.sink.kind
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": machine(),
        "command": " ".join(["python -m benchmarks.smtp_load", *(args.argv or [])]),
        "messages": args.messages,
        "client": args.client,
        "size": factory.size,
        "plugins": [p["name"] for p in plugins],
        "elapsed_s": round(time.perf_counter() - started, 1),
        "repeat": args.repeat,
        "rows": [asdict(r) for r in rows],
        "runs": all_runs if args.repeat > 1 else [],
        **extra,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        m = report["machine"]
        print(
            f"machine: {m['nproc']} x {m['cpu']}, Python {m['python']}, load {m['load_avg']}; "
            f"message {report['size']} bytes; plugins: {', '.join(report['plugins']) or '-'}"
        )
        print_tables([Row(**r) for r in report["rows"]])
        for key, value in report.items():
            if "sink" in key:
                print(f"{key}: {value}")
        print(f"elapsed: {report['elapsed_s']} s")
    if args.profile:
        for path in sorted(args.profile.glob("*.prof")):
            print_profile(path)
    if args.py_spy:
        from benchmarks.stacks import summarise

        for path in sorted(args.py_spy.glob("*.txt")):
            print(summarise(path))


if __name__ == "__main__":
    main()
