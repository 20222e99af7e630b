"""LMTP delivery (RFC 2033) against a real aiosmtpd LMTP server, over TCP and a unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.lmtp import LMTP

from mailflow.delivery.lmtp import LMTPTransport
from mailflow.delivery.outcome import Outcome
from mailflow.delivery.spool import QueueEntry, RecipientState
from mailflow.testing import (
    SinkBehaviour,
    SinkHandler,
    free_port,
    make_message,
    running_server,
    send,
    smtp_sink,
)
from mailflow.verdict import Route, RouteKind
from tests.test_relay_inline import count_stores

ROUTE = Route(RouteKind.LMTP)


def lmtp_config(make_config, where: str):
    return make_config(
        f"""
        local_domains: [example.com]
        delivery:
          method: lmtp
          lmtp: {{{where}}}
        """
    )


def entry_for(rcpts: list[str], sender: str = "alice@example.org") -> QueueEntry:
    states = [RecipientState(r, ROUTE.as_dict()) for r in rcpts]
    return QueueEntry("Q1", sender, states, created=0.0)


async def deliver(config, rcpts: list[str], message: bytes) -> dict[str, tuple[int, str]]:
    entry = entry_for(rcpts)
    transport = LMTPTransport(config)
    try:
        outcomes = await transport(entry, message, entry.recipients, ROUTE)
    finally:
        await transport.aclose()  # it keeps the session for the next delivery
    return {k: (v.code, v.text) for k, v in outcomes.items()}


# --- one reply per recipient --------------------------------------------------------------------


async def test_each_recipient_gets_its_own_final_reply(make_config):
    behaviour = SinkBehaviour(
        lmtp_data_replies={
            "full@example.com": "452 4.2.2 mailbox full",
            "gone@example.com": "550 5.1.1 no such mailbox",
        }
    )
    async with smtp_sink(behaviour, lmtp=True) as sink:
        config = lmtp_config(make_config, f"host: 127.0.0.1, port: {sink.port}")
        rcpts = ["ok@example.com", "full@example.com", "gone@example.com", "ok2@example.com"]
        msg = make_message(body=".dot line\r\nend\r\n")
        outcomes = await deliver(config, rcpts, msg)
    assert outcomes["ok@example.com"][0] == 250
    assert outcomes["ok2@example.com"][0] == 250
    assert outcomes["full@example.com"] == (452, "4.2.2 mailbox full")
    assert outcomes["gone@example.com"] == (550, "5.1.1 no such mailbox")
    [got] = sink.messages
    assert got.rcpt_tos == ["ok@example.com", "ok2@example.com"]
    assert got.data == msg  # dot-stuffing undone by the server: content intact


async def test_rcpt_refusal_is_reported_and_the_rest_delivered(make_config):
    behaviour = SinkBehaviour(rcpt_replies={"nobody@example.com": "550 5.1.1 unknown user"})
    async with smtp_sink(behaviour, lmtp=True) as sink:
        config = lmtp_config(make_config, f"host: 127.0.0.1, port: {sink.port}")
        outcomes = await deliver(
            config, ["nobody@example.com", "ok@example.com"], b"X: y\r\n\r\nz\r\n"
        )
    assert outcomes["nobody@example.com"][0] == 550
    assert outcomes["ok@example.com"][0] == 250
    assert sink.messages[0].rcpt_tos == ["ok@example.com"]


async def test_lmtp_server_down_is_a_temporary_failure(make_config):
    config = lmtp_config(make_config, f"host: 127.0.0.1, port: {free_port()}")
    outcomes = await deliver(config, ["ok@example.com"], make_message())
    code, text = outcomes["ok@example.com"]
    assert code == 451 and text.startswith("4.4.1")


@contextlib.asynccontextmanager
async def fake_lmtp(handle: Any) -> AsyncIterator[int]:
    """A hand-written LMTP server on 127.0.0.1 (``handle`` gets each connection): its port."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def take_message(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """DATA on a fake LMTP server: 354, then everything up to the end-of-data line."""
    writer.write(b"354 go\r\n")
    while (await reader.readline()) != b".\r\n":
        pass


async def test_server_closing_after_data_leaves_recipients_to_retry(make_config):
    """A server that dies before answering every recipient: nobody counts as delivered."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake LMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"LHLO"):
                writer.write(b"250-fake\r\n250 PIPELINING\r\n")
            elif line.startswith(b"DATA"):
                await take_message(reader, writer)
                writer.write(b"250 2.0.0 first ok\r\n")  # then vanish before the second
                await writer.drain()
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    async with fake_lmtp(handle) as port:
        config = lmtp_config(make_config, f"host: 127.0.0.1, port: {port}")
        outcomes = await deliver(config, ["a@example.com", "b@example.com"], make_message())
    assert outcomes["a@example.com"][0] == 250
    assert outcomes["b@example.com"][0] == 451


# --- sessions are reused ----------------------------------------------------------------------


