"""SMTP front end: aiosmtpd protocol -> the mailflow pipeline -> spool.

The handler turns each SMTP phase into one pipeline stage; a verdict at an early
stage is answered at that command. A message is acknowledged with 250 only after
it has been fsync'd into the spool (or quarantine), never before.

The per-connection protocol (limits, timeouts, STARTTLS bookkeeping) is
:class:`mailflow.smtp_session.MailflowSMTP`; AUTH is in :mod:`mailflow.auth`.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import re
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SMTPEnvelope

from mailflow.app import App
from mailflow.authlimit import AuthGuard, Scope
from mailflow.config import AuthThrottleConfig, parse_listen
from mailflow.delivery.outcome import RefusedUpstream
from mailflow.delivery.spool import new_queue_id
from mailflow.message import (
    Connection,
    Delivery,
    Envelope,
    MessageContext,
    PluginRun,
    format_header,
)
from mailflow.mime import HeaderBlock
from mailflow.msglog import record_after_reply
from mailflow.normalize import has_bare_newline, normalize_newlines
from mailflow.policy import admit_recipient, in_networks, is_local_recipient
from mailflow.quarantine import Quarantine
from mailflow.smtp_data import BulkPacer, ByteBudget, DataFacts, clear_directory
from mailflow.smtp_session import MailflowSMTP
from mailflow.verdict import Action, Mutation, Result, SMTPReply

log = logging.getLogger("mailflow.smtp")


# RFC 5321 4.2 replies used by the front end.
R_TOO_MANY_RCPTS = SMTPReply(452, "Too many recipients", "4.5.3")
R_LOOP = SMTPReply(554, "Too many Received headers: mail loop?", "5.4.6")
R_BARE_NEWLINE = SMTPReply(
    550, "Bare CR or LF in message data is not allowed (RFC 5322 2.3)", "5.6.0"
)
R_NUL = SMTPReply(550, "NUL characters are not allowed in message data", "5.6.0")
R_SPOOL_FAILED = SMTPReply(451, "Local error storing the message, try again later", "4.3.0")
R_BAD_ADDRESS = SMTPReply(553, "Malformed address", "5.1.3")
R_SENDER_NEEDED = SMTPReply(503, "Need MAIL command first", "5.5.1")
R_LOCAL_ERROR = SMTPReply(451, "Local error in processing, try again later", "4.3.0")

# Under queue.directory: temporary files of large messages while they arrive.
INCOMING_DIR = "incoming"

# RFC 5322 2.2 field name (printable ASCII except ":"), with obsolete WSP before ":".
_HEADER_START = re.compile(rb"[!-9;-~]+[ \t]*:")


def _sender(address: str | None) -> str:
    """The envelope sender as mailflow models it: "" is the null sender."""
    return "" if not address or address == "<>" else address


_ADDRESS_OK = re.compile(
    r"^[^\s<>()\[\],;:\\\"]+@[A-Za-z0-9.\-\[\]:]+$|^postmaster$", re.IGNORECASE
)


@dataclass(slots=True)
class Transaction:
    """Per-MAIL-transaction state kept on aiosmtpd's Envelope."""

    runs: list[PluginRun] = field(default_factory=list)
    mutations: list[Mutation] = field(default_factory=list)


def _tx(envelope: SMTPEnvelope) -> Transaction:
    tx = getattr(envelope, "mailflow_tx", None)
    if tx is None:
        tx = Transaction()
        envelope.mailflow_tx = tx  # type: ignore[attr-defined]
    return tx


def _reply_for(result: Result, stage: str) -> str:
    reply = result.smtp_reply()
    if reply is None:
        reply = SMTPReply(550, "Rejected", "5.7.1")
    if stage == "rcpt" and result.action is Action.DISCARD:
        reply = SMTPReply(550, "Recipient rejected", "5.7.1")
    return str(reply)


