"""One SMTP connection: aiosmtpd's protocol plus what mailflow adds around the commands.

Connection limits (an exact count), the connect stage before the greeting, the
timers (RFC 5321 4.5.3.2: per command and per chunk of DATA, plus an overall DATA
deadline, a minimum transfer rate and a cap on time without progress, each
answered 421 4.4.2), DATA read in blocks and scanned block by block
(:mod:`mailflow.smtp.data`), large messages kept in a temporary file, carrying the
:class:`~mailflow.message.Connection` across STARTTLS with the TLS facts, and
crash-proof address parsing. The per-command decisions (relay control, limits, the
pipeline) live in :class:`mailflow.smtp.handler.Handler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from aiosmtpd.smtp import MISSING, SMTP

from mailflow.message import Connection
from mailflow.smtp.auth import AuthMechanisms
from mailflow.smtp.data import BulkPacer, DataScanner, DataStore
from mailflow.smtp.policy import connection_refusal
from mailflow.verdict import SMTPReply

if TYPE_CHECKING:
    from mailflow.smtp.handler import Handler
    from mailflow.transaction import Transaction

log = logging.getLogger("mailflow.smtp")

# RFC 5321 3.1 / 4.5.3.2: replies given before closing the connection.
R_TIMEOUT = SMTPReply(421, "Timeout, closing connection", "4.4.2")
R_NO_PROGRESS = SMTPReply(421, "Idle too long without progress, closing connection", "4.4.2")
R_DATA_DEADLINE = SMTPReply(421, "Message data took too long, closing connection", "4.4.2")
R_DATA_TOO_SLOW = SMTPReply(421, "Message data arriving too slowly, closing connection", "4.4.2")
# RFC 3463 4.3.0: a local error, temporary. The message was read to its end first, so
# the session goes on in step with the client ...
R_DATA_NOT_STORED = SMTPReply(451, "Local error storing the message data, try again later", "4.3.0")
# ... unlike after an error of the reader itself, which leaves it nowhere to resume.
R_DATA_READ_FAILED = SMTPReply(
    421, "Local error receiving the message data, closing connection", "4.3.0"
)

# Why a connection is cut off: (reply, label of mailflow_smtp_timeouts_total).
_Cut = tuple[str, str]
_CUT_COMMAND: _Cut = (f"{R_TIMEOUT} (command)", "command")
_CUT_DATA: _Cut = (f"{R_TIMEOUT} (data)", "data")
_CUT_NO_PROGRESS: _Cut = (str(R_NO_PROGRESS), "no_progress")
_CUT_DATA_DEADLINE: _Cut = (str(R_DATA_DEADLINE), "data_deadline")
_CUT_DATA_RATE: _Cut = (str(R_DATA_TOO_SLOW), "data_rate")

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# "<local@domain>" with a dot-atom local part and a plain domain: no comments, quotes,
# source routes or literals (those take aiosmtpd's full parser).
_PLAIN_ADDRESS = re.compile(
    rf"[ \t]*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>"
)
_DATA_END = b".\r\n"  # the end-of-data line, once a CRLF before it is checked
# How much message data the stream reader may hold while DATA is read. Its usual limit
# is the command line length (~1 KB), which makes a few-KB message overrun it (an
# exception and a second read) and stop and restart reading from the socket (two
# epoll_ctl calls) every time. The reader stops reading from the socket at twice this.
DATA_READ_LIMIT = 256 * 1024
# The DATA reader lets other connections run after this much work without waiting
# for the socket: data already buffered is read without a pause, and a message made
# of tiny pieces (many ".<CRLF>" that end nothing) costs per piece, not per octet.
YIELD_EVERY = DATA_READ_LIMIT
PIECE_COST = 256  # octets of work charged per piece, on top of its length
# Paces the octets of a message's data past its large threshold (see _read_data_from).
Pace = Callable[[int], Awaitable[None]]


async def _unpaced(octets: int) -> None:
    await asyncio.sleep(0)


# A command moves the session on (RFC 5321 4.5.3.2: a server may close a session that
# makes none) when answered 2xx or 3xx.
_PROGRESS_CODES = (b"2", b"3")


def _buffered_until_end(reader: asyncio.StreamReader, tail: bytes) -> int:
    """How many buffered octets can be taken without passing a possible end of data.

    That is up to (and with) the CRLF of the first "<CRLF>.<CRLF>" in the buffer, or
    all but the last four octets (a terminator may be arriving). 0 when the end may
    start right at the front (after ``tail``, the last two octets taken), which the
    caller's ``readuntil`` sorts out. StreamReader keeps unread data in ``_buffer``
    (aiosmtpd uses it too); without it, 0.
    """
    buffer = getattr(reader, "_buffer", None)
    if not buffer or buffer[:1] == b"." or (tail[-1:] == b"\r" and buffer[:2] == b"\n."):
        return 0
    end = buffer.find(b"\r\n.\r\n")
    if end >= 0:
        return end + 2
    return max(len(buffer) - 4, 0)


_Command = TypeVar("_Command", bound=Callable[..., Any])
_SYNTAX_ATTRIBUTES = ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__")


def _help_of(replaced: Any) -> Callable[[_Command], _Command]:
    """Give an overriding ``smtp_X`` the HELP text of aiosmtpd's, which HELP looks up
    on the method itself (aiosmtpd's ``@syntax``); without it HELP omits the command."""

    def decorate(method: _Command) -> _Command:
        for name in _SYNTAX_ATTRIBUTES:
            if hasattr(replaced, name):
                setattr(method, name, getattr(replaced, name))
        return method

    return decorate


class MailflowSMTP(AuthMechanisms, SMTP):
    """aiosmtpd's protocol plus connection limits, timeouts, TLS facts and the connect stage.

    One instance serves one TCP connection (STARTTLS keeps the instance and swaps
    the transport).
    """

    def __init__(self, handler: Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.mailflow_handler = handler
        self.mailflow_auth_guard = handler.login_guard
        self.mailflow_conn: Connection | None = None
        self.mailflow_tx: Transaction | None = None  # the sans-IO model, from the connect stage
        self._counted = False  # this connection is in handler.active
        self._counted_ip: str | None = None  # ... and in handler.active_by_ip under this
        # The timers (see _next_deadline): one loop timer, moved lazily.
        self._deadline = 0.0  # loop time the timer is set for
        self._idle_deadline = 0.0  # no command (or no DATA octets) until then: cut off
        self._progress_at = 0.0  # when the session last made progress
        self._data_started = 0.0  # when DATA began
        self._data_octets = 0  # received since then
        # Time this DATA spent in the large-message pacer: the server's own doing, so
        # the DATA timers do not count it against the client (see _pace).
        self._paced = 0.0  # in pauses that are over
        self._pacing_since: float | None = None  # when the current pause began
        self._timer_paused = False  # while a complete message is being filtered
        self._in_data = False  # between "354" and the end of the message data
        self._in_group_command = False  # running MAIL, RCPT or RSET (see push)
        self._held: list[bytes] = []  # replies not written yet (see push)
        self._last_code = b""  # the first octets of the last reply

    # --- connection bookkeeping -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        after_starttls = self.transport is not None
        if not after_starttls:
            self._progress_at = self.loop.time()
        super().connection_made(transport)
        if after_starttls:
            self._after_starttls()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Peers lose ~40 ms per reply to Nagle + delayed ACK otherwise.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.mailflow_handler.active += 1
        self.mailflow_handler.all_active.value += 1
        self._counted = True

    def _after_starttls(self) -> None:
        """aiosmtpd made a fresh Session; carry the Connection over, minus what TLS resets.

        RFC 3207 4.2: after the handshake the server forgets what the client said
        before it (HELO name, and any AUTH), so ``helo`` is cleared here too.
        """
        self._mark_progress()
        conn = self.mailflow_conn
        if conn is None or self.session is None:
            return
        self.session.mailflow_conn = conn
        conn.authenticated_user = ""
        if self.mailflow_tx is not None:
            self.mailflow_tx.forget_helo()
        ssl_object = (self.session.ssl or {}).get("ssl_object")
        conn.tls = True
        conn.tls_version = (ssl_object.version() or "") if ssl_object is not None else ""

    def connection_lost(self, error: Exception | None) -> None:
        # May run twice (aiosmtpd calls it itself when the TLS handshake fails), and
        # before _handle_client ever ran: the flag keeps the count exact either way.
        if self._counted:
            self._counted = False
            self.mailflow_handler.active -= 1
            self.mailflow_handler.all_active.value -= 1
        if self._counted_ip is not None:
            by_ip = self.mailflow_handler.active_by_ip
            by_ip[self._counted_ip] -= 1
            if by_ip[self._counted_ip] <= 0:
                del by_ip[self._counted_ip]  # the counter keeps no entry per past client
            self._counted_ip = None
        super().connection_lost(error)

    def _close(self) -> None:
        if self.transport is not None:
            self._write_held()
            self.transport.close()

    # --- replies ----------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        """Send a reply; replies to pipelined MAIL/RCPT/RSET go out together.

        RFC 2920 3.2: a server may keep the replies to a group of pipelined commands
        and send them as one unit. A reply to MAIL, RCPT or RSET is held while the
        client's next command line is already in the buffer; the next reply that is
        not held (at the latest the one to DATA, which ends a group) takes them all
        in one write. A client that waits for each reply is answered at once, and no
        reply is held while mailflow waits for input, so nothing can stall.
        """
        if isinstance(status, str):
            status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        self._last_code = status[:3]
        self._held.append(status + b"\r\n")
        if self._in_group_command and self._next_line_buffered():
            return
        self._write_held()
        await self._writer.drain()

    def _next_line_buffered(self) -> bool:
        # StreamReader keeps unread data in ``_buffer`` (aiosmtpd uses it as well).
        buffer = getattr(self._reader, "_buffer", None)
        return buffer is not None and b"\n" in buffer

    def _write_held(self) -> None:
        if self._held:
            held, self._held = self._held, []
            self._writer.write(b"".join(held))

    async def _as_group_command(self, command: Callable[[str], Awaitable[None]], arg: str) -> None:
        """Run aiosmtpd's handler for a command whose reply may wait for the group's.

        MAIL, RCPT and RSET are no progress: a transaction counts once its DATA is
        answered (see :meth:`smtp_DATA`), so MAIL, RCPT, RSET over and over does not
        keep a session alive.
        """
        self._in_group_command = True
        try:
            await command(arg)
        finally:
            self._in_group_command = False

    async def _progressing(
        self, command: Callable[[str], Awaitable[None]], arg: str, *, counts: bool = True
    ) -> None:
        """Run a command; when ``counts`` and it is answered 2xx/3xx, the session moved on."""
        self._last_code = b""
        await command(arg)
        if counts and self._last_code[:1] in _PROGRESS_CODES:
            self._mark_progress()

    @_help_of(SMTP.smtp_MAIL)
    async def smtp_MAIL(self, arg: str) -> None:
        await self._as_group_command(super().smtp_MAIL, arg)

    @_help_of(SMTP.smtp_RCPT)
    async def smtp_RCPT(self, arg: str) -> None:
        await self._as_group_command(super().smtp_RCPT, arg)

    @_help_of(SMTP.smtp_RSET)
    async def smtp_RSET(self, arg: str) -> None:
        await self._as_group_command(super().smtp_RSET, arg)

    @_help_of(SMTP.smtp_HELO)
    async def smtp_HELO(self, hostname: str) -> None:
        # Only naming the client counts: HELO after HELO would keep a session alive.
        first = self.session is not None and self.session.host_name is None
        await self._progressing(super().smtp_HELO, hostname, counts=first)

    @_help_of(SMTP.smtp_EHLO)
    async def smtp_EHLO(self, hostname: str) -> None:
        first = self.session is not None and self.session.host_name is None
        await self._progressing(super().smtp_EHLO, hostname, counts=first)

    # --- timers (RFC 5321 4.5.3.2) ------------------------------------------------------------

    def _mark_progress(self) -> None:
        # The no-progress deadline only moves later: the timer checks it when it fires.
        self._progress_at = self.loop.time()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Restart the command (or DATA silence) timer; aiosmtpd calls it per command.

        aiosmtpd cancels and creates a timer for every command and DATA chunk (six
        or more per message). Here one timer is kept while it fires no later than
        the nearest deadline: when it fires early it works out the deadline again
        and waits the rest.
        """
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        self._timer_paused = False
        self._arm()

    def _pause_timer(self) -> None:
        """No timer runs while mailflow works on a complete message (plugins have their own)."""
        self._timer_paused = True
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    def _arm(self) -> None:
        deadline, _ = self._next_deadline()
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled():
            if handle.when() <= deadline:
                return
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._deadline_reached)

    def _next_deadline(self) -> tuple[float, _Cut]:
        """The nearest deadline now, and what to say when it passes.

        Each one only moves later as the session goes on, so the timer may fire
        early (then it waits again) but never late. Commands: ``command_timeout``
        after the last command, ``idle_timeout`` after the last progress (NOOP,
        RSET, HELP, VRFY, unknown commands and MAIL/RCPT until their DATA is
        answered are none). DATA: ``data_timeout``
        after the last octets, ``data_deadline`` after the 354, and the minimum
        rate: by ``data_rate_grace`` + octets / ``data_min_rate`` after the 354.
        """
        server = self.mailflow_handler.app.config.server
        if not self._in_data:
            best = (self._idle_deadline, _CUT_COMMAND)
            if server.idle_timeout:
                best = min(best, (self._progress_at + server.idle_timeout, _CUT_NO_PROGRESS))
            return best
        # Time in the pacer is not the client's: each DATA deadline is later by it (the
        # pause going on now included, so a deadline keeps moving while it lasts).
        pausing = 0.0 if self._pacing_since is None else self.loop.time() - self._pacing_since
        started = self._data_started + self._paced + pausing
        best = (self._idle_deadline + pausing, _CUT_DATA)
        if server.data_deadline:
            best = min(best, (started + server.data_deadline, _CUT_DATA_DEADLINE))
        if server.data_min_rate:
            allowed = server.data_rate_grace + self._data_octets / server.data_min_rate
            best = min(best, (started + allowed, _CUT_DATA_RATE))
        return best

    def _deadline_reached(self) -> None:
        if self._timer_paused:
            return
        deadline, cut = self._next_deadline()
        if self.loop.time() < deadline:  # moved on since the timer was set
            self._deadline = deadline
            self._timeout_handle = self.loop.call_at(deadline, self._deadline_reached)
            return
        self._cut_off(cut)

    def _cut_off(self, cut: _Cut) -> None:
        """Tell the client why before closing (RFC 5321 4.5.3.2: 421 on timeout)."""
        reply, reason = cut
        conn = self.mailflow_conn
        log.info("%s: closing the connection: %s", conn.ip if conn else "?", reply)
        self.mailflow_handler.app.metrics.observe_timeout(reason)
        if self.transport is not None and not self.transport.is_closing():
            self._held.append(f"{reply}\r\n".encode())
            self._write_held()
        super()._timeout_cb()

    def _timeout_cb(self) -> None:
        # aiosmtpd's own timer (it arms one in connection_made before ours runs).
        self._cut_off(_CUT_DATA if self._in_data else _CUT_COMMAND)

    def data_received(self, data: bytes) -> None:
        # RFC 5321 4.5.3.2.5: the DATA timeout is per received chunk, not per message,
        # so a large message on a slow link is not cut off while it is still flowing;
        # the overall deadline and the minimum rate bound it as a whole.
        if self._in_data:
            self._data_octets += len(data)
            server = self.mailflow_handler.app.config.server
            self._idle_deadline = self.loop.time() + (server.data_timeout or self._timeout_duration)
        super().data_received(data)

    # --- DATA, read in blocks ---------------------------------------------------------------

    @_help_of(SMTP.smtp_DATA)
    async def smtp_DATA(self, arg: str) -> None:
        server = self.mailflow_handler.app.config.server
        self._in_data = True
        self._data_started = self.loop.time()
        self._data_octets = 0
        self._paced = 0.0
        self._pacing_since = None
        self._reset_timeout(server.data_timeout)
        try:
            if self._decode_data:  # mailflow never asks for str content; keep aiosmtpd's path
                await super().smtp_DATA(arg)
            elif await self._smtp_data_bulk(arg):
                # A transaction is progress once its data is answered, whatever the
                # answer; counted from the reply, not from the end of the data, so
                # the time spent filtering is not taken from the client's idle time.
                self._mark_progress()
        finally:
            self._in_data = False
            if self.transport is not None:
                self._reset_timeout(server.command_timeout)

    async def _smtp_data_bulk(self, arg: str) -> bool:
        """aiosmtpd's ``smtp_DATA`` with the message read in blocks, not line by line.

        Same replies as aiosmtpd 1.4 (503 without RCPT, 501 with an argument, 552
        past ``data_size_limit`` and 500 for a line longer than ``line_length_limit``,
        both answered only after the whole message is read). Each block is scanned
        as it arrives (:class:`~mailflow.smtp.data.DataScanner`: dot-stuffing, bare
        line ends, NUL, line length, trace fields) and kept in a
        :class:`~mailflow.smtp.data.DataStore`: in memory, or beyond
        ``large_message_threshold`` in a temporary file that is deleted on every
        path. A message that went to a file is read back for the plugins within the
        server's ``large_message_memory`` budget, waiting for room if need be.

        Returns True when the message data was read to its end and answered.
        """
        if await self.check_helo_needed():
            return False
        if await self.check_auth_needed("DATA"):
            return False
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return False
        if arg:
            await self.push("501 Syntax: DATA")
            return False
        handler = self.mailflow_handler
        server = handler.app.config.server
        scanner = DataScanner(
            self.line_length_limit,
            self.data_size_limit or 0,
            reject_bare_newline=server.bare_newline == "reject",
        )
        store = DataStore(server.large_message_threshold, handler.incoming_dir)
        try:
            # Counted as arriving, so that messages already at the data stage wait for it
            # and go through the plugins together (mailflow.batching).
            with handler.app.pipeline.batch.receiving_data():
                await self.push("354 End data with <CR><LF>.<CR><LF>")
                try:
                    complete = await self._read_data(scanner, store, handler.bulk)
                except asyncio.CancelledError:
                    log.info("Connection lost during DATA")
                    self._writer.close()
                    raise
                except ConnectionError:
                    raise  # the client is gone: aiosmtpd closes the session
                except Exception:
                    # Where the data ends is unknown now: say so and close.
                    log.exception("%s: error reading message data", self._client_ip())
                    self._abandon(R_DATA_READ_FAILED)
            if not complete:
                return False  # the connection closed mid-message
            # The data is in (RFC 5321 4.5.3.2.6): no timer while we decide.
            self._in_data = False
            self._pause_timer()
            if scanner.error is not None:
                await self.push(scanner.error.value)
                self._set_post_data_state()
                return True
            if store.failed is not None:
                self._log_not_stored(store.failed)
                await self.push(str(R_DATA_NOT_STORED))
                self._set_post_data_state()
                return True
            self.envelope.mailflow_facts = scanner.facts
            async with self._memory_for(store):
                try:
                    content = await store.take() if scanner.keep else b""
                except OSError as error:
                    self._log_not_stored(error)
                    await self.push(str(R_DATA_NOT_STORED))
                    self._set_post_data_state()
                    return True
                self.envelope.content = content
                self.envelope.original_content = content
                del content
                status = await self._call_handler_hook("DATA")
                self._set_post_data_state()
            await self.push("250 OK" if status is MISSING else status)
            return True
        finally:
            store.discard()

    def _client_ip(self) -> str:
        conn = self.mailflow_conn
        return conn.ip if conn is not None else "?"

    def _log_not_stored(self, error: OSError) -> None:
        log.error("%s: message data not stored (answered 451): %s", self._client_ip(), error)

    def _abandon(self, reply: SMTPReply) -> NoReturn:
        """Answer ``reply``, close the connection and end the session here.

        The session's task is cancelled like aiosmtpd's QUIT does, and right away:
        command lines already buffered (the rest of a message) are never run.
        """
        if self.transport is not None and not self.transport.is_closing():
            self._held.append(f"{reply}\r\n".encode())
        self._close()
        raise asyncio.CancelledError

    @contextlib.asynccontextmanager
    async def _memory_for(self, store: DataStore) -> AsyncIterator[None]:
        """Room in the large-message budget for a message read back from its file."""
        if not store.on_disk:
            yield
            return
        async with self.mailflow_handler.large_messages.hold(store.size):
            yield

    async def _pace(self, bulk: BulkPacer, octets: int) -> None:
        """Wait for ``octets``' share of the large-message rate, off the client's clock.

        The pause delays reading (and, through TCP, the sender), so the DATA timeout,
        deadline and minimum rate are moved later by it (:meth:`_next_deadline`):
        a sender that keeps up is never cut off for mailflow's own pacing.
        """
        if octets <= 0 or bulk.rate <= 0:
            await asyncio.sleep(0)
            return
        began = self.loop.time()
        self._pacing_since = began
        try:
            await bulk.pace(octets)
        finally:
            paused = self.loop.time() - began
            self._pacing_since = None
            self._paced += paused
            self._idle_deadline += paused

    async def _read_data(
        self, scanner: DataScanner, store: DataStore, bulk: BulkPacer | None = None
    ) -> bool:
        """Read the message up to the end-of-data line into ``store``, through ``scanner``.

        Returns False when the connection closed before the end. A message that is
        too large or has too long a line is read to its end all the same (RFC 5321
        4.2.5 implies it), keeping nothing; ``scanner.error`` says which.

        RFC 5321 4.5.2: the data ends only at ``<CRLF>.<CRLF>`` (the CRLF ending the
        DATA command counts, so ``.<CRLF>`` right after it is an empty message); a
        "." after a bare CR or LF ends nothing (SMTP smuggling), and bare line ends
        become CRLF or refuse the message (``server.bare_newline``). The reader is
        searched for ``.<CRLF>`` and each match checked for a CRLF before it, so the
        data is consumed in blocks and nothing after the end (pipelined commands) is.
        """
        reader = self._reader
        pace: Pace = _unpaced if bulk is None else functools.partial(self._pace, bulk)
        # StreamReader keeps its limit in ``_limit`` (CPython 3.7+); aiosmtpd uses the
        # reader's internals too. Without it, the data is read with the usual limit.
        command_limit = getattr(reader, "_limit", None)
        if isinstance(command_limit, int) and command_limit < DATA_READ_LIMIT:
            reader._limit = DATA_READ_LIMIT  # type: ignore[attr-defined]
            try:
                return await self._read_data_from(reader, scanner, store, pace)
            finally:
                reader._limit = command_limit  # type: ignore[attr-defined]
        return await self._read_data_from(reader, scanner, store, pace)

    @staticmethod
    async def _read_data_from(
        reader: asyncio.StreamReader, scanner: DataScanner, store: DataStore, pace: Pace
    ) -> bool:
        """The reading loop of :meth:`_read_data`.

        After every ``YIELD_EVERY`` of work the other connections get their turn:
        ``pace(n)`` is awaited with the octets read since, as far as they lie past
        the message's large threshold (``store.threshold``). Those are all octets
        read off the socket, kept or not: data refused for its size, after a NUL or
        a storage error costs the loop as much as data kept, and is paced alike.
        """
        tail = b"\r\n"  # the two bytes before the unread data
        work = 0  # octets handled since the loop last ran other tasks (plus piece costs)
        octets = 0  # octets read since then
        unpaced = store.threshold  # octets still to be read before pacing begins
        while True:
            try:
                chunk = await reader.readuntil(_DATA_END)
            except asyncio.LimitOverrunError as exc:
                # No ".<CRLF>" within the reader's limit: take what is safe to take.
                chunk = await reader.read(exc.consumed)
                end = False
            except asyncio.IncompleteReadError:
                return False  # connection closed mid-message
            else:
                before = chunk[-5:-3] if len(chunk) >= 5 else (tail + chunk[:-3])[-2:]
                end = before == b"\r\n"
            if not chunk:
                return False
            kept = scanner.feed(chunk[:-3] if end else chunk)
            if kept:
                await store.add(kept)
            if end:
                break
            tail = (tail + chunk[-2:])[-2:]
            work += len(chunk) + PIECE_COST
            octets += len(chunk)
            # ".<CRLF>" that ends nothing ("x.<CRLF>" lines) would cost a readuntil
            # each: take what is already buffered, up to the next possible end, at once.
            ahead = _buffered_until_end(reader, tail)
            if ahead:
                piece = await reader.read(ahead)  # buffered: returns at once
                kept = scanner.feed(piece)
                if kept:
                    await store.add(kept)
                tail = (tail + piece[-2:])[-2:]
                work += len(piece)
                octets += len(piece)
            if work >= YIELD_EVERY:
                # readuntil returns without waiting while data is buffered: let the
                # other connections have their turn; past the large threshold, only as
                # much as the shared large-message rate allows.
                large = max(octets - unpaced, 0)
                unpaced = max(unpaced - octets, 0)
                await pace(large)
                work = octets = 0
        last = scanner.finish()
        if last:
            await store.add(last)
        return True

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command == "DATA":
            # The data is in; filtering has its own per-plugin timeouts, so the idle
            # timer must not cut the client off while we decide (RFC 5321 4.5.3.2.6).
            self._in_data = False
            self._pause_timer()
        return await super()._call_handler_hook(command, *args)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser, minus its crashes on some malformed input.

        The stdlib header parser it uses raises AttributeError (not HeaderParseError)
        for e.g. ``<a@[bad``; that is a malformed address (553 5.1.3), not a local error.
        """
        match = _PLAIN_ADDRESS.match(arg)
        rest = arg[match.end() :].lstrip(" \t\r\n") if match is not None else ""
        if match is not None and not rest.startswith("("):
            # The common strict form, answered as the parser would, without it
            # (RFC 5321 4.1.2 dot-atom local part and domain; ~70 us saved per address).
            address = match.group(1)
            limit = self.local_part_limit
            if limit and len(address.rpartition("@")[0]) > limit:
                return None, None
            return address, rest
        try:
            return super()._getaddr(arg)
        except Exception:
            return None, None

    # --- AUTH -------------------------------------------------------------------------------

    @_help_of(SMTP.smtp_AUTH)
    async def smtp_AUTH(self, arg: str) -> None:
        await self._progressing(super().smtp_AUTH, arg)
        conn = self.mailflow_conn
        if self.session is not None and self.session.authenticated and conn is not None:
            login = getattr(self.session.auth_data, "login", b"") or b""
            if not conn.authenticated_user:
                conn.authenticated_user = login.decode("utf-8", "replace")
                log.info("%s authenticated as %s", conn.ip, conn.authenticated_user)

    # --- greeting ---------------------------------------------------------------------------

    async def _handle_client(self) -> None:
        handler = self.mailflow_handler
        peer = self.session.peer if self.session else None
        ip, port = (peer[0], peer[1]) if isinstance(peer, tuple) else (str(peer or ""), 0)
        conn = handler.new_connection(ip, port)
        self.mailflow_conn = conn
        self.session.mailflow_conn = conn
        server = handler.app.config.server
        if self._counted:  # not when the connection is already gone
            self._counted_ip = ip
            handler.active_by_ip[ip] += 1
        refusal = connection_refusal(
            server, handler.all_active.value, handler.active_by_ip, ip, handler.per_ip_exempt
        )
        if refusal is not None:
            # RFC 5321 3.1: a server may answer the connection with 421 and close.
            log.info("%s: refused at connect: %s", ip, refusal)
            await self.push(str(refusal))
            self._close()
            return
        model = handler.transaction(conn)
        self.mailflow_tx = model
        decision = await model.connect()
        if decision.refused:
            await self.push(str(decision.reply))
            self._close()
            return
        await super()._handle_client()