async def test_deliveries_reuse_one_session_and_it_is_closed_at_shutdown(make_config):
    async with smtp_sink(SinkBehaviour(), lmtp=True) as sink:
        config = lmtp_config(make_config, f"host: 127.0.0.1, port: {sink.port}")
        transport = LMTPTransport(config)
        try:
            for i in range(3):
                entry = entry_for([f"u{i}@example.com"])
                msg = make_message(subject=f"m{i}")
                outcomes = await transport(entry, msg, entry.recipients, ROUTE)
                assert outcomes[f"u{i}@example.com"].code == 250
        finally:
            await transport.aclose()
        assert [m.rcpt_tos for m in sink.messages] == [[f"u{i}@example.com"] for i in range(3)]
        assert sink.handler.connections == 1


async def test_a_reused_session_the_server_dropped_is_replaced_once(make_config):
    """The server closes an idle session at the next MAIL: the delivery moves to a fresh one."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        transactions = 0
        writer.write(b"220 fake LMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"LHLO"):
                writer.write(b"250-fake\r\n250 8BITMIME\r\n")
            elif line.startswith(b"MAIL") and transactions and len(connections) == 1:
                break  # gone, without a word, when asked again on the first connection
            elif line.startswith(b"DATA"):
                await take_message(reader, writer)
                transactions += 1
                writer.write(b"250 2.0.0 stored\r\n")
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    async with fake_lmtp(handle) as port:
        transport = LMTPTransport(lmtp_config(make_config, f"host: 127.0.0.1, port: {port}"))
        try:
            for rcpt in ("first@example.com", "second@example.com"):
                entry = entry_for([rcpt])
                outcomes = await transport(entry, make_message(), entry.recipients, ROUTE)
                assert outcomes[rcpt] == Outcome(250, "2.0.0 stored")
        finally:
            await transport.aclose()
    assert len(connections) == 2


# --- end to end ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def unix_lmtp_sink() -> AsyncIterator[tuple[SinkHandler, Path]]:
    handler = SinkHandler(SinkBehaviour())
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="mf-lmtp-") as tmp:
        path = Path(tmp) / "lmtp.sock"  # short: unix socket paths are limited to ~108 bytes
        server = await loop.create_unix_server(
            lambda: LMTP(handler, hostname="store.test", loop=loop), str(path)
        )
        try:
            yield handler, path
        finally:
            server.close()
            await server.wait_closed()


async def test_local_mail_goes_to_lmtp_over_a_unix_socket(make_config):
    async with unix_lmtp_sink() as (handler, path):
        config = lmtp_config(make_config, f"socket: {path}")
        async with running_server(config) as srv:
            msg = make_message(subject="via lmtp")
            assert await send(srv.port, "alice@example.org", ["bob@example.com"], msg) == {}
            await srv.wait_queue_empty()
    [got] = handler.messages
    assert got.rcpt_tos == ["bob@example.com"]
    assert got.mail_from == "alice@example.org"
    assert b"Subject: via lmtp" in got.data


async def test_lmtp_permanent_failure_bounces_and_temporary_is_retried(make_config):
    behaviour = SinkBehaviour(lmtp_data_replies={"gone@example.com": "550 5.1.1 no such mailbox"})
    async with smtp_sink(behaviour, lmtp=True) as sink:
        config = lmtp_config(make_config, f"host: 127.0.0.1, port: {sink.port}")
        async with running_server(config) as srv:
            rcpts = ["ok@example.com", "gone@example.com"]
            await send(srv.port, "carol@example.com", rcpts, make_message())
            await sink.wait_messages(2)  # the message, then the bounce (also over LMTP)
            await srv.wait_queue_empty()
    original, bounce = sink.messages
    assert original.rcpt_tos == ["ok@example.com"]
    assert bounce.mail_from == "<>" and bounce.rcpt_tos == ["carol@example.com"]
    assert b"Final-Recipient: rfc822; gone@example.com" in bounce.data


# --- handed on before the 250 -------------------------------------------------------------------


async def test_lmtp_copies_are_handed_on_before_the_250_and_never_spooled(make_config):
    async with smtp_sink(SinkBehaviour(), lmtp=True) as sink:
        config = lmtp_config(make_config, f"host: 127.0.0.1, port: {sink.port}")
        async with running_server(config) as srv:
            stored = count_stores(srv)
            rcpts = ["bob@example.com"]
            assert await send(srv.port, "alice@example.org", rcpts, make_message()) == {}
            # In the mail store when the client got its 250, without the spool.
            assert [m.rcpt_tos for m in sink.messages] == [["bob@example.com"]]
            assert stored == []


async def test_an_lmtp_refusal_for_every_recipient_is_refused_to_the_client(make_config):
    behaviour = SinkBehaviour(lmtp_data_replies={"gone@example.com": "550 5.1.1 no such mailbox"})
    async with smtp_sink(behaviour, lmtp=True) as sink:
        config = lmtp_config(make_config, f"host: 127.0.0.1, port: {sink.port}")
        async with running_server(config) as srv:
            with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
                await send(srv.port, "carol@example.com", ["gone@example.com"], make_message())
            assert refused.value.code == 550
            assert "5.1.1 no such mailbox" in refused.value.message
            assert srv.app.spool.ids() == []
    # The sink records the refused transaction with no recipient stored; no bounce.
    assert [m.rcpt_tos for m in sink.messages] == [[]]


async def test_inline_timeout_zero_spools_lmtp_copies_first(make_config):
    async with smtp_sink(SinkBehaviour(), lmtp=True) as sink:
        config = make_config(
            f"""
            local_domains: [example.com]
            delivery:
              method: lmtp
              lmtp: {{host: 127.0.0.1, port: {sink.port}, inline_timeout: 0}}
            """
        )
        async with running_server(config) as srv:
            stored = count_stores(srv)
            rcpts = ["bob@example.com"]
            assert await send(srv.port, "alice@example.org", rcpts, make_message()) == {}
            await sink.wait_messages(1)
            await srv.wait_queue_empty()
            assert len(stored) == 1


def pipelining_lmtp(replies: list[bytes], seen: list[bytes]) -> Any:
    """A fake LMTP server that answers a transaction only once it has read every
    command up to DATA, as a pipelining client sends them (a client that waits for
    each reply would wait forever). ``replies``: MAIL, each RCPT, DATA and, after a
    354, one per accepted recipient. Every line read goes to ``seen``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake LMTP\r\n")
        pending = list(replies)
        unanswered = 0  # MAIL and RCPT lines read since the last answers
        while line := await reader.readline():
            seen.append(line)
            if line.startswith(b"LHLO"):
                writer.write(b"250-fake\r\n250 PIPELINING\r\n")
            elif line.startswith((b"MAIL", b"RCPT")):
                unanswered += 1
            elif line.startswith(b"DATA"):
                answers, pending = pending[: unanswered + 1], pending[unanswered + 1 :]
                unanswered = 0
                writer.write(b"".join(answers))
                if answers[-1].startswith(b"354"):
                    await writer.drain()
                    while (line := await reader.readline()) != b".\r\n":
                        seen.append(line)
                    writer.write(b"".join(pending))
                    pending = []
            elif line.startswith(b"RSET"):
                writer.write(b"250 ok\r\n")
            elif line.startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
            await writer.drain()
        writer.close()

    return handle


