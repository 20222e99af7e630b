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
from mailflow.message import Connection, MessageContext, format_header
from mailflow.mime import HeaderBlock
from mailflow.msglog import record_after_reply
from mailflow.normalize import has_bare_newline, normalize_newlines
from mailflow.policy import in_networks, is_local_recipient
from mailflow.quarantine import Quarantine
from mailflow.smtp_data import BulkPacer, ByteBudget, DataFacts, clear_directory
from mailflow.smtp_session import MailflowSMTP
from mailflow.transaction import Decision, Transaction, accepted_reply
from mailflow.verdict import Action, SMTPReply

log = logging.getLogger("mailflow.smtp")


# RFC 5321 4.2 replies used by the front end.
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


class Handler:
    """aiosmtpd handler: the glue between SMTP commands and pipeline stages."""

    def __init__(self, app: App, enqueue: Callable[..., Any]) -> None:
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
        """A full local mailbox refuses the recipient at RCPT (``over_quota_code``)."""
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
        except Exception:
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
        if address and address != "<>" and not _address_ok(address):
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
        if not _address_ok(address):
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
                ctx.extra["delivery"] = "discarded"
            return str(decision.reply)
        try:
            if action is Action.QUARANTINE:
                await self.quarantine.store(ctx)
                ctx.extra["delivery"] = "quarantined"
                return str(accepted_reply(ctx.queue_id))
            await self.enqueue(ctx)
        except RefusedUpstream as refused:
            ctx.extra["delivery"] = "refused upstream"
            return refused.reply()
        except Exception:
            log.exception("queue %s: could not store message", ctx.queue_id)
            ctx.extra["delivery"] = "store failed"
            return str(R_SPOOL_FAILED)
        ctx.extra.setdefault("delivery", "queued")
        return str(accepted_reply(ctx.queue_id))


def with_trace(raw: bytes, received: bytes) -> bytes:
    """``raw`` with the ``received`` field in front."""
    if not raw.startswith(b"\r\n") and not _HEADER_START.match(raw):
        # No header section at all (RFC 5322 3.5 wants a blank line before the
        # body): add the blank line, or the Received field would turn the first
        # body line into a broken header field.
        raw = b"\r\n" + raw
    return received + raw


def protocol_name(esmtp: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 name of the protocol a message came in by, for Received's "with"."""
    return ("ESMTP" if esmtp else "SMTP") + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(
    conn: Connection, by: str, protocol: str, recipients: list[str], queue_id: str
) -> bytes:
    """RFC 5321 4.4 trace header of a message received from ``conn`` by host ``by``."""
    helo = _sanitize(conn.helo or "unknown")
    rdns = _sanitize(conn.reverse_name or "")
    ip = f"[{conn.ip}]" if ":" not in conn.ip else f"[IPv6:{conn.ip}]"
    rcpt = recipients[0] if len(recipients) == 1 else ""
    value = (
        f"from {helo} ({rdns + ' ' if rdns else ''}{ip}) by {by} (mailflow) "
        f"with {protocol} id {queue_id}"
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


async def start_servers(
    app: App, handler: Handler, authenticator: Any = None
) -> list[asyncio.Server]:
    """Listen on every configured address; returns the asyncio servers."""
    cfg = app.config.server
    tls_context = make_tls_context(str(cfg.tls.cert), str(cfg.tls.key)) if cfg.tls else None
    loop = asyncio.get_running_loop()

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
            auth_exclude_mechanism=_excluded_mechanisms(app, authenticator),
            loop=loop,
        )

    servers = []
    for item in cfg.listen:
        host, port = parse_listen(item)
        servers.append(await loop.create_server(factory, host=host, port=port, reuse_address=True))
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
