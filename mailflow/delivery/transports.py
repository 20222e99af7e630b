"""Transports: how a group of recipients sharing one route gets its copy.

Each transport returns an :class:`Outcome` per recipient; the queue turns those
into delivered / deferred / bounced states.
"""

from __future__ import annotations

import logging

from mailflow.app import App
from mailflow.delivery.maildir import MailboxError, QuotaExceeded
from mailflow.delivery.outcome import Outcome
from mailflow.delivery.queue import Transport
from mailflow.delivery.spool import QueueEntry, RecipientState
from mailflow.verdict import Route, RouteKind

log = logging.getLogger("mailflow.delivery")


def maildir_transport(app: App) -> Transport:
    maildir = app.maildir
    quota_code = app.config.delivery.maildir.over_quota_code

    async def deliver(
        entry: QueueEntry, message: bytes, rcpts: list[RecipientState], route: Route
    ) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        # Every copy at once (group commit with concurrent messages): each new/ fsync'd once.
        copies = [(r.address, route.folder, route.mailbox) for r in rcpts]
        results = await maildir.deliver_many_async(copies, message)
        for r, result in zip(rcpts, results, strict=True):
            if isinstance(result, QuotaExceeded):
                status = "4.2.2" if quota_code == 452 else "5.2.2"
                out[r.address] = Outcome(quota_code, f"{status} {result}")
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


def build_transports(app: App) -> dict[RouteKind, Transport]:
    transports: dict[RouteKind, Transport] = {RouteKind.MAILDIR: maildir_transport(app)}
    try:
        from mailflow.delivery import lmtp, relay
    except ImportError:  # pragma: no cover - during development only
        return transports
    transports[RouteKind.LMTP] = lmtp.lmtp_transport(app)
    transports[RouteKind.RELAY] = relay.relay_transport(app)
    transports[RouteKind.MX] = relay.mx_transport(app)
    return transports