async def test_a_pipelining_server_gets_the_transaction_in_one_go(make_config):
    """RFC 2920 with LMTP: MAIL, the RCPTs and DATA are sent without waiting for
    replies; a refused recipient keeps its own answer, the others are delivered."""
    seen: list[bytes] = []
    replies = [b"250 ok\r\n", b"550 5.1.1 no such user\r\n", b"250 ok\r\n", b"354 go\r\n"]
    replies.append(b"250 2.0.0 b stored\r\n")
    async with fake_lmtp(pipelining_lmtp(replies, seen)) as port:
        config = lmtp_config(make_config, f"host: 127.0.0.1, port: {port}")
        rcpts = ["a@example.com", "b@example.com"]
        outcomes = await asyncio.wait_for(deliver(config, rcpts, make_message()), 10)
    assert outcomes == {
        "a@example.com": (550, "5.1.1 no such user"),
        "b@example.com": (250, "2.0.0 b stored"),
    }


async def test_pipelined_with_every_recipient_refused_no_message_is_sent(make_config):
    """No message after a refused DATA; the next delivery on the same session starts
    with RSET (the server may still hold the refused transaction)."""
    seen: list[bytes] = []
    replies = [b"250 ok\r\n", b"550 5.1.1 no\r\n", b"452 4.2.2 full\r\n"]
    replies.append(b"554 5.5.1 no valid recipients\r\n")
    # The next transaction: MAIL, RCPT, DATA, then the recipient's reply.
    replies += [b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", b"250 2.0.0 c stored\r\n"]
    async with fake_lmtp(pipelining_lmtp(replies, seen)) as port:
        transport = LMTPTransport(lmtp_config(make_config, f"host: 127.0.0.1, port: {port}"))
        try:
            first = entry_for(["a@example.com", "b@example.com"])
            refused = await asyncio.wait_for(
                transport(first, make_message(subject="one"), first.recipients, ROUTE), 10
            )
            assert not any(line.startswith(b"Subject:") for line in seen)
            second = entry_for(["c@example.com"])
            stored = await asyncio.wait_for(
                transport(second, make_message(subject="two"), second.recipients, ROUTE), 10
            )
        finally:
            await transport.aclose()
    assert refused == {
        "a@example.com": Outcome(550, "5.1.1 no"),
        "b@example.com": Outcome(452, "4.2.2 full"),
    }
    assert stored == {"c@example.com": Outcome(250, "2.0.0 c stored")}
    commands = [line.split(b" ")[0].rstrip() for line in seen if line[:4].isupper()]
    assert commands[:6] == [b"LHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA", b"RSET"]
    assert commands[6:9] == [b"MAIL", b"RCPT", b"DATA"]
    assert b"Subject: two\r\n" in seen
