"""Where an accepted message goes before its reply: delivered, handed on, or spooled.

The front ends (SMTP, milter-less ``serve``) call :meth:`Dispatcher.enqueue` once the
pipeline accepted a message; when it returns, every copy is delivered, handed on or
durably spooled, and the client may get its ``250``. The dispatcher owns the queue,
the transports and the relay's session pool, and is built from its real
dependencies (config, spool, Maildir writer, resolver, metrics, and two callbacks
into the pipeline), never from the application object: nothing under
``mailflow.delivery`` imports ``mailflow.app``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

from mailflow.config import Config
from mailflow.delivery.dsn import build_dsn
from mailflow.delivery.maildir import MaildirDelivery
from mailflow.delivery.outcome import Outcome, RefusedUpstream
from mailflow.delivery.queue import QueueManager, Transport, log_results
from mailflow.delivery.relay import relay_pool
from mailflow.delivery.smtp_pool import SMTPPool
from mailflow.delivery.spool import QueueEntry, RecipientState, Spool
from mailflow.delivery.transports import build_transports
from mailflow.dns import Resolver
from mailflow.message import Delivery, MessageContext
from mailflow.metrics import Metrics
from mailflow.verdict import Route, RouteKind

log = logging.getLogger("mailflow.server")

# The routes of a message's recipients (the pipeline's ``mailflow_route``), in RCPT order.
RouteMessage = Callable[[MessageContext], Awaitable[dict[str, Route]]]
# An informational hook call: ``notify("mailflow_delivered", queue_id=..., ...)``.
Notify = Callable[..., Awaitable[None]]


def inline_bounds(config: Config) -> dict[RouteKind, float]:
    """The route kinds handed on before the reply, with their ``inline_timeout``."""
    bounds = {RouteKind.RELAY: config.relay.inline_timeout}
    if config.delivery.lmtp is not None:
        bounds[RouteKind.LMTP] = config.delivery.lmtp.inline_timeout
    return {kind: bound for kind, bound in bounds.items() if bound > 0}


class Dispatcher:
    """Delivery policy for accepted messages, and the queue that carries it out.

    ``route(ctx)`` gives each recipient's route, ``bounce_route(rcpt)`` the route of
    a bounce's recipient, ``notify`` calls the ``mailflow_delivered`` hook. Use
    :meth:`start` before the first :meth:`enqueue` and :meth:`stop` at the end.
    """

    def __init__(
        self,
        config: Config,
        *,
        spool: Spool,
        maildir: MaildirDelivery,
        resolver: Resolver,
        metrics: Metrics,
        route: RouteMessage,
        bounce_route: Callable[[str], Route],
        notify: Notify,
    ) -> None:
        self.config = config
        self.maildir = maildir
        self.resolver = resolver
        self.metrics = metrics
        self._route = route
        self._notify = notify
        # The relay's and the MX transport's idle sessions, shared (owned here).
        self.pool: SMTPPool = relay_pool(config)
        self.transports: dict[RouteKind, Transport] = build_transports(
            config, maildir=maildir, resolver=resolver, pool=self.pool
        )
        self.queue = QueueManager(
            config,
            spool,
            self.transports,
            on_delivered=self.on_delivered,
            build_bounce=self.build_bounce,
            bounce_route=bounce_route,
        )
        # Concurrent inline attempts (_hand_on), like the queue's workers.
        self._inline_slots = asyncio.Semaphore(config.queue.workers)
        self.inline_bounds = inline_bounds(config)

    async def start(self) -> None:
        """Resume the spooled messages and start the queue."""
        await self.queue.start()

    async def stop(self) -> None:
        """Stop the queue (running attempts get a grace period), then QUIT idle sessions."""
        await self.queue.stop()
        await self.pool.aclose()

    async def reconfigure(self, config: Config) -> None:
        """Deliver by ``config`` from now on (a reload): relay targets, routes and
        ``relay.default``, MX settings, ``delivery.method`` and ``delivery.lmtp``,
        the inline timeouts, and the queue's ``retry_schedule``, ``lifetime``,
        ``scan_interval`` and ``bounce_from``. Attempts under way finish with the
        transports they started with; idle LMTP sessions are closed.

        Kept until a restart (a reload gives back the running values,
        ``mailflow.reload.RESTART_KEYS``): ``queue.directory`` and ``queue.workers``,
        the relay pool's ``helo_name``, ``pool_size`` and ``pool_idle``, and
        ``delivery.maildir`` (the Maildir writer is the application's).
        """
        old = dict(self.transports)
        self.config = config
        self.inline_bounds = inline_bounds(config)
        self.queue.config = config
        # The queue holds this very dict: replace its contents, not the dict.
        self.transports.update(
            build_transports(config, maildir=self.maildir, resolver=self.resolver, pool=self.pool)
        )
        for transport in old.values():
            aclose = getattr(transport, "aclose", None)
            if aclose is not None:
                await aclose()

    async def enqueue(self, ctx: MessageContext) -> None:
        """Make the message durable or hand it on before the 250: delivered, spooled, or both.

        Sets ``ctx.delivery`` to :attr:`Delivery.DELIVERED`,
        :attr:`Delivery.DELIVERED_QUEUED` or :attr:`Delivery.QUEUED`.

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
        routes = await self._route(ctx)
        bounds = self.inline_bounds
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
                ctx.delivery = Delivery.DELIVERED
                return
            partly = len(left) < len(routes)
            routes = {a: r for a, r in routes.items() if a in left}
        else:
            partly = False
        await self.queue.enqueue(
            ctx.envelope.mail_from,
            routes,
            ctx.raw,
            client_ip=ctx.connection.ip,
            helo=ctx.connection.helo,
            queue_id=ctx.queue_id,
            tried=tried,
        )
        ctx.delivery = Delivery.DELIVERED_QUEUED if partly else Delivery.QUEUED

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
        transport = self.transports.get(kind)
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
            await self.on_delivered(ctx.queue_id, address, route, "delivered", reply)
        return failed, tried

    async def _deliver_local(
        self, ctx: MessageContext, routes: dict[str, Route]
    ) -> dict[str, Route]:
        """Deliver every copy to its Maildir; return the routes of the copies that failed."""
        copies = [(rcpt, r.folder, r.mailbox) for rcpt, r in routes.items()]
        results = await self.maildir.deliver_many_async(copies, ctx.raw)
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
            await self.on_delivered(ctx.queue_id, rcpt, route, "delivered", detail)
        return failed

    async def on_delivered(
        self, queue_id: str, rcpt: str, route: Route, outcome: str, detail: str
    ) -> None:
        """A copy reached its final state: count it, and tell ``mailflow_delivered``."""
        self.metrics.observe_delivery(outcome, route.kind.value)
        await self._notify(
            "mailflow_delivered",
            queue_id=queue_id,
            recipient=rcpt,
            route=route,
            outcome=outcome,
            detail=detail,
        )

    def build_bounce(
        self, entry: QueueEntry, failed: list[RecipientState], message: bytes
    ) -> bytes:
        """The DSN (RFC 3464) for ``failed`` recipients of ``entry``."""
        return build_dsn(
            entry,
            failed,
            message,
            reporting_mta=self.config.server.hostname,
            bounce_from=self.config.queue.bounce_from,
        )
