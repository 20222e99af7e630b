"""Run one mailflow target under load with a tracer attached to ``serve``.

    python -m benchmarks.trace_serve maildir                      # strace -c summary
    python -m benchmarks.trace_serve relay --plugins auto --tracer "perf stat -p"
    python -m benchmarks.trace_serve maildir --tracer "perf record -g -o perf.data -p"

The tracer command gets the server's pid appended; it is stopped with SIGINT
after the load, so summaries (``strace -c``, ``perf stat``) are printed or
written where its own options say (``--tracer ""``: no tracer). Also prints the
server's user and system CPU time per message, in all and per thread (the event
loop's thread is the one a busy server runs out of first), which ``smtp_load``
only reports as a sum.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.sample import MessageFactory
from benchmarks.smtp_client import run_load
from benchmarks.smtp_load import select_plugins
from benchmarks.targets import LOCAL_DOMAIN, RELAY_DOMAIN, MailflowTarget, Sink

SETTLE = 1.0  # seconds for the tracer to attach before the load starts


def user_sys_seconds(stat_path: str) -> tuple[float, float]:
    """User and system CPU seconds from a /proc ``stat`` file (a process or a thread)."""
    fields = Path(stat_path).read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def context_switches(status_path: str) -> int:
    """Voluntary + involuntary context switches from a /proc ``status`` file."""
    total = 0
    for line in Path(status_path).read_text().splitlines():
        if "ctxt_switches:" in line:
            total += int(line.split()[-1])
    return total


def thread_times(pid: int) -> dict[int, tuple[float, float, int]]:
    """User and system CPU seconds and context switches of each thread of ``pid``
    (threads that ended are gone)."""
    times = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        task = f"/proc/{pid}/task/{tid}"
        try:
            user, system = user_sys_seconds(f"{task}/stat")
            times[int(tid)] = (user, system, context_switches(f"{task}/status"))
        except OSError:  # the thread ended in between
            continue
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["maildir", "relay"])
    parser.add_argument("--plugins", default="none")
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--tracer", default="strace -f -c -p", help="command; pid appended")
    parser.add_argument("--what-if", action="append", default=[])
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mailflow-trace-"))
    try:
        trace(args, workdir)
    finally:
        if args.keep:
            print(f"work directory: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def trace(args: argparse.Namespace, workdir: Path) -> None:
    sink = Sink(workdir) if args.mode == "relay" else None
    plugins = select_plugins(args.plugins) if args.plugins != "none" else None
    target = MailflowTarget(workdir, args.mode, plugins, sink=sink, what_ifs=args.what_if)
    target.start()
    assert target.process is not None
    pid = target.process.proc.pid
    tracer = subprocess.Popen([*args.tracer.split(), str(pid)]) if args.tracer else None
    time.sleep(SETTLE)
    rcpt = f"user@{LOCAL_DOMAIN if args.mode == 'maildir' else RELAY_DOMAIN}"
    factory = MessageFactory()
    before = user_sys_seconds(f"/proc/{pid}/stat")
    threads_before = thread_times(pid)
    result = asyncio.run(
        run_load(
            "127.0.0.1", target.port, args.n, args.k, factory.payload, lambda i: ("s@x.org", [rcpt])
        )
    )
    while target.queued():
        time.sleep(0.02)
    after = user_sys_seconds(f"/proc/{pid}/stat")
    threads_after = thread_times(pid)
    if tracer is not None:
        tracer.send_signal(signal.SIGINT)
        tracer.wait()
    target.stop()
    user, system = (after[i] - before[i] for i in (0, 1))
    print(
        f"{args.n} messages, {result.sent} accepted, {result.rate:.0f} msgs/s: "
        f"user {user / args.n * 1000:.3f} ms/msg, sys {system / args.n * 1000:.3f} ms/msg"
    )
    for tid, (user_after, sys_after, switches_after) in sorted(threads_after.items()):
        user0, sys0, switches0 = threads_before.get(tid, (0.0, 0.0, 0))
        user, system = user_after - user0, sys_after - sys0
        if user + system > 0:
            name = "main thread" if tid == pid else f"thread {tid}"
            print(
                f"  {name:14s} user {user / args.n * 1000:.3f} ms/msg, "
                f"sys {system / args.n * 1000:.3f} ms/msg, "
                f"{(switches_after - switches0) / args.n:.1f} context switches/msg"
            )


if __name__ == "__main__":
    main()
