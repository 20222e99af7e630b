"""Relayed mail handed on before the 250 (``relay.inline_timeout``), against real peers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from mailflow.config import ConfigError
from mailflow.delivery.outcome import Outcome, RefusedUpstream
from mailflow.delivery.spool import QueueEntry
from mailflow.testing import (
    RunningServer,
    SinkBehaviour,
    free_port,
    make_message,
    running_server,
    send,
    smtp_sink,
)
from tests.smtp_support import relay_config
from tests.test_relay import first_entry, wait_for

SENDER = "alice@example.org"  # local: bounces land in its Maildir


def count_stores(srv: RunningServer) -> list[QueueEntry]:
    """Record every message the server spools (wraps ``Spool.store`` on this instance)."""
    stored: list[QueueEntry] = []
    spool = srv.app.spool
    original = spool.store

    async def store(entry: QueueEntry, message: bytes) -> None:
        stored.append(entry)
        await original(entry, message)

    spool.store = store  # type: ignore[method-assign]
    return stored


def delivered_events(srv: RunningServer) -> list[tuple[str, str, str]]:
    """(recipient, route kind, outcome) of every ``mailflow_delivered`` notification."""
    events: list[tuple[str, str, str]] = []
    dispatcher = srv.server.dispatcher
    assert dispatcher is not None
    original = dispatcher.on_delivered

    async def on_delivered(queue_id, rcpt, route, outcome, detail) -> None:  # type: ignore[no-untyped-def]
        events.append((rcpt, route.kind.value, outcome))
        await original(queue_id, rcpt, route, outcome, detail)

    dispatcher.on_delivered = on_delivered  # type: ignore[method-assign]
    dispatcher.queue.on_delivered = on_delivered
    return events


def spool_files(srv: RunningServer) -> list[str]:
    return sorted(p.name for p in Path(srv.app.spool.queue_dir).iterdir())


def inline_config(make_config, port: int, timeout: str = "5", extra: str = ""):
    """``relay_config`` with ``relay.inline_timeout`` set."""
    return relay_config(make_config, port, extra=extra, inline_timeout=timeout)


async def test_accepted_message_is_delivered_before_the_250_and_never_spooled(make_config):
    async with (
        smtp_sink() as sink,
        running_server(inline_config(make_config, sink.port)) as srv,
    ):
        stored = count_stores(srv)
        events = delivered_events(srv)
        msg = make_message(subject="inline")
        refused = await send(srv.port, SENDER, ["bob@remote.test", "carol@remote.test"], msg)
        assert refused == {}
        # The client has its 250: the upstream already has the message.
        assert len(sink.messages) == 1
        assert sink.messages[0].rcpt_tos == ["bob@remote.test", "carol@remote.test"]
        assert stored == []
        assert spool_files(srv) == []
        assert events == [
            ("bob@remote.test", "relay", "delivered"),
            ("carol@remote.test", "relay", "delivered"),
        ]
        assert srv.server.queue is not None and srv.server.queue.entries() == []
        # The next message reuses the pooled session.
        await send(srv.port, SENDER, ["bob@remote.test"], make_message())
        assert len(sink.messages) == 2
    assert sink.handler.connections == 1


async def test_temporary_refusal_is_spooled_as_deferred_and_retried_by_the_queue(make_config):
    behaviour = SinkBehaviour(data_replies=["451 4.3.0 busy, try later", None])
    async with smtp_sink(behaviour) as sink:
        config = inline_config(make_config, sink.port, extra="queue: {retry_schedule: [0.5]}")
        async with running_server(config) as srv:
            stored = count_stores(srv)
            await send(srv.port, SENDER, ["bob@remote.test"], make_message())
            # Spooled before the 250, with the inline attempt recorded: no retry at once.
            [entry] = stored
            [r] = entry.recipients
            assert r.attempts == 1
            assert r.last_reply.startswith("451 4.3.0 busy")
            assert r.next_attempt > time.time()
            assert sink.messages == []
            [got] = await sink.wait_messages(1)
            await srv.wait_queue_empty()
    assert got.rcpt_tos == ["bob@remote.test"]
    assert sink.handler.transactions == 2


async def test_a_recipient_refused_for_good_is_bounced_without_asking_again(make_config, tmp_path):
    behaviour = SinkBehaviour(rcpt_replies={"bob@remote.test": "550 5.1.1 no such user"})
    async with (
        smtp_sink(behaviour) as sink,
        running_server(inline_config(make_config, sink.port)) as srv,
    ):
        stored = count_stores(srv)
        refused = await send(
            srv.port, SENDER, ["bob@remote.test", "carol@remote.test"], make_message()
        )
        assert refused == {}
        # carol was accepted inline; bob alone is spooled, and bounced with the
        # upstream's answer to the inline attempt: the upstream is not asked again.
        assert [r.address for r in stored[0].recipients] == ["bob@remote.test"]
        assert len(sink.messages) == 1 and sink.messages[0].rcpt_tos == ["carol@remote.test"]
        new = tmp_path / "mail" / SENDER / "new"
        await wait_for(lambda: new.is_dir() and any(new.iterdir()))
        await srv.wait_queue_empty()
        assert sink.handler.rcpts_asked.count("bob@remote.test") == 1
    [dsn] = list(new.iterdir())
    text = dsn.read_bytes()
    assert b"bob@remote.test" in text and b"5.1.1" in text


async def test_a_message_refused_for_every_recipient_is_refused_to_the_client(
    make_config, tmp_path
):
    behaviour = SinkBehaviour(
        rcpt_replies={
            "bob@remote.test": "550 5.1.1 no such user",
            "carol@remote.test": "554 5.7.1 not for you",
        }
    )
    async with (
        smtp_sink(behaviour) as sink,
        running_server(inline_config(make_config, sink.port)) as srv,
    ):
        stored = count_stores(srv)
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await send(srv.port, SENDER, ["bob@remote.test", "carol@remote.test"], make_message())
        # The client learns it at once, with the upstream's reason; nothing is stored,
        # so there is nothing to retry and no bounce to send.
        assert refused.value.code == 550
        assert "5.1.1 no such user" in refused.value.message
        assert stored == []
        assert spool_files(srv) == []
        assert sink.handler.rcpts_asked == ["bob@remote.test", "carol@remote.test"]
        # The server goes on: the next message goes through.
        del behaviour.rcpt_replies["bob@remote.test"]
        assert await send(srv.port, SENDER, ["bob@remote.test"], make_message()) == {}
    assert not (tmp_path / "mail" / SENDER).exists()  # no bounce


async def test_unreachable_upstream_is_spooled_and_delivered_when_it_comes_up(make_config):
    port = free_port()  # nothing listens here yet: connection refused
    config = inline_config(make_config, port, extra="queue: {retry_schedule: [0.3]}")
    async with running_server(config) as srv:
        stored = count_stores(srv)
        await send(srv.port, SENDER, ["bob@remote.test"], make_message(subject="later"))
        [entry] = stored
        assert entry.recipients[0].last_reply.startswith("451 4.4.1")
        async with smtp_sink(port=port) as sink:
            [got] = await sink.wait_messages(1)
            await srv.wait_queue_empty()
    assert b"Subject: later" in got.data


@contextlib.asynccontextmanager
async def silent_after_data() -> AsyncIterator[tuple[int, list[str]]]:
    """An SMTP server that takes the whole message and then never answers the final dot.

    Yields its port and a log of events ("connect", "closed").
    """
    events: list[str] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        events.append("connect")
        writer.write(b"220 slow ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-slow\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    while (body := await reader.readline()) and body != b".\r\n":
                        pass
                    continue  # ... and no reply
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        events.append("closed")
        writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], events
    finally:
        server.close()
        await server.wait_closed()


async def test_slow_upstream_is_cut_off_at_the_bound_and_the_message_spooled(make_config):
    async with silent_after_data() as (port, events):
        config = inline_config(make_config, port, timeout="0.5")
        async with running_server(config) as srv:
            stored = count_stores(srv)
            started = time.monotonic()
            await send(srv.port, SENDER, ["bob@remote.test"], make_message())
            assert time.monotonic() - started < 3
            [entry] = stored
            assert "timed out after 0.5s" in entry.recipients[0].last_reply
            # The session cut off mid-transaction was dropped, not pooled.
            await wait_for(lambda: "closed" in events)
            assert srv.server.dispatcher is not None
            pool = srv.server.dispatcher.pool
            assert not pool._idle  # no idle session kept
            assert first_entry(srv.app.spool) is not None


async def test_inline_timeout_zero_spools_first_as_before(make_config):
    async with (
        smtp_sink() as sink,
        running_server(inline_config(make_config, sink.port, timeout="0")) as srv,
    ):
        stored = count_stores(srv)
        await send(srv.port, SENDER, ["bob@remote.test"], make_message())
        assert len(stored) == 1 and stored[0].recipients[0].attempts == 0
        await sink.wait_messages(1)
        await srv.wait_queue_empty()


async def test_local_and_relayed_copies_are_both_delivered_without_the_spool(make_config, tmp_path):
    async with (
        smtp_sink() as sink,
        running_server(inline_config(make_config, sink.port)) as srv,
    ):
        stored = count_stores(srv)
        events = delivered_events(srv)
        await send(srv.port, SENDER, ["bob@remote.test", "dave@example.org"], make_message())
        assert stored == []
        assert len(sink.messages) == 1 and sink.messages[0].rcpt_tos == ["bob@remote.test"]
        assert any((tmp_path / "mail" / "dave@example.org" / "new").iterdir())
        assert sorted(events) == [
            ("bob@remote.test", "relay", "delivered"),
            ("dave@example.org", "maildir", "delivered"),
        ]


def test_inline_timeout_is_validated(make_config):
    assert make_config().relay.inline_timeout == 5.0
    assert make_config("relay: {inline_timeout: 2s}").relay.inline_timeout == 2.0
    assert make_config("relay: {inline_timeout: 0}").relay.inline_timeout == 0.0
    with pytest.raises(ConfigError, match="inline_timeout"):
        make_config("relay: {inline_timeout: -1}")
    with pytest.raises(ConfigError, match="inline_timeout"):
        make_config("relay: {inline_timeout: soon}")


@pytest.mark.parametrize(
    ("outcome", "reply"),
    [
        (Outcome(550, "5.1.1 no such user"), "550 5.1.1 no such user"),
        (Outcome(554, "5.7.1 line one\r\n  line two"), "554 5.7.1 line one line two"),
        (Outcome(650, "odd code"), "550 odd code"),
        (Outcome(550, "5.1.1 n\u00e4me"), "550 5.1.1 n?me"),
        (Outcome(550, ""), "550 5.0.0 Refused by the next hop"),
    ],
)
def test_the_refusal_reaches_the_client_as_one_printable_5xx_line(outcome, reply):
    assert RefusedUpstream(outcome).reply() == reply
