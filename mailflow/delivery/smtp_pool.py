"""Outbound SMTP and LMTP sessions: connect, STARTTLS policy, AUTH, one transaction, reuse.

The relay and MX transports (``relay.py``) and the LMTP transport (``lmtp.py``) decide
*where* a message goes; this module knows *how* to talk to one host, with the one
client in ``smtp_client.py``. A session that
finished a transaction cleanly goes back to a small per-destination pool and is
reused for the next message (RFC 5321 4.1.1.5: RSET first only if the previous
transaction did not end cleanly), so a burst of relayed mail costs one TCP+TLS+AUTH
handshake. Idle sessions get QUIT after ``pool_idle`` seconds.

Every failure to *reach* a host becomes a :class:`SessionError` carrying a 4xx
:class:`Outcome`: a connection refused, a timeout or a TLS policy violation never
bounces mail, it is retried (RFC 5321 4.5.4.1).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Literal

from mailflow.delivery.idle import IdleSessions
from mailflow.delivery.outcome import Outcome
from mailflow.delivery.smtp_client import ReplyError, SessionClosed, SMTPSession

log = logging.getLogger("mailflow.relay")

TLSPolicy = Literal["none", "opportunistic", "required", "verify"]
Dialect = Literal["smtp", "lmtp"]
IdleKey = tuple[str, int, str, str, str, str, str]

QUIT_TIMEOUT = 2.0  # seconds to wait for the reply to QUIT before just closing


class SessionError(Exception):
    """The host could not be used, or the session failed mid-transaction.

    ``answered`` holds the recipients the server had already answered for good
    before the failure (a refusal at RCPT; on LMTP, a reply after the message);
    ``outcome`` applies to every other recipient.
    """

    def __init__(self, outcome: Outcome, answered: dict[str, Outcome] | None = None) -> None:
        super().__init__(str(outcome))
        self.outcome = outcome
        self.answered: dict[str, Outcome] = answered or {}

    def outcomes(self, rcpts: list[str]) -> dict[str, Outcome]:
        """An outcome for each of ``rcpts``: its answer if it had one, else ``outcome``."""
        return {rcpt: self.answered.get(rcpt, self.outcome) for rcpt in rcpts}


@dataclass(frozen=True, slots=True)
class Destination:
    """One SMTP or LMTP server and how to talk to it.

    ``host`` is what we connect to (a name or an address), or ``socket`` a unix
    socket path instead; ``tls_name`` is the name the certificate must carry under the
    ``verify`` policy (for MX delivery: the MX host name, not the address we connected
    to). ``protocol`` ``lmtp`` greets with LHLO and reads one reply per recipient
    after the message (RFC 2033). ``timeout`` bounds each command's reply,
    ``data_timeout`` (default: ``timeout``) the replies after the message.
    """

    host: str
    port: int
    tls: TLSPolicy = "opportunistic"
    tls_name: str = ""
    username: str | None = None
    password: str | None = None
    timeout: float = 60.0
    ca_file: str | None = None
    protocol: Dialect = "smtp"
    socket: str | None = None
    data_timeout: float | None = None

    @property
    def key(self) -> IdleKey:
        """Sessions are only shared between identical security settings."""
        return (
            self.host,
            self.port,
            self.tls,
            self.tls_name,
            self.username or "",
            self.protocol,
            self.socket or "",
        )

    def __str__(self) -> str:
        return self.socket if self.socket is not None else f"{self.host}:{self.port}"


def _tls_context(dest: Destination) -> ssl.SSLContext:
    if dest.tls == "verify":
        return ssl.create_default_context(cafile=dest.ca_file)
    # opportunistic/required: encryption against passive eavesdropping only; most MX
    # certificates would not verify anyway (RFC 7435 opportunistic security).
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _temp(status: str, text: str, answered: dict[str, Outcome] | None = None) -> SessionError:
    return SessionError(Outcome(451, f"{status} {text}"), answered)


class SMTPPool:
    """Opens sessions and keeps idle ones for reuse, per :attr:`Destination.key`."""

    def __init__(self, helo_name: str, size: int = 4, idle: float = 5.0) -> None:
        self.helo_name = helo_name
        self.size = size
        self.idle = idle
        # Idle sessions per destination; the most recently used is taken first.
        self._idle: IdleSessions[IdleKey, SMTPSession] = IdleSessions(
            size, idle, clean=_idle_clean, quit=_quit
        )
        self._contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}
        self.opened = 0  # sessions opened so far (for tests and metrics)

    # --- opening --------------------------------------------------------------------------

    async def open(self, dest: Destination) -> SMTPSession:
        """Connect, EHLO, apply the TLS policy, AUTH; raise :class:`SessionError`."""
        try:
            session = await self._setup(dest)
        except SessionError:
            raise
        except ReplyError as exc:
            # A 4xx/5xx greeting or EHLO reply still only means "not now" for this host.
            raise _temp("4.4.2", f"{dest} said: {exc.reply}") from exc
        except (OSError, TimeoutError) as exc:
            raise _temp("4.4.1", f"cannot talk to {dest}: {_describe(exc)}") from exc
        self.opened += 1
        return session

    async def _connect(self, dest: Destination) -> SMTPSession:
        session, greeting = await SMTPSession.connect(
            dest.host,
            dest.port,
            dest.timeout,
            unix_socket=dest.socket,
            data_timeout=dest.data_timeout,
        )
        try:
            if greeting.code != 220:
                raise ReplyError("greeting", greeting)
            if dest.protocol == "lmtp":
                await session.lhlo(self.helo_name)
            else:
                await session.hello(self.helo_name)
        except BaseException:
            session.close()
            raise
        return session

    async def _setup(self, dest: Destination) -> SMTPSession:
        session = await self._connect(dest)
        try:
            if dest.tls != "none":
                session = await self._starttls(session, dest)
            if dest.username:
                # Never hand out credentials in the clear.
                if not session.tls:
                    raise _temp("4.7.0", f"not sending AUTH credentials to {dest} without TLS")
                try:
                    await session.login(dest.username, dest.password or "")
                except (ReplyError, ValueError) as exc:
                    # Deferred, not bounced: a wrong password is the admin's to fix.
                    raise _temp("4.7.8", f"AUTH at {dest} failed: {exc}") from exc
        except BaseException:
            session.close()
            raise
        return session

    def _context(self, dest: Destination) -> ssl.SSLContext:
        """One context per (verify?, CA file): loading the CA store costs milliseconds."""
        key = (dest.tls == "verify", dest.ca_file)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = _tls_context(dest)
        return ctx

    async def _starttls(self, session: SMTPSession, dest: Destination) -> SMTPSession:
        """RFC 3207: STARTTLS per policy; must be followed by a fresh EHLO (4.2).

        Returns the session to go on with: a new clear-text one when an opportunistic
        handshake failed.
        """
        strict = dest.tls in ("required", "verify")
        if not session.supports("starttls"):
            if strict:
                raise _temp("4.7.5", f"TLS {dest.tls} but {dest} does not offer STARTTLS")
            return session
        try:
            await session.starttls(self._context(dest), dest.tls_name or dest.host)
        except ReplyError as exc:
            if strict:
                raise _temp("4.7.5", f"{dest} refused STARTTLS: {exc.reply}") from exc
            log.info("relay: %s refused STARTTLS (%s); going on without TLS", dest, exc.reply)
            return session  # a refused STARTTLS leaves the session as it was
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            session.close()
            if strict:
                raise _temp("4.7.5", f"TLS with {dest} failed: {_describe(exc)}") from exc
            # Opportunistic: the session is unusable after a failed handshake; start
            # over in clear text rather than not delivering at all (RFC 7435).
            log.info("relay: STARTTLS with %s failed (%s); retrying without TLS", dest, exc)
            return await self._connect(dest)
        await session.hello(self.helo_name)
        return session

    # --- the pool -------------------------------------------------------------------------

    async def acquire(self, dest: Destination) -> tuple[SMTPSession, bool]:
        """An idle session to ``dest`` that is still open, or a new one.

        Returns the session and whether it was reused from the pool. Whether the
        server still answers shows in the transaction itself: a session found
        closed before the message was sent is replaced by :meth:`send`.
        """
        session = self._idle.take(dest.key)
        if session is not None:
            return session, True
        return await self.open(dest), False

    def release(self, dest: Destination, session: SMTPSession, reusable: bool = True) -> None:
        """Give a session back; it is kept only if it ended a transaction cleanly."""
        if reusable:
            self._idle.give(dest.key, session)
        else:
            self._idle.close(session)

    async def aclose(self) -> None:
        """QUIT every idle session (at shutdown)."""
        await self._idle.aclose(QUIT_TIMEOUT * 2)

    # --- one transaction ------------------------------------------------------------------

    async def send(
        self, dest: Destination, sender: str, rcpts: list[str], message: bytes
    ) -> dict[str, Outcome]:
        """Deliver over a pooled session; raise :class:`SessionError` if none is usable
        or the session fails before every recipient has its answer (the answers it
        did get are in :attr:`SessionError.answered`).

        A pooled session may have been closed by the server since its last use; if
        that shows before the message itself was sent, the transaction is repeated
        once on a fresh session. After the message was sent it might have arrived:
        it is retried later (a possible duplicate, RFC 5321 6.1), never at once.
        """
        session, reused = await self.acquire(dest)
        while True:
            out: dict[str, Outcome] = {}
            try:
                await session.send_message(sender, rcpts, message, out)
            except SessionClosed as exc:
                session.abort()
                if reused and not exc.data_sent:  # the server closed our idle session
                    session, reused = await self.open(dest), False
                    continue
                if exc.data_sent:
                    raise _temp(
                        "4.4.2", f"connection to {dest} lost after DATA: {_describe(exc)}", out
                    ) from exc
                if exc.reply is not None:  # 421: the server is going away (RFC 5321 3.8)
                    raise SessionError(exc.reply.outcome, out) from exc
                raise _temp("4.4.2", f"connection to {dest} lost: {_describe(exc)}", out) from exc
            except (OSError, TimeoutError) as exc:
                session.abort()
                raise _temp("4.4.2", f"{dest}: {_describe(exc)}", out) from exc
            except BaseException:
                session.abort()
                raise
            self.release(dest, session)
            return out


def _idle_clean(session: SMTPSession) -> bool:
    return session.idle_clean


async def _quit(session: SMTPSession) -> None:
    if session.is_open:
        await session.quit(QUIT_TIMEOUT)
    else:
        session.close()


def _describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return " ".join(text.split())
