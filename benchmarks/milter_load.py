"""Postfix alone vs. Postfix + mailflow's milter vs. Postfix + rspamd's milter, one run.

    python -m benchmarks.milter_load                        # N=300, K=1,10,50, 3 rounds
    python -m benchmarks.milter_load -n 500 -k 1,10,50 --repeat 5 --json

postfix's ``smtp-source`` (C) sends N messages over K connections (each connection
reused, ``-d``) to one private Postfix with three SMTP listeners (see
:mod:`benchmarks.milter_stacks`); Postfix relays them to ``smtp-sink``. Every round
runs the three stacks one after the other at each K, so a burst of load from other
processes on the machine hits all of them; the median round per stack is reported,
with the ratios of mailflow to rspamd. Postfix's queue is emptied before every run
(not timed). Needs root, postfix and rspamd.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import milter_stacks, postfix_source
from benchmarks.report import machine
from benchmarks.sample import DEFAULT_SIZE, message_template
from benchmarks.smtp_load import select_plugins

STACKS = ("postfix", "postfix+mailflow", "postfix+rspamd")
SENDER = "alice@example.org"
RECIPIENT = f"bob@{milter_stacks.RELAY_DOMAIN}"
WARM_UP = 20  # messages per stack before the first measured run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", "--messages", type=int, default=300, help="messages per run")
    p.add_argument("-k", "--concurrency", default="1,10,50", help="comma-separated K values")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="message size in bytes")
    p.add_argument(
        "--plugins",
        default="auto",
        help="mailflow's plugin chain: 'auto' (installed offline builtins, as "
        "benchmarks.smtp_load), 'none', or names, comma-separated",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--profile", type=Path, help="run mailflow under cProfile; stats go here")
    p.add_argument(
        "--batch-rounds", type=int, help="mailflow's server.data_batch_rounds (default: 3)"
    )
    p.add_argument("--py-spy", type=Path, help="sample mailflow with py-spy; stacks go here")
    p.add_argument(
        "--mailflow-tree",
        type=Path,
        help="run mailflow from this source tree (e.g. a worktree of an older commit)",
    )
    p.add_argument("--workdir", type=Path, help="keep the servers' files here (default: temp)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    why = milter_stacks.usable()
    if why is not None:
        raise SystemExit(f"benchmarks.milter_load {why}")
    ks = [int(k) for k in str(args.concurrency).split(",") if k.strip()]
    plugins = select_plugins(args.plugins)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mailflow-milter-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # rspamd and postfix run as their own users
    message = postfix_source.write_message(message_template(args.size), workdir / "message.txt")
    mailflow = milter_stacks.MailflowMilter(
        workdir, plugins, args.profile, args.mailflow_tree, args.py_spy
    )
    if args.batch_rounds is not None:
        mailflow.server_settings["data_batch_rounds"] = args.batch_rounds
    stacks = milter_stacks.PostfixStacks(workdir, mailflow)
    runs: list[dict[str, Any]] = []
    load_seen: list[list[float]] = []
    started = time.perf_counter()
    try:
        stacks.start()
        for name in STACKS:  # warm-up, not measured: caches, compiled regexps, processes
            postfix_source.run_smtp_source(
                "127.0.0.1", stacks.ports[name], WARM_UP, 2, message, SENDER, RECIPIENT
            )
        for k in ks:
            for round_no in range(args.repeat):
                for name in STACKS:
                    if not stacks.wait_drained():
                        raise SystemExit("Postfix's queue did not empty; see its maillog")
                    load_seen.append([round(x, 2) for x in os.getloadavg()])
                    cpu_before = stacks.milter_cpu(name)
                    postfix_before = stacks.postfix_cpu()
                    result = postfix_source.run_smtp_source(
                        "127.0.0.1",
                        stacks.ports[name],
                        args.messages,
                        k,
                        message,
                        SENDER,
                        RECIPIENT,
                    )
                    # Postfix's delivery of this run's messages to the sink is included:
                    # the queue is empty before the next run starts.
                    drained = stacks.wait_drained()
                    cpu_ms = per_message(cpu_before, stacks.milter_cpu(name), result.sent)
                    postfix_ms = per_message(postfix_before, stacks.postfix_cpu(), result.sent)
                    runs.append(
                        {
                            "milter_cpu_ms": cpu_ms,
                            "postfix_cpu_ms": postfix_ms if drained else None,
                            "stack": name,
                            "concurrency": k,
                            "round": round_no,
                            "sent": result.sent,
                            "failed": result.failed,
                            "rate": round(result.rate, 1),
                            "errors": result.errors,
                        }
                    )
                    if not args.json:
                        print(
                            f"K={k} round {round_no} {name}: {result.rate:.1f} msgs/s",
                            file=sys.stderr,
                        )
    finally:
        stacks.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": machine(),
        "command": " ".join(["python -m benchmarks.milter_load", *(args.argv or [])]),
        "messages": args.messages,
        "size": args.size,
        "plugins": [p["name"] for p in plugins],
        "repeat": args.repeat,
        "load_avg_during": load_seen,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "medians": medians(runs, ks),
        "runs": runs,
    }


def per_message(before: float | None, after: float | None, count: int) -> float | None:
    if before is None or after is None or not count:
        return None
    return round((after - before) * 1000 / count, 2)


def medians(runs: list[dict[str, Any]], ks: list[int]) -> list[dict[str, Any]]:
    """Per K: each stack's median rate (failed runs count as 0) and mailflow/rspamd."""
    out: list[dict[str, Any]] = []
    for k in ks:
        row: dict[str, Any] = {"concurrency": k}
        for name in STACKS:
            rates = [
                r["rate"] if not r["failed"] else 0.0
                for r in runs
                if r["stack"] == name and r["concurrency"] == k
            ]
            row[name] = round(statistics.median(rates), 1) if rates else None
            row[f"{name} range"] = [min(rates), max(rates)] if rates else None
            for key in ("milter_cpu_ms", "postfix_cpu_ms"):
                cpu = [
                    r[key]
                    for r in runs
                    if r["stack"] == name and r["concurrency"] == k and r[key] is not None
                ]
                row[f"{name} {key}"] = round(statistics.median(cpu), 2) if cpu else None
        mf, rs = row["postfix+mailflow"], row["postfix+rspamd"]
        row["mailflow/rspamd"] = round(mf / rs, 2) if mf and rs else None
        # The same ratio within each round (runs seconds apart), then its median.
        by_round: dict[int, dict[str, float]] = {}
        for r in runs:
            if r["concurrency"] == k:
                by_round.setdefault(r["round"], {})[r["stack"]] = (
                    r["rate"] if not r["failed"] else 0.0
                )
        paired = sorted(
            v["postfix+mailflow"] / v["postfix+rspamd"]
            for v in by_round.values()
            if v.get("postfix+rspamd") and "postfix+mailflow" in v
        )
        row["mailflow/rspamd per round"] = [round(x, 2) for x in paired]
        row["mailflow/rspamd paired median"] = (
            round(statistics.median(paired), 2) if paired else None
        )
        out.append(row)
    return out


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    loads = report["load_avg_during"]
    print(
        f"machine: {m['nproc']} x {m['cpu']}, Python {m['python']}; load average at the "
        f"start of runs: {min(x[0] for x in loads)}-{max(x[0] for x in loads)} (1 min)"
    )
    print(
        f"{report['messages']} messages of {report['size']} bytes per run, "
        f"{report['repeat']} rounds, medians; mailflow plugins: "
        f"{', '.join(report['plugins']) or '-'}"
    )
    header = f"{'K':>3} " + "".join(f"{n:>26}" for n in STACKS) + f"{'mailflow/rspamd':>17}"
    print(header)
    print("-" * len(header))
    for row in report["medians"]:
        cells = ""
        for name in STACKS:
            lo, hi = row[f"{name} range"]
            cells += f"{row[name]:>10} ({lo:>5}-{hi:>5})".rjust(26)
        print(f"{row['concurrency']:>3} {cells}{row['mailflow/rspamd']!s:>17}")
    print("CPU ms per message, medians (Postfix: all its processes, delivery included):")
    for row in report["medians"]:
        cells = "  ".join(
            f"{name}: Postfix {row[f'{name} postfix_cpu_ms']}"
            + (f" + milter {row[f'{name} milter_cpu_ms']}" if name != "postfix" else "")
            for name in STACKS
        )
        print(f"  K={row['concurrency']}: {cells}")
    for row in report["medians"]:
        print(
            f"  K={row['concurrency']}: mailflow/rspamd within each round "
            f"{row['mailflow/rspamd per round']}, median {row['mailflow/rspamd paired median']}"
        )
    failed = [r for r in report["runs"] if r["failed"]]
    for r in failed:
        print(f"FAILED {r['stack']} K={r['concurrency']}: {r['errors']}")
    print(f"elapsed: {report['elapsed_s']} s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    if args.py_spy:
        from benchmarks.stacks import summarise

        print(summarise(args.py_spy), file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
