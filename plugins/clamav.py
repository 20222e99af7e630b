"""Antivirus: every message is streamed to ClamAV's clamd with ``INSTREAM``.

The whole message goes to clamd as it will be delivered (one stream per message):
clamd decodes MIME itself (``ScanMail``), base64 and quoted-printable included, and
unpacks archives inside the parts (``ScanArchive``), so one round trip covers every
attachment and keeps clamd's mail-specific signatures (phishing, broken MIME). Streaming
each decoded part instead would cost a connection per part and lose those.

All I/O is asyncio streams on the event loop; a scan is bounded by a time budget
(waiting for a slot, connecting, sending and the answer together) and by a bound on
the scans in flight. A clamd that is down, hangs, or answers with an error never
turns into "accept" unless ``on_error: accept`` says so. Docs: docs/plugins/clamav.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailflow.api import AddHeader, App, MessageContext, RemoveHeader, Result, Symbol, hookimpl

log = logging.getLogger("mailflow.plugins.clamav")

KIB = 1024
MIB = 1024 * KIB

# clamd's protocol (clamd(8), "COMMANDS"): the "z" prefix makes commands and replies
# NUL-terminated; INSTREAM is followed by chunks, each a 4-byte unsigned length in
# network byte order and that many bytes, and a zero length ends the stream.
INSTREAM = b"zINSTREAM\0"
PING = b"zPING\0"
END_OF_STREAM = struct.pack(">I", 0)
CHUNK_LENGTH = struct.Struct(">I")
MAX_REPLY = 64 * KIB  # a reply is one short line per finding: anything longer is broken
MAX_NAME = 200  # a signature name goes into the SMTP reply and a header: keep it short
MAX_NAMES_SHOWN = 2  # names in the reply, the header, the symbol and the log line
MAX_NAMES_KEPT = 20  # names in the details

DEBIAN_SOCKET = "/var/run/clamav/clamd.ctl"  # LocalSocket of Debian's clamd.conf

# RFC 3463: 5.7.1 "delivery not authorized, message refused"; 4.3.0 "other or undefined
# mail system status" for a scanner that cannot answer now.
VIRUS_CODE, VIRUS_STATUS = 550, "5.7.1"
ERROR_CODE, ERROR_STATUS = 451, "4.3.0"

_UNPRINTABLE = re.compile(r"[^\x21-\x7e]+")
_NOT_TEXT = re.compile(r"[^\x20-\x7e]+")


class ClamAVSettings(BaseModel):
    """``plugins: [{name: clamav, settings: {...}}]``; every key is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # clamd's socket: a path (LocalSocket) or host:port / [v6]:port (TCPSocket).
    address: str = DEBIAN_SOCKET
    connect_timeout: Annotated[float, Field(gt=0, le=60)] = 2.0
    # The whole scan: waiting for a slot, connecting, streaming and clamd's answer.
    # Keep it below the plugin entry's `timeout` (30 s by default) so that this
    # plugin's own `on_error` decides, not the pipeline's.
    timeout: Annotated[float, Field(gt=0, le=600)] = 20.0
    max_concurrent: Annotated[int, Field(ge=1, le=1024)] = 8
    # The most bytes sent to clamd: set it to clamd's StreamMaxLength or less.
    max_size: Annotated[int, Field(ge=1 * KIB, le=4096 * MIB)] = 25 * MIB
    # A message larger than max_size: error -> on_error; truncate -> scan the first
    # max_size bytes (symbol CLAM_TRUNCATED); skip -> not scanned (CLAM_UNSCANNED).
    oversize: Literal["error", "truncate", "skip"] = "error"
    chunk_size: Annotated[int, Field(ge=1 * KIB, le=4 * MIB)] = 64 * KIB
    on_virus: Literal["reject", "quarantine"] = "reject"
    # clamd down, hanging, or answering an error: a production filter must not
    # silently accept unscanned mail, so the default asks the sender to retry.
    on_error: Literal["accept", "tempfail", "quarantine"] = "tempfail"
    virus_score: float = 0.0  # score of CLAM_VIRUS (the verdict already decides)
    # e.g. "X-Virus-Scanned": added with the outcome; copies from outside are removed.
    header: str | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not value.startswith("/"):
            parse_tcp(value)  # raises ValueError with a hint
        return value

    @field_validator("header")
    @classmethod
    def _header(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[!-9;-~]+", value):
            raise ValueError("a header name is printable ASCII without ':' or spaces")
        return value


Settings = ClamAVSettings


def parse_tcp(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{address!r}: expected a socket path (/run/clamav/clamd.ctl) or host:port"
        )
    return host.strip("[]"), int(port)


class ScanError(Exception):
    """clamd could not give an answer (down, slow, or it answered ERROR)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """clamd's answer to one stream: the signature names found (empty: clean)."""

    viruses: tuple[str, ...]


def clean_name(name: str) -> str:
    """A signature name safe for an SMTP reply and a header (printable ASCII, short)."""
    return _UNPRINTABLE.sub("_", name.strip())[:MAX_NAME] or "unknown"


def parse_reply(reply: bytes) -> Verdict:
    """Turn clamd's NUL-separated reply lines for a stream into a verdict.

    ``stream: OK``, ``stream: NAME FOUND`` (one line per finding with AllMatchScan),
    or ``... ERROR`` (e.g. ``INSTREAM size limit exceeded. ERROR``).
    """
    lines = [ln.strip() for ln in reply.decode("utf-8", "replace").split("\0") if ln.strip()]
    if not lines:
        raise ScanError("clamd closed the connection without an answer")
    viruses: list[str] = []
    clean = False
    for line in lines:
        _, _, text = line.partition(": ") if line.startswith("stream:") else ("", "", line)
        if text.endswith(" FOUND"):
            viruses.append(clean_name(text[: -len(" FOUND")]))
        elif text == "OK":
            clean = True
        else:
            raise ScanError(f"clamd: {_NOT_TEXT.sub('_', text)[:MAX_NAME]}")
    if not viruses and not clean:
        raise ScanError("clamd gave no verdict")
    return Verdict(tuple(viruses))


class ClamdClient:
    """An asyncio client for clamd's INSTREAM, one connection per scan.

    Written on the event loop's socket calls (``sock_connect``, ``sock_sendall``,
    ``sock_recv``) rather than streams: a scan of a typical message is then one
    send and a few receives with no transport, protocol or helper task, which cost
    the server process about ten times the CPU of the round trip itself
    (docs/performance.md, "ClamAV").
    """

    def __init__(self, address: str, connect_timeout: float, chunk_size: int) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.chunk_size = chunk_size

    async def _open(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.address.startswith("/"):
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    await loop.sock_connect(sock, self.address)
                    return sock
                host, port = parse_tcp(self.address)
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                family, kind, proto, _, where = infos[0]
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                await loop.sock_connect(sock, where)
                return sock
        except TimeoutError:
            if sock is not None:
                sock.close()
            raise ScanError(
                f"no connection to clamd at {self.address} in {self.connect_timeout:g}s"
            ) from None
        except (OSError, IndexError) as exc:
            if sock is not None:
                sock.close()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ScanError(f"cannot connect to clamd at {self.address}: {why}") from None
        except BaseException:
            if sock is not None:
                sock.close()
            raise

    async def ping(self) -> bool:
        loop = asyncio.get_running_loop()
        with await self._open() as sock:
            await loop.sock_sendall(sock, PING)
            return (await _read_reply(sock)).rstrip(b"\0") == b"PONG"

    async def scan(self, data: bytes) -> Verdict:
        """Stream ``data`` with INSTREAM and return clamd's verdict (no time limit here)."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        with await self._open() as sock:
            try:
                # The command, the first chunk and, for a message of one chunk, the end
                # marker in one send: every send wakes clamd. sock_sendall waits
                # while the socket buffer is full, so one chunk at a time is held.
                first = view[: self.chunk_size]
                head: list[bytes | memoryview] = (
                    [INSTREAM, CHUNK_LENGTH.pack(len(first)), first] if first else [INSTREAM]
                )
                if len(view) <= self.chunk_size:
                    head.append(END_OF_STREAM)
                await loop.sock_sendall(sock, b"".join(head))
                for start in range(self.chunk_size, len(view), self.chunk_size):
                    chunk = view[start : start + self.chunk_size]
                    last = start + self.chunk_size >= len(view)
                    frame: list[bytes | memoryview] = [CHUNK_LENGTH.pack(len(chunk)), chunk]
                    await loop.sock_sendall(
                        sock, b"".join([*frame, END_OF_STREAM] if last else frame)
                    )
            except OSError as exc:
                # clamd answers and closes when it refuses a stream (StreamMaxLength):
                # its answer is still in our receive buffer (over TCP a reset may have
                # dropped it; then the error stands, with the same outcome).
                reply = await _read_reply(sock)
                if not reply:
                    raise ScanError(f"clamd closed the connection: {exc}") from None
                return parse_reply(reply)
            return parse_reply(await _read_reply(sock))


async def _read_reply(sock: socket.socket) -> bytes:
    """Everything clamd answers until it closes the connection, at most MAX_REPLY bytes."""
    loop = asyncio.get_running_loop()
    reply = bytearray()
    with contextlib.suppress(OSError):  # a reset after the answer: keep what came
        while len(reply) < MAX_REPLY:
            data = await loop.sock_recv(sock, MAX_REPLY - len(reply))
            if not data:
                break
            reply += data
    return bytes(reply)


class ClamAVPlugin:
    """Scans each message with clamd at end of data; a find rejects or quarantines it."""

    Settings = ClamAVSettings

    def __init__(self, settings: ClamAVSettings | None = None) -> None:
        self.settings = settings or ClamAVSettings()
        s = self.settings
        self.client = ClamdClient(s.address, s.connect_timeout, s.chunk_size)
        self.host = "localhost"
        # One semaphore per event loop: a worker process has its own loop.
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None

    @hookimpl
    async def mailflow_startup(self, app: App) -> None:
        """Note the host name for the header; say early if clamd does not answer.

        Start-up goes on either way: clamd may come up later, and until it does
        every message gets the ``on_error`` action.
        """
        self.host = app.authserv_id
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                alive = await self.client.ping()
        except (ScanError, TimeoutError, OSError) as exc:
            log.warning("clamav: clamd at %s does not answer: %s", self.settings.address, exc)
            return
        if not alive:
            log.warning("clamav: clamd at %s gave no PONG to PING", self.settings.address)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots = asyncio.Semaphore(self.settings.max_concurrent)
            self._slots_loop = loop
        return self._slots

    async def _scan(self, data: bytes) -> Verdict:
        try:
            async with asyncio.timeout(self.settings.timeout):
                async with self._semaphore():
                    return await self.client.scan(data)
        except TimeoutError:
            raise ScanError(
                f"no answer from clamd at {self.settings.address} within {self.settings.timeout:g}s"
            ) from None

    @hookimpl
    async def mailflow_data(self, message: MessageContext) -> Result:
        s = self.settings
        raw = message.raw
        details: dict[str, object] = {"address": s.address, "size": len(raw)}
        data = raw
        partial: Symbol | None = None
        if len(raw) > s.max_size:
            why = f"message of {len(raw)} bytes is larger than max_size ({s.max_size})"
            details["oversize"] = s.oversize
            if s.oversize == "skip":
                details["result"] = "unscanned"
                log.warning("clamav: %s not scanned: %s", message.queue_id, why)
                return self._with_header(
                    Result(symbols=[Symbol("CLAM_UNSCANNED", 0.0, why)], details=details),
                    f"unscanned ({why})",
                )
            if s.oversize == "error":
                return self._failure(message, ScanError(why), details)
            data = raw[: s.max_size]
            partial = Symbol("CLAM_TRUNCATED", 0.0, f"first {s.max_size} of {len(raw)} bytes")
        started = time.perf_counter()
        try:
            verdict = await self._scan(data)
        except ScanError as exc:
            return self._failure(message, exc, details)
        details["scan_ms"] = round((time.perf_counter() - started) * 1000, 2)
        details["scanned_bytes"] = len(data)
        symbols = [partial] if partial is not None else []
        if not verdict.viruses:
            details["result"] = "clean"
            status = "clean" if partial is None else f"clean in the first {len(data)} bytes"
            return self._with_header(Result(symbols=symbols, details=details), status)
        # AllMatchScan may name hundreds: the reply line (RFC 5321: 512 bytes), the
        # header and the details show the first few and a count.
        names = ", ".join(verdict.viruses[:MAX_NAMES_SHOWN])
        if len(verdict.viruses) > MAX_NAMES_SHOWN:
            names += f" and {len(verdict.viruses) - MAX_NAMES_SHOWN} more"
        details["result"] = "infected"
        details["viruses"] = list(verdict.viruses[:MAX_NAMES_KEPT])
        details["virus_count"] = len(verdict.viruses)
        log.warning("clamav: %s infected: %s", message.queue_id, names)
        symbols.insert(0, Symbol("CLAM_VIRUS", s.virus_score, names))
        if s.on_virus == "reject":
            result = Result.reject(
                f"Message rejected: virus found ({names})", VIRUS_CODE, VIRUS_STATUS
            )
        else:
            result = Result.quarantine(f"virus found ({names})")
        result.score = s.virus_score
        result.symbols = symbols
        result.details = details
        return self._with_header(result, f"infected ({names})")

    def _failure(
        self, message: MessageContext, exc: ScanError, details: dict[str, object]
    ) -> Result:
        """clamd gave no verdict: the configured on_error, never a silent accept."""
        s = self.settings
        reason = str(exc)
        details["result"] = "error"
        details["error"] = reason
        details["on_error"] = s.on_error
        log.warning("clamav: %s not scanned (%s): %s", message.queue_id, s.on_error, reason)
        symbol = Symbol("CLAM_ERROR", 0.0, reason)
        if s.on_error == "tempfail":
            # The client gets a generic text; the reason (paths, addresses) is for the log.
            result = Result.tempfail(
                "Virus scanner unavailable, please try again later", ERROR_CODE, ERROR_STATUS
            )
            result.reason = f"virus scan failed: {reason}"
        elif s.on_error == "quarantine":
            result = Result.quarantine(f"virus scan failed: {reason}")
        else:
            result = Result(reason=f"virus scan failed: {reason}")
        result.symbols = [symbol]
        result.details = details
        # The header goes to the recipients: no socket paths or addresses in it.
        return self._with_header(result, "unscanned (scanner error)")

    def _with_header(self, result: Result, status: str) -> Result:
        name = self.settings.header
        if name is not None:
            # A copy from outside could claim "clean": only ours stays (removed first).
            result.mutations = [
                RemoveHeader(name),
                AddHeader(name, f"{status} by ClamAV at {self.host}"),
            ]
        return result
