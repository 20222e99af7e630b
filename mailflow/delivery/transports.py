"""Transports: how a group of recipients sharing one route gets its copy.

Each transport returns an :class:`Outcome` per recipient; the queue turns those
into delivered / deferred / bounced states. They are built from their real
dependencies (the config, the Maildir writer, the resolver, the relay's session
pool), never from the application object.
"""

from __future__ import annotations

import logging

from mailflow.config import Config
from mailflow.delivery.lmtp import LMTPTransport
from mailflow.delivery.maildir import MailboxError, MaildirDelivery, QuotaExceeded
from mailflow.delivery.outcome import Outcome
from mailflow.delivery.queue import Transport
from mailflow.delivery.relay import MXTransport, RelayTransport
from mailflow.delivery.smtp_pool import SMTPPool
from mailflow.delivery.spool import QueueEntry, RecipientState
from mailflow.dns import Resolver
from mailflow.verdict import Route, RouteKind

log = logging.getLogger("mailflow.delivery")


def maildir_transport(maildir: MaildirDelivery, over_quota_code: int) -> Transport:
    async def deliver(
        entry: QueueEntry, message: bytes, rcpts: list[RecipientState], route: Route
    ) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        # Every copy at once (group commit with concurrent messages): each new/ fsync'd once.
        copies = [(r.address, route.folder, route.mailbox) for r in rcpts]
        results = await maildir.deliver_many_async(copies, message)
        for r, result in zip(rcpts, results, strict=True):
            if isinstance(result, QuotaExceeded):
                status = "4.2.2" if over_quota_code == 452 else "5.2.2"
                out[r.address] = Outcome(over_quota_code, f"{status} {result}")
            elif isinstance(result, MailboxError):
                out[r.address] = Outcome(550, f"5.1.1 {result}")
            elif isinstance(result, OSError):
                out[r.address] = Outcome(451, f"4.3.0 local delivery failed: {result.strerror}")
            elif isinstance(result, Exception):
                out[r.address] = Outcome(451, f"4.3.0 local delivery failed: {result}")
            else:
                out[r.address] = Outcome(250, f"delivered to {result.parent.parent}")
        return out

    return deliver


def build_transports(
    config: Config, *, maildir: MaildirDelivery, resolver: Resolver, pool: SMTPPool
) -> dict[RouteKind, Transport]:
    """One transport per route kind; ``relay`` and ``mx`` share ``pool``."""
    return {
        RouteKind.MAILDIR: maildir_transport(maildir, config.delivery.maildir.over_quota_code),
        RouteKind.LMTP: LMTPTransport(config),
        RouteKind.RELAY: RelayTransport(config, pool),
        RouteKind.MX: MXTransport(config, resolver, pool),
    }
