"""One SMTP connection: aiosmtpd's protocol plus what mailflow adds around the commands.

Connection limits (an exact count), the connect stage before the greeting, 421 on
timeouts with a per-chunk DATA timer, carrying the :class:`~mailflow.message.Connection`
across STARTTLS with the TLS facts, and crash-proof address parsing. The per-command
decisions (relay control, limits, the pipeline) live in :class:`mailflow.smtp.Handler`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiosmtpd.smtp import MISSING, SMTP

from mailflow.auth import AuthMechanisms
from mailflow.message import Connection, PluginRun
from mailflow.policy import in_networks
from mailflow.verdict import Action, SMTPReply

if TYPE_CHECKING:
    from mailflow.smtp import Handler

log = logging.getLogger("mailflow.smtp")

# RFC 5321 3.1 / 4.5.3.2: replies given before closing the connection.
R_TOO_MANY_CONNS = SMTPReply(421, "Too many connections, try again later", "4.7.0")
R_TOO_MANY_FROM_IP = SMTPReply(
    421, "Too many connections from your address, try again later", "4.7.0"
)
R_TIMEOUT = SMTPReply(421, "Timeout, closing connection", "4.4.2")

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
# epoll_ctl calls) every time. The message size is still checked block by block.
DATA_READ_LIMIT = 256 * 1024


def _longest_line(data: bytes) -> int:
    """Length of the longest CRLF-terminated line in ``data``, its CRLF included."""
    return max(map(len, data.split(b"\r\n")), default=0) + 2


def _has_line_longer_than(data: bytes, limit: int) -> bool:
    """``_longest_line(data) > limit``, without splitting typical mail into lines.

    Such a line is more than ``limit - 2`` bytes without a CRLF, so it covers a whole
    aligned window of ``limit // 2`` bytes: when every window holds a CRLF, no line
    is that long. A few ``find`` calls instead of one bytes object per line.
    """
    step = limit // 2
    if step >= 2:
        find = data.find
        for start in range(0, len(data), step):
            if find(b"\r\n", start, start + step) < 0:
                break  # a long stretch without a line end: measure exactly
        else:
            return False
    return _longest_line(data) > limit


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
        self.mailflow_conn: Connection | None = None
        self.mailflow_connect_runs: list[PluginRun] = []
        self.mailflow_helo_runs: list[PluginRun] = []
        self._counted = False  # this connection is in handler.active
        self._counted_ip: str | None = None  # ... and in handler.active_by_ip under this
        self._deadline = 0.0  # loop time after which an idle client is cut off
        self._in_data = False  # between "354" and the end of the message data
        self._in_group_command = False  # running MAIL, RCPT or RSET (see push)
        self._held: list[bytes] = []  # replies not written yet (see push)

    # --- connection bookkeeping -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        after_starttls = self.transport is not None
        super().connection_made(transport)
        if after_starttls:
            self._after_starttls()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Peers lose ~40 ms per reply to Nagle + delayed ACK otherwise.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.mailflow_handler.active += 1
        self._counted = True

    def _after_starttls(self) -> None:
        """aiosmtpd made a fresh Session; carry the Connection over, minus what TLS resets.

        RFC 3207 4.2: after the handshake the server forgets what the client said
        before it (HELO name, and any AUTH), so ``helo`` is cleared here too.
        """
        conn = self.mailflow_conn
        if conn is None or self.session is None:
            return
        self.session.mailflow_conn = conn
        conn.helo = ""
        conn.authenticated_user = ""
        self.mailflow_helo_runs = []
        ssl_object = (self.session.ssl or {}).get("ssl_object")
        conn.tls = True
        conn.tls_version = (ssl_object.version() or "") if ssl_object is not None else ""

    def connection_lost(self, error: Exception | None) -> None:
        # May run twice (aiosmtpd calls it itself when the TLS handshake fails), and
        # before _handle_client ever ran: the flag keeps the count exact either way.
        if self._counted:
            self._counted = False
            self.mailflow_handler.active -= 1
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
        """Run aiosmtpd's handler for a command whose reply may wait for the group's."""
        self._in_group_command = True
        try:
            await command(arg)
        finally:
            self._in_group_command = False

    @_help_of(SMTP.smtp_MAIL)
    async def smtp_MAIL(self, arg: str) -> None:
        await self._as_group_command(super().smtp_MAIL, arg)

    @_help_of(SMTP.smtp_RCPT)
    async def smtp_RCPT(self, arg: str) -> None:
        await self._as_group_command(super().smtp_RCPT, arg)

    @_help_of(SMTP.smtp_RSET)
    async def smtp_RSET(self, arg: str) -> None:
        await self._as_group_command(super().smtp_RSET, arg)

    # --- timeouts ---------------------------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the idle deadline; re-arm the timer only when it would fire too late.

        aiosmtpd cancels and creates a timer for every command and DATA chunk (six
        or more per message). Here a timer that fires no later than the new deadline
        is kept: when it fires early it looks at the deadline and waits the rest.
        """
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled():
            if handle.when() <= deadline:
                return
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._deadline_reached)

    def _deadline_reached(self) -> None:
        if self.loop.time() < self._deadline:  # moved on since the timer was set
            self._timeout_handle = self.loop.call_at(self._deadline, self._deadline_reached)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        """Tell the client why before closing (RFC 5321 4.5.3.2: 421 on timeout)."""
        if self.transport is not None and not self.transport.is_closing():
            phase = "data" if self._in_data else "command"
            self._held.append(f"{R_TIMEOUT} ({phase})\r\n".encode())
            self._write_held()
        super()._timeout_cb()

    def data_received(self, data: bytes) -> None:
        # RFC 5321 4.5.3.2.5: the DATA timeout is per received chunk, not per message,
        # so a large message on a slow link is not cut off while it is still flowing.
        if self._in_data:
            self._reset_timeout(self.mailflow_handler.app.config.server.data_timeout)
        super().data_received(data)

    @_help_of(SMTP.smtp_DATA)
    async def smtp_DATA(self, arg: str) -> None:
        server = self.mailflow_handler.app.config.server
        self._in_data = True
        self._reset_timeout(server.data_timeout)
        try:
            if self._decode_data:  # mailflow never asks for str content; keep aiosmtpd's path
                await super().smtp_DATA(arg)
            else:
                await self._smtp_data_bulk(arg)
        finally:
            self._in_data = False
            if self.transport is not None:
                self._reset_timeout(server.command_timeout)

    # --- DATA, read in blocks ---------------------------------------------------------------

    async def _smtp_data_bulk(self, arg: str) -> None:
        """aiosmtpd's ``smtp_DATA`` with the message read in blocks, not line by line.

        Same replies and checks as aiosmtpd 1.4 (503 without RCPT, 501 with an
        argument, 552 past ``data_size_limit`` and 500 for a line longer than
        ``line_length_limit``, both answered only after the whole message is read),
        at a fraction of the cost: a 5 KB message used to take ~100 ``readuntil``
        calls and list appends.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        # Counted as arriving, so that messages already at the data stage wait for it
        # and go through the plugins together (mailflow.batching).
        with self.mailflow_handler.app.pipeline.batch.receiving_data():
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                data, error = await self._read_data()
            except asyncio.CancelledError:
                log.info("Connection lost during DATA")
                self._writer.close()
                raise
        if data is None:
            if error:
                await self.push(error)
            self._set_post_data_state()
            return
        self.envelope.content = data
        self.envelope.original_content = data
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> tuple[bytes | None, str]:
        """Read the message up to the end-of-data line; un-dot-stuff it.

        Returns ``(data, "")``, or ``(None, reply)`` when it was too large or had
        too long a line (the rest of it is read and thrown away first, as RFC 5321
        4.2.5 implies), or ``(None, "")`` when the connection closed.

        RFC 5321 4.5.2: the data ends only at ``<CRLF>.<CRLF>`` (the CRLF ending the
        DATA command counts, so ``.<CRLF>`` right after it is an empty message); a
        "." after a bare CR or LF ends nothing (SMTP smuggling), and bare line ends
        are dealt with later by :mod:`mailflow.normalize`. The reader is searched
        for ``.<CRLF>`` and each match checked for a CRLF before it, so the data
        is consumed in blocks and nothing after the end (pipelined commands) is.
        """
        reader = self._reader
        # StreamReader keeps its limit in ``_limit`` (CPython 3.7+); aiosmtpd uses the
        # reader's internals too. Without it, the data is read with the usual limit.
        command_limit = getattr(reader, "_limit", None)
        if isinstance(command_limit, int) and command_limit < DATA_READ_LIMIT:
            reader._limit = DATA_READ_LIMIT  # type: ignore[attr-defined]
            try:
                return await self._read_data_from(reader)
            finally:
                reader._limit = command_limit  # type: ignore[attr-defined]
        return await self._read_data_from(reader)

    async def _read_data_from(self, reader: asyncio.StreamReader) -> tuple[bytes | None, str]:
        size_limit = self.data_size_limit
        parts: list[bytes] = []
        size = 0  # bytes before the end line, as aiosmtpd counts them
        tail = b"\r\n"  # the two bytes before the unread data
        too_much = too_long = False
        while True:
            try:
                chunk = await reader.readuntil(_DATA_END)
            except asyncio.LimitOverrunError as exc:
                # No ".<CRLF>" within the reader's limit: take what is safe to take.
                chunk = await reader.read(exc.consumed)
                end = False
            except asyncio.IncompleteReadError:
                return None, ""  # connection closed mid-message
            else:
                before = chunk[-5:-3] if len(chunk) >= 5 else (tail + chunk[:-3])[-2:]
                end = before == b"\r\n"
            if not chunk:
                return None, ""
            piece = chunk[:-3] if end else chunk
            size += len(piece)
            if not (too_much or too_long):
                if size_limit and size > size_limit:
                    # Decide between 552 and 500 as aiosmtpd would (first problem wins),
                    # then keep reading but stop storing (RFC 5321 4.5.3.1.7).
                    too_long = _has_line_longer_than(b"".join(parts), self.line_length_limit)
                    too_much = not too_long
                    parts.clear()
                else:
                    parts.append(piece)
            if end:
                break
            tail = (tail + chunk)[-2:]
        if too_long:
            return None, "500 Line too long (see RFC5321 4.5.3.1.6)"
        if too_much:
            return None, "552 Error: Too much mail data"
        data = b"".join(parts)
        # RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF.
        if len(data) >= self.line_length_limit and _has_line_longer_than(
            data, self.line_length_limit
        ):
            return None, "500 Line too long (see RFC5321 4.5.3.1.6)"
        # RFC 5321 4.5.2: drop the first "." of every line that starts with one.
        if data.startswith(b"."):
            data = data[1:]
        if b"\r\n." in data:
            data = data.replace(b"\r\n.", b"\r\n")
        return data, ""

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command != "DATA":
            return await super()._call_handler_hook(command, *args)
        # The data is in; filtering has its own per-plugin timeouts, so the idle
        # timer must not cut the client off while we decide (RFC 5321 4.5.3.2.6).
        self._in_data = False
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
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
        await super().smtp_AUTH(arg)
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
        refusal = None
        if handler.active > server.max_connections:
            refusal = R_TOO_MANY_CONNS
        elif (
            server.max_connections_per_ip is not None
            and handler.active_by_ip[ip] > server.max_connections_per_ip
            and not in_networks(ip, handler.per_ip_exempt)
        ):
            refusal = R_TOO_MANY_FROM_IP
        if refusal is not None:
            # RFC 5321 3.1: a server may answer the connection with 421 and close.
            log.info("%s: refused at connect: %s", ip, refusal)
            await self.push(str(refusal))
            self._close()
            return
        result, runs = await handler.app.pipeline.run_stage("connect", connection=conn)
        self.mailflow_connect_runs = runs
        if result is not None and result.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCARD):
            reply = result.smtp_reply() or SMTPReply(554, "Connection refused", "5.7.1")
            code = 554 if reply.code >= 500 else 421
            await self.push(str(SMTPReply(code, reply.text, reply.status)))
            self._close()
            return
        await super()._handle_client()
