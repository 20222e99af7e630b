"""`mailflow serve`: SMTP listeners + pipeline + durable queue, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from mailflow import msglog
from mailflow.app import App
from mailflow.delivery.dsn import build_dsn
from mailflow.delivery.outcome import Outcome
from mailflow.delivery.queue import QueueManager
from mailflow.delivery.spool import QueueEntry, RecipientState
from mailflow.delivery.transports import build_transports
from mailflow.message import MessageContext
from mailflow.milter.server import MilterServer
from mailflow.pipeline import default_route
from mailflow.smtp import Handler, bound_addresses, start_servers
from mailflow.verdict import Route, RouteKind

log = logging.getLogger("mailflow.server")


class Server:
    """Owns the listeners and the queue; ``start``/``stop`` are idempotent."""

    def __init__(self, app: App, authenticator: object | None = None) -> None:
        self.app = app
        self.authenticator = authenticator
        self.queue: QueueManager | None = None
        self.handler: Handler | None = None
        self.servers: list[asyncio.Server] = []
        self.metrics_server: asyncio.Server | None = None
        self.milter: MilterServer | None = None  # milter front end, when milter.listen is set

    async def start(self) -> list[tuple[str, int]]:
        app = self.app
        msglog.configure(app.config.log.format == "json")
        await app.startup()
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
        self.servers = await start_servers(app, self.handler, self.authenticator)
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

    async def enqueue(self, ctx: MessageContext) -> None:
        """Make the message durable before the 250: delivered, or spooled, or both.

        When every route is a Maildir, all copies are delivered here
        (``deliver_many_async`` returns only after each file and each ``new/``
        directory is fsync'd: the same promise as the spool, one fsync'd file per
        copy instead of three and no queue round trip; concurrent messages share
        one fsync round). Copies that fail (quota, bad
        folder, I/O) are spooled, so the queue applies its usual retry, 452/552 and
        bounce logic to them. Messages with any other route take the spool.
        """
        assert self.queue is not None
        routes = await self.app.route(ctx)
        if routes and all(r.kind is RouteKind.MAILDIR for r in routes.values()):
            routes = await self._deliver_local(ctx, routes)
            if not routes:
                ctx.extra["delivery"] = "delivered"
                return
            ctx.extra["delivery"] = "delivered+queued"
        await self.queue.enqueue(
            ctx.envelope.mail_from,
            routes,
            ctx.raw,
            client_ip=ctx.connection.ip,
            helo=ctx.connection.helo,
            queue_id=ctx.queue_id,
        )

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
