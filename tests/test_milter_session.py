"""The milter listener and session over real loopback sockets, with a byte-level MTA client.

These cover what a well-behaved Postfix never sends (broken packets, unknown commands,
QUIT_NC, offers without HDR_LEADSPC); tests/test_milter_postfix.py covers real Postfix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mailflow.app import App
from mailflow.config import MilterConfig
from mailflow.hookspecs import hookimpl
from mailflow.milter import protocol as p
from mailflow.milter.server import MilterServer
from mailflow.verdict import AddHeader, AddRecipient, ChangeSender, ReplaceBody, Result

FINAL = {b"a", b"c", b"d", b"r", b"t", b"y"}  # replies that end a stage


def frame(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + code + data


class MTA:
    """Speaks the MTA side of the milter protocol, one packet at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, target: int | str) -> MTA:
        if isinstance(target, str):
            reader, writer = await asyncio.open_unix_connection(target)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", target)
        return cls(reader, writer)

    async def send(self, code: bytes, data: bytes = b"") -> None:
        self.writer.write(frame(code, data))
        await self.writer.drain()

    async def packet(self) -> tuple[bytes, bytes]:
        async with asyncio.timeout(10):
            (length,) = struct.unpack("!I", await self.reader.readexactly(4))
            body = await self.reader.readexactly(length)
        return body[:1], body[1:]

    async def until_final(self) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            pkt = await self.packet()
            out.append(pkt)
            if pkt[0] in FINAL:
                return out

    async def ask(self, code: bytes, data: bytes = b"") -> list[tuple[bytes, bytes]]:
        await self.send(code, data)
        return await self.until_final()

    async def negotiate(self, protocol: int = 0x1FFFFF) -> tuple[int, int, int]:
        await self.send(b"O", struct.pack("!III", 6, 0x1FF, protocol))
        code, data = await self.packet()
        assert code == b"O"
        return struct.unpack("!III", data)

    async def closed(self) -> bool:
        """True once the server has closed the connection (EOF)."""
        async with asyncio.timeout(10):
            return await self.reader.read(1) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    @classmethod
    async def in_transaction(cls, port: int, rcpt: str = "bob@example.com") -> MTA:
        """Connected, negotiated, past MAIL and one RCPT: ready for the message."""
        mta = await cls.open(port)
        await mta.negotiate()
        await mta.connect_and_mail()
        await mta.ask(b"R", f"<{rcpt}>\0".encode())
        return mta

    async def connect_and_mail(self, sender: str = "alice@example.org") -> None:
        await self.send(b"D", b"Cj\0mx.test\0v\0Postfix 3.7.11\0")
        info = b"client.example.org\x004" + struct.pack("!H", 40000) + b"192.0.2.7\0"
        assert (await self.ask(b"C", info))[-1][0] == b"c"
        assert (await self.ask(b"H", b"client.example.org\0"))[-1][0] == b"c"
        await self.send(b"D", b"M{i}\0QID1\0{auth_authen}\0carol\0")
        assert (await self.ask(b"M", f"<{sender}>\0SIZE=10\0".encode()))[-1][0] == b"c"

    async def message(
        self, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> list[tuple[bytes, bytes]]:
        """DATA (answered), headers, EOH, body (no replies: NR flags), end of message."""
        assert await self.ask(b"T") == [(b"c", b"")]
        for name, value in headers:
            await self.send(b"L", name + b"\0" + value + b"\0")
        await self.send(b"N")
        if body:
            await self.send(b"B", body)
        return await self.ask(b"E")


class Recorder:
    """Remembers what the pipeline saw; returns what the test tells it to."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.result: Result | None = None
        self.rcpt_result: Result | None = None
        self.wait_for: asyncio.Event | None = None

    @hookimpl
    def mailflow_rcpt_to(self, connection, sender, recipient, options):
        return self.rcpt_result if recipient.startswith("refuse") else None

    @hookimpl
    async def mailflow_data(self, message):
        self.seen.append(message)
        if self.wait_for is not None:
            await self.wait_for.wait()
        return self.result


@contextlib.asynccontextmanager
async def milter(
    make_config, plugin: Recorder, **settings: Any
) -> AsyncIterator[tuple[App, MilterServer]]:
    app = App(make_config(), extra_plugins={"recorder": plugin})
    await app.startup()
    progress = settings.pop("progress_interval", 30.0)
    server = MilterServer(
        app, MilterConfig(listen="127.0.0.1:0", **settings), progress_interval=progress
    )
    await server.start()
    try:
        yield app, server
    finally:
        await server.stop()
        await app.shutdown()


async def test_negotiation_keeps_only_what_we_use(make_config):
    async with milter(make_config, Recorder()) as (_, server):
        mta = await MTA.open(server.port)
        version, actions, protocol = await mta.negotiate()
        assert version == 6
        assert actions == p.WANTED_ACTIONS
        assert protocol == p.WANTED_PROTOCOL
        # An MTA that offers fewer steps gets no flag it did not offer.
        mta2 = await MTA.open(server.port)
        assert (await mta2.negotiate(protocol=p.SMFIP_NR_HDR))[2] == p.SMFIP_NR_HDR
        await mta.close()
        await mta2.close()


async def test_whole_conversation_builds_the_message_and_maps_macros(make_config):
    rec = Recorder()
    rec.result = Result(
        mutations=[
            AddHeader("X-Filtered", "yes"),
            AddRecipient("copy@example.com"),
            ChangeSender("bounce@example.org"),
            ReplaceBody(b"replaced\r\n"),
        ]
    )
    async with milter(make_config, rec) as (_, server):
        mta = await MTA.open(server.port)
        await mta.negotiate()
        await mta.connect_and_mail()
        await mta.send(b"D", b"R{rcpt_addr}\0bob@example.com\0")
        assert (await mta.ask(b"R", b"<bob@example.com>\0"))[-1][0] == b"c"
        replies = await mta.message(
            [(b"Subject", b" hello\n\tworld"), (b"From", b" alice@example.org")], b"hi\r\n"
        )
        await mta.send(b"Q")
        assert await mta.closed()
        await mta.close()
    [ctx] = rec.seen
    assert ctx.queue_id == "QID1"
    assert ctx.connection.ip == "192.0.2.7" and ctx.connection.port == 40000
    assert ctx.connection.reverse_name == "client.example.org"
    assert ctx.connection.helo == "client.example.org"
    assert ctx.connection.authenticated_user == "carol"
    assert ctx.connection.milter_macros["j"] == "mx.test"
    assert ctx.envelope.mail_options == ["SIZE=10"]
    # Headers are byte-faithful (HDR_LEADSPC), folding restored to CRLF.
    assert ctx.raw.startswith(b"X-Filtered: yes\r\nSubject: hello\r\n\tworld\r\nFrom: alice")
    assert replies == [
        (b"i", b"\0\0\0\0X-Filtered\0 yes\0"),  # top of the header, like AddHeader(index=0)
        (b"b", b"replaced\r\n"),
        (b"e", b"<bounce@example.org>\0"),
        (b"+", b"<copy@example.com>\0"),
        (b"c", b""),
    ]


async def test_without_leadspc_values_get_one_space(make_config):
    rec = Recorder()
    rec.result = Result(mutations=[AddHeader("X-A", "1", index=-1)])
    async with milter(make_config, rec) as (_, server):
        mta = await MTA.open(server.port)
        await mta.negotiate(protocol=0x1FFFFF & ~p.SMFIP_HDR_LEADSPC)
        await mta.connect_and_mail()
        await mta.ask(b"R", b"<bob@example.com>\0")
        replies = await mta.message([(b"Subject", b"hello")], b"")
        await mta.close()
    assert rec.seen[0].raw == b"Subject: hello\r\nX-A: 1\r\n\r\n"  # after the mutation
    assert replies == [(b"h", b"X-A\x001\0"), (b"c", b"")]


async def test_early_verdicts_are_answered_at_their_stage(make_config):
    rec = Recorder()
    rec.rcpt_result = Result.reject("no such user here", code=550, status="5.1.1")
    async with milter(make_config, rec) as (_, server):
        mta = await MTA.open(server.port)
        await mta.negotiate()
        await mta.connect_and_mail()
        assert await mta.ask(b"R", b"<refuse@example.com>\0") == [
            (b"y", b"550 5.1.1 no such user here\0")
        ]
        rec.rcpt_result = Result.discard("quietly")  # at RCPT, discard refuses the recipient
        assert await mta.ask(b"R", b"<refuse2@example.com>\0") == [
            (b"y", b"550 5.7.1 Recipient rejected\0")
        ]
        rec.rcpt_result = Result.accept()  # ends the chain, must not skip the message
        assert await mta.ask(b"R", b"<refuse3@example.com>\0") == [(b"c", b"")]
        await mta.ask(b"R", b"<bob@example.com>\0")
        await mta.message([(b"Subject", b" x")], b"body\r\n")
        await mta.close()
    assert rec.seen[0].envelope.rcpt_tos == ["refuse3@example.com", "bob@example.com"]


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (Result.reject("spam, go away"), [(b"y", b"550 5.7.1 spam, go away\0")]),
        (Result.tempfail("busy", code=451, status="4.3.2"), [(b"y", b"451 4.3.2 busy\0")]),
        (Result.discard("drop"), [(b"d", b"")]),
        (Result.quarantine("looks phishy"), [(b"q", b"looks phishy\0"), (b"c", b"")]),
        (Result.accept(), [(b"c", b"")]),
    ],
)
async def test_end_of_message_verdicts(make_config, result, expected):
    rec = Recorder()
    rec.result = result
    async with milter(make_config, rec) as (_, server):
        mta = await MTA.in_transaction(server.port)
        assert await mta.message([(b"Subject", b" x")], b"body\r\n") == expected
        await mta.close()


async def test_connect_reject_is_554_and_tempfail_421(make_config):
    class Gate:
        answer = Result.reject("you are listed")

        @hookimpl
        def mailflow_connect(self, connection):
            return self.answer

    gate = Gate()
    app = App(make_config(), extra_plugins={"gate": gate})
    server = MilterServer(app, MilterConfig(listen="127.0.0.1:0"))
    await server.start()
    try:
        info = b"h\x004" + struct.pack("!H", 1) + b"192.0.2.9\0"
        mta = await MTA.open(server.port)
        await mta.negotiate()
        assert await mta.ask(b"C", info) == [(b"y", b"554 5.7.1 you are listed\0")]
        gate.answer = Result.tempfail("slow down")
        assert await mta.ask(b"C", info) == [(b"y", b"421 4.7.1 slow down\0")]
        await mta.close()
    finally:
        await server.stop()


async def test_abort_forgets_the_transaction_and_quit_nc_starts_a_new_connection(make_config):
    rec = Recorder()
    async with milter(make_config, rec) as (_, server):
        mta = await MTA.in_transaction(server.port, "first@example.com")
        await mta.ask(b"T")
        await mta.send(b"L", b"X-Aborted\0 yes\0")
        await mta.send(b"A")  # RSET: the transaction is gone, the connection stays
        await mta.send(b"D", b"M{i}\0QID2\0")
        assert (await mta.ask(b"M", b"<other@example.org>\0"))[-1][0] == b"c"
        await mta.ask(b"R", b"<second@example.com>\0")
        await mta.message([(b"Subject", b" two")], b"")
        # QUIT_NC: same socket, a new SMTP client.
        await mta.send(b"K")
        info = b"other.test\x006" + struct.pack("!H", 2525) + b"IPv6:2001:db8::5\0"
        assert (await mta.ask(b"C", info))[-1][0] == b"c"
        await mta.ask(b"M", b"<x@example.org>\0")
        await mta.ask(b"R", b"<third@example.com>\0")
        await mta.message([(b"Subject", b" three")], b"")
        await mta.close()
    first, second = rec.seen
    assert first.envelope.rcpt_tos == ["second@example.com"]
    assert first.envelope.mail_from == "other@example.org"
    assert b"X-Aborted" not in first.raw and first.queue_id == "QID2"
    assert second.connection.ip == "2001:db8::5"
    assert second.connection.helo == ""  # the new client has not said HELO
    assert second.connection.authenticated_user == ""  # macros of the old client are gone


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (frame(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)) + frame(b"Z"), "unknown milter"),
        (frame(b"H", b"early\0"), "before SMFIC_OPTNEG"),
        (b"\x7f\xff\xff\xffB", "exceeds limit"),
        (frame(b"O", b"\0\0\0\6"), "needs 12 bytes"),
        (frame(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)) + frame(b"C", b"x"), "truncated"),
    ],
)
async def test_bad_input_closes_only_that_connection(make_config, caplog, stream, message):
    rec = Recorder()
    async with milter(make_config, rec) as (_, server):
        healthy = await MTA.open(server.port)
        await healthy.negotiate()
        bad = await MTA.open(server.port)
        with caplog.at_level(logging.ERROR, logger="mailflow.milter"):
            bad.writer.write(stream)
            await bad.writer.drain()
            # The OPTNEG reply may come first; then the server hangs up.
            while (await bad.reader.read(4096)) != b"":
                pass
        await bad.close()
        assert message in caplog.text
        assert server.errors == 1
        # The other conversation is unaffected.
        await healthy.connect_and_mail()
        await healthy.ask(b"R", b"<bob@example.com>\0")
        assert await healthy.message([(b"Subject", b" ok")], b"") == [(b"c", b"")]
        await healthy.close()


async def test_truncated_packet_at_eof_is_logged(make_config, caplog):
    async with milter(make_config, Recorder()) as (_, server):
        mta = await MTA.open(server.port)
        await mta.negotiate()
        with caplog.at_level(logging.ERROR, logger="mailflow.milter"):
            mta.writer.write(frame(b"H", b"client.test\0")[:6])
            mta.writer.write_eof()
            assert await mta.closed()
        await mta.close()
        assert "closed mid-packet" in caplog.text and server.errors == 1


@pytest.mark.parametrize(("default_action", "reply"), [("tempfail", b"t"), ("accept", b"a")])
async def test_internal_failure_answers_the_configured_default_action(
    make_config, caplog, default_action, reply
):
    rec = Recorder()
    # A buggy plugin: ReplaceBody wants bytes; applying a str raises inside the pipeline,
    # outside the per-plugin guard: a mailflow-side failure.
    rec.result = Result(mutations=[ReplaceBody("not bytes")])  # type: ignore[arg-type]
    async with milter(make_config, rec, default_action=default_action) as (_, server):
        mta = await MTA.in_transaction(server.port)
        with caplog.at_level(logging.ERROR, logger="mailflow.milter"):
            assert await mta.message([(b"Subject", b" x")], b"b\r\n") == [(reply, b"")]
        assert "internal error at eom" in caplog.text
        # The connection itself goes on.
        rec.result = None
        await mta.send(b"A")
        await mta.ask(b"M", b"<a@example.org>\0")
        await mta.ask(b"R", b"<bob@example.com>\0")
        assert await mta.message([(b"Subject", b" y")], b"") == [(b"c", b"")]
        await mta.close()


async def test_progress_is_sent_while_plugins_work(make_config):
    rec = Recorder()
    rec.wait_for = asyncio.Event()
    async with milter(make_config, rec, progress_interval=0.01) as (_, server):
        mta = await MTA.in_transaction(server.port)
        await mta.ask(b"T")
        await mta.send(b"N")
        await mta.send(b"E")
        # The plugin only finishes once the MTA has seen a progress packet.
        assert await mta.packet() == (b"p", b"")
        rec.wait_for.set()
        replies = await mta.until_final()
        assert replies[-1] == (b"c", b"")
        assert {code for code, _ in replies[:-1]} <= {b"p"}
        await mta.close()


async def test_oversized_message_is_refused_at_end_of_message(make_config):
    rec = Recorder()
    config = make_config("server: {listen: ['127.0.0.1:0'], max_message_size: 100}")
    app = App(config, extra_plugins={"recorder": rec})
    server = MilterServer(app, MilterConfig(listen="127.0.0.1:0"))
    await server.start()
    try:
        mta = await MTA.in_transaction(server.port)
        replies = await mta.message([(b"Subject", b" big")], b"x" * 200)
        assert replies == [(b"y", b"552 5.3.4 Message size exceeds fixed maximum message size\0")]
        await mta.close()
    finally:
        await server.stop()
    assert rec.seen == []


async def test_idle_timeout_and_connection_limit(make_config):
    async with milter(make_config, Recorder(), timeout=0.2, max_connections=1) as (_, server):
        first = await MTA.open(server.port)
        await first.negotiate()
        second = await MTA.open(server.port)
        assert await second.closed()  # over the limit: closed at once
        await second.close()
        assert await first.closed()  # idle past the timeout
        await first.close()


async def test_unix_socket_listener(make_config, tmp_path: Path):
    path = tmp_path / "milter.sock"
    path.touch()  # not a socket: must not be removed silently...
    app = App(make_config())
    server = MilterServer(app, MilterConfig(listen=f"unix:{path}"))
    with pytest.raises(OSError):
        await server.start()
    path.unlink()
    server = MilterServer(app, MilterConfig(listen=f"unix:{path}"))
    assert await server.start() == f"unix:{path}"
    try:
        mta = await MTA.open(str(path))
        assert (await mta.negotiate())[0] == 6
        await mta.send(b"C", b"localhost\0L\0\0/some/where\0")
        assert await mta.packet() == (b"c", b"")
        await mta.close()
    finally:
        await server.stop()
    assert not path.exists()


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_listener(make_config):
    app = App(make_config())
    server = MilterServer(app, MilterConfig(listen="[::1]:0"))
    address = await server.start()
    try:
        assert address.startswith("[::1]:")
        reader, writer = await asyncio.open_connection("::1", server.port)
        mta = MTA(reader, writer)
        assert (await mta.negotiate())[0] == 6
        await mta.close()
    finally:
        await server.stop()


async def test_message_without_headers_needs_no_edits(make_config):
    rec = Recorder()
    async with milter(make_config, rec) as (_, server):
        mta = await MTA.in_transaction(server.port)
        # A body with an empty line and a colon: must not be mistaken for headers.
        replies = await mta.message([], b"line: one\r\n\r\nline two\r\n")
        await mta.close()
    assert replies == [(b"c", b"")]
    assert rec.seen[0].raw == b"\r\nline: one\r\n\r\nline two\r\n"


async def test_mta_without_no_reply_flags_gets_a_reply_to_every_event(make_config):
    """An MTA offering no SMFIP_NR_* flags waits for a reply to each header, chunk, etc."""
    rec = Recorder()
    async with milter(make_config, rec) as (_, server):
        mta = await MTA.open(server.port)
        assert (await mta.negotiate(protocol=0))[2] == 0
        await mta.connect_and_mail()
        await mta.ask(b"R", b"<bob@example.com>\0")
        assert await mta.ask(b"U", b"XFOO bar\0") == [(b"c", b"")]
        assert await mta.ask(b"T") == [(b"c", b"")]
        assert await mta.ask(b"L", b"Subject\0hi\0") == [(b"c", b"")]
        assert await mta.ask(b"N") == [(b"c", b"")]
        assert await mta.ask(b"B", b"chunk one\r\n") == [(b"c", b"")]
        assert await mta.ask(b"B", b"chunk two\r\n") == [(b"c", b"")]
        assert await mta.ask(b"E", b"last\r\n") == [(b"c", b"")]
        await mta.close()
    assert rec.seen[0].raw == b"Subject: hi\r\n\r\nchunk one\r\nchunk two\r\nlast\r\n"


async def test_unknown_smtp_command_is_answered_even_when_offered_no_reply(make_config):
    """NR_UNKN is offered by Postfix but not agreed (see tests/test_milter_round_trips.py)."""
    async with milter(make_config, Recorder()) as (_, server):
        mta = await MTA.open(server.port)
        await mta.negotiate()
        await mta.connect_and_mail()
        assert await mta.ask(b"U", b"XFOO bar\0") == [(b"c", b"")]
        assert await mta.ask(b"R", b"<bob@example.com>\0") == [(b"c", b"")]
        await mta.close()


async def arriving_becomes(app: App, count: int) -> None:
    async with asyncio.timeout(5):
        while app.pipeline.batch.receiving != count:
            await asyncio.sleep(0.005)


async def test_a_message_counts_as_arriving_from_data_to_end_of_message(make_config):
    """So messages already at the data stage wait for it (mailflow.batching)."""
    rec = Recorder()
    async with milter(make_config, rec) as (app, server):
        mta = await MTA.in_transaction(server.port)
        await mta.ask(b"T")
        await mta.send(b"L", b"Subject\0 counted\0")
        await arriving_becomes(app, 1)
        assert (await mta.ask(b"E"))[-1][0] == b"c"
        assert app.pipeline.batch.receiving == 0
        assert len(rec.seen) == 1

        # An aborted transaction stops counting, and so does a connection that is gone.
        await mta.ask(b"M", b"<alice@example.org>\0")
        await mta.send(b"B", b"half a body\r\n")
        await arriving_becomes(app, 1)
        await mta.send(b"A")
        await arriving_becomes(app, 0)
        await mta.ask(b"T")
        assert app.pipeline.batch.receiving == 1
        await mta.close()
        await arriving_becomes(app, 0)


# --- hostile header lists -------------------------------------------------------------


def test_header_edits_stay_linear_with_thousands_of_identical_fields():
    """difflib alone takes n*m steps on repeated values: 20,000 identical fields with
    every other one removed would take minutes."""
    from mailflow.milter.diff import Field, header_edits
    from tests.growth import assert_linear

    def build(n: int) -> tuple[list[Field], list[Field]]:
        original = [Field("X-Spam", b" same") for _ in range(n)]
        final = [Field("X-New", b" 1"), *original[::2]]
        return original, final

    def run(lists: tuple[list[Field], list[Field]]) -> list[bytes]:
        return header_edits(lists[0], lists[1], leading_space=True)

    assert_linear(build, run, 4000)
    edits = run(build(10))
    assert len(edits) == 6  # 5 removed (the MTA keeps the order), 1 inserted on top
