"""The SMTP handler: aiosmtpd's command hooks as calls of the transaction model.

Each SMTP command becomes a step of :class:`mailflow.transaction.Transaction` (the
model the milter session and ``mailflow check`` run too), whose decision is answered
at that command. A message is acknowledged with 250 only after it has been fsync'd
into the spool (or quarantine), never before.

The per-connection protocol (limits, timeouts, the DATA reader, STARTTLS
bookkeeping) is :class:`mailflow.smtp.protocol.MailflowSMTP`; AUTH is
:mod:`mailflow.smtp.auth`; the Received field :mod:`mailflow.smtp.received`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SMTPEnvelope

from mailflow.app import App
from mailflow.authlimit import AuthGuard, Scope
from mailflow.config import AuthThrottleConfig
from mailflow.delivery.maildir import QuotaExceeded
from mailflow.delivery.outcome import RefusedUpstream
from mailflow.delivery.spool import new_queue_id
from mailflow.message import Connection, Delivery, MessageContext
from mailflow.msglog import record_after_reply
from mailflow.normalize import has_bare_newline, normalize_newlines
from mailflow.policy import in_networks, is_local_recipient
from mailflow.quarantine import Quarantine
from mailflow.smtp.data import BulkPacer, ByteBudget, DataFacts, clear_directory
from mailflow.smtp.policy import address_ok, data_refusal
from mailflow.smtp.received import count_received, protocol_name, received_header, with_trace
from mailflow.transaction import Decision, Transaction, accepted_reply
from mailflow.verdict import Action, SMTPReply

log = logging.getLogger("mailflow.smtp")


# RFC 5321 4.2 replies used by the front end.
R_SPOOL_FAILED = SMTPReply(451, "Local error storing the message, try again later", "4.3.0")
R_BAD_ADDRESS = SMTPReply(553, "Malformed address", "5.1.3")
R_SENDER_NEEDED = SMTPReply(503, "Need MAIL command first", "5.5.1")
R_LOCAL_ERROR = SMTPReply(451, "Local error in processing, try again later", "4.3.0")

# Under queue.directory: temporary files of large messages while they arrive.
INCOMING_DIR = "incoming"


def _sender(address: str | None) -> str:
    """The envelope sender as mailflow models it: "" is the null sender."""
    return "" if not address or address == "<>" else address


class ConnectionCount:
    """A number of open connections that handlers can share."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class Handler:
    """aiosmtpd handler: the glue between SMTP commands and pipeline stages."""

    def __init__(
        self, app: App, enqueue: Callable[..., Any], *, clear_incoming: bool = True
    ) -> None:
        self.app = app
        self.enqueue = enqueue  # async (ctx) -> queue id, after durable store
        self.quarantine = Quarantine(app.config.quarantine.directory)
        self.active = 0  # open connections of this handler (MailflowSMTP keeps it exact)
        # Open connections of every handler a reload (mailflow.reload) made: what
        # max_connections and the connections gauge count. Shared like active_by_ip.
        self.all_active = ConnectionCount()
        self.active_by_ip: Counter[str] = Counter()  # the same per client address
        self._relay_nets = app.config.relay_network_objects
        # Clients that max_connections_per_ip does not count against (relay_networks too).
        self.per_ip_exempt = [
            *self._relay_nets,
            *(ip_network(n, strict=False) for n in app.config.server.max_connections_per_ip_exempt),
        ]
        server = app.config.server
        # Large messages arrive into files here; what a crash left behind goes now.
        self.incoming_dir = Path(app.config.queue.directory) / INCOMING_DIR
        if clear_incoming:  # not on a reload (mailflow.reload): connections are writing there
            clear_directory(self.incoming_dir)
        # Memory for large messages read back from their files to be filtered.
        self.large_messages = ByteBudget(server.large_message_memory)
        self.bulk = BulkPacer(server.large_message_rate)
        # AUTH failures across this server's connections (mailflow.authlimit).
        # (Not "auth_...": aiosmtpd takes such members of the handler for SASL mechanisms.)
        self.login_guard = AuthGuard(
            server.auth or AuthThrottleConfig(),
            on_lockout=self._auth_lockout,
            on_failure=app.metrics.observe_auth_failure,
        )

    def _auth_lockout(self, scope: Scope, key: str) -> None:
        self.app.metrics.observe_auth_lockout(scope)

    def new_connection(self, ip: str, port: int) -> Connection:
        conn = Connection(ip=ip, port=port)
        conn.relay_allowed = in_networks(conn.ip, self._relay_nets)
        if self.app.config.server.reverse_dns:
            conn._resolver = self.app.resolver.ptr
        return conn

    def transaction(self, conn: Connection) -> Transaction:
        """The sans-IO model of one connection (mailflow.transaction)."""
        return Transaction(
            self.app.pipeline, self.app.config, conn, recipient_check=self._check_quota
        )

    async def _check_quota(self, address: str) -> SMTPReply | None:
        """A full local mailbox refuses the recipient at RCPT (``over_quota_code``).

        Only a full one: a mailbox that cannot be read raises, which answers 451
        (:meth:`handle_exception`), never a permanent "Mailbox full".
        """
        config = self.app.config
        maildir = config.delivery.maildir
        if not (
            maildir.quota is not None
            and config.delivery.method == "maildir"
            and is_local_recipient(config, address)
        ):
            return None
        try:
            await asyncio.to_thread(self.app.maildir.check_quota, address, 0)
        except QuotaExceeded:
            code = maildir.over_quota_code
            return SMTPReply(code, "Mailbox full", "4.2.2" if code == 452 else "5.2.2")
        return None

    async def handle_exception(self, error: Exception) -> str:
        """A bug or I/O error in a stage: log it, answer a temporary failure, keep serving."""
        log.error("SMTP session error: %r", error, exc_info=error)
        return str(R_LOCAL_ERROR)

    @staticmethod
    def conn(session: Session) -> Connection:
        return session.mailflow_conn  # type: ignore[attr-defined]

    @staticmethod
    def model(server: SMTP) -> Transaction:
        return server.mailflow_tx  # type: ignore[attr-defined]

    # --- HELO/EHLO ------------------------------------------------------------------------

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: SMTPEnvelope, hostname: str
    ) -> str:
        reply = await self._helo(server, session, hostname)
        if reply is None:
            session.host_name = hostname
            return f"250 {server.hostname}"
        return reply

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: SMTPEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        reply = await self._helo(server, session, hostname)
        if reply is not None:
            return [reply]
        session.host_name = hostname
        # RFC 2920: aiosmtpd reads commands one line at a time from its buffer and
        # answers in order, so batched commands are safe to accept (and to advertise).
        # aiosmtpd prints a bare "250-AUTH" when every mechanism is excluded.
        kept = [r for r in responses[:-1] if r.strip() != "250-AUTH"]
        return [*kept, "250-PIPELINING", responses[-1]]

    async def _helo(self, server: SMTP, session: Session, hostname: str) -> str | None:
        decision = await self.model(server).helo(hostname)
        return str(decision.reply) if decision.refused else None

    # --- MAIL FROM ------------------------------------------------------------------------

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: SMTPEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        conn = self.conn(session)
        conn.tls = session.ssl is not None
        # aiosmtpd spells the null sender (RFC 5321 4.5.5) "<>" and needs it truthy.
        if address and address != "<>" and not address_ok(address):
            return str(R_BAD_ADDRESS)
        decision = await self.model(server).mail(_sender(address), mail_options)
        if decision.refused:
            return str(decision.reply)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    # --- RCPT TO --------------------------------------------------------------------------

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: SMTPEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if envelope.mail_from is None:
            return str(R_SENDER_NEEDED)
        if not address_ok(address):
            return str(R_BAD_ADDRESS)
        decision = await self.model(server).rcpt(address, rcpt_options)
        if decision.refused:
            return str(decision.reply)
        if not decision.duplicate:  # <postmaster> and postmaster@ ours: one mailbox, one copy
            envelope.rcpt_tos.append(decision.address)
            envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: SMTPEnvelope) -> str:
        self.model(server).reset()
        return "250 2.0.0 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SMTPEnvelope) -> str:
        started = time.perf_counter()
        conn = self.conn(session)
        config = self.app.config
        raw = envelope.original_content or b""
        facts: DataFacts | None = getattr(envelope, "mailflow_facts", None)
        if facts is None:
            # Not read by MailflowSMTP's block reader: look at the whole message here.
            facts = DataFacts(len(raw), nul=b"\x00" in raw, bare_newline=has_bare_newline(raw))
            if facts.bare_newline and config.server.bare_newline == "normalize":
                raw = normalize_newlines(raw)
            facts.received = count_received(raw)
        # Else the reader did it block by block as the data arrived: the NUL check,
        # bare line ends made CRLF, Received fields counted (mailflow.smtp.data).
        refusal = data_refusal(facts, config.server)
        if refusal is not None:
            self.model(server).reset()  # as aiosmtpd resets its envelope after DATA
            return str(refusal)
        queue_id = new_queue_id()
        proto = protocol_name(
            session.extended_smtp, session.ssl is not None, bool(conn.authenticated_user)
        )
        by = config.server.hostname
        raw = with_trace(raw, received_header(conn, by, proto, envelope.rcpt_tos, queue_id))
        # The message lives on as ctx.raw; the envelope's copy (as large as the message)
        # would only double the memory of a large message while the plugins run.
        envelope.content = envelope.original_content = None
        model = self.model(server)
        ctx = model.message(raw, queue_id)
        decision = await model.data(ctx)
        reply = await self.finish(ctx, decision)
        elapsed = time.perf_counter() - started
        record_after_reply(ctx, reply, elapsed, self.app.metrics.observe_message)
        return reply

    async def finish(self, ctx: MessageContext, decision: Decision) -> str:
        """Carry out the transaction's decision: store the message, then say so."""
        action = decision.action
        if decision.refused or action is Action.DISCARD:
            if action is Action.DISCARD:
                ctx.delivery = Delivery.DISCARDED
            return str(decision.reply)
        try:
            if action is Action.QUARANTINE:
                await self.quarantine.store(ctx)
                ctx.delivery = Delivery.QUARANTINED
                return str(accepted_reply(ctx.queue_id))
            await self.enqueue(ctx)
        except RefusedUpstream as refused:
            ctx.delivery = Delivery.REFUSED_UPSTREAM
            return refused.reply()
        except Exception:
            log.exception("queue %s: could not store message", ctx.queue_id)
            ctx.delivery = Delivery.STORE_FAILED
            return str(R_SPOOL_FAILED)
        if ctx.delivery is None:
            ctx.delivery = Delivery.QUEUED
        return str(accepted_reply(ctx.queue_id))