class Handler:
    """aiosmtpd handler: the glue between SMTP commands and pipeline stages."""

    def __init__(
        self, app: App, enqueue: Callable[..., Any], *, clear_incoming: bool = True
    ) -> None:
        self.app = app
        self.enqueue = enqueue  # async (ctx) -> queue id, after durable store
        self.quarantine = Quarantine(app.config.quarantine.directory)
        self.active = 0  # open connections (MailflowSMTP keeps it exact)
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

    async def handle_exception(self, error: Exception) -> str:
        """A bug or I/O error in a stage: log it, answer a temporary failure, keep serving."""
        log.error("SMTP session error: %r", error, exc_info=error)
        return str(R_LOCAL_ERROR)

    @staticmethod
    def conn(session: Session) -> Connection:
        return session.mailflow_conn  # type: ignore[attr-defined]

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
        conn = self.conn(session)
        conn.helo = hostname
        result, runs = await self.app.pipeline.run_stage("helo", connection=conn, name=hostname)
        # A second EHLO replaces the first (RFC 5321 4.1.4), and so do its results.
        server.mailflow_helo_runs = runs  # type: ignore[attr-defined]
        if result is not None and result.action in (Action.REJECT, Action.TEMPFAIL):
            return _reply_for(result, "helo")
        return None

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
        if address and address != "<>" and not _address_ok(address):
            return str(R_BAD_ADDRESS)
        tx = _tx(envelope)
        result, runs = await self.app.pipeline.run_stage(
            "mail", connection=conn, sender=_sender(address), options=mail_options
        )
        tx.runs.extend(runs)
        if result is not None and result.action in (Action.REJECT, Action.TEMPFAIL):
            return _reply_for(result, "mail")
        for run in runs:
            if run.result is not None:
                tx.mutations.extend(run.result.mutations)
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
        conn = self.conn(session)
        config = self.app.config
        if envelope.mail_from is None:
            return str(R_SENDER_NEEDED)
        if not _address_ok(address):
            return str(R_BAD_ADDRESS)
        if len(envelope.rcpt_tos) >= config.server.max_recipients:
            return str(R_TOO_MANY_RCPTS)
        # Relay control; postmaster (RFC 5321 4.5.1) becomes its configured mailbox here,
        # so the plugins, routing and delivery see an ordinary address.
        asked = address
        address, refusal = admit_recipient(config, conn, address)
        if refusal is not None:
            return str(refusal)
        if address != asked and address in envelope.rcpt_tos:
            return "250 2.1.5 Ok"  # <postmaster> and postmaster@ ours: one mailbox, one copy
        maildir = config.delivery.maildir
        if (
            is_local_recipient(config, address)
            and config.delivery.method == "maildir"
            and maildir.quota is not None
        ):
            try:
                await asyncio.to_thread(self.app.maildir.check_quota, address, 0)
            except Exception:
                code = maildir.over_quota_code
                status = "4.2.2" if code == 452 else "5.2.2"
                return f"{code} {status} Mailbox full"
        tx = _tx(envelope)
        result, runs = await self.app.pipeline.run_stage(
            "rcpt",
            connection=conn,
            sender=_sender(envelope.mail_from),
            recipient=address,
            options=rcpt_options,
        )
        tx.runs.extend(runs)
        if result is not None and result.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCARD):
            return _reply_for(result, "rcpt")
        for run in runs:
            if run.result is not None:
                tx.mutations.extend(run.result.mutations)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    # --- DATA -----------------------------------------------------------------------------

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
            facts.received = _count_received(raw)
        # Else the reader did it block by block as the data arrived: the NUL check,
        # bare line ends made CRLF, Received fields counted (mailflow.smtp_data).
        if facts.nul:
            return str(R_NUL)
        if facts.bare_newline and config.server.bare_newline == "reject":
            return str(R_BARE_NEWLINE)
        queue_id = new_queue_id()
        if facts.received >= config.server.max_received_headers:
            return str(R_LOOP)
        if not raw.startswith(b"\r\n") and not _HEADER_START.match(raw):
            # No header section at all (RFC 5322 3.5 wants a blank line before the
            # body): add the blank line, or our Received header would turn the first
            # body line into a broken header field.
            raw = b"\r\n" + raw
        raw = self.received_header(conn, session, envelope, queue_id) + raw
        # The message lives on as ctx.raw; the envelope's copy (as large as the message)
        # would only double the memory of a large message while the plugins run.
        envelope.content = envelope.original_content = None
        ctx = MessageContext(
            raw,
            Envelope(
                _sender(envelope.mail_from),
                list(envelope.rcpt_tos),
                list(envelope.mail_options),
            ),
            conn,
            queue_id=queue_id,
        )
        tx = _tx(envelope)
        ctx.runs.extend(getattr(server, "mailflow_connect_runs", []))
        ctx.runs.extend(getattr(server, "mailflow_helo_runs", []))
        ctx.runs.extend(tx.runs)
        for run in ctx.runs:
            if run.result is not None:
                ctx.score += run.result.score
        ctx.apply(tx.mutations)
        await self.app.pipeline.run_data(ctx)
        reply = await self.finish(ctx)
        elapsed = time.perf_counter() - started
        record_after_reply(ctx, reply, elapsed, self.app.metrics.observe_message)
        return reply

    async def finish(self, ctx: MessageContext) -> str:
        """Turn the pipeline's decision into storage and an SMTP reply."""
        action = ctx.action
        if action in (Action.REJECT, Action.TEMPFAIL):
            reply = ctx.reply or (
                SMTPReply(550, "Rejected", "5.7.1")
                if action is Action.REJECT
                else SMTPReply(451, "Try again later", "4.7.1")
            )
            return str(reply)
        if action is Action.DISCARD:
            ctx.delivery = Delivery.DISCARDED
            return f"250 2.0.0 Ok: {ctx.queue_id} discarded"
        try:
            if action is Action.QUARANTINE:
                await self.quarantine.store(ctx)
                ctx.delivery = Delivery.QUARANTINED
                return f"250 2.0.0 Ok: queued as {ctx.queue_id}"
            if not ctx.envelope.rcpt_tos:
                ctx.delivery = Delivery.NO_RECIPIENTS
                return f"250 2.0.0 Ok: {ctx.queue_id} (no recipients left)"
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
        return f"250 2.0.0 Ok: queued as {ctx.queue_id}"

    def received_header(
        self, conn: Connection, session: Session, envelope: SMTPEnvelope, queue_id: str
    ) -> bytes:
        """RFC 5321 4.4 trace header; 'with' uses RFC 3848 protocol names."""
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None:
            proto += "S"
        if conn.authenticated_user:
            proto += "A"
        helo = _sanitize(conn.helo or "unknown")
        rdns = _sanitize(conn.reverse_name or "")
        ip = f"[{conn.ip}]" if ":" not in conn.ip else f"[IPv6:{conn.ip}]"
        by = self.app.config.server.hostname
        rcpt = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else ""
        value = (
            f"from {helo} ({rdns + ' ' if rdns else ''}{ip}) by {by} (mailflow) "
            f"with {proto} id {queue_id}"
        )
        if rcpt:
            value += f" for <{_sanitize(rcpt)}>"
        value += "; " + _date_now()
        return format_header("Received", value)


