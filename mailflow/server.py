"""`mailflow serve`: SMTP listeners + pipeline + durable queue, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from mailflow import msglog
from mailflow.app import App
from mailflow.delivery.dispatch import Dispatcher
from mailflow.delivery.queue import QueueManager
from mailflow.message import MessageContext
from mailflow.milter.server import MilterServer
from mailflow.pipeline import default_route
from mailflow.reload import ProtocolSwitch
from mailflow.smtp import Handler, bound_addresses, protocol_factory, start_servers

log = logging.getLogger("mailflow.server")


class Server:
    """Owns the listeners and the dispatcher; ``start``/``stop`` are idempotent."""

    def __init__(self, app: App, authenticator: object | None = None) -> None:
        self.app = app
        self.authenticator = authenticator
        # Delivery policy, the queue, the transports and the relay pool (docs/delivery.md).
        self.dispatcher: Dispatcher | None = None
        self.handler: Handler | None = None
        self.protocols: ProtocolSwitch | None = None  # what a reload re-points
        self.servers: list[asyncio.Server] = []
        self.metrics_server: asyncio.Server | None = None
        self.milter: MilterServer | None = None  # milter front end, when milter.listen is set

    @property
    def queue(self) -> QueueManager | None:
        """The dispatcher's delivery queue, while the server runs."""
        return self.dispatcher.queue if self.dispatcher is not None else None

    async def start(self) -> list[tuple[str, int]]:
        app = self.app
        msglog.configure(app.config.log.format == "json")
        await app.startup()
        # Before any thread of ours runs (a worker is a fresh interpreter either way).
        await app.pipeline.start_isolation(on_restart=app.metrics.observe_worker_restart)
        # Copies answered before a crash whose new/ names were not yet synced.
        await asyncio.to_thread(app.maildir.recover)
        self.dispatcher = Dispatcher(
            app.config,
            spool=app.spool,
            maildir=app.maildir,
            resolver=app.resolver,
            metrics=app.metrics,
            # Through self.app: a reload (mailflow.reload) replaces the App, and
            # routing and delivery notices go to the plugins of the one serving.
            route=lambda ctx: self.app.route(ctx),
            bounce_route=lambda rcpt: default_route(self.app.config, rcpt),
            notify=lambda hook, **kwargs: self.app.pipeline.notify(hook, **kwargs),
        )
        await self.dispatcher.start()
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
            self.app.metrics.connections.set(self.handler.all_active.value)
        pool = self.app.pipeline.isolation
        self.app.metrics.isolation_workers.set(pool.size if pool is not None else 0)

    async def enqueue(self, ctx: MessageContext) -> None:
        """The front ends' one entry into delivery: :meth:`Dispatcher.enqueue`.

        Returns once every copy is delivered, handed on or durably spooled (the
        client may then get its ``250``; ``ctx.delivery`` says which); raises
        :class:`~mailflow.delivery.outcome.RefusedUpstream` when the next hop refused
        every copy for good, and any other exception when the message could not be
        stored.
        """
        assert self.dispatcher is not None, "Server.start() first"
        await self.dispatcher.enqueue(ctx)

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
        if self.dispatcher is not None:
            await self.dispatcher.stop()
            self.dispatcher = None
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
