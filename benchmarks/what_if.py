"""Measure a proposed core change before making it: patch it into ``serve`` at start-up.

These are prototypes of the changes recommended in docs/performance.md, applied by
:mod:`benchmarks.run_serve` ``--what-if NAME`` and selected in the harness with
``python -m benchmarks.smtp_load --what-if NAME``. They exist to put a number on a
recommendation; none of them is meant to ship from here.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any


def direct_maildir() -> None:
    """Local-only messages go straight into the Maildir before the 250, not via the spool.

    Same durability promise (files and directories fsync'd before the reply), one
    fsync'd file per copy instead of three, and no queue round trip. Copies that
    fail (quota, I/O) are spooled for the queue to retry or bounce; messages with
    any non-Maildir route take the spool as before.
    """
    from mailflow import server
    from mailflow.verdict import RouteKind

    spooled = server.Server.enqueue

    async def enqueue(self: Any, ctx: Any) -> None:
        routes = await self.app.route(ctx)
        if not all(r.kind is RouteKind.MAILDIR for r in routes.values()):
            await spooled(self, ctx)
            return
        copies = [(rcpt, r.folder, r.mailbox) for rcpt, r in routes.items()]
        results = await asyncio.to_thread(self.app.maildir.deliver_many, copies, ctx.raw)
        failed = {
            rcpt: route
            for (rcpt, route), result in zip(routes.items(), results, strict=True)
            if isinstance(result, Exception)
        }
        if failed:
            await self.queue.enqueue(
                ctx.envelope.mail_from,
                failed,
                ctx.raw,
                client_ip=ctx.connection.ip,
                helo=ctx.connection.helo,
                queue_id=ctx.queue_id,
            )

    server.Server.enqueue = enqueue  # type: ignore[method-assign]


def fast_newlines() -> None:
    """normalize_newlines: count CR, LF and CRLF (C speed) before reaching for the regex."""
    from mailflow import normalize, smtp

    slow = normalize.normalize_newlines

    def normalize_newlines(data: bytes, mode: Any = "normalize") -> bytes:
        crlf = data.count(b"\r\n")
        if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
            return data
        return slow(data, mode)

    smtp.normalize_newlines = normalize_newlines


def no_fsync() -> None:
    """ANALYSIS ONLY, breaks durability: os.fsync does nothing (what does it cost?)."""

    def skip(fd: Any) -> None:
        del fd

    os.fsync = skip


WHAT_IFS: dict[str, Callable[[], None]] = {
    "direct-maildir": direct_maildir,
    "fast-newlines": fast_newlines,
    "no-fsync": no_fsync,
}


def apply(names: list[str]) -> None:
    for name in names:
        try:
            WHAT_IFS[name]()
        except KeyError:
            raise SystemExit(f"unknown what-if {name!r}; known: {', '.join(WHAT_IFS)}") from None


def time_chain() -> None:
    """ANALYSIS: print each data-stage plugin's mean time per message at exit.

    Measured inside ``serve``, where caches are colder than in ``bench_chain``. The
    plugins' own timings (wall time of each hook call, as ``check --json`` shows
    them) are summed: CPU time around ``Pipeline.run_data`` would also count the
    other messages of its batch while it waits (``mailflow.batching``).
    """
    import atexit
    import sys

    from mailflow import pipeline

    run_data = pipeline.Pipeline.run_data
    totals = {"messages": 0.0}
    per_plugin: dict[str, float] = {}

    async def timed(self: Any, ctx: Any) -> Any:
        out = await run_data(self, ctx)
        totals["messages"] += 1
        for run in ctx.runs:
            per_plugin[run.plugin] = per_plugin.get(run.plugin, 0.0) + run.elapsed_ms
        return out

    def report() -> None:
        n = max(totals["messages"], 1)
        plugins = " ".join(f"{k}={v / n * 1000:.0f}" for k, v in per_plugin.items())
        print(
            f"time-chain: {totals['messages']:.0f} messages, plugins "
            f"{sum(per_plugin.values()) / n * 1000:.0f} us each; mean us per plugin: {plugins}",
            file=sys.stderr,
            flush=True,
        )

    atexit.register(report)
    pipeline.Pipeline.run_data = timed  # type: ignore[method-assign]


WHAT_IFS["time-chain"] = time_chain


def no_batch() -> None:
    """The data stage without batching (as ``server.data_batch_rounds: 0``), to compare."""
    from mailflow import batching

    init = batching.DataBatch.__init__

    def unbatched(self: Any, rounds: int, max_batch: int = batching.DEFAULT_MAX_BATCH) -> None:
        init(self, 0, max_batch)

    batching.DataBatch.__init__ = unbatched  # type: ignore[method-assign]


WHAT_IFS["no-batch"] = no_batch


def batch_sizes() -> None:
    """ANALYSIS: print how many messages each data-stage batch gathered, at exit."""
    import atexit
    import sys
    from collections import Counter

    from mailflow import batching

    sizes: Counter[int] = Counter()
    release = batching._release

    def counted(waiters: Any) -> None:
        if sys._getframe(1).f_code.co_name != "_release_regrouped":
            sizes[len(waiters)] += 1
        release(waiters)

    batching._release = counted

    def report() -> None:
        gathered = sum(n * count for n, count in sizes.items())
        print(
            f"batch-sizes: {dict(sorted(sizes.items()))} ({gathered} messages waited)",
            file=sys.stderr,
            flush=True,
        )

    atexit.register(report)


WHAT_IFS["batch-sizes"] = batch_sizes


def inline_plugins() -> None:
    """Run every data hook in the server process (as ``isolation: {processes: 0}``), to
    put a number on what the content-analysis worker processes cost or save."""
    from mailflow import pipeline

    async def start_isolation(self: Any, on_restart: Any = None) -> None:
        return None

    pipeline.Pipeline.start_isolation = start_isolation  # type: ignore[method-assign]


WHAT_IFS["inline-plugins"] = inline_plugins
