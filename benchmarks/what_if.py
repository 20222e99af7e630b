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


def lean_queue() -> None:
    """The queue's first attempt uses the bytes it was given, and removes the spool
    files without a thread hop (two unlinks): recommendation 2 for queue.py.

    Done from outside: ``enqueue`` keeps the bytes, and the queue module's view of
    ``asyncio.to_thread`` answers ``read_message``/``remove`` for those messages
    directly. Retries and restarts still read from disk.
    """
    from mailflow.delivery import queue as queue_module

    kept: dict[str, bytes] = {}
    enqueue = queue_module.QueueManager.enqueue

    async def keeping_enqueue(
        self: Any, sender: str, routes: Any, message: bytes, **kw: Any
    ) -> Any:
        entry = await enqueue(self, sender, routes, message, **kw)
        kept[entry.id] = message
        return entry

    class _Asyncio:
        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        async def to_thread(self, func: Callable[..., Any], /, *args: Any) -> Any:
            name = getattr(func, "__name__", "")
            if name == "read_message" and args and args[0] in kept:
                return kept[args[0]]
            if name == "remove" and args:
                kept.pop(args[0], None)
                return func(*args)
            return await asyncio.to_thread(func, *args)

    queue_module.QueueManager.enqueue = keeping_enqueue  # type: ignore[method-assign]
    queue_module.asyncio = _Asyncio()  # type: ignore[assignment]


def no_fsync() -> None:
    """ANALYSIS ONLY, breaks durability: os.fsync does nothing (what does it cost?)."""

    def skip(fd: Any) -> None:
        del fd

    os.fsync = skip


WHAT_IFS: dict[str, Callable[[], None]] = {
    "direct-maildir": direct_maildir,
    "fast-newlines": fast_newlines,
    "lean-queue": lean_queue,
    "no-fsync": no_fsync,
}


def apply(names: list[str]) -> None:
    for name in names:
        try:
            WHAT_IFS[name]()
        except KeyError:
            raise SystemExit(f"unknown what-if {name!r}; known: {', '.join(WHAT_IFS)}") from None
