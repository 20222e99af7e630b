"""LMTP delivery (RFC 2033) to a local mail store (Dovecot, Cyrus) over TCP or a unix socket.

The session is the relay's client (``smtp_client.py``, through an ``SMTPPool`` of
its own) in its LMTP dialect: ``LHLO`` instead of ``EHLO``, and after the end of
DATA *one reply per accepted recipient*, in RCPT order (RFC 2033 4.2), so one mailbox
can be full while the others succeed. No STARTTLS or AUTH: the mail store is local.

Sessions are reused: after a transaction that ended cleanly, the session waits idle
(at most :data:`IDLE_SECONDS`, then QUIT) for the next delivery, which skips the
connection, the greeting and LHLO. A reused session that turns out to be closed by
the server before the message was sent is replaced by a fresh one, once.
"""

from __future__ import annotations

from mailflow.config import Config, LMTPTarget
from mailflow.delivery.outcome import Outcome
from mailflow.delivery.smtp_pool import Destination, SessionError, SMTPPool
from mailflow.delivery.spool import QueueEntry, RecipientState
from mailflow.verdict import Route

COMMAND_TIMEOUT = 60.0  # seconds per command reply
DATA_TIMEOUT = 600.0  # seconds for the final replies after the message
IDLE_SECONDS = 5.0  # an idle session is closed (QUIT) after this long
MAX_IDLE = 16  # idle sessions kept at most (the queue runs queue.workers at a time)


def lmtp_destination(target: LMTPTarget) -> Destination:
    """How to reach ``delivery.lmtp``: plain LMTP over TCP or its unix socket."""
    return Destination(
        host=target.host,
        port=target.port,
        tls="none",
        timeout=COMMAND_TIMEOUT,
        protocol="lmtp",
        socket=str(target.socket) if target.socket is not None else None,
        data_timeout=DATA_TIMEOUT,
    )


class LMTPTransport:
    """Route kind ``lmtp``: hand the message to ``delivery.lmtp``, reusing sessions."""

    def __init__(self, config: Config) -> None:
        self.config = config
        helo = config.relay.helo_name or config.server.hostname
        self.pool = SMTPPool(helo, size=MAX_IDLE, idle=IDLE_SECONDS)

    async def __call__(
        self, entry: QueueEntry, message: bytes, rcpts: list[RecipientState], route: Route
    ) -> dict[str, Outcome]:
        target = self.config.delivery.lmtp
        addresses = [r.address for r in rcpts]
        if target is None:
            outcome = Outcome(451, "4.3.5 no delivery.lmtp target configured")
            return dict.fromkeys(addresses, outcome)
        try:
            return await self.pool.send(lmtp_destination(target), entry.sender, addresses, message)
        except SessionError as exc:
            # Recipients without a final reply are retried: never assume delivery.
            return exc.outcomes(addresses)

    async def aclose(self) -> None:
        """QUIT every idle session (at shutdown)."""
        await self.pool.aclose()
