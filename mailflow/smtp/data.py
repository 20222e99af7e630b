"""SMTP message data as it arrives: every check per block, and where the bytes are kept.

:class:`DataScanner` is sans-IO: the DATA reader (``MailflowSMTP._read_data_from``)
frames the data and feeds each block as it comes off the socket; the scanner undoes
dot-stuffing, normalizes bare CR/LF, looks for NUL, measures lines and counts the
trace fields of the header, keeping only a few bytes of state between blocks. Each
step is C-speed work on one block (at most about 2 x ``DATA_READ_LIMIT``), so no
message, however large or odd, holds the event loop for longer than one block takes.

:class:`DataStore` keeps what the scanner passes on: in memory up to a threshold,
beyond it in a temporary file (written from a worker thread), deleted on every path.
:class:`ByteBudget` bounds the memory of large messages that are read back to be
filtered: each waits for its size in a shared budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mailflow.normalize import NewlineNormalizer

_CRLF = b"\r\n"
# "Received:" at the start of a line, lower-cased; a line start is an LF (after
# normalization every LF ends a CRLF), and the carry between blocks is one byte
# shorter than this, so no match is counted twice.
_RECEIVED_AT_LINE_START = b"\nreceived:"
_HEADER_CARRY = len(_RECEIVED_AT_LINE_START) - 1
_HEADER_END = b"\r\n\r\n"
_T = TypeVar("_T")


class DataError(enum.Enum):
    """Why message data is refused as a whole (read to the end first, RFC 5321 4.2.5)."""

    TOO_BIG = "552 Error: Too much mail data"
    LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"


@dataclass(slots=True)
class DataFacts:
    """What the scanner found, for the handler's decisions after DATA."""

    size: int = 0  # octets received before the end-of-data line (as aiosmtpd counts)
    nul: bool = False  # a NUL octet (refused: no safe way to pass it on)
    bare_newline: bool = False  # a bare CR or LF (normalized, or refused per config)
    received: int = 0  # Received: fields in the header section (loop detection)


def _longest_line(data: bytes) -> int:
    """Length of the longest CRLF-terminated line in ``data``, its CRLF included."""
    return max(map(len, data.split(_CRLF)), default=0) + 2


def has_line_longer_than(data: bytes, limit: int) -> bool:
    """``_longest_line(data) > limit``, without splitting typical mail into lines.

    Such a line is more than ``limit - 2`` bytes without a CRLF, so it covers a whole
    aligned window of ``limit // 2`` bytes: when every window holds a CRLF, no line
    is that long. A few ``find`` calls instead of one bytes object per line.
    """
    step = limit // 2
    if step >= 2:
        find = data.find
        for start in range(0, len(data), step):
            if find(_CRLF, start, start + step) < 0:
                break  # a long stretch without a line end: measure exactly
        else:
            return False
    return _longest_line(data) > limit


