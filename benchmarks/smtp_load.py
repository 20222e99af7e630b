"""SMTP throughput benchmark: mailflow vs. a bare aiosmtpd server, in the same run.

    python -m benchmarks.smtp_load                      # defaults: N=300, K=1,10,50
    python -m benchmarks.smtp_load -n 2000 -k 10 --json
    python -m benchmarks.smtp_load --plugins bayes,rules --targets bare,maildir+plugins

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
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import postfix_source, what_if
from benchmarks.postfix_source import run_smtp_source
from benchmarks.report import (
    Row,
    combine,
    machine,
    print_profile,
    print_tables,
    set_paired_ratios,
    set_ratios,
)
from benchmarks.sample import DEFAULT_SIZE, MessageFactory, message_template
from benchmarks.smtp_client import run_load
from benchmarks.targets import REPO, BareTarget, MailflowTarget, Sink, Target

DRAIN_TIMEOUT = 60.0  # seconds to wait for a mailflow queue to empty after a load
DRAIN_POLL = 0.02
TARGET_NAMES = ("bare", "maildir", "relay", "maildir+plugins", "relay+plugins")
DEFAULT_TARGETS = "bare,maildir,relay,maildir+plugins,relay+plugins"
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
    pipelining: bool = False,
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
                "127.0.0.1",
                target.port,
                count,
                concurrency,
                factory.payload,
                target.addressing,
                pipelining=pipelining,
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
        total = time.perf_counter() - started
        after = target.delivered()
        row.delivered = (after or 0) - before
        if drain is not None:
            row.drain_s = round(drain, 2)
            row.e2e_rate = round(row.delivered / total, 1) if total > 0 else None
    cpu_after = target.cpu()
    if cpu_before is not None and cpu_after is not None and row.accepted:
        row.cpu_ms = round((cpu_after - cpu_before) * 1000 / row.accepted, 2)
    return row


def build_targets(
    names: list[str],
    workdir: Path,
    plugins: list[dict[str, object]],
    profile: Path | None,
    py_spy: Path | None = None,
    what_ifs: list[str] | None = None,
    log_level: str = "INFO",
    relay_pool: int = 8,
    compare_tree: Path | None = None,
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
        for source in [None, compare_tree] if compare_tree else [None]:
            if source is not None and mode == "relay":
                sink = Sink(workdir / f"{slug}-compare")
                sink.workdir.mkdir(parents=True, exist_ok=True)
            targets.append(
                MailflowTarget(
                    workdir,
                    mode,
                    chain,
                    sink,
                    prof if source is None else None,
                    spy if source is None else None,
                    [*(what_ifs or []), *own_what_ifs],
                    log_level,
                    relay_pool,
                    source,
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", "--messages", type=int, default=300, help="messages per run")
    p.add_argument("-k", "--concurrency", default="1,10,50", help="comma-separated K values")
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds per K; the median round is reported"
    )
    p.add_argument(
        "--client",
        choices=["python", "python-pipelining", "smtp-source"],
        default="python",
        help="load generator: this package's client, one command at a time (latencies); "
        "the same with MAIL/RCPT/DATA pipelined as Postfix's SMTP client sends them; or "
        "postfix's smtp-source (C, lighter on a small machine; rates only)",
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
        help=f"run mailflow with a change patched in ({', '.join(what_if.WHAT_IFS)}; "
        "see benchmarks/what_if.py); repeatable",
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
    p.add_argument(
        "--pairing",
        choices=["paired", "interleaved"],
        default="paired",
        help="paired: the bare server runs right before every other target and each "
        "ratio is the median of those pairs (range shown); interleaved: one bare run per "
        "round, ratios of the median rounds",
    )
    p.add_argument("--workdir", type=Path, help="keep servers' files here (default: temp)")
    p.add_argument(
        "--compare-tree",
        type=Path,
        help="also run every mailflow target from this source tree (e.g. `git worktree "
        "add /tmp/old <commit>`), in the same rounds, each paired with its own bare run",
    )
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
        args.compare_tree,
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

            in_order: list[Row] = []  # every run of this K, as they happened

            def load(
                t: Target,
                k: int = k,
                runs: dict[str, list[Row]] = runs,
                in_order: list[Row] = in_order,
            ) -> Row:
                row = measure(
                    t,
                    args.messages,
                    k,
                    factory,
                    args.drain_timeout,
                    message_file,
                    pipelining=args.client == "python-pipelining",
                )
                runs[t.name].append(row)
                in_order.append(row)
                return row

            bare = next((t for t in targets if isinstance(t, BareTarget)), None)
            paired = args.pairing == "paired" and bare is not None and len(targets) > 1
            pairs: dict[str, list[tuple[Row, Row]]] = {}
            for _ in range(args.repeat):
                for t in targets:
                    if not paired:
                        load(t)
                    elif t is not bare:
                        # The bare server right before each target: the ratio compares
                        # two runs seconds apart, not the machine's speed at two times.
                        base = load(bare)
                        pairs.setdefault(t.name, []).append((base, load(t)))
            combined = [combine(r) for r in runs.values()]
            set_ratios(combined, [bare] if bare is not None else [])
            set_paired_ratios(combined, pairs)
            rows += combined
            all_runs += [asdict(r) for r in in_order]
    finally:
        for t in targets:
            t.stop()
            if isinstance(t, MailflowTarget) and t.sink is not None:
                extra[f"{t.name} sink received (total)"] = t.sink_received
                extra[f"{t.name} sink"] = t.sink.kind
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": machine(workdir),
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
        if m.get("workdir_fs"):
            print(f"work directory on: {m['workdir_fs']}")
        if m.get("workdir_fs", "").endswith("(no journal)"):
            print(
                "  (ext4 without a journal: file creation is slower for a few minutes after "
                "many files were deleted; see docs/performance.md)"
            )
        print_tables([Row(**r) for r in report["rows"]])
        for key, value in report.items():
            if "sink" in key:
                print(f"{key}: {value}")
        print(f"elapsed: {report['elapsed_s']} s")
    if args.profile:
        for path in sorted(args.profile.glob("*.prof")):
            print_profile(path, out=sys.stderr if args.json else sys.stdout)
    if args.py_spy:
        from benchmarks.stacks import summarise

        for path in sorted(args.py_spy.glob("*.txt")):
            print(summarise(path), file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