_date_cache: tuple[int, str] = (0, "")


def _date_now() -> str:
    """RFC 5322 3.3 date-time of now, local time, formatted once per second (~9 us each)."""
    global _date_cache
    now = time.time()
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, localtime=True))
    return _date_cache[1]


def _address_ok(address: str) -> bool:
    """Plausible mailbox syntax, and valid UTF-8 (RFC 6531 3.3): aiosmtpd hands us
    undecodable bytes as surrogate escapes, which must not reach paths or the spool."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return _ADDRESS_OK.match(address) is not None


# Printable ASCII except the characters that delimit a Received clause: ( ) ; < >
_UNSAFE_IN_RECEIVED = re.compile(r"[^\x21-\x27\x2a-\x3a\x3d\x3f-\x7e]")


@functools.lru_cache(maxsize=4096)
def _sanitize(text: str) -> str:
    """``text`` safe inside a Received header: every other character becomes ``_``.

    Cached: the same HELO names and recipients come back message after message.
    """
    return _UNSAFE_IN_RECEIVED.sub("_", text[:255])


def _count_received(raw: bytes) -> int:
    """Received fields in the header block (mailflow.mime: one C-level count)."""
    return HeaderBlock(raw).count("received")


# --- relay control (pure functions, shared with `mailflow check`) -----------------------------


# --- servers -------------------------------------------------------------------------------


def make_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def protocol_factory(
    app: App, handler: Handler, authenticator: Any = None
) -> Callable[[], MailflowSMTP]:
    """What makes the protocol object for each new connection (the TLS context is loaded
    here, once)."""
    cfg = app.config.server
    tls_context = make_tls_context(str(cfg.tls.cert), str(cfg.tls.key)) if cfg.tls else None
    loop = asyncio.get_running_loop()
    excluded = _excluded_mechanisms(app, authenticator)

    def factory() -> MailflowSMTP:
        return MailflowSMTP(
            handler,
            hostname=cfg.hostname,
            ident="mailflow ESMTP",
            data_size_limit=cfg.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls_context,
            require_starttls=bool(cfg.tls and cfg.tls.require),
            timeout=cfg.command_timeout,
            auth_require_tls=True,
            authenticator=authenticator,
            auth_exclude_mechanism=excluded,
            loop=loop,
        )

    return factory


async def start_servers(
    app: App,
    handler: Handler,
    authenticator: Any = None,
    *,
    factory: Callable[[], MailflowSMTP] | None = None,
) -> list[asyncio.Server]:
    """Listen on every configured address; returns the asyncio servers.

    ``factory`` (default: :func:`protocol_factory`) is called for every connection; a
    reload (mailflow.reload) passes one whose target it can swap.
    """
    make = factory or protocol_factory(app, handler, authenticator)
    loop = asyncio.get_running_loop()
    servers = []
    for item in app.config.server.listen:
        host, port = parse_listen(item)
        servers.append(await loop.create_server(make, host=host, port=port, reuse_address=True))
    return servers


def _excluded_mechanisms(app: App, authenticator: Any) -> list[str]:
    """Mechanisms not to offer: all without an authenticator (else aiosmtpd offers
    ones that always fail), otherwise those missing from ``server.auth.mechanisms``."""
    if authenticator is None:
        return ["PLAIN", "LOGIN"]
    auth = app.config.server.auth
    allowed = set(auth.mechanisms) if auth else {"PLAIN", "LOGIN"}
    return [m for m in ("PLAIN", "LOGIN") if m not in allowed]


def bound_addresses(servers: list[asyncio.Server]) -> list[tuple[str, int]]:
    out = []
    for server in servers:
        for sock in server.sockets:
            name = sock.getsockname()
            out.append((name[0], name[1]))
    return out
