"""The one SMTP-family client: relaying (SMTP, RFC 5321) and local delivery (LMTP,
RFC 2033), one session on an asyncio protocol.

SMTP and LMTP differ in two places only: the greeting command (``EHLO`` or
``LHLO``, :meth:`SMTPSession.hello` / :meth:`SMTPSession.lhlo`) and the replies after
the message: SMTP sends one for the whole transaction (RFC 5321 3.3), LMTP one per
accepted recipient, in RCPT order (RFC 2033 4.2). Both send the message through the
one :func:`dot_stuff` here.

Why not aiosmtplib: relaying spends most of its time in transactions on pooled,
already greeted sessions, and there a general-purpose client costs a round trip,
a future, a timeout and a reply object per command, plus address parsing and a
line-ending regex over every message. Here a transaction on a server offering
PIPELINING (RFC 2920) is two writes and two round trips: ``MAIL``, every ``RCPT``
and ``DATA`` in one write, their replies taken from whatever arrived, then the
message and its terminating dot in one write and one final reply. Servers without
PIPELINING get the same commands one at a time.

Setting a session up (greeting, ``EHLO``, ``STARTTLS``, ``AUTH``) is also done here,
since it is a handful of commands on the same transport; the *policy* (when TLS is
required, when credentials may be sent, what a failure means for the mail) lives in
``smtp_pool.py``.

Errors: a closed connection or a reply that is not SMTP raises :class:`SessionClosed`
(a :class:`ConnectionError`); its ``data_sent`` says whether the message itself had
been written, i.e. whether it may have arrived. An unexpected reply during set-up
raises :class:`ReplyError`. Timeouts raise :class:`TimeoutError`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import ssl
from collections.abc import Sequence
from typing import NamedTuple

from mailflow.delivery.outcome import Outcome

MAX_REPLY_LINES = 100  # a multi-line reply longer than this is a broken server
MAX_REPLY_BYTES = 64 * 1024  # an incomplete reply longer than this is a broken server

# Characters that would end an address on a command line or start a new command;
# a quoted local part ("a b"@example.org) may contain them.
_UNSAFE_ADDRESS = re.compile(r'[\s<>"]')
_QUOTED_LOCAL = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"')


class Reply(NamedTuple):
    """One (possibly multi-line) SMTP reply: its code and the text of each line."""

    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        """The text on one line, runs of white space collapsed (for logs and DSNs)."""
        return " ".join(" ".join(self.lines).split())

    @property
    def outcome(self) -> Outcome:
        return Outcome(self.code, self.text)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class SessionClosed(ConnectionError):
    """The connection ended (or the server stopped speaking SMTP) mid-exchange.

    ``data_sent`` is true once the message itself was written: it may have arrived.
    ``reply`` is the server's ``421`` if it announced the close.
    """

    def __init__(self, text: str, *, data_sent: bool = False, reply: Reply | None = None):
        super().__init__(text)
        self.data_sent = data_sent
        self.reply = reply


class ReplyError(Exception):
    """A set-up command (greeting, EHLO, STARTTLS, AUTH) got an unexpected reply."""

    def __init__(self, command: str, reply: Reply) -> None:
        super().__init__(f"{command}: {reply}")
        self.command = command
        self.reply = reply


def safe_address(address: str) -> bool:
    """Whether ``address`` can go between ``<>`` on a command line as it is."""
    return not _UNSAFE_ADDRESS.search(_QUOTED_LOCAL.sub("", address, count=1))


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload with its terminator: CRLF line ends, leading dots doubled.

    The one dot-stuffing of every message mailflow sends (relay, MX, LMTP):

    - RFC 5321 2.3.8: lines end in CRLF. A bare LF and a bare CR each end a line and
      are sent as CRLF (so ``a\\rb`` is two lines, ``a\\r\\r\\nb`` three); nothing is
      dropped.
    - RFC 5321 4.5.2: a line starting with "." gets another "." prepended; a line of
      only "." is sent as "..", so it cannot end the message early.
    - A message not ending in a line break gets CRLF before the terminating
      ``.<CRLF>``; an empty message is sent as the terminator alone.

    Linear in the size of the message. A message that already has CRLF line ends and
    no line starting with "." (the usual case: the front end normalises line ends) is
    only copied once, to append the terminator.
    """
    lf = message.count(b"\n")
    if lf != message.count(b"\r\n") or lf != message.count(b"\r"):
        message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if message.startswith(b"."):
        message = b"." + message
    if b"\n." in message:
        message = message.replace(b"\r\n.", b"\r\n..")
    if message and not message.endswith(b"\r\n"):
        return message + b"\r\n.\r\n"
    return message + b".\r\n"


