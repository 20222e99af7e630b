"""The one dot-stuffing (``smtp_client.dot_stuff``) of every message mailflow sends:
relay and MX (SMTP) and local delivery (LMTP) go through it, checked against real
aiosmtpd peers on loopback."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailflow.delivery.lmtp import LMTPTransport
from mailflow.delivery.smtp_client import dot_stuff
from mailflow.delivery.smtp_pool import Destination, SMTPPool
from mailflow.delivery.spool import QueueEntry, RecipientState
from mailflow.testing import SinkBehaviour, smtp_sink
from mailflow.verdict import Route, RouteKind


def normalized(message: bytes) -> bytes:
    """The message as it should arrive: every CRLF, bare CR and bare LF is one CRLF,
    and a message not ending in a line break gets one."""
    text = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def unstuffed(payload: bytes) -> bytes:
    """What a receiver makes of the payload (RFC 5321 4.5.2): the lines before the
    terminating line of one ".", each without the first "." if it starts with one."""
    lines = payload.split(b"\r\n")
    assert lines[-1] == b"", "the payload ends with CRLF"
    end = lines.index(b".")  # the first line of a single dot ends the data
    assert end == len(lines) - 2, "nothing after the terminator"
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines[:end])


@pytest.mark.parametrize(
    ("message", "payload"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),  # the usual case: only the terminator added
        (b".a\r\nb\r\n..c\r\n", b"..a\r\nb\r\n...c\r\n.\r\n"),  # leading dots doubled
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),  # a line of only "." mid-message
        (b".\r\n", b"..\r\n.\r\n"),  # a message that is one line of only "."
        (b"a\r\n.", b"a\r\n..\r\n.\r\n"),  # ... last, without its CRLF
        (b"a\r\nb", b"a\r\nb\r\n.\r\n"),  # not ending in CRLF: CRLF added
        (b"a\nb\n", b"a\r\nb\r\n.\r\n"),  # bare LF: CRLF
        (b"a\rb\r", b"a\r\nb\r\n.\r\n"),  # bare CR: CRLF
        (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),  # CR then CRLF: two line breaks
        (b"a\n.b\r.\n", b"a\r\n..b\r\n..\r\n.\r\n"),  # dots after bare line ends too
        (b"\r\n", b"\r\n.\r\n"),
        (b"", b".\r\n"),  # nothing: the terminator alone
    ],
)
def test_dot_stuff(message: bytes, payload: bytes) -> None:
    assert dot_stuff(message) == payload


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n."])).map(b"".join))
def test_dot_stuffing_round_trips_to_the_message_with_crlf_line_ends(message: bytes) -> None:
    payload = dot_stuff(message)
    # No bare CR or LF is ever sent (RFC 5321 2.3.8) ...
    assert payload.count(b"\r") == payload.count(b"\n") == payload.count(b"\r\n")
    # ... the data ends at the terminator and nowhere before, and the receiver gets
    # the message back, line ends made CRLF.
    assert unstuffed(payload) == normalized(message)


# --- the same stuffing over SMTP and LMTP, against real servers -----------------------------------

TRICKY = b"Subject: dots\r\n\r\n.\r\n..two\r\nbare lf\nbare cr\r.after cr\r\n."


async def test_relay_sends_the_tricky_message_intact() -> None:
    async with smtp_sink() as sink:
        pool = SMTPPool("client.test")
        dest = Destination(host="127.0.0.1", port=sink.port, tls="none", timeout=5)
        try:
            outcomes = await pool.send(dest, "a@example.org", ["b@example.com"], TRICKY)
        finally:
            await pool.aclose()
    assert outcomes["b@example.com"].code == 250
    [got] = sink.messages
    assert got.data == normalized(TRICKY)


async def test_lmtp_sends_the_tricky_message_intact(make_config) -> None:
    async with smtp_sink(SinkBehaviour(), lmtp=True) as sink:
        config = make_config(
            f"""
            local_domains: [example.com]
            delivery:
              method: lmtp
              lmtp: {{host: 127.0.0.1, port: {sink.port}}}
            """
        )
        transport = LMTPTransport(config)
        route = Route(RouteKind.LMTP)
        entry = QueueEntry(
            "Q1", "a@example.org", [RecipientState("b@example.com", {})], created=0.0
        )
        try:
            outcomes = await transport(entry, TRICKY, entry.recipients, route)
        finally:
            await transport.aclose()
    assert outcomes["b@example.com"].code == 250
    [got] = sink.messages
    assert got.data == normalized(TRICKY)
