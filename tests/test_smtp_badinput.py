"""Malformed input and SMTP smuggling: each case gets its SMTP answer, and the server lives on.

Every test ends with :func:`still_works`: a normal message on a new connection is
delivered, so no bad input leaves the server broken.
"""

from __future__ import annotations

import email
import email.policy

import pytest

from mailflow.normalize import has_bare_newline
from mailflow.testing import SMTPDialog, make_message, running_server, send, smtp_sink
from tests.smtp_support import Recorder

RCPT = "bob@example.com"
VICTIM = "victim@example.com"


async def still_works(srv) -> None:
    before = len(srv.delivered("alive@example.com"))
    assert await send(srv.port, "a@example.org", ["alive@example.com"], make_message()) == {}
    await srv.wait_delivered("alive@example.com", count=before + 1)


async def session(port: int) -> SMTPDialog:
    dialog, greeting = await SMTPDialog.open(port)
    assert greeting.startswith("220"), greeting
    assert (await dialog.command("EHLO client.test")).startswith("250")
    return dialog


async def transaction(port: int, data: bytes, rcpts: tuple[str, ...] = (RCPT,)) -> str:
    """MAIL/RCPT/DATA with ``data`` written verbatim, then the terminator; the final reply."""
    dialog = await session(port)
    try:
        assert (await dialog.command("MAIL FROM:<a@example.org>")).startswith("250")
        for r in rcpts:
            assert (await dialog.command(f"RCPT TO:<{r}>")).startswith("250")
        assert (await dialog.command("DATA")).startswith("354")
        await dialog.write_raw(data)
        return await dialog.command(b"\r\n.")
    finally:
        await dialog.close()


def body_after_trace(msg: bytes) -> bytes:
    """The delivered message minus the Received header we prepend."""
    assert msg.startswith(b"Received: ")
    end = msg.index(b"\r\n", 0)
    while msg[end + 2 : end + 3] in (b" ", b"\t"):
        end = msg.index(b"\r\n", end + 2)
    return msg[end + 2 :]


# --- SMTP smuggling (2023): bare line endings around a dot ---------------------------------


def smuggle(ending: bytes) -> bytes:
    return (
        b"From: a@example.org\r\nSubject: first\r\n\r\nfirst body"
        + ending
        + b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<" + VICTIM.encode() + b">\r\nDATA\r\n"
        + b"From: admin@example.com\r\nSubject: smuggled\r\n\r\nsecond body"
    )  # fmt: skip


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n"]


@pytest.mark.parametrize("ending", SMUGGLING)
async def test_smuggling_in_normalize_mode_delivers_exactly_one_message(make_config, ending):
    async with running_server(make_config()) as srv:
        reply = await transaction(srv.port, smuggle(ending))
        assert reply.startswith("250 2.0.0"), reply
        [msg] = await srv.wait_delivered(RCPT)
        await srv.wait_queue_empty()
        assert srv.delivered(VICTIM) == []
        # The would-be second message is plain text inside the first one.
        assert b"MAIL FROM:<admin@example.com>\r\n" in msg
        assert b"Subject: smuggled" in msg
        assert not has_bare_newline(msg)
        await still_works(srv)


@pytest.mark.parametrize("ending", SMUGGLING)
async def test_smuggling_in_reject_mode_is_refused_and_nothing_delivered(make_config, ending):
    config = make_config('server: {listen: ["127.0.0.1:0"], bare_newline: reject}')
    async with running_server(config) as srv:
        reply = await transaction(srv.port, smuggle(ending))
        assert reply.startswith("550 5.6.0"), reply
        await still_works(srv)
        assert srv.delivered(RCPT) == [] and srv.delivered(VICTIM) == []


@pytest.mark.parametrize("ending", SMUGGLING)
async def test_relayed_bytes_carry_no_bare_line_endings(make_config, ending):
    async with smtp_sink() as sink:
        config = make_config(f"""
            server: {{listen: ["127.0.0.1:0"], hostname: mx.test}}
            local_domains: [example.com]
            relay_networks: [127.0.0.0/8]
            relay:
              default: sink
              targets: {{sink: {{host: 127.0.0.1, port: {sink.port}, tls: none}}}}
            """)
        async with running_server(config) as srv:
            reply = await transaction(srv.port, smuggle(ending), rcpts=("x@elsewhere.test",))
            assert reply.startswith("250"), reply
            [got] = await sink.wait_messages(1)
            await srv.wait_queue_empty()
        assert len(sink.messages) == 1 and sink.handler.transactions == 1
        assert got.rcpt_tos == ["x@elsewhere.test"]
        assert not has_bare_newline(got.data)
        assert b"MAIL FROM:<admin@example.com>" in got.data


