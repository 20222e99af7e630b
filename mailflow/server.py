"""`mailflow serve`: SMTP listeners + pipeline + durable queue, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import defaultdict
from pathlib import Path

from mailflow import msglog
from mailflow.app import App
from mailflow.delivery.dsn import build_dsn
from mailflow.delivery.outcome import Outcome, RefusedUpstream
from mailflow.delivery.queue import QueueManager, log_results
from mailflow.delivery.spool import QueueEntry, RecipientState
from mailflow.delivery.transports import build_transports
from mailflow.message import MessageContext
from mailflow.milter.server import MilterServer
from mailflow.pipeline import default_route
from mailflow.reload import ProtocolSwitch
from mailflow.smtp import Handler, bound_addresses, protocol_factory, start_servers
from mailflow.verdict import Route, RouteKind

log = logging.getLogger("mailflow.server")


def _inline_bounds(app: App) -> dict[RouteKind, float]:
    """The route kinds handed on before the reply, with their ``inline_timeout``."""
    config = app.config
    bounds = {RouteKind.RELAY: config.relay.inline_timeout}
    if config.delivery.lmtp is not None:
        bounds[RouteKind.LMTP] = config.delivery.lmtp.inline_timeout
    return {kind: bound for kind, bound in bounds.items() if bound > 0}


class Server:
    """Owns the listeners and the queue; ``start``/``stop`` are idempotent."""

    def __init__(self, app: App, authenticator: object | None = None) -> None:
        self.app = app
        self.authenticator = authenticator
        self.queue: QueueManager | None = None
        self.handler: Handler | None = None
        self.protocols: ProtocolSwitch | None = None  # what a reload re-points
        self.servers: list[asyncio.Server] = []
        self.metrics_server: asyncio.Server | None = None
        self.milter: MilterServer | None = None  # milter front end, when milter.listen is set
        # Concurrent inline attempts (Server._hand_on), like the queue's workers.
        self._inline_slots = asyncio.Semaphore(app.config.queue.workers)
        self._inline_bounds = _inline_bounds(app)

    async def start(self) -> list[tuple[str, int]]:
        app = self.app
        msglog.configure(app.config.log.format == "json")
        await app.startup()
        # Before any thread of ours runs (a worker is a fresh interpreter either way).
        await app.pipeline.start_isolation(on_restart=app.metrics.observe_worker_restart)
        # Copies answered before a crash whose new/ names were not yet synced.
        await asyncio.to_thread(app.maildir.recover)
        self.queue = QueueManager(
            app.config,
            app.spool,
            build_transports(app),
            on_delivered=self._on_delivered,
            build_bounce=self._build_bounce,
            bounce_route=lambda rcpt: default_route(app.config, rcpt),
        )
        await self.queue.start()
        self.handler = Handler(app, self.enqueue)
        if self.authenticator is None and app.config.server.auth is not None:
            from mailflow.auth import UsersFileAuthenticator

            self.authenticator = UsersFileAuthenticator(app.config.server.auth.users_file)
        self.protocols = ProtocolSwitch(protocol_factory(app, self.handler, self.authenticator))
        self.servers = await start_servers(
            app, self.handler, self.authenticator, factory=self.protocols
        )
        if app.config.milter.listen:
            # Milter front end (docs/milter.md): same pipeline, the MTA delivers.
            self.milter = MilterServer(app, app.config.milter)
            await self.milter.start()
        if app.config.metrics.listen:
            from mailflow.metrics import start_metrics_server

            self.metrics_server = await start_metrics_server(
                app.config.metrics.listen, app.metrics, refresh=self._refresh_gauges
            )
        return bound_addresses(self.servers)

    def _refresh_gauges(self) -> None:
        if self.queue is not None:
            self.app.metrics.queue_size.set(len(self.queue.entries()))
        if self.handler is not None:
            self.app.metrics.connections.set(self.handler.active)
        pool = self.app.pipeline.isolation
        self.app.metrics.isolation_workers.set(pool.size if pool is not None else 0)

    async def enqueue(self, ctx: MessageContext) -> None:
        """Make the message durable or hand it on before the 250: delivered, spooled, or both.

        When every route is a Maildir, all copies are delivered here
        (``deliver_many_async`` returns only after each file and each ``new/``
        directory is fsync'd: the same promise as the spool, one fsync'd file per
        copy instead of three and no queue round trip; concurrent messages share
        one fsync round). Copies that fail (quota, bad
        folder, I/O) are spooled, so the queue applies its usual retry, 452/552 and
        bounce logic to them.

        Copies routed ``relay`` (``relay.inline_timeout``) and ``lmtp``
        (``delivery.lmtp.inline_timeout``), unless that is 0, get their first attempt
        here, through the queue's transports and their reused sessions, for at most
        that long (local copies of the same message are delivered as above).
        Recipients the next hop accepted after DATA are done; every other copy
        (refused, deferred, unreachable, timed out) is spooled with the outcome of
        that attempt. When the next hop refused every copy of the message for good
        (5xx), :class:`RefusedUpstream` is raised instead and nothing is stored: the
        client gets the refusal. Other routes (MX, discard) take the spool.
        """
        assert self.queue is not None
        routes = await self.app.route(ctx)
        bounds = self._inline_bounds
        handed_on = {a: r for a, r in routes.items() if r.kind in bounds}
        tried: dict[str, Outcome] = {}
        if routes and (handed_on or all(r.kind is RouteKind.MAILDIR for r in routes.values())):
            local = {a: r for a, r in routes.items() if r.kind is RouteKind.MAILDIR}
            # Spooled: whatever is neither a Maildir copy nor handed on below.
            left = {
                a: r
                for a, r in routes.items()
                if r.kind is not RouteKind.MAILDIR and a not in handed_on
            }
            if local:
                left.update(await self._deliver_local(ctx, local))
            for kind, bound in bounds.items():
                copies = {a: r for a, r in handed_on.items() if r.kind is kind}
                if not copies:
                    continue
                failed, outcomes = await self._hand_on(ctx, copies, kind, bound)
                left.update(failed)
                tried.update(outcomes)
            if len(tried) == len(routes) and all(o.permanent for o in tried.values()):
                # Every copy was handed on and refused for good: say so to the client
                # (no bounce to send, no backscatter) instead of storing it.
                raise RefusedUpstream(tried[next(iter(routes))])
            if not left:
                ctx.extra["delivery"] = "delivered"
                return
            if len(left) < len(routes):
                ctx.extra["delivery"] = "delivered+queued"
            routes = {a: r for a, r in routes.items() if a in left}
        await self.queue.enqueue(
            ctx.envelope.mail_from,
            routes,
            ctx.raw,
            client_ip=ctx.connection.ip,
            helo=ctx.connection.helo,
            queue_id=ctx.queue_id,
            tried=tried,
        )

    async def _hand_on(
        self, ctx: MessageContext, routes: dict[str, Route], kind: RouteKind, bound: float
    ) -> tuple[dict[str, Route], dict[str, Outcome]]:
        """One delivery attempt for ``routes`` (all of ``kind``) before the reply.

        Bounded by ``bound`` seconds (the kind's ``inline_timeout``). Returns the routes
        of the copies the next hop did not accept and the outcome of this attempt for
        each of them. The attempt waits for one of ``queue.workers`` inline slots (so a
        burst of clients does not open a connection each); the wait counts against the
        bound. On timeout the attempt is cancelled: the transport drops the session it
        was using, so no connection in an unknown state is reused.
        """
        assert self.queue is not None
        transport = self.queue.transports.get(kind)
        if transport is None:
            return routes, {}
        entry = QueueEntry(
            id=ctx.queue_id,
            sender=ctx.envelope.mail_from,
            recipients=[RecipientState(a, r.as_dict()) for a, r in routes.items()],
            created=time.time(),
            size=len(ctx.raw),
            client_ip=ctx.connection.ip,
            helo=ctx.connection.helo,
        )
        groups: dict[tuple[str, str, str], list[RecipientState]] = defaultdict(list)
        for state, route in zip(entry.recipients, routes.values(), strict=True):
            groups[(route.target, route.folder, route.mailbox)].append(state)
        outcomes: dict[str, Outcome] = {}
        missing = Outcome(451, f"4.4.2 no result from the inline {kind.value} attempt")
        try:
            async with asyncio.timeout(bound):
                async with self._inline_slots:
                    for members in groups.values():
                        route = routes[members[0].address]
                        outcomes.update(await transport(entry, ctx.raw, members, route))
        except TimeoutError:
            missing = Outcome(451, f"4.4.2 inline {kind.value} attempt timed out after {bound:g}s")
        except Exception as exc:
            log.exception("queue %s: inline %s attempt failed", ctx.queue_id, kind.value)
            missing = Outcome(451, f"4.3.0 inline {kind.value} attempt failed: {exc}")
        failed: dict[str, Route] = {}
        tried: dict[str, Outcome] = {}
        lines: dict[tuple[str, str], list[str]] = {}
        delivered: list[tuple[str, Route, str]] = []
        for address, route in routes.items():
            outcome = outcomes.get(address) or missing
            reply = str(outcome)
            if outcome.ok:
                delivered.append((address, route, reply))
                lines.setdefault(("delivered", reply), []).append(address)
            else:
                failed[address] = route
                tried[address] = outcome
                what = "refused" if outcome.permanent else "spooled"
                lines.setdefault((what, reply), []).append(address)
        log_results(ctx.queue_id, kind.value, lines)
        for address, route, reply in delivered:
            await self._on_delivered(ctx.queue_id, address, route, "delivered", reply)
        return failed, tried

    async def _deliver_local(
        self, ctx: MessageContext, routes: dict[str, Route]
    ) -> dict[str, Route]:
        """Deliver every copy to its Maildir; return the routes of the copies that failed."""
        copies = [(rcpt, r.folder, r.mailbox) for rcpt, r in routes.items()]
        results = await self.app.maildir.deliver_many_async(copies, ctx.raw)
        failed: dict[str, Route] = {}
        for (rcpt, route), result in zip(routes.items(), results, strict=True):
            if not isinstance(result, Path):
                failed[rcpt] = route
                log.debug(
                    "queue %s: to=<%s> not delivered now (%s); spooled", ctx.queue_id, rcpt, result
                )
                continue
            detail = str(Outcome(250, f"delivered to {result.parent.parent}"))
            log.debug(
                "queue %s: to=<%s> route=%s status=delivered reply=%r",
                ctx.queue_id,
                rcpt,
                route.kind.value,
                detail,
            )
            await self._on_delivered(ctx.queue_id, rcpt, route, "delivered", detail)
        return failed

    async def _on_delivered(
        self, queue_id: str, rcpt: str, route: Route, outcome: str, detail: str
    ) -> None:
        self.app.metrics.observe_delivery(outcome, route.kind.value)
        await self.app.pipeline.notify(
            "mailflow_delivered",
            queue_id=queue_id,
            recipient=rcpt,
            route=route,
            outcome=outcome,
            detail=detail,
        )

    def _build_bounce(
        self, entry: QueueEntry, failed: list[RecipientState], message: bytes
    ) -> bytes:
        return build_dsn(
            entry,
            failed,
            message,
            reporting_mta=self.app.config.server.hostname,
            bounce_from=self.app.config.queue.bounce_from,
        )

    async def stop(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.milter is not None:
            await self.milter.stop()
            self.milter = None
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self.servers = []
        if self.queue is not None:
            await self.queue.stop()
            self.queue = None
        await asyncio.to_thread(self.app.maildir.close)
        await self.app.pipeline.stop_isolation()
        await self.app.shutdown()

    async def run_forever(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await self.stop()
