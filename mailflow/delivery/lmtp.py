"""LMTP delivery (RFC 2033) to a local mail store (Dovecot, Cyrus) over TCP or a unix socket.

aiosmtplib speaks SMTP only (no LHLO, and it expects one reply after DATA), so this is
a small client on asyncio streams. The difference that matters: after the end of
DATA, an LMTP server sends *one reply per accepted recipient*, in RCPT order
(RFC 2033 4.2), so one mailbox can be full while the others succeed.

Sessions are reused: after a transaction that ended cleanly, the session waits idle
(at most :data:`IDLE_SECONDS`, then QUIT) for the next delivery, which skips the
connection, the greeting and LHLO. A reused session that turns out to be closed by
the server before the message was sent is replaced by a fresh one, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mailflow.app import App
from mailflow.config import LMTPTarget
from mailflow.delivery.idle import IdleSessions
from mailflow.delivery.outcome import Outcome
from mailflow.delivery.spool import QueueEntry, RecipientState
from mailflow.verdict import Route

log = logging.getLogger("mailflow.lmtp")

COMMAND_TIMEOUT = 60.0  # seconds per command reply
DATA_TIMEOUT = 600.0  # seconds for the message transfer and all final replies
MAX_REPLY_LINES = 100  # a multi-line reply longer than this is a broken server
STREAM_LIMIT = 64 * 1024  # longest reply line we accept
IDLE_SECONDS = 5.0  # an idle session is closed (QUIT) after this long
MAX_IDLE = 16  # idle sessions kept at most (the queue runs queue.workers at a time)


class LMTPError(Exception):
    """The session failed; ``outcome`` applies to every recipient not yet answered."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(str(outcome))
        self.outcome = outcome


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload with its terminator: CRLF line ends, leading dots doubled.

    RFC 5321 4.5.2: a line starting with "." gets another "." prepended; 2.3.8: lines
    end in CRLF, so bare LFs are turned into CRLF on the way.
    """
    data = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


class LMTPClient:
    """One LMTP session on a pair of streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.extensions: set[str] = set()
        self.data_sent = False  # the current transaction's message was written

    @property
    def reusable(self) -> bool:
        """Open, and the server has sent nothing unasked (a 421 before closing, say)."""
        # StreamReader has no public way to ask for unread bytes; without the
        # attribute, only a closed stream counts against reuse.
        unread = getattr(self.reader, "_buffer", b"")
        return not self.writer.is_closing() and not self.reader.at_eof() and not unread

    @classmethod
    async def connect(cls, target: LMTPTarget, timeout: float = COMMAND_TIMEOUT) -> LMTPClient:
        async with asyncio.timeout(timeout):
            if target.socket is not None:
                reader, writer = await asyncio.open_unix_connection(
                    str(target.socket), limit=STREAM_LIMIT
                )
            else:
                reader, writer = await asyncio.open_connection(
                    target.host, target.port, limit=STREAM_LIMIT
                )
        return cls(reader, writer)

    async def _read_lines(self, timeout: float) -> tuple[int, list[str]]:
        """One (possibly multi-line, RFC 5321 4.2.1) reply: its code and text lines."""
        texts: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.reader.readline()
                if not raw.endswith(b"\n"):
                    raise ConnectionError("connection closed by the LMTP server")
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if len(line) < 3 or not line[:3].isdigit() or len(texts) >= MAX_REPLY_LINES:
                    raise ConnectionError(f"malformed LMTP reply {line[:80]!r}")
                texts.append(line[4:].strip())
                if len(line) == 3 or line[3] != "-":
                    return int(line[:3]), texts

    async def read_reply(self, timeout: float = COMMAND_TIMEOUT) -> Outcome:
        code, texts = await self._read_lines(timeout)
        return Outcome(code, " ".join(texts).strip())

    async def command(self, line: str) -> Outcome:
        self.writer.write(line.encode("utf-8") + b"\r\n")
        await self.writer.drain()
        return await self.read_reply()

    async def lhlo(self, name: str) -> None:
        """Greeting and LHLO (RFC 2033 4.1); remembers the advertised extensions."""
        greeting = await self.read_reply()
        if greeting.code != 220:
            raise LMTPError(Outcome(451, f"4.4.2 LMTP greeting: {greeting}"))
        self.writer.write(f"LHLO {name}\r\n".encode())
        await self.writer.drain()
        code, lines = await self._read_lines(COMMAND_TIMEOUT)
        if code != 250:
            raise LMTPError(Outcome(451, f"4.4.2 LHLO refused: {code} {' '.join(lines)}"))
        # The extension keywords follow the first line (RFC 5321 4.1.1.1).
        self.extensions = {ln.split(" ")[0].upper() for ln in lines[1:] if ln}

    async def deliver(
        self, sender: str, rcpts: list[str], message: bytes, out: dict[str, Outcome]
    ) -> None:
        """MAIL, RCPT each, DATA (in one write if the server has PIPELINING); then one
        final reply per accepted recipient.

        Results go into ``out`` as they arrive, so the replies received before a
        connection dies are kept (those recipients *were* delivered).
        """
        self.data_sent = False
        mail_from = f"MAIL FROM:<{sender}>"
        if "8BITMIME" in self.extensions and not message.isascii():
            mail_from += " BODY=8BITMIME"  # RFC 6152
        if "PIPELINING" in self.extensions:
            await self._deliver_pipelined(mail_from, rcpts, message, out)
            return
        reply = await self.command(mail_from)
        if reply.code != 250:
            out.update(dict.fromkeys(rcpts, reply))
            await self.command("RSET")
            return
        accepted: list[str] = []
        for rcpt in rcpts:
            reply = await self.command(f"RCPT TO:<{rcpt}>")
            if 200 <= reply.code < 300:
                accepted.append(rcpt)
            else:
                out[rcpt] = reply
        if not accepted:
            await self.command("RSET")
            return
        reply = await self.command("DATA")
        if reply.code != 354:
            out.update(dict.fromkeys(accepted, reply))
            return
        await self._send_message(message, accepted, out)

    async def _deliver_pipelined(
        self, mail_from: str, rcpts: list[str], message: bytes, out: dict[str, Outcome]
    ) -> None:
        """RFC 2920: MAIL, every RCPT and DATA in one write, then their replies in turn.

        A refused MAIL is every recipient's answer. A DATA refused because no
        recipient was accepted leaves the RCPT answers; a 354 with nobody accepted
        gets an empty message (RFC 2920 3.1), whose reply is not anyone's.
        """
        commands = [mail_from, *(f"RCPT TO:<{rcpt}>" for rcpt in rcpts), "DATA"]
        self.writer.write("".join(f"{c}\r\n" for c in commands).encode("utf-8"))
        await self.writer.drain()
        mail = await self.read_reply()
        accepted: list[str] = []
        for rcpt in rcpts:
            reply = await self.read_reply()
            if mail.code != 250:
                out[rcpt] = mail
            elif 200 <= reply.code < 300:
                accepted.append(rcpt)
            else:
                out[rcpt] = reply
        data = await self.read_reply()
        if data.code != 354:
            out.update(dict.fromkeys(accepted, data))
            await self.command("RSET")
        elif not accepted:
            self.writer.write(b".\r\n")
            await self.writer.drain()
            await self.read_reply(timeout=DATA_TIMEOUT)
        else:
            await self._send_message(message, accepted, out)

    async def _send_message(
        self, message: bytes, accepted: list[str], out: dict[str, Outcome]
    ) -> None:
        """After the 354: the message in one write, then one reply per recipient."""
        self.data_sent = True
        self.writer.write(dot_stuff(message))  # stuffed, with its terminator
        await self.writer.drain()
        for rcpt in accepted:  # RFC 2033 4.2: replies in the order of the RCPTs
            out[rcpt] = await self.read_reply(timeout=DATA_TIMEOUT)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await self.writer.drain()
            await self.read_reply(timeout=2.0)
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class LMTPTransport:
    """Route kind ``lmtp``: hand the message to ``delivery.lmtp``, reusing sessions."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._idle: IdleSessions[str, LMTPClient] = IdleSessions(
            MAX_IDLE, IDLE_SECONDS, clean=_reusable, quit=_close
        )

    @property
    def name(self) -> str:
        return self.app.config.relay.helo_name or self.app.config.server.hostname

    async def __call__(
        self, entry: QueueEntry, message: bytes, rcpts: list[RecipientState], route: Route
    ) -> dict[str, Outcome]:
        target = self.app.config.delivery.lmtp
        addresses = [r.address for r in rcpts]
        if target is None:
            outcome = Outcome(451, "4.3.5 no delivery.lmtp target configured")
            return dict.fromkeys(addresses, outcome)
        where = str(target.socket) if target.socket else f"{target.host}:{target.port}"
        out: dict[str, Outcome] = {}
        client: LMTPClient | None = None
        try:
            client, reused = await self._session(target)
            while True:
                try:
                    await client.deliver(entry.sender, addresses, message, out)
                    break
                except (OSError, TimeoutError):
                    if not reused or client.data_sent:
                        raise
                    # The server closed the idle session: once more on a fresh one.
                    await _abort(client)
                    client, reused = None, False
                    out.clear()
                    client = await self._fresh(target)
        except LMTPError as exc:
            fallback = exc.outcome
        except (OSError, TimeoutError) as exc:  # ConnectionError is an OSError
            reason = str(exc) or exc.__class__.__name__
            fallback = Outcome(451, f"4.4.1 LMTP {where}: {reason}")
        else:
            fallback = Outcome(451, "4.4.2 no reply from LMTP server")
            if client is not None and len(out) == len(addresses) and client.reusable:
                self._idle.give(_IDLE_KEY, client)
                client = None
        finally:
            if client is not None:
                await _abort(client)
        # Recipients without a final reply are retried: never assume delivery.
        for addr in addresses:
            out.setdefault(addr, fallback)
        return out

    async def _session(self, target: LMTPTarget) -> tuple[LMTPClient, bool]:
        """An idle session if one is still usable (True), else a fresh one (False)."""
        client = self._idle.take(_IDLE_KEY)
        if client is not None:
            return client, True
        return await self._fresh(target), False

    async def _fresh(self, target: LMTPTarget) -> LMTPClient:
        client = await LMTPClient.connect(target)
        try:
            await client.lhlo(self.name)
        except BaseException:
            await _abort(client)
            raise
        return client

    async def aclose(self) -> None:
        """QUIT every idle session (at shutdown)."""
        await self._idle.aclose(5.0)


_IDLE_KEY = "lmtp"  # one destination: delivery.lmtp


def _reusable(client: LMTPClient) -> bool:
    return client.reusable


async def _close(client: LMTPClient) -> None:
    await client.close()


async def _abort(client: LMTPClient) -> None:
    """Drop a session in an unknown state without another word to the server."""
    client.writer.transport.abort()
    with contextlib.suppress(Exception):
        await client.writer.wait_closed()


def lmtp_transport(app: App) -> LMTPTransport:
    return LMTPTransport(app)
