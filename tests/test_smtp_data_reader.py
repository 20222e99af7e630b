"""The block-wise DATA reader (MailflowSMTP._read_data): end of data, dot-stuffing, limits.

RFC 5321 4.5.2 (transparency) and 4.5.3.1.6 (line length); the end of data is only
ever <CRLF>.<CRLF>, wherever the blocks the client wrote happen to split it.
"""

from __future__ import annotations

import asyncio

import pytest

from mailflow.testing import running_server
from tests.test_smtp_badinput import RCPT, body_after_trace, session, still_works


async def send_data(port: int, writes: list[bytes]) -> tuple[str, list[str]]:
    """One transaction whose DATA is written as ``writes`` (with pauses); the replies."""
    dialog = await session(port)
    try:
        assert (await dialog.command("MAIL FROM:<a@example.org>")).startswith("250")
        assert (await dialog.command(f"RCPT TO:<{RCPT}>")).startswith("250")
        assert (await dialog.command("DATA")).startswith("354")
        for chunk in writes:
            await dialog.write_raw(chunk)
            await asyncio.sleep(0.01)
        reply = await dialog.read_reply()
        more = []
        if writes[-1].endswith(b"QUIT\r\n"):
            more.append(await dialog.read_reply())
        return reply, more
    finally:
        await dialog.close()


MESSAGE = b"Subject: t\r\n\r\n" + b"".join(b"line %d.\r\n" % i for i in range(300))


@pytest.mark.parametrize("split", [1, 2, 3, 4, 5, 1000, 1001, 1002, len(MESSAGE) - 1])
async def test_end_of_data_split_anywhere(make_config, split):
    data = MESSAGE + b".\r\n"
    async with running_server(make_config()) as srv:
        reply, _ = await send_data(srv.port, [data[:split], data[split:]])
        assert reply.startswith("250"), reply
        [msg] = await srv.wait_delivered(RCPT)
        assert body_after_trace(msg) == MESSAGE