class DataScanner:
    """Turns the raw DATA octets into the message, block by block.

    Per block, in this order:

    * dot-stuffing undone (RFC 5321 4.5.2): the first "." of a line that follows a
      CRLF on the wire is dropped. A "." after a bare CR or LF stays: such a line is
      no line to the client's SMTP, and it ends nothing (SMTP smuggling).
    * bare CR and LF each become CRLF (:class:`~mailflow.normalize.NewlineNormalizer`);
      ``facts.bare_newline`` records that there were some.
    * NUL octets are noted.
    * line length (RFC 5321 4.5.3.1.6): lines are measured after normalization, so a
      bare LF ends a line as a CRLF does, and without the transparency dot. Longer
      than ``line_limit`` octets with CRLF is :attr:`DataError.LINE_TOO_LONG`.
    * size: more than ``size_limit`` octets received is :attr:`DataError.TOO_BIG`.
    * ``Received:`` fields of the header section are counted (RFC 5321 6.3).

    The first error wins; from then on nothing is kept. ``keep`` is cleared as well
    when the message will be refused anyway (a NUL; a bare line end with
    ``reject_bare_newline``), so :meth:`feed` returns nothing more to store.
    """

    def __init__(self, line_limit: int, size_limit: int, *, reject_bare_newline: bool) -> None:
        self.line_limit = line_limit
        self.size_limit = size_limit
        self.reject_bare_newline = reject_bare_newline
        self.facts = DataFacts()
        self.error: DataError | None = None
        self.keep = True
        # The two octets before the unread data: the CRLF that ended the DATA command
        # makes a "." right at the start a stuffing dot too.
        self._wire_tail = _CRLF
        self._newlines = NewlineNormalizer()
        self._run = 0  # octets of the current, unfinished line (normalized)
        self._in_header = True
        self._header_tail = _CRLF  # a virtual line end before the first header line

    def feed(self, block: bytes) -> bytes:
        """Scan one block as received; return the message bytes to store (maybe b"")."""
        if self.error is not None:
            return b""
        self.facts.size += len(block)
        if self.size_limit and self.facts.size > self.size_limit:
            return self._fail(DataError.TOO_BIG)
        return self._scan(self._newlines.feed(self._unstuff(block)))

    def finish(self) -> bytes:
        """The end of data was reached: the last bytes to store (a held-back CR).

        The data before the end line ends in CRLF (or is empty), so no line is
        left unfinished here.
        """
        if self.error is not None:
            return b""
        return self._scan(self._newlines.finish())

    def _fail(self, error: DataError) -> bytes:
        self.error = error
        self.keep = False
        return b""

    def _unstuff(self, block: bytes) -> bytes:
        tail = self._wire_tail
        self._wire_tail = (tail + block[-2:])[-2:]
        if tail == _CRLF and block[:1] == b".":
            block = block[1:]
        elif tail[-1:] == b"\r" and block[:2] == b"\n.":
            block = b"\n" + block[2:]  # the CRLF before the dot spans two blocks
        if b"\r\n." in block:
            block = block.replace(b"\r\n.", _CRLF)
        return block

    def _scan(self, data: bytes) -> bytes:
        if not data:
            return data
        facts = self.facts
        if self._newlines.bare and not facts.bare_newline:
            facts.bare_newline = True
            if self.reject_bare_newline:
                self.keep = False
        if not facts.nul and b"\x00" in data:
            facts.nul = True
            self.keep = False
        if self._line_too_long(data):
            return self._fail(DataError.LINE_TOO_LONG)
        if self._in_header:
            self._count_received(data)
        return data if self.keep else b""

    def _line_too_long(self, data: bytes) -> bool:
        """Does ``data`` (normalized, continuing the current line) end a line too long?"""
        limit = self.line_limit
        first = data.find(_CRLF)
        if first < 0:
            self._run += len(data)
            return self._run + 2 > limit
        if self._run + first + 2 > limit:
            return True
        last = data.rfind(_CRLF)
        if last > first and has_line_longer_than(data[first + 2 : last + 2], limit):
            return True
        self._run = len(data) - last - 2
        # A line not finished yet may already be too long for its CRLF to come.
        return self._run + 2 > limit

    def _count_received(self, data: bytes) -> None:
        text = self._header_tail + data
        end = text.find(_HEADER_END)
        if end >= 0:
            text = text[: end + 2]  # the last field's line, not what follows the blank line
            self._in_header = False
        self.facts.received += text.lower().count(_RECEIVED_AT_LINE_START)
        self._header_tail = text[-_HEADER_CARRY:]


# --- keeping the bytes --------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int, size: int) -> bytes:
    data = os.pread(fd, size, 0)
    if len(data) != size:
        raise OSError(f"temporary message file is {len(data)} bytes, expected {size}")
    return data


_File = tuple[int, Path]  # an open temporary file: descriptor and path


