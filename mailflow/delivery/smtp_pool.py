"""Outbound SMTP sessions: connect, STARTTLS policy, AUTH, one transaction, reuse.

The relay and MX transports (``relay.py``) decide *where* a message goes; this module
knows *how* to talk to one host. A session that finished a transaction cleanly goes
back to a small per-destination pool and is reused for the next message after RSET
(RFC 5321 4.1.1.5), so a burst of relayed mail costs one TCP+TLS+AUTH handshake.
Idle sessions get QUIT after ``pool_idle`` seconds.

Every failure to *reach* a host becomes a :class:`SessionError` carrying a 4xx
:class:`Outcome`: a connection refused, a timeout or a TLS policy violation never
bounces mail, it is retried (RFC 5321 4.5.4.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import aiosmtplib

from mailflow.delivery.outcome import Outcome

log = logging.getLogger("mailflow.relay")

TLSPolicy = Literal["none", "opportunistic", "required", "verify"]

QUIT_TIMEOUT = 2.0  # seconds to wait for the reply to QUIT before just closing
RSET_TIMEOUT = 5.0  # a pooled session that cannot RSET this fast is discarded


class SessionError(Exception):
    """The host could not be used at all; ``outcome`` applies to every recipient."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(str(outcome))
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class Destination:
    """One SMTP server and how to talk to it.

    ``host`` is what we connect to (a name or an address); ``tls_name`` is the name the
    certificate must carry under the ``verify`` policy (for MX delivery: the MX host
    name, not the address we connected to).
    """

    host: str
    port: int
    tls: TLSPolicy = "opportunistic"
    tls_name: str = ""
    username: str | None = None
    password: str | None = None
    timeout: float = 60.0
    ca_file: str | None = None

    @property
    def key(self) -> tuple[str, int, str, str, str]:
        """Sessions are only shared between identical security settings."""
        return (self.host, self.port, self.tls, self.tls_name, self.username or "")

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _tls_context(dest: Destination) -> ssl.SSLContext:
    if dest.tls == "verify":
        return ssl.create_default_context(cafile=dest.ca_file)
    # opportunistic/required: encryption against passive eavesdropping only; most MX
    # certificates would not verify anyway (RFC 7435 opportunistic security).
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _temp(status: str, text: str) -> SessionError:
    return SessionError(Outcome(451, f"{status} {text}"))


def _reply_outcome(exc: aiosmtplib.SMTPResponseException) -> Outcome:
    text = " ".join(str(exc.message).split())  # multi-line replies -> one line
    return Outcome(exc.code, text)


