"""PIPELINING (RFC 2920): replies to a group of commands go out together, in order.

The server's writes are observed at the asyncio transport, so the tests see how
many writes a group of pipelined commands costs, not just the replies.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio.selector_events import _SelectorSocketTransport  # type: ignore[attr-defined]
from collections.abc import Iterator

import pytest

from mailflow.testing import SMTPDialog, running_server
from tests.test_smtp_badinput import still_works


@pytest.fixture
def server_writes(monkeypatch) -> Iterator[dict[int, list[bytes]]]:
    """Every transport write, by the local port of the socket it went out on."""
    writes: dict[int, list[bytes]] = {}
    original = _SelectorSocketTransport.write

    def write(self, data):
        sockname = self.get_extra_info("sockname")
        writes.setdefault(sockname[1], []).append(bytes(data))
        return original(self, data)

    monkeypatch.setattr(_SelectorSocketTransport, "write", write)
    yield writes


async def read_replies(dialog: SMTPDialog, count: int) -> list[str]:
    return [await dialog.read_reply() for _ in range(count)]


async def test_replies_to_a_pipelined_group_are_written_once(make_config, server_writes):
    async with running_server(make_config()) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        assert (await dialog.command("EHLO client.test")).startswith("250")
        before = len(server_writes[srv.port])
        await dialog.write_raw(
            b"MAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<b@example.com>\r\n"
            b"RCPT TO:<c@example.com>\r\n"
            b"DATA\r\n"
        )
        replies = await read_replies(dialog, 4)
        assert [r[:3] for r in replies] == ["250", "250", "250", "354"]
        group = server_writes[srv.port][before:]
        assert len(group) == 1, group  # one write for the four replies
        assert group[0].startswith(b"250 2.1.0") and group[0].endswith(b"<CR><LF>.<CR><LF>\r\n")

        await dialog.write_raw(b"Subject: t\r\n\r\nhi\r\n.\r\n")
        assert (await dialog.read_reply()).startswith("250 2.0.0")
        await dialog.close()
        await srv.wait_delivered("b@example.com")
        await srv.wait_delivered("c@example.com")


async def test_a_refused_recipient_in_a_group_keeps_its_place(make_config, server_writes):
    async with running_server(make_config("local_domains: [example.com]\n")) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        assert (await dialog.command("EHLO client.test")).startswith("250")
        await dialog.write_raw(
            b"MAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<victim@elsewhere.test>\r\n"
            b"RCPT TO:<b@example.com>\r\n"
            b"RSET\r\n"
            b"NOOP\r\n"
        )
        replies = await read_replies(dialog, 5)
        assert [r[:3] for r in replies] == ["250", "554", "250", "250", "250"]
        await dialog.close()
        await still_works(srv)


async def test_a_client_that_waits_for_each_reply_gets_each_at_once(make_config, server_writes):
    """Nothing is held when no further command is waiting: lock-step clients see no delay."""
    async with running_server(make_config()) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        assert (await dialog.command("EHLO client.test")).startswith("250")
        before = len(server_writes[srv.port])
        for line in ("MAIL FROM:<a@example.org>", "RCPT TO:<b@example.com>", "RSET"):
            reply = await asyncio.wait_for(dialog.command(line), timeout=2)
            assert reply.startswith("250"), (line, reply)
        assert len(server_writes[srv.port]) - before == 3
        await dialog.close()


async def test_held_replies_are_written_before_the_connection_closes(make_config):
    """A group ended by QUIT: every reply, then 221, then the close."""
    async with running_server(make_config()) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        assert (await dialog.command("EHLO client.test")).startswith("250")
        await dialog.write_raw(b"MAIL FROM:<a@example.org>\r\nRSET\r\nQUIT\r\nNOOP\r\n")
        replies = await read_replies(dialog, 3)
        assert [r[:3] for r in replies] == ["250", "250", "221"]
        await dialog.close()


async def test_help_lists_the_commands_mailflow_overrides(make_config):
    async with running_server(make_config()) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        assert (await dialog.command("EHLO client.test")).startswith("250")
        listing = await dialog.command("HELP")
        for command in ("MAIL", "RCPT", "RSET", "DATA", "AUTH"):
            assert f" {command}" in listing, listing
        assert await dialog.command("HELP DATA") == "250 Syntax: DATA"
        assert (await dialog.command("HELP MAIL")).startswith("250 Syntax: MAIL FROM: <address>")
        await dialog.close()


async def test_the_reply_to_data_goes_out_before_the_log_line_and_metrics(
    make_config, server_writes
):
    """The message's log line and metrics wait for the loop's next turn: a client
    sending message after message does not wait for them."""
    seen_at_log: list[bool] = []

    class WhenLogged(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            writes = b"".join(server_writes.get(srv.port, []))
            seen_at_log.append(b"250 2.0.0 Ok: queued" in writes)

    handler = WhenLogged(logging.INFO)
    logger = logging.getLogger("mailflow.message")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        async with running_server(make_config()) as srv:
            dialog, _ = await SMTPDialog.open(srv.port)
            assert (await dialog.command("EHLO client.test")).startswith("250")
            for command in ("MAIL FROM:<a@example.org>", "RCPT TO:<b@example.com>", "DATA"):
                await dialog.command(command)
            await dialog.write_raw(b"Subject: t\r\n\r\nhi\r\n.\r\n")
            assert (await dialog.read_reply()).startswith("250 2.0.0")
            await dialog.close()
            await srv.wait_delivered("b@example.com")
            counted = srv.app.metrics.registry.get_sample_value(
                "mailflow_messages_total", {"action": "accept"}
            )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen_at_log == [True]
    assert counted == 1
