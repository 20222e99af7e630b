"""The application object: config + pipeline + shared services, one per process.

``serve`` and ``check`` both build an :class:`App`, so the pipeline a message goes
through is the same in both.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from mailflow.config import Config
from mailflow.delivery.maildir import MaildirDelivery
from mailflow.delivery.spool import Spool
from mailflow.dns import Resolver
from mailflow.message import MessageContext
from mailflow.metrics import Metrics
from mailflow.pipeline import Pipeline
from mailflow.verdict import Route

log = logging.getLogger("mailflow")


class App:
    """Holds what plugins may use via ``mailflow_startup(app)``."""

    def __init__(
        self,
        config: Config,
        *,
        extra_plugins: dict[str, Any] | None = None,
        available_plugins: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.resolver = Resolver(config.dns)
        # A worker process (mailflow.isolation) builds its App with this same class.
        self.pipeline = Pipeline(
            config, extra=extra_plugins, available=available_plugins, app_factory=App
        )
        self.maildir = MaildirDelivery(config.delivery.maildir, config.storage.sync)
        self.metrics = Metrics()
        self._spool: Spool | None = None
        self.started = False
        self.state: dict[str, Any] = {}  # shared scratch space for plugins

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            self._spool = Spool(Path(self.config.queue.directory), self.config.storage.sync)
        return self._spool

    @property
    def authserv_id(self) -> str:
        return self.config.authserv_id or self.config.server.hostname

    def share_services(self, running: App) -> None:
        """Use ``running``'s process-wide services instead of new ones (a reload,
        mailflow.reload): the metrics keep counting, the Maildir writer and the spool
        stay the ones the queue uses (their config keys need a restart)."""
        self.metrics = running.metrics
        self.maildir = running.maildir
        self._spool = running.spool

    async def startup(self) -> None:
        if not self.started:
            await self.pipeline.notify("mailflow_startup", app=self)
            self.started = True

    async def shutdown(self) -> None:
        if self.started:
            await self.pipeline.notify("mailflow_shutdown", app=self)
            self.started = False

    async def route(self, ctx: MessageContext) -> dict[str, Route]:
        if not ctx.routes or set(ctx.routes) != set(ctx.envelope.rcpt_tos):
            await self.pipeline.assign_routes(ctx)
        return {r: ctx.routes[r] for r in ctx.envelope.rcpt_tos}


def run(coro: Any) -> Any:
    return asyncio.run(coro)
