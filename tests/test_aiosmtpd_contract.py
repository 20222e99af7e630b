"""What mailflow.smtp.protocol.MailflowSMTP needs from aiosmtpd beyond its public API.

MailflowSMTP (with mailflow.smtp.auth.AuthMechanisms) overrides or calls private
members of ``aiosmtpd.smtp.SMTP`` and reads asyncio's StreamReader internals. aiosmtpd
is pinned to the minor version tested (pyproject.toml); this test says what to check
when the pin moves: every member still there, with the signature and the behaviour
relied on, on a real connection over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from mailflow.smtp.auth import AuthMechanisms
from mailflow.smtp.protocol import MailflowSMTP

# name -> (coroutine function?, parameter names): methods MailflowSMTP overrides or calls.
METHODS: dict[str, tuple[bool, list[str]]] = {
    "_call_handler_hook": (True, ["self", "command", "args"]),
    "_getaddr": (False, ["self", "arg"]),
    "_handle_client": (True, ["self"]),
    "_reset_timeout": (False, ["self", "duration"]),
    "_set_post_data_state": (False, ["self"]),
    "_timeout_cb": (False, ["self"]),
    "auth_LOGIN": (True, ["self", "_", "args"]),
    "auth_PLAIN": (True, ["self", "_", "args"]),
    "challenge_auth": (True, ["self", "challenge", "encode_to_b64", "log_client_response"]),
    "check_auth_needed": (True, ["self", "caller_method"]),
    "check_helo_needed": (True, ["self", "helo"]),
    "connection_lost": (False, ["self", "error"]),
    "connection_made": (False, ["self", "transport"]),
    "data_received": (False, ["self", "data"]),
    "push": (True, ["self", "status"]),
    "smtp_AUTH": (True, ["self", "arg"]),
    "smtp_DATA": (True, ["self", "arg"]),
    "smtp_EHLO": (True, ["self", "hostname"]),
    "smtp_HELO": (True, ["self", "hostname"]),
    "smtp_MAIL": (True, ["self", "arg"]),
    "smtp_RCPT": (True, ["self", "arg"]),
    "smtp_RSET": (True, ["self", "arg"]),
}

# Instance attributes read (or, for the timer, replaced) by MailflowSMTP / AuthMechanisms.
ATTRIBUTES = [
    "_authenticator",
    "_decode_data",
    "_reader",
    "_timeout_duration",
    "_timeout_handle",
    "_writer",
    "data_size_limit",
    "enable_SMTPUTF8",
    "envelope",
    "line_length_limit",
    "local_part_limit",
    "loop",
    "session",
    "transport",
]
# Session and Envelope fields the handler and the protocol use.
SESSION_FIELDS = ["peer", "ssl", "host_name", "extended_smtp", "auth_data", "authenticated"]
ENVELOPE_FIELDS = ["mail_from", "mail_options", "rcpt_tos", "rcpt_options", "content"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_overridden_and_called_methods_keep_their_signatures(name: str):
    coroutine, params = METHODS[name]
    member = getattr(SMTP, name)
    assert inspect.iscoroutinefunction(member) is coroutine
    assert list(inspect.signature(member).parameters) == params


def test_mailflow_overrides_only_members_listed_here():
    """A new override of an aiosmtpd member must be added to METHODS (and checked)."""
    ours = {*vars(MailflowSMTP), *vars(AuthMechanisms)}
    theirs = {name for klass in SMTP.__mro__[:-1] for name in vars(klass)}
    overridden = {n for n in ours & theirs if callable(getattr(SMTP, n)) and n != "__init__"}
    assert overridden <= set(METHODS), overridden - set(METHODS)


def test_help_text_lives_on_the_command_methods():
    # mailflow.smtp.protocol._help_of copies these so HELP still lists the overrides.
    for name in ("smtp_MAIL", "smtp_RCPT", "smtp_RSET", "smtp_HELO", "smtp_EHLO", "smtp_AUTH"):
        assert getattr(getattr(SMTP, name), "__smtp_syntax__", None), name
        assert getattr(getattr(MailflowSMTP, name), "__smtp_syntax__", None), name


def test_auth_types_and_getaddr():
    assert {"success", "handled", "message", "auth_data"} <= set(
        inspect.signature(AuthResult).parameters
    )
    assert LoginPassword(b"u", b"p").login == b"u"
    smtp = SMTP(object(), loop=asyncio.new_event_loop())
    try:
        # MailflowSMTP._getaddr falls back on this parser for anything unusual.
        assert smtp._getaddr("<a@example.com> SIZE=10") == ("a@example.com", "SIZE=10")
        assert smtp._getaddr("<a@example.com>") == ("a@example.com", "")
    finally:
        smtp.loop.close()


class Probe(SMTP):
    """aiosmtpd's SMTP recording what MailflowSMTP relies on, as it happens."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.seen: dict[str, Any] = {}

    async def _handle_client(self) -> None:
        # MailflowSMTP runs the connect stage here, before aiosmtpd's greeting.
        self.seen["handle_client_session"] = self.session
        self.seen["attributes"] = {name: hasattr(self, name) for name in ATTRIBUTES}
        self.seen["timer"] = self._timeout_handle
        await super()._handle_client()