@pytest.mark.parametrize("data", [b"bare LF\nhere", b"bare CR\rhere", b"end with LF\n"])
async def test_bare_newlines_without_a_dot(make_config, data):
    async with running_server(make_config()) as srv:
        assert (await transaction(srv.port, b"Subject: x\r\n\r\n" + data)).startswith("250")
        [msg] = await srv.wait_delivered(RCPT)
        assert not has_bare_newline(msg)
        await still_works(srv)


# --- line length, NUL, 8-bit ---------------------------------------------------------------


async def test_line_lengths(make_config):
    # RFC 5321 4.5.3.1.6: 1000 octets with CRLF. aiosmtpd allows one more octet (room
    # for a dot-stuffed maximal line) and answers 500 past that; see docs/smtp.md.
    async with running_server(make_config()) as srv:
        for length in (998, 999):
            reply = await transaction(srv.port, b"Subject: x\r\n\r\n" + b"a" * length)
            assert reply.startswith("250"), (length, reply)
        reply = await transaction(srv.port, b"Subject: x\r\n\r\n" + b"a" * 1000)
        assert reply.startswith("500"), reply
        reply = await transaction(srv.port, b"Subject: x\r\n\r\n" + b"a" * 100_000)
        assert reply.startswith("500"), reply
        await srv.wait_queue_empty()
        assert len(srv.delivered(RCPT)) == 2
        # A command line over 512 octets (RFC 5321 4.5.3.1.4) is refused; the session lives.
        dialog = await session(srv.port)
        assert (await dialog.command("NOOP " + "x" * 600)).startswith("500")
        assert (await dialog.command("NOOP")).startswith("250")
        await dialog.close()
        await still_works(srv)


async def test_nul_bytes_are_refused(make_config):
    async with running_server(make_config()) as srv:
        reply = await transaction(srv.port, b"Subject: x\r\n\r\nnul \x00 here")
        assert reply.startswith("550 5.6.0"), reply
        await still_works(srv)
        assert srv.delivered(RCPT) == []


async def test_8bit_data_without_8bitmime_is_stored_byte_for_byte(make_config):
    data = b"Subject: caf\xc3\xa9\r\nX-Latin1: \xe9t\xe9\r\n\r\n\xff\xfe raw \x80\x81 bytes\r\n"
    async with running_server(make_config()) as srv:
        assert (await transaction(srv.port, data[:-2])).startswith("250")
        [msg] = await srv.wait_delivered(RCPT)
        assert body_after_trace(msg) == data
        await still_works(srv)


# --- odd message shapes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "body"),
    [
        (b"just a body line, no headers", b"just a body line, no headers\r\n"),
        (b"two lines\r\nof body", b"two lines\r\nof body\r\n"),
        (b"", b""),
    ],
)
async def test_message_without_headers_keeps_its_body_a_body(make_config, data, body):
    async with running_server(make_config()) as srv:
        assert (await transaction(srv.port, data)).startswith("250")
        [msg] = await srv.wait_delivered(RCPT)
        # We add the blank line RFC 5322 3.5 requires, so the body does not become a header.
        assert body_after_trace(msg) == b"\r\n" + body
        parsed = email.message_from_bytes(msg, policy=email.policy.compat32)
        assert parsed.keys() == ["Received"]
        assert parsed.get_payload(decode=True) == body
        await still_works(srv)


async def test_headers_only_and_missing_from_date_message_id_are_accepted(make_config):
    async with running_server(make_config()) as srv:
        assert (await transaction(srv.port, b"Subject: only headers")).startswith("250")
        [msg] = await srv.wait_delivered(RCPT)
        parsed = email.message_from_bytes(msg)
        assert parsed["Subject"] == "only headers"
        # A relay/MX does not invent Date or Message-ID (RFC 5321 6.4; see docs/smtp.md).
        assert parsed["Date"] is None and parsed["Message-ID"] is None
        assert parsed["From"] is None
        await still_works(srv)


async def test_huge_header_blocks_are_handled_and_plugins_run(make_config):
    rec = Recorder()
    many = b"".join(b"X-Filler-%d: value %d\r\n" % (i, i) for i in range(20_000))
    folded = b"X-Folded: start" + b"\r\n\tword word word word word word word" * 14_000
    assert len(folded) > 500_000
    async with running_server(make_config(), extra_plugins={"rec": rec}) as srv:
        for head in (many, folded + b"\r\n"):
            reply = await transaction(srv.port, head + b"Subject: big\r\n\r\nbody")
            assert reply.startswith("250"), reply
        msgs = await srv.wait_delivered(RCPT, count=2)
        assert msgs[0].count(b"X-Filler-") == 20_000
        assert b"X-Folded: start" in msgs[1]
        assert len(rec.stages["data"]) == 2
        await still_works(srv)