def _remove(file: _File) -> None:
    fd, path = file
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class DataStore:
    """Message bytes in memory, or beyond ``threshold`` in a temporary file.

    The file is created in ``directory`` (under the queue directory: same disk as
    the spool) when the message outgrows the threshold; what was in memory goes
    into it, and from then on the blocks are appended in batches of more than
    ``threshold`` bytes, each written by a worker thread (a slow disk never holds
    the event loop). Nothing is fsync'd: the message is only made durable once it
    is accepted, by the spool or Maildir. :meth:`discard` deletes the file; call it
    on every path (it is idempotent). When the task is cancelled while a thread
    still works on the file (a client gone mid-DATA), the file is closed and
    deleted once that thread is done, never under its feet.

    A storage error while the data arrives (disk full, an I/O error) does not stop
    the reader, which must still find the end of the data: :meth:`add` records it
    in :attr:`failed`, deletes the file at once and keeps nothing more.
    """

    def __init__(self, threshold: int, directory: Path) -> None:
        self.threshold = max(threshold, 1)
        self.directory = directory
        self.size = 0
        self.failed: OSError | None = None  # the storage error that lost the data
        self._parts: list[bytes] = []
        self._buffered = 0
        self._file: _File | None = None
        self._busy: asyncio.Future[Any] | None = None  # a worker thread on the file

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    @property
    def path(self) -> Path | None:
        return self._file[1] if self._file is not None else None

    async def add(self, data: bytes) -> None:
        """Keep ``data``; a storage error is kept in :attr:`failed`, not raised."""
        if not data or self.failed is not None:
            return
        self._parts.append(data)
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered > self.threshold:
            try:
                await self._flush()
            except OSError as error:
                self.failed = error
                self.discard()

    async def _flush(self) -> None:
        chunk = b"".join(self._parts)
        self._parts.clear()
        self._buffered = 0
        self._file = await self._in_thread(self._write, self._file, chunk)

    def _write(self, file: _File | None, chunk: bytes) -> _File:
        if file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="data-", suffix=".tmp", dir=self.directory)
            file = (fd, Path(name))
            try:
                _write_all(fd, chunk)
            except BaseException:
                _remove(file)
                raise
            return file
        _write_all(file[0], chunk)
        return file

    async def _in_thread(self, function: Callable[..., _T], *args: Any) -> _T:
        """``function(*args)`` in a worker thread; it finishes even if we are cancelled."""
        busy = asyncio.get_running_loop().run_in_executor(None, function, *args)
        self._busy = busy
        result = await asyncio.shield(busy)
        self._busy = None
        return result

    async def take(self) -> bytes:
        """All the bytes, as one object (read back from the file, which is then deleted).

        Raises :attr:`failed` when a storage error lost some of them, and OSError
        when the file cannot be written or read back now.
        """
        if self.failed is not None:
            raise self.failed
        if self._file is None:
            data = b"".join(self._parts)
            self._parts.clear()
            return data
        if self._parts:
            await self._flush()
        assert self._file is not None
        try:
            return await self._in_thread(_read_all, self._file[0], self.size)
        finally:
            self.discard()

    def discard(self) -> None:
        """Forget the bytes and delete the file, if any."""
        self._parts.clear()
        busy, self._busy = self._busy, None
        file, self._file = self._file, None
        if busy is not None and not busy.done():

            def remove_when_done(done: asyncio.Future[Any]) -> None:
                result = None
                if not done.cancelled() and done.exception() is None:
                    result = done.result()
                target = result if isinstance(result, tuple) else file
                if target is not None:
                    _remove(target)

            busy.add_done_callback(remove_when_done)
            return
        if file is not None:
            _remove(file)


def clear_directory(directory: Path) -> int:
    """Delete leftover temporary files (a crash mid-DATA); returns how many."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for path in directory.glob("data-*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


# --- pacing the bulk of large messages ---------------------------------------------------------


class BulkPacer:
    """At most ``rate`` octets per second of large-message data, all connections together.

    Reading and scanning data costs the event loop time in proportion to the octets
    (a few ms per MB). A few clients sending large messages as fast as loopback allows
    would take all of it, and every other client's replies would wait in line behind
    their blocks. Each connection, past its message's large threshold, reports the
    octets it handled and sleeps until the time those take at ``rate`` (shared: the
    reservations of all connections follow one another); meanwhile its socket buffer
    fills and TCP slows the sender down. Legitimate large mail still flows at ``rate``
    in total, far above any minimum transfer rate. ``rate`` 0: no pacing.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._free_at = 0.0  # loop time when the octets reserved so far are done

    async def pace(self, octets: int) -> None:
        if self.rate <= 0:
            await asyncio.sleep(0)
            return
        now = asyncio.get_running_loop().time()
        self._free_at = max(now, self._free_at) + octets / self.rate
        await asyncio.sleep(self._free_at - now)


# --- the memory budget for large messages -------------------------------------------------------


class ByteBudget:
    """An asyncio semaphore counted in bytes; waiters are served first come, first served.

    A request larger than the whole budget is cut to the budget (the message then
    has it to itself), so every request is granted eventually.
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a budget needs at least one byte")
        self.total = total
        self.available = total
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for room."""
        return sum(1 for _, fut in self._waiters if not fut.done())

    async def acquire(self, size: int) -> int:
        """Wait until ``size`` bytes (at most the total) are free; returns what was taken."""
        size = min(max(size, 0), self.total)
        if not self._waiters and self.available >= size:
            self.available -= size
            return size
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((size, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(size)  # granted, but nobody will use it
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((size, future))
                self._wake()  # the head may have been the one blocking the rest
            raise
        return size

    def release(self, size: int) -> None:
        self.available += size
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if size > self.available:
                return
            self._waiters.popleft()
            self.available -= size
            future.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[int]:
        """``async with budget.hold(n):`` the bytes are taken inside the block."""
        taken = await self.acquire(size)
        try:
            yield taken
        finally:
            self.release(taken)