class Hooks:
    """Handler hooks with the signatures mailflow.smtp.handler.Handler uses."""

    def __init__(self) -> None:
        self.probe: Probe | None = None
        self.buffered_at_mail = b""
        self.ehlo_responses: list[str] = []
        self.data: dict[str, Any] = {}

    async def handle_EHLO(
        self,
        server: Probe,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        self.ehlo_responses = list(responses)
        # With this (new-style) hook aiosmtpd leaves the name to the handler, as
        # mailflow.smtp.handler.Handler does: without it MAIL would be "503 send HELO first".
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: Probe, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # MailflowSMTP.push holds a pipelined reply while the next line is buffered here.
        self.buffered_at_mail = bytes(server._reader._buffer)
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(self, server: Probe, session: Session, envelope: Envelope) -> str:
        self.data = {
            "content": envelope.content,
            "session": [hasattr(session, f) for f in SESSION_FIELDS],
            "envelope": [hasattr(envelope, f) for f in ENVELOPE_FIELDS],
            "limit": server._reader._limit,
        }
        return "250 stored"


@contextlib.asynccontextmanager
async def probe_server(hooks: Hooks, **kwargs: Any) -> AsyncIterator[list[Probe]]:
    loop = asyncio.get_running_loop()
    made: list[Probe] = []

    def factory() -> Probe:
        probe = Probe(hooks, decode_data=False, timeout=30, loop=loop, **kwargs)
        made.append(probe)
        return probe

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        made.append(server.sockets[0].getsockname()[1])  # type: ignore[arg-type]
        yield made
    finally:
        server.close()
        await server.wait_closed()


async def _lines(reader: asyncio.StreamReader) -> str:
    async with asyncio.timeout(10):
        return (await reader.readline()).decode()


async def test_a_real_session_through_the_members_mailflow_uses():
    hooks = Hooks()
    async with probe_server(hooks) as made:
        port = made.pop()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _lines(reader)).startswith("220")
        probe = made[0]
        # _handle_client runs once the connection is made, with the session in place
        # and every attribute MailflowSMTP reads already set; aiosmtpd's timer armed.
        assert probe.seen["handle_client_session"] is probe.session
        assert probe.seen["attributes"] == dict.fromkeys(ATTRIBUTES, True)
        assert isinstance(probe.seen["timer"], asyncio.TimerHandle)
        assert probe._timeout_duration == 30
        assert probe._decode_data is False
        # StreamReader keeps unread data in a bytearray _buffer and its limit in _limit.
        assert isinstance(probe._reader._buffer, bytearray)
        assert isinstance(probe._reader._limit, int)
        assert isinstance(probe._writer, asyncio.StreamWriter)

        writer.write(b"EHLO client.test\r\n")
        while not (line := await _lines(reader)).startswith("250 "):
            assert line.startswith("250-")
        assert hooks.ehlo_responses[-1].startswith("250 ")  # the last line is last

        # Two commands in one write: the second is in _buffer while MAIL is handled.
        writer.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
        assert (await _lines(reader)).startswith("250")
        assert (await _lines(reader)).startswith("250")
        assert hooks.buffered_at_mail.startswith(b"RCPT TO:<b@example.com>")

        writer.write(b"DATA\r\n")
        assert (await _lines(reader)).startswith("354")
        writer.write(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        assert (await _lines(reader)) == "250 stored\r\n"
        assert hooks.data["content"] == b"Subject: x\r\n\r\nhi\r\n"  # bytes: decode_data=False
        assert all(hooks.data["session"]) and all(hooks.data["envelope"])
        # _set_post_data_state ran: a fresh envelope for the next transaction.
        assert probe.envelope.mail_from is None and probe.envelope.rcpt_tos == []

        # The hook API MailflowSMTP's DATA reader calls, and what it returns.
        assert await probe._call_handler_hook("DATA") == "250 stored"
        assert await probe._call_handler_hook("NOOP") is MISSING
        assert await probe.check_helo_needed() is False
        assert await probe.check_auth_needed("DATA") is False

        # _reset_timeout(duration) re-arms _timeout_handle; _timeout_cb closes the
        # connection and writes nothing (MailflowSMTP writes its 421 first).
        before = probe._timeout_handle
        probe._reset_timeout(5)
        assert isinstance(probe._timeout_handle, asyncio.TimerHandle)
        assert before is not None and before.cancelled()
        probe._timeout_handle.cancel()
        probe._timeout_cb()
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