async def test_loop_detection_counts_received_headers(make_config):
    config = make_config('server: {listen: ["127.0.0.1:0"], max_received_headers: 5}')
    hop = b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    async with running_server(config) as srv:
        reply = await transaction(srv.port, hop * 5 + b"Subject: loop\r\n\r\nx")
        assert reply.startswith("554 5.4.6"), reply
        # Received lines in the body are not trace headers.
        body_hops = b"Subject: ok\r\n\r\n" + hop * 10
        assert (await transaction(srv.port, hop * 4 + body_hops)).startswith("250")
        [msg] = await srv.wait_delivered(RCPT)
        assert b"Subject: ok" in msg
        await still_works(srv)


# --- the command stream --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"FOO bar", "500"),
        (b"\x00\xff\xfe\x80junk", "500"),
        (b"GET / HTTP/1.1", "500"),
        (b"MAIL FROM:<a@example.org>", "503"),  # before HELO
        (b"RCPT TO:<bob@example.com>", "503"),
        (b"DATA", "503"),
        (b"", "500"),
    ],
)
async def test_junk_before_helo(make_config, line, expected):
    async with running_server(make_config()) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        assert (await dialog.command(line)).startswith(expected)
        assert (await dialog.command("EHLO client.test")).startswith("250")
        await dialog.close()
        await still_works(srv)


async def test_endless_junk_is_cut_off(make_config):
    async with running_server(make_config()) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        replies = [await dialog.command(b"XJUNK%d" % i) for i in range(5)]
        assert replies[-1].startswith("502 5.5.1"), replies
        assert await dialog.reader.read() == b""
        await dialog.close()
        await still_works(srv)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("MAIL FROM:<not an address>", "553"),
        ("MAIL FROM:<a@[bad", "553"),  # crashed the stdlib parser before our guard
        (b"MAIL FROM:<\xff\xfe@example.org>", "553"),  # not UTF-8 (RFC 6531 3.3)
        ("MAIL FROM:<j\u00f6rg@example.org> SMTPUTF8", "250"),
        ("MAIL FROM:<a@example.org> BODY=8BITMIME", "250"),
        ("MAIL FROM:<a@example.org> SIZE=notanumber", "501"),
        ("MAIL FROM:<>", "250"),  # the null sender (RFC 5321 4.5.5)
        ("MAIL TO:<a@example.org>", "501"),
    ],
)
async def test_mail_from_variants(make_config, command, expected):
    async with running_server(make_config()) as srv:
        dialog = await session(srv.port)
        reply = await dialog.command(command)
        assert reply.startswith(expected), reply
        await dialog.close()
        await still_works(srv)


async def test_pipelined_commands_in_one_write(make_config):
    async with running_server(make_config()) as srv:
        dialog = await session(srv.port)
        assert "PIPELINING" in await dialog.command("EHLO client.test")
        await dialog.write_raw(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\n"
            b"RCPT TO:<nobody@[bad\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n"
        )
        replies = [await dialog.read_reply() for _ in range(5)]
        assert [r[:3] for r in replies] == ["250", "250", "553", "250", "354"], replies
        await dialog.write_raw(b"Subject: piped\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        assert (await dialog.read_reply()).startswith("250")
        assert (await dialog.read_reply()).startswith("221")
        await dialog.close()
        for r in (RCPT, "carol@example.com"):
            [msg] = await srv.wait_delivered(r)
            assert b"Subject: piped" in msg


async def test_rset_mid_transaction_forgets_the_envelope(make_config):
    async with running_server(make_config()) as srv:
        dialog = await session(srv.port)
        await dialog.command("MAIL FROM:<a@example.org>")
        await dialog.command("RCPT TO:<first@example.com>")
        assert (await dialog.command("RSET")).startswith("250")
        assert (await dialog.command("RCPT TO:<x@example.com>")).startswith("503")
        assert (await dialog.command("DATA")).startswith("503")
        await dialog.command("MAIL FROM:<a@example.org>")
        await dialog.command(f"RCPT TO:<{RCPT}>")
        assert (await dialog.command("DATA")).startswith("354")
        await dialog.write_raw(b"Subject: after rset\r\n\r\nx")
        assert (await dialog.command(b"\r\n.")).startswith("250")
        await dialog.close()
        await srv.wait_delivered(RCPT)
        await srv.wait_queue_empty()
        assert srv.delivered("first@example.com") == []


async def test_client_vanishing_mid_data_stores_nothing(make_config):
    async with running_server(make_config()) as srv:
        dialog = await session(srv.port)
        await dialog.command("MAIL FROM:<a@example.org>")
        await dialog.command(f"RCPT TO:<{RCPT}>")
        await dialog.command("DATA")
        await dialog.write_raw(b"Subject: cut\r\n\r\npartial")
        dialog.writer.transport.abort()
        await still_works(srv)
        await srv.wait_queue_empty()
        assert srv.delivered(RCPT) == []
        assert srv.app.spool.ids() == []