def parse_reply(buffer: bytes | bytearray, start: int) -> tuple[Reply, int] | None:
    """The complete reply at ``buffer[start:]`` and the offset after it, or None.

    Raises :class:`SessionClosed` for lines that are not SMTP replies.
    """
    pos = start
    code = 0
    lines: list[str] = []
    while True:
        end = buffer.find(b"\n", pos)
        if end < 0:
            if len(buffer) - start > MAX_REPLY_BYTES:
                raise SessionClosed("reply too long")
            return None
        line = bytes(buffer[pos:end]).rstrip(b"\r")
        pos = end + 1
        head = line[:3]
        sep = line[3:4]
        if len(head) != 3 or not head.isdigit() or sep not in (b"", b" ", b"-"):
            raise SessionClosed(f"not an SMTP reply: {line[:80]!r}")
        if not lines:
            code = int(head)
        lines.append(line[4:].decode("utf-8", "replace"))
        if sep != b"-":
            return Reply(code, lines), pos
        if len(lines) >= MAX_REPLY_LINES:
            raise SessionClosed("multi-line reply too long")


# A timer may fire up to the loop's clock resolution early; within this of its
# deadline it counts as reached.
_CLOCK_SLACK = 0.001


class _ClientProtocol(asyncio.Protocol):
    """Collects what the server sends; wakes the one task waiting for it."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.closed = False
        self.error: BaseException | None = None
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        # One timer per connection, moved rather than re-created for every wait (a
        # timeout context per reply cost a timer handle and a heap push each time):
        # it fires at the latest deadline it was armed for and, if a wait with a later
        # deadline is still going on, arms itself again.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self._close(None)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._close(exc)

    def _close(self, exc: BaseException | None) -> None:
        self.closed = True
        self.error = self.error or exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_data(self, deadline: float) -> None:
        """Until more data arrives or the connection closes; TimeoutError once the
        loop's clock passes ``deadline``."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            raise TimeoutError
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._deadline_reached)
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _deadline_reached(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits now: the next wait arms the timer again
        loop = waiter.get_loop()
        if loop.time() + _CLOCK_SLACK >= self._deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = loop.call_at(self._deadline, self._deadline_reached)


class SMTPSession:
    """One SMTP or LMTP client session. Use :meth:`connect`, then :meth:`hello` (SMTP)
    or :meth:`lhlo` (LMTP) and friends."""

    def __init__(
        self, protocol: _ClientProtocol, timeout: float, data_timeout: float | None = None
    ) -> None:
        self._protocol = protocol
        self._pos = 0  # parse offset into protocol.buffer
        self.timeout = timeout  # seconds per command reply
        # Seconds for the replies after the message (RFC 5321 4.5.3.2.6 suggests 10 min).
        self.data_timeout = timeout if data_timeout is None else data_timeout
        self.lmtp = False  # set by lhlo(): one reply per accepted recipient after DATA
        self.extensions: dict[str, str] = {}  # EHLO/LHLO keyword (lower case) -> parameters
        self.tls = False
        # The server may still hold transaction state (a refused DATA, an aborted
        # pipeline): RSET before the next MAIL.
        self.needs_rset = False
        self.usable = True  # false after a 421, a timeout or anything out of step

    # --- connection -----------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        timeout: float,
        *,
        unix_socket: str | None = None,
        data_timeout: float | None = None,
    ) -> tuple[SMTPSession, Reply]:
        """Open a TCP connection (or one to ``unix_socket``, when given) and read the
        greeting (whatever its code)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            if unix_socket is not None:
                _, protocol = await loop.create_unix_connection(_ClientProtocol, unix_socket)
            else:
                _, protocol = await loop.create_connection(_ClientProtocol, host, port)
        session = cls(protocol, timeout, data_timeout)
        try:
            [greeting] = await session.read_replies(1)
        except BaseException:
            session.close()
            raise
        return session, greeting

    @property
    def is_open(self) -> bool:
        return not self._protocol.closed and self.usable

    @property
    def idle_clean(self) -> bool:
        """Open, and the server has sent nothing we did not ask for (usable from a pool)."""
        return self.is_open and len(self._protocol.buffer) == self._pos

    def close(self) -> None:
        self.usable = False
        transport = self._protocol.transport
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        """Drop the connection at once (nothing more will be read or written)."""
        self.usable = False
        transport = self._protocol.transport
        if transport is not None:
            transport.abort()

    # --- reading and writing ----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        # No flow control needed: every write is followed by waiting for a reply (with
        # the timeout), and what the socket does not take at once stays in the
        # transport's buffer - at most one message, which is in memory anyway.
        protocol = self._protocol
        if protocol.closed or protocol.transport is None or protocol.transport.is_closing():
            raise SessionClosed("connection closed")
        protocol.transport.write(data)

    async def read_replies(self, count: int, timeout: float | None = None) -> list[Reply]:
        """The next ``count`` replies; raises :class:`SessionClosed` if the server stops."""
        replies: list[Reply] = []
        protocol = self._protocol
        deadline = asyncio.get_running_loop().time() + (
            self.timeout if timeout is None else timeout
        )
        try:
            while len(replies) < count:
                parsed = parse_reply(protocol.buffer, self._pos)
                if parsed is not None:
                    reply, self._pos = parsed
                    replies.append(reply)
                    continue
                if protocol.closed:
                    error = protocol.error
                    text = f"connection closed: {error}" if error else "connection closed"
                    raise SessionClosed(text)
                if self._pos:  # keep the buffer small: drop what was parsed
                    del protocol.buffer[: self._pos]
                    self._pos = 0
                await protocol.wait_data(deadline)
        except BaseException:
            self.usable = False  # out of step with the server: never reuse
            raise
        if self._pos == len(protocol.buffer):
            protocol.buffer.clear()
            self._pos = 0
        return replies

    async def command(self, line: str | bytes, timeout: float | None = None) -> Reply:
        """Send one command line (without CRLF) and read its reply."""
        data = line.encode() if isinstance(line, str) else line
        self._write(data + b"\r\n")
        [reply] = await self.read_replies(1, timeout)
        if reply.code == 421:
            self.usable = False  # the server is closing the session (RFC 5321 3.8)
        return reply

    # --- set-up -----------------------------------------------------------------------------

    async def hello(self, name: str) -> Reply:
        """EHLO (recording the extensions), or HELO if the server does not know EHLO."""
        reply = await self.command(f"EHLO {name}")
        if reply.code == 250:
            self.extensions = _extensions(reply)
            return reply
        if reply.code in (500, 502):  # RFC 5321 4.1.4: fall back to HELO
            reply = await self.command(f"HELO {name}")
            if reply.code == 250:
                self.extensions = {}
                return reply
        raise ReplyError("EHLO", reply)

    async def lhlo(self, name: str) -> Reply:
        """LMTP's greeting command (RFC 2033 4.1), recording the extensions; from now on
        the session reads one reply per accepted recipient after the message."""
        reply = await self.command(f"LHLO {name}")
        if reply.code != 250:
            raise ReplyError("LHLO", reply)
        self.extensions = _extensions(reply)
        self.lmtp = True
        return reply

    def supports(self, extension: str) -> bool:
        return extension.lower() in self.extensions

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """RFC 3207: STARTTLS and the handshake. The caller must send EHLO again (4.2).

        Raises :class:`ReplyError` when the server refuses (the session is still
        usable in clear text), :class:`ssl.SSLError` / :class:`OSError` when the
        handshake fails (the session is not).
        """
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            raise ReplyError("STARTTLS", reply)
        protocol = self._protocol
        if len(protocol.buffer) != self._pos:
            # Anything after the 220 was injected before the handshake (CVE-2011-0411).
            self.abort()
            raise SessionClosed("data after the STARTTLS reply")
        assert protocol.transport is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                protocol.transport,
                protocol,
                context,
                server_hostname=server_hostname or None,
                ssl_handshake_timeout=self.timeout,
            )
        except BaseException:
            self.abort()
            raise
        if transport is None:  # pragma: no cover - only when the loop is closing
            raise SessionClosed("connection closed during the TLS handshake")
        assert isinstance(transport, asyncio.Transport)
        protocol.transport = transport
        self.tls = True
        self.extensions = {}

    def auth_mechanisms(self) -> list[str]:
        return self.extensions.get("auth", "").upper().split()

    async def login(self, username: str, password: str) -> None:
        """AUTH with the first of PLAIN, LOGIN, CRAM-MD5 the server offers (RFC 4954).

        Raises :class:`ReplyError` for a refusal, ``ValueError`` if no mechanism fits.
        """
        offered = self.auth_mechanisms()
        user, secret = username.encode(), password.encode()
        if "PLAIN" in offered:
            token = base64.b64encode(b"\0" + user + b"\0" + secret).decode()
            reply = await self.command(f"AUTH PLAIN {token}")
        elif "LOGIN" in offered:
            reply = await self.command("AUTH LOGIN")
            for value in (user, secret):
                if reply.code != 334:
                    break
                reply = await self.command(base64.b64encode(value))
        elif "CRAM-MD5" in offered:
            reply = await self.command("AUTH CRAM-MD5")
            if reply.code == 334:
                challenge = base64.b64decode(reply.text.encode() or b"")
                digest = hmac.new(secret, challenge, hashlib.md5).hexdigest()
                reply = await self.command(base64.b64encode(user + b" " + digest.encode()))
        else:
            raise ValueError(f"no supported AUTH mechanism among {offered or 'none'}")
        if reply.code == 334:  # a challenge we cannot answer: cancel (RFC 4954 4)
            reply = await self.command("*")
        if reply.code != 235:
            raise ReplyError("AUTH", reply)

    async def quit(self, timeout: float) -> None:
        """QUIT politely, then close, whatever happens."""
        try:
            if self.is_open:
                await self.command("QUIT", timeout)
        except (OSError, TimeoutError):
            pass
        finally:
            self.close()

    # --- one transaction ----------------------------------------------------------------------

    async def send_message(
        self,
        sender: str,
        rcpts: Sequence[str],
        message: bytes,
        out: dict[str, Outcome] | None = None,
    ) -> dict[str, Outcome]:
        """MAIL, RCPT per recipient, DATA, the message: an :class:`Outcome` per recipient.

        RCPT replies are per recipient; a refused MAIL applies to all. After the
        message, SMTP's one reply applies to every recipient accepted at RCPT (RFC 5321
        3.3); on an LMTP session (:meth:`lhlo`) each accepted recipient gets its own
        reply, in RCPT order (RFC 2033 4.2).

        Answers go into ``out`` (when given) as they arrive, so the caller keeps those
        received before a failure: a refusal at RCPT, or on LMTP the recipients already
        answered after the message (*those* were delivered). Raises
        :class:`SessionClosed` if the connection ends before the last reply
        (``data_sent`` tells whether the message may have arrived), ``TimeoutError``
        if the server is too slow.
        """
        if out is None:
            out = {}
        options = ""
        if "size" in self.extensions:
            options += f" SIZE={len(message)}"  # RFC 1870
        if "8bitmime" in self.extensions and not message.isascii():
            options += " BODY=8BITMIME"  # RFC 6152
        encoding = "ascii"
        if not (sender.isascii() and all(r.isascii() for r in rcpts)):
            if "smtputf8" not in self.extensions:
                # RFC 6531 3.2: such an envelope may only go to an SMTPUTF8 server.
                outcome = Outcome(553, "5.6.7 SMTPUTF8 is required but not offered by host")
                out.update(dict.fromkeys(rcpts, outcome))
                return out
            options += " SMTPUTF8"
            encoding = "utf-8"
        if not safe_address(sender):
            outcome = Outcome(553, "5.1.7 sender address cannot be sent on a command line")
            out.update(dict.fromkeys(rcpts, outcome))
            return out
        valid = []
        for rcpt in rcpts:
            if safe_address(rcpt):
                valid.append(rcpt)
            else:
                out[rcpt] = Outcome(553, "5.1.3 address cannot be sent on a command line")
        if not valid:
            return out
        commands = [f"MAIL FROM:<{sender}>{options}\r\n".encode(encoding)]
        commands += [f"RCPT TO:<{rcpt}>\r\n".encode(encoding) for rcpt in valid]
        commands.append(b"DATA\r\n")
        rset = self.needs_rset
        self.needs_rset = True  # until this transaction has ended cleanly
        if rset:
            commands.insert(0, b"RSET\r\n")
        if "pipelining" in self.extensions:
            self._write(b"".join(commands))
            replies = await self.read_replies(len(commands))
        else:
            replies = await self._one_by_one(commands, rset)
        if rset:
            reset = replies.pop(0)
            if reset.code != 250:
                self.usable = False
                raise SessionClosed(f"RSET refused: {reset}", reply=reset)
        for reply in replies:
            if reply.code == 421:  # the server is going away (RFC 5321 3.8)
                self.usable = False
                raise SessionClosed(f"server closing: {reply}", reply=reply)
        mail = replies[0]
        if mail.code // 100 != 2:
            if len(replies) == len(commands) - rset and replies[-1].code == 354:
                self.usable = False  # DATA accepted without a transaction: out of step
            for rcpt in rcpts:
                out.setdefault(rcpt, mail.outcome)
            return out
        accepted = []
        for rcpt, reply in zip(valid, replies[1 : 1 + len(valid)], strict=False):
            if reply.code // 100 == 2:
                accepted.append(rcpt)
            else:
                out[rcpt] = reply.outcome
        data = replies[1 + len(valid)] if len(replies) > 1 + len(valid) else None
        if data is None:  # one by one, every RCPT refused: DATA was not sent
            return out
        if data.code != 354:
            outcome = data.outcome
            if data.code < 400:  # never "delivered" without the message having been sent
                self.usable = False
                outcome = Outcome(451, f"4.5.0 unexpected reply to DATA: {data}")
            for rcpt in accepted:  # RFC 2920: DATA refused, e.g. 554 no valid recipients
                out[rcpt] = outcome
            return out
        # With nobody accepted (RFC 2920 3.1: a 354 anyway), an empty message, whose
        # one reply is nobody's.
        payload = dot_stuff(message) if accepted else b".\r\n"
        try:
            self._write(payload)
            if self.lmtp and accepted:
                for rcpt in accepted:  # RFC 2033 4.2: one reply each, in RCPT order
                    [final] = await self.read_replies(1, self.data_timeout)
                    if final.code == 421:
                        self.usable = False
                    out[rcpt] = final.outcome
            else:
                [final] = await self.read_replies(1, self.data_timeout)
                if final.code == 421:
                    self.usable = False
                for rcpt in accepted:
                    out[rcpt] = final.outcome
        except SessionClosed as exc:
            raise SessionClosed(str(exc), data_sent=True) from exc
        self.needs_rset = False  # the reply to the data ends the transaction either way
        return out

    async def _one_by_one(self, commands: list[bytes], rset: bool) -> list[Reply]:
        """Without PIPELINING: stop after a refused MAIL, skip DATA without a recipient."""
        replies: list[Reply] = []
        accepted = 0
        for i, line in enumerate(commands):
            if line == b"DATA\r\n" and not accepted:
                break
            self._write(line)
            [reply] = await self.read_replies(1)
            replies.append(reply)
            if reply.code == 421 or (rset and i == 0 and reply.code != 250):
                break
            if line.startswith(b"MAIL") and reply.code // 100 != 2:
                break
            if line.startswith(b"RCPT") and reply.code // 100 == 2:
                accepted += 1
        return replies


def _extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (lower case) and their parameters; ``AUTH=`` is the old AUTH form."""
    out: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.lower()
        if keyword.startswith("auth="):
            out.setdefault("auth", keyword[5:].upper() + " " + params)
            continue
        out[keyword] = params
    return out