class SMTPPool:
    """Opens sessions and keeps idle ones for reuse, per :attr:`Destination.key`."""

    def __init__(self, helo_name: str, size: int = 4, idle: float = 5.0) -> None:
        self.helo_name = helo_name
        self.size = size
        self.idle = idle
        self._idle: dict[tuple[str, int, str, str, str], list[tuple[aiosmtplib.SMTP, float]]]
        self._idle = defaultdict(list)
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.opened = 0  # sessions opened so far (for tests and metrics)

    # --- opening --------------------------------------------------------------------------

    async def open(self, dest: Destination) -> aiosmtplib.SMTP:
        """Connect, EHLO, apply the TLS policy, AUTH; raise :class:`SessionError`."""
        client = aiosmtplib.SMTP(
            hostname=dest.host,
            port=dest.port,
            local_hostname=self.helo_name,
            timeout=dest.timeout,
            start_tls=False,  # we apply the policy ourselves, below
            use_tls=False,
        )
        try:
            await self._setup(client, dest, allow_tls=True)
        except SessionError:
            client.close()
            raise
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            # A 5xx greeting or EHLO reply still only means "not now" for this host.
            raise _temp("4.4.2", f"{dest} said: {_reply_outcome(exc)}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            raise _temp("4.4.1", f"cannot talk to {dest}: {_describe(exc)}") from exc
        self.opened += 1
        return client

    async def _setup(self, client: aiosmtplib.SMTP, dest: Destination, allow_tls: bool) -> None:
        await client.connect()
        await client.ehlo()
        if dest.tls != "none" and allow_tls:
            await self._starttls(client, dest)
        if dest.username:
            # Never hand out credentials in the clear.
            if client.get_transport_info("sslcontext") is None:
                raise _temp("4.7.0", f"not sending AUTH credentials to {dest} without TLS")
            try:
                await client.login(dest.username, dest.password or "")
            except aiosmtplib.SMTPAuthenticationError as exc:
                # Deferred, not bounced: a wrong password is the admin's to fix.
                raise _temp("4.7.8", f"AUTH at {dest} failed: {_reply_outcome(exc)}") from exc

    async def _starttls(self, client: aiosmtplib.SMTP, dest: Destination) -> None:
        """RFC 3207: STARTTLS per policy; must be followed by a fresh EHLO (4.2)."""
        strict = dest.tls in ("required", "verify")
        if not client.supports_extension("starttls"):
            if strict:
                raise _temp("4.7.5", f"TLS {dest.tls} but {dest} does not offer STARTTLS")
            return
        try:
            await client.starttls(
                tls_context=_tls_context(dest), server_hostname=dest.tls_name or dest.host
            )
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            if strict:
                raise _temp("4.7.5", f"TLS with {dest} failed: {_describe(exc)}") from exc
            # Opportunistic: the session is unusable after a failed handshake; start
            # over in clear text rather than not delivering at all (RFC 7435).
            log.info("relay: STARTTLS with %s failed (%s); retrying without TLS", dest, exc)
            client.close()
            await client.connect()
            await client.ehlo()
            return
        await client.ehlo()

    # --- the pool -------------------------------------------------------------------------

    async def acquire(self, dest: Destination) -> tuple[aiosmtplib.SMTP, bool]:
        """An idle session to ``dest`` that still answers RSET, or a new one.

        Returns the session and whether it was reused from the pool.
        """
        idle = self._idle.get(dest.key)
        while idle:
            client, _ = idle.pop()
            self._cancel_timer(client)
            if not client.is_connected:
                continue
            try:
                await client.rset(timeout=RSET_TIMEOUT)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
                continue
            return client, True
        return await self.open(dest), False

    def release(self, dest: Destination, client: aiosmtplib.SMTP, reusable: bool = True) -> None:
        """Give a session back; it is kept only if it ended a transaction cleanly."""
        idle = self._idle[dest.key]
        if not reusable or not client.is_connected or len(idle) >= self.size or self.idle <= 0:
            self._quit(client)
            return
        idle.append((client, time.monotonic()))
        loop = asyncio.get_running_loop()
        self._timers[id(client)] = loop.call_later(self.idle, self._expire, dest.key, client)

    def _expire(self, key: tuple[str, int, str, str, str], client: aiosmtplib.SMTP) -> None:
        self._timers.pop(id(client), None)
        idle = self._idle.get(key, [])
        for i, (c, _) in enumerate(idle):
            if c is client:
                del idle[i]
                self._quit(client)
                break

    def _cancel_timer(self, client: aiosmtplib.SMTP) -> None:
        timer = self._timers.pop(id(client), None)
        if timer is not None:
            timer.cancel()

    def _quit(self, client: aiosmtplib.SMTP) -> None:
        if not client.is_connected:
            client.close()
            return
        task = asyncio.get_running_loop().create_task(_polite_quit(client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """QUIT every idle session (at shutdown)."""
        for idle in self._idle.values():
            for client, _ in idle:
                self._cancel_timer(client)
                self._quit(client)
        self._idle.clear()
        if self._closing:
            await asyncio.wait(self._closing, timeout=QUIT_TIMEOUT * 2)

    # --- one transaction ------------------------------------------------------------------

    async def send(
        self, dest: Destination, sender: str, rcpts: list[str], message: bytes
    ) -> dict[str, Outcome]:
        """Deliver over a pooled session; raise :class:`SessionError` if none is usable.

        A pooled session may have been closed by the server since its last use; in
        that case the transaction is retried once on a fresh session.
        """
        client, reused = await self.acquire(dest)
        while True:
            try:
                outcomes = await transaction(client, sender, rcpts, message)
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                client.close()
                if reused:  # the server closed our idle session: one fresh try
                    client, reused = await self.open(dest), False
                    continue
                raise _temp("4.4.2", f"connection to {dest} lost: {_describe(exc)}") from exc
            except SessionError:
                client.close()
                raise
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                client.close()
                raise _temp("4.4.2", f"{dest}: {_describe(exc)}") from exc
            self.release(dest, client)
            return outcomes


async def transaction(
    client: aiosmtplib.SMTP, sender: str, rcpts: list[str], message: bytes
) -> dict[str, Outcome]:
    """MAIL, one RCPT per recipient, DATA: an :class:`Outcome` per recipient.

    RCPT replies are per recipient; the DATA reply applies to every recipient
    accepted at RCPT (RFC 5321 3.3). A refused MAIL FROM applies to all.
    """
    options = []
    if client.supports_extension("size"):
        options.append(f"SIZE={len(message)}")  # RFC 1870
    if client.supports_extension("8bitmime") and not message.isascii():
        options.append("BODY=8BITMIME")  # RFC 6152
    try:
        await client.mail(sender, options=options)
    except aiosmtplib.SMTPSenderRefused as exc:
        outcome = _reply_outcome(exc)
        await _rset_quietly(client)
        return dict.fromkeys(rcpts, outcome)
    out: dict[str, Outcome] = {}
    accepted: list[str] = []
    for rcpt in rcpts:
        try:
            await client.rcpt(rcpt)
            accepted.append(rcpt)
        except aiosmtplib.SMTPRecipientRefused as exc:
            out[rcpt] = _reply_outcome(exc)
    if not accepted:
        await _rset_quietly(client)  # RFC 5321 3.3: no DATA without a recipient
        return out
    try:
        reply = await client.data(message)
    except aiosmtplib.SMTPDataError as exc:
        outcome = _reply_outcome(exc)
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
        # The message may have arrived: retry it later (a possible duplicate, RFC 5321
        # 6.1), never at once on a fresh session as if nothing had been sent.
        raise _temp("4.4.2", f"connection lost after DATA: {_describe(exc)}") from exc
    else:
        outcome = Outcome(reply.code, " ".join(reply.message.split()))
    out.update(dict.fromkeys(accepted, outcome))
    return out


async def _rset_quietly(client: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
        await client.rset(timeout=RSET_TIMEOUT)


async def _polite_quit(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit(timeout=QUIT_TIMEOUT)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        pass
    finally:
        client.close()


def _describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return " ".join(text.split())
