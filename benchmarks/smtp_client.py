"""A minimal asyncio SMTP load client built for measuring, not for general use.

Each command and each whole DATA payload goes out in one write with TCP_NODELAY
set, and each connection is reused for many messages, so the client adds no
Nagle/delayed-ACK stalls of its own. Latency is measured per message from the
MAIL FROM write to the final reply after DATA.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

REPLY_TIMEOUT = 60.0  # seconds to wait for any one reply before giving up on a connection


class SMTPReplyError(Exception):
    """The server answered a command with an unexpected code."""

    def __init__(self, command: str, reply: bytes) -> None:
        super().__init__(f"{command}: {reply.decode('utf-8', 'replace').strip()}")
        self.reply = reply


@dataclass
class LoadResult:
    """What one load run measured."""

    sent: int = 0  # messages the server answered 2xx after DATA
    failed: int = 0  # messages answered with 4xx/5xx at any step
    errors: list[str] = field(default_factory=list)  # first few failure texts
    latencies: list[float] = field(default_factory=list)  # seconds, one per sent message
    elapsed: float = 0.0  # seconds from the first MAIL FROM to the last reply

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, fraction: float) -> float:
        """Nearest-rank percentile of the latencies, in seconds (0 when none)."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
        return ordered[rank]


class Connection:
    """One SMTP session over a raw stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, helo: str = "loadgen.test") -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(reader, writer)
        await conn.expect("greeting", b"2")
        await conn.command(f"EHLO {helo}", b"2")
        return conn

    async def read_reply(self) -> bytes:
        """One (possibly multi-line, RFC 5321 4.2.1) reply."""
        lines = []
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionError("server closed the connection")
                lines.append(line)
                if line[3:4] != b"-":
                    return b"".join(lines)

    async def expect(self, what: str, code_prefix: bytes) -> bytes:
        reply = await self.read_reply()
        if not reply.startswith(code_prefix):
            raise SMTPReplyError(what, reply)
        return reply

    async def command(self, line: str, code_prefix: bytes) -> bytes:
        self.writer.write(line.encode() + b"\r\n")
        return await self.expect(line.split(":")[0], code_prefix)

    async def send(
        self, sender: str, recipients: list[str], payload: bytes, pipelining: bool = False
    ) -> None:
        """One transaction; ``payload`` is dot-stuffed and ends with ``.\\r\\n``.

        With ``pipelining`` (RFC 2920, as Postfix's SMTP client does it) MAIL, the
        RCPTs and DATA go out in one write and their replies are read afterwards;
        otherwise each command waits for its reply (as postfix's smtp-source does).
        """
        if pipelining:
            await self._send_pipelined(sender, recipients, payload)
            return
        try:
            await self.command(f"MAIL FROM:<{sender}>", b"2")
            for rcpt in recipients:
                await self.command(f"RCPT TO:<{rcpt}>", b"2")
            await self.command("DATA", b"3")
            self.writer.write(payload)
            await self.expect("end of DATA", b"2")
        except SMTPReplyError:
            # Leave the session clean for the next message (RFC 5321 4.1.1.5).
            with contextlib.suppress(SMTPReplyError):
                await self.command("RSET", b"2")
            raise

    async def _send_pipelined(self, sender: str, recipients: list[str], payload: bytes) -> None:
        commands = [f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{r}>" for r in recipients), "DATA"]
        self.writer.write("".join(f"{c}\r\n" for c in commands).encode())
        replies = [await self.read_reply() for _ in commands]
        refused = [
            (command, reply)
            for command, reply in zip(commands[:-1], replies[:-1], strict=True)
            if not reply.startswith(b"2")
        ]
        if replies[-1].startswith(b"3"):
            # DATA was accepted: the message has to be sent (or ended) either way.
            self.writer.write(payload)
            await self.expect("end of DATA", b"2")
        elif not refused:
            refused = [("DATA", replies[-1])]
        if refused:
            with contextlib.suppress(SMTPReplyError):
                await self.command("RSET", b"2")
            command, reply = refused[0]
            raise SMTPReplyError(command.split(":")[0], reply)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await self.read_reply()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


Addressing = Callable[[int], tuple[str, list[str]]]


async def run_load(
    host: str,
    port: int,
    count: int,
    concurrency: int,
    payload: Callable[[int], bytes],
    addressing: Addressing,
    max_errors: int = 5,
    pipelining: bool = False,
) -> LoadResult:
    """Send ``count`` messages over ``concurrency`` reused connections.

    The clock starts once every connection has been opened and greeted, so the
    rate measures message transactions, not TCP set-up.
    """
    result = LoadResult()
    connections = await asyncio.gather(*(Connection.open(host, port) for _ in range(concurrency)))
    counter = itertools.count()

    async def worker(conn: Connection) -> None:
        while (index := next(counter)) < count:
            sender, recipients = addressing(index)
            data = payload(index)
            start = time.perf_counter()
            try:
                await conn.send(sender, recipients, data, pipelining)
            except SMTPReplyError as exc:
                result.failed += 1
                if len(result.errors) < max_errors:
                    result.errors.append(str(exc))
                continue
            result.latencies.append(time.perf_counter() - start)
            result.sent += 1

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in connections))
    finally:
        result.elapsed = time.perf_counter() - start
        await asyncio.gather(*(c.close() for c in connections))
    return result