async def test_terminator_split_between_its_crlf_and_dot(make_config):
    async with running_server(make_config()) as srv:
        reply, _ = await send_data(srv.port, [b"Subject: t\r\n\r\nbody\r\n", b".", b"\r", b"\n"])
        assert reply.startswith("250"), reply
        [msg] = await srv.wait_delivered(RCPT)
        assert body_after_trace(msg) == b"Subject: t\r\n\r\nbody\r\n"


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 4])  # inside "<CRLF>.<CRLF>"
@pytest.mark.parametrize("before", [-6, -3, -2, 0, 1, 3])  # around DATA_READ_LIMIT
async def test_end_of_data_split_at_the_read_limit(make_config, before, cut):
    """The end line arriving in two writes, where the reader's limit falls (its
    LimitOverrunError paths): found exactly there, not before and not later."""
    from mailflow.smtp.protocol import DATA_READ_LIMIT

    head = b"Subject: t\r\n\r\n"
    filler = DATA_READ_LIMIT + before - len(head) - 2
    message = head + b"x" * (filler % 900) + b"\r\n" + (b"y" * 898 + b"\r\n") * (filler // 900)
    data = message[:-2] + b"\r\n.\r\n"  # the CRLF of the last line starts the end line
    at = len(message) - 2 + cut
    async with running_server(make_config()) as srv:
        reply, _ = await send_data(srv.port, [data[:at], data[at:]])
        assert reply.startswith("250"), reply
        [msg] = await srv.wait_delivered(RCPT)
        assert body_after_trace(msg) == message


async def test_dot_stuffing_is_undone_once_per_line(make_config):
    sent = b"..first\r\nSubject: t\r\n\r\n..\r\n...\r\n.x\r\nend.\r\n.. \r\n"
    async with running_server(make_config()) as srv:
        reply, _ = await send_data(srv.port, [sent + b".\r\n"])
        assert reply.startswith("250"), reply
        [msg] = await srv.wait_delivered(RCPT)
        # No header section (first line is not a field): a blank line is added in front.
        expected = b"\r\n.first\r\nSubject: t\r\n\r\n.\r\n..\r\nx\r\nend.\r\n. \r\n"
        assert body_after_trace(msg) == expected


async def test_lines_ending_in_a_dot_do_not_end_the_data(make_config):
    sent = b"Subject: t\r\n\r\nend.\r\nx.\r\n.\r\n"
    async with running_server(make_config()) as srv:
        reply, more = await send_data(srv.port, [sent + b"QUIT\r\n"])
        assert reply.startswith("250"), reply
        assert more[0].startswith("221")  # the pipelined QUIT was left for the command loop
        [msg] = await srv.wait_delivered(RCPT)
        assert body_after_trace(msg) == b"Subject: t\r\n\r\nend.\r\nx.\r\n"


async def test_too_much_data_is_read_to_the_end_then_refused(make_config):
    config = make_config("server: {max_message_size: 3000}")
    body = b"Subject: t\r\n\r\n" + b"x" * 70 + b"\r\n"
    async with running_server(config) as srv:
        reply, more = await send_data(srv.port, [body * 100 + b".\r\nQUIT\r\n"])
        assert reply.startswith("552"), reply
        assert more[0].startswith("221")
        assert srv.delivered(RCPT) == []
        await still_works(srv)


async def test_long_line_is_refused_after_the_data(make_config):
    async with running_server(make_config()) as srv:
        reply, _ = await send_data(srv.port, [b"Subject: t\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n"])
        assert reply.startswith("500"), reply
        assert srv.delivered(RCPT) == []
        await still_works(srv)


def test_the_long_line_shortcut_agrees_with_measuring_every_line():
    """has_line_longer_than skips the split for typical mail; same answer as measuring."""
    import random

    from mailflow.smtp.data import _longest_line, has_line_longer_than

    rng = random.Random(7)
    ends = [b"\r\n", b"\r\n", b"\n", b"\r"]  # bare CR/LF do not end a line here
    for _ in range(3000):
        pieces = []
        for _ in range(rng.randrange(0, 40)):
            length = rng.choice([rng.randrange(0, 80), rng.randrange(0, 1500)])
            pieces.append(b"x" * length + rng.choice(ends))
        data = b"".join(pieces)
        for limit in (1, 2, 3, 5, 100, 999, 1000, 1001):
            assert has_line_longer_than(data, limit) == (_longest_line(data) > limit)


def test_received_header_text_is_sanitized_character_by_character():
    from mailflow.smtp.received import _sanitize

    assert _sanitize("mx.example.org") == "mx.example.org"
    assert _sanitize("a (b);<c>\té\x00") == "a__b___c____"
    assert _sanitize("h" * 300) == "h" * 255


class _FlowControlledTransport:
    """Just enough of a transport for a StreamReader: counts pause/resume requests."""

    def __init__(self) -> None:
        self.pauses = 0
        self.paused = False

    def pause_reading(self) -> None:
        self.pauses += 1
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


async def test_message_data_is_read_without_stopping_the_socket_and_limits_come_back(tmp_path):
    """During DATA the reader may buffer DATA_READ_LIMIT bytes, not one command line.

    With the command-line limit (~1 KB) a few-KB message overran it and stopped and
    restarted reading from the socket per message; afterwards the command-line limit
    applies again, and what the client pipelined after the data is left for the
    command loop.
    """
    from mailflow.smtp.data import DataScanner, DataStore
    from mailflow.smtp.protocol import DATA_READ_LIMIT, MailflowSMTP

    line_limit = 1001
    reader = asyncio.StreamReader(limit=line_limit)
    transport = _FlowControlledTransport()
    reader.set_transport(transport)  # type: ignore[arg-type]
    protocol = object.__new__(MailflowSMTP)  # only what _read_data uses
    protocol._reader = reader
    scanner = DataScanner(line_limit, 10 * 1024 * 1024, reject_bare_newline=False)
    store = DataStore(DATA_READ_LIMIT, tmp_path)
    body = b"Subject: t\r\n\r\n" + b"".join(b"line %d of the body\r\n" % i for i in range(400))
    assert 2 * line_limit < len(body) < DATA_READ_LIMIT

    reading = asyncio.ensure_future(protocol._read_data(scanner, store))
    await asyncio.sleep(0)  # the reader is waiting for data now
    for start in range(0, len(body), 4096):  # as the socket delivers it
        reader.feed_data(body[start : start + 4096])
        await asyncio.sleep(0)
    reader.feed_data(b".\r\nMAIL FROM:<next@example.org>\r\n")
    assert await reading is True

    assert (scanner.error, await store.take()) == (None, body)
    assert not store.on_disk
    assert transport.pauses == 0
    assert reader._limit == line_limit  # type: ignore[attr-defined]
    assert await reader.readuntil() == b"MAIL FROM:<next@example.org>\r\n"


async def test_reader_finds_exactly_the_end_however_the_socket_splits_the_data(tmp_path):
    """Random data ("x.<CRLF>" lines that end nothing, bare line ends, stuffed dots),
    the end line, then pipelined commands, fed in random pieces: the reader returns the
    message the whole-data reference gives and leaves the commands unread."""
    import random

    from mailflow.normalize import normalize_newlines
    from mailflow.smtp.data import DataScanner, DataStore
    from mailflow.smtp.protocol import MailflowSMTP, _unpaced

    rng = random.Random(5)
    atoms = [b"x", b".", b"x.\r\n", b"\r\n", b"\r\n..", b"\n", b"\r", b"\n.\n", b"\r.\r", b"ab "]
    for _ in range(600):
        body = b"".join(rng.choice(atoms) for _ in range(rng.randrange(0, 150)))
        if body and not body.endswith(b"\r\n"):
            body += b"\r\n"
        if b"\r\n.\r\n" in b"\r\n" + body:
            continue  # the atoms made an end line: that data would end there
        wire = body + b".\r\nQUIT\r\n"
        # A tiny limit, so the LimitOverrunError paths run too (the reading loop itself:
        # _read_data would raise the limit to DATA_READ_LIMIT first).
        reader = asyncio.StreamReader(limit=rng.choice([4, 5, 8, 64]))
        scanner = DataScanner(10_000, 0, reject_bare_newline=False)
        store = DataStore(1 << 20, tmp_path)
        reading = asyncio.ensure_future(
            MailflowSMTP._read_data_from(reader, scanner, store, _unpaced)
        )
        position = 0
        while position < len(wire):
            step = rng.choice([1, 2, 3, 5, 64, 1000])
            reader.feed_data(wire[position : position + step])
            position += step
            await asyncio.sleep(0)
        async with asyncio.timeout(5):  # a reader that missed the end would wait forever
            assert await reading is True
        unstuffed = body[1:] if body.startswith(b".") else body
        expected = normalize_newlines(unstuffed.replace(b"\r\n.", b"\r\n"))
        assert await store.take() == expected, body
        reader.feed_eof()
        assert await reader.read() == b"QUIT\r\n"
