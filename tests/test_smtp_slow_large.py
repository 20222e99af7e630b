"""Finding 8: slow and large senders cannot hold connections or memory without bound.

DATA at 1 byte/s used to stay open indefinitely (the DATA timeout is per chunk),
NOOP every few seconds kept a connection forever, and every message in flight was
held in memory whole. Now: an overall DATA deadline and a minimum transfer rate,
a cap on time without progress, large messages in a temporary file while they
arrive (deleted on every path), and a memory budget for filtering them.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from mailflow.hookspecs import hookimpl
from mailflow.message import MessageContext
from mailflow.testing import SMTPDialog, make_message, running_server
from tests.test_smtp_badinput import RCPT, body_after_trace, session, still_works


def server_yaml(**settings: object) -> str:
    return "server: {" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + "}\n"


async def start_data(port: int) -> SMTPDialog:
    dialog = await session(port)
    assert (await dialog.command("MAIL FROM:<a@example.org>")).startswith("250")
    assert (await dialog.command(f"RCPT TO:<{RCPT}>")).startswith("250")
    assert (await dialog.command("DATA")).startswith("354")
    return dialog


async def trickle(dialog: SMTPDialog, piece: bytes, every: float, until: float) -> None:
    """Write ``piece`` every ``every`` seconds for ``until`` seconds, then go quiet.

    Quiet before the server's cut-off: octets still unread when a server closes its
    socket make the kernel send RST instead of FIN, and the client may then see the
    reset instead of the 421. (data_timeout is long in these tests: the silence
    after ``until`` cannot be what cuts the client off.)
    """
    loop = asyncio.get_running_loop()
    stop = loop.time() + until
    with contextlib.suppress(ConnectionError):
        await dialog.write_raw(b"Subject: slow\r\n\r\n")
        while loop.time() < stop and not dialog.writer.is_closing():
            await asyncio.sleep(every)
            await dialog.write_raw(piece)


async def cut_off_reply(srv, dialog: SMTPDialog, piece: bytes, every: float, until: float) -> str:
    writing = asyncio.ensure_future(trickle(dialog, piece, every, until))
    try:
        reply = await dialog.read_reply(timeout=10)
        assert await dialog.reader.read() == b""  # and closed
    finally:
        writing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writing
        await dialog.close()
    await still_works(srv)
    assert srv.delivered(RCPT) == []
    return reply


# --- DATA deadline and minimum rate ------------------------------------------------------------


async def test_a_client_trickling_data_is_cut_off_at_the_minimum_rate(make_config):
    config = make_config(
        server_yaml(data_min_rate=1000, data_rate_grace=0.3, data_timeout=30, data_deadline=0)
    )
    async with running_server(config) as srv:
        dialog = await start_data(srv.port)
        # 1 octet every 20 ms: each arrives well within data_timeout, so only the
        # rate can stop it (grace 0.3 s + octets / 1000 per second: at ~0.31 s).
        reply = await cut_off_reply(srv, dialog, b"x", 0.02, until=0.2)
        assert reply.startswith("421 4.4.2 Message data arriving too slowly"), reply
        metrics = srv.app.metrics.exposition().decode()
    assert 'mailflow_smtp_timeouts_total{reason="data_rate"} 1.0' in metrics


async def test_data_has_an_overall_deadline(make_config):
    config = make_config(server_yaml(data_deadline=0.5, data_min_rate=0, data_timeout=30))
    async with running_server(config) as srv:
        dialog = await start_data(srv.port)
        # 50 KB/s for 0.4 s, then quiet; cut at 0.5 s.
        reply = await cut_off_reply(srv, dialog, b"y" * 1000 + b"\r\n", 0.02, until=0.4)
        assert reply.startswith("421 4.4.2 Message data took too long"), reply


async def test_a_slow_client_that_keeps_up_the_rate_gets_through(make_config):
    config = make_config(server_yaml(data_min_rate=1000, data_rate_grace=0.2, data_deadline=30))
    async with running_server(config) as srv:
        dialog = await start_data(srv.port)
        await dialog.write_raw(b"Subject: steady\r\n\r\n")
        for _ in range(10):  # 1 s at ~5 KB/s: more than the rate, longer than the grace
            await asyncio.sleep(0.1)
            await dialog.write_raw(b"z" * 498 + b"\r\n")
        assert (await dialog.command(".")).startswith("250")
        await dialog.close()
        [msg] = await srv.wait_delivered(RCPT)
        assert msg.count(b"z" * 498) == 10


# --- no progress -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keepalive", ["NOOP", "RSET", "HELP", "VRFY <bob@example.com>", "EHLO again"]
)
async def test_commands_that_move_nothing_do_not_keep_a_connection(make_config, keepalive):
    config = make_config(server_yaml(idle_timeout=0.5, command_timeout=30))
    async with running_server(config) as srv:
        dialog = await session(srv.port)
        loop = asyncio.get_running_loop()
        start = loop.time()
        reply = ""
        try:
            while loop.time() - start < 5:
                reply = await dialog.command(keepalive)
                if reply.startswith("421"):
                    break
                await asyncio.sleep(0.1)
            assert await dialog.reader.read() == b""
        except ConnectionResetError:
            # A command written just as the server closed is unread there: the kernel
            # then resets the connection, and the 421 may be lost on the way.
            reply = "(reset)"
        assert reply.startswith("421 4.4.2 Idle too long without progress") or (
            reply == "(reset)"
        ), reply
        await dialog.close()
        metrics = srv.app.metrics.exposition().decode()
    assert 'mailflow_smtp_timeouts_total{reason="no_progress"} 1.0' in metrics  # the reason


async def keep_alive_until_cut(dialog: SMTPDialog, commands: list[str], limit: float) -> str:
    """Send ``commands`` round after round for up to ``limit`` seconds; the reply that
    ended it (``"(reset)"`` when the 421 was lost to a reset, see above)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        while loop.time() - start < limit:
            for command in commands:
                reply = await dialog.command(command)
                if not reply.startswith(("2", "3")):
                    assert await dialog.reader.read() == b""
                    return reply
            await asyncio.sleep(0.1)
    except ConnectionResetError:
        return "(reset)"
    return "(still open)"


async def test_an_abandoned_transaction_is_no_progress(make_config):
    """MAIL and RCPT answered 250, then RSET, over and over: no message ever comes, so
    the session is cut off like one sending NOOPs."""
    config = make_config(server_yaml(idle_timeout=0.5, command_timeout=30))
    async with running_server(config) as srv:
        dialog = await session(srv.port)
        cycle = ["MAIL FROM:<a@example.org>", f"RCPT TO:<{RCPT}>", "RSET"]
        reply = await keep_alive_until_cut(dialog, cycle, limit=5)
        assert reply.startswith("421 4.4.2 Idle too long") or reply == "(reset)", reply
        await dialog.close()
        metrics = srv.app.metrics.exposition().decode()
    assert 'mailflow_smtp_timeouts_total{reason="no_progress"} 1.0' in metrics


class Slow:
    """A data-stage plugin that takes its time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    @hookimpl
    async def mailflow_data(self, message: MessageContext) -> None:
        await asyncio.sleep(self.seconds)


async def test_progress_counts_from_the_data_reply_not_from_the_end_of_the_data(make_config):
    """The time the plugins take is the server's: the idle clock starts at the reply."""
    config = make_config(server_yaml(idle_timeout=1.0, command_timeout=30, data_batch_rounds=0))
    async with running_server(config, extra_plugins={"slow": Slow(0.8)}) as srv:
        dialog = await start_data(srv.port)
        await dialog.write_raw(make_message())
        assert (await dialog.command(".")).startswith("250")  # ~0.8 s after the data
        await asyncio.sleep(0.3)  # 1.1 s after the data, 0.3 s after the reply
        assert (await dialog.command("NOOP")).startswith("250")
        await dialog.close()


async def test_a_client_sending_mail_makes_progress(make_config):
    config = make_config(server_yaml(idle_timeout=0.4, command_timeout=30))
    async with running_server(config) as srv:
        dialog = await session(srv.port)
        for i in range(6):  # ~1 s in all, more than twice the idle cap
            await asyncio.sleep(0.15)
            assert (await dialog.command("NOOP")).startswith("250")
            assert (await dialog.command("MAIL FROM:<a@example.org>")).startswith("250")
            assert (await dialog.command(f"RCPT TO:<{RCPT}>")).startswith("250")
            assert (await dialog.command("DATA")).startswith("354")
            await dialog.write_raw(b"Subject: %d\r\n\r\nhi\r\n" % i)
            assert (await dialog.command(".")).startswith("250")
        await dialog.close()
        await srv.wait_delivered(RCPT, count=6)


# --- large messages in a temporary file --------------------------------------------------------


def large_message(size: int) -> bytes:
    line = b"0123456789" * 7 + b"\r\n"
    return b"Subject: large\r\n\r\n" + line * (size // len(line))


async def wait_for(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def temp_files(srv) -> list[str]:
    directory = srv.server.handler.incoming_dir
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


LARGE = server_yaml(large_message_threshold="64K")


async def test_a_large_message_goes_through_a_temporary_file_and_arrives_intact(make_config):
    message = large_message(1_000_000)
    async with running_server(make_config(LARGE)) as srv:
        dialog = await start_data(srv.port)
        await dialog.write_raw(message[:300_000])
        await wait_for(lambda: len(temp_files(srv)) == 1)  # on disk while it arrives
        [name] = temp_files(srv)
        assert name.startswith("data-") and name.endswith(".tmp")
        await dialog.write_raw(message[300_000:])
        assert (await dialog.command(".")).startswith("250")
        await dialog.close()
        [msg] = await srv.wait_delivered(RCPT)
        assert body_after_trace(msg) == message
        assert temp_files(srv) == []


@pytest.mark.parametrize(
    ("settings", "tail", "expected"),
    [
        ({}, b"a NUL \x00 late in the message\r\n", "550 5.6.0"),
        ({"max_message_size": "500K"}, b"", "552"),
        ({"bare_newline": "reject"}, b"a bare LF\nlate in the message\r\n", "550 5.6.0"),
    ],
)
async def test_the_temporary_file_goes_when_the_message_is_refused(
    make_config, settings, tail, expected
):
    config = make_config(server_yaml(large_message_threshold="64K", **settings))
    async with running_server(config) as srv:
        dialog = await start_data(srv.port)
        await dialog.write_raw(large_message(600_000))
        await wait_for(lambda: len(temp_files(srv)) == 1)
        await dialog.write_raw(tail)
        reply = await dialog.command(".")
        assert reply.startswith(expected), reply
        await dialog.close()
        assert temp_files(srv) == []
        await still_works(srv)


class Refuser:
    @hookimpl
    def mailflow_data(self, message: MessageContext) -> None:
        raise RuntimeError("plugin failure")  # on_error: tempfail -> 451


async def test_the_temporary_file_goes_when_a_plugin_fails(make_config):
    config = make_config(LARGE + "plugins: [{name: refuser, on_error: tempfail}]\n")
    async with running_server(config, extra_plugins={"refuser": Refuser()}) as srv:
        dialog = await start_data(srv.port)
        await dialog.write_raw(large_message(300_000))
        assert (await dialog.command(".")).startswith("451")
        await dialog.close()
        assert temp_files(srv) == []


async def test_the_temporary_file_goes_when_the_client_disconnects_mid_data(make_config):
    async with running_server(make_config(LARGE)) as srv:
        dialog = await start_data(srv.port)
        await dialog.write_raw(large_message(500_000))
        await wait_for(lambda: len(temp_files(srv)) == 1)
        dialog.writer.transport.abort()
        await wait_for(lambda: temp_files(srv) == [])
        await still_works(srv)
        assert srv.app.spool.ids() == []


async def test_leftover_temporary_files_are_removed_at_start(make_config):
    config = make_config(LARGE)
    incoming = config.queue.directory / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "data-crashed.tmp").write_bytes(b"half a message")
    async with running_server(config) as srv:
        assert temp_files(srv) == []


async def test_a_large_message_arriving_holds_what_docs_smtp_md_says(make_config):
    """docs/smtp.md, "Memory": a connection receiving a large message holds about
    T + 3D (its reader's buffer, the block in hand, the batch on its way to the file),
    however large the message. Traced while one client sends 8 MB as fast as it can;
    the NUL at the end refuses it after the data, so no read-back is counted."""
    import tracemalloc

    from mailflow.smtp.protocol import DATA_READ_LIMIT

    message = large_message(8_000_000) + b"NUL \x00\r\n"
    pieces = [message[i : i + 65536] for i in range(0, len(message), 65536)]
    async with running_server(make_config(server_yaml(large_message_rate=0))) as srv:
        threshold = srv.app.config.server.large_message_threshold
        dialog = await start_data(srv.port)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for piece in pieces:
                await dialog.write_raw(piece)
            reply = await dialog.command(".")
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert reply.startswith("550 5.6.0"), reply
        await dialog.close()
    most_at_once = 2 * DATA_READ_LIMIT + 256 * 1024  # the reader's buffer: D
    assert peak < 1.2 * (threshold + 3 * most_at_once), peak  # ~2.5 MiB, not 8 MB


# --- the memory budget for large messages ------------------------------------------------------


class Gate:
    """A data-stage plugin that holds each message until released."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.open = asyncio.Event()

    @hookimpl
    async def mailflow_data(self, message: MessageContext) -> None:
        self.seen.append(message.size)
        await self.open.wait()


async def test_the_memory_budget_makes_a_second_large_message_wait(make_config):
    gate = Gate()
    config = make_config(
        server_yaml(large_message_threshold="64K", large_message_memory="300K", data_batch_rounds=0)
    )
    message = large_message(200_000)
    async with running_server(config, extra_plugins={"gate": gate}) as srv:
        budget = srv.server.handler.large_messages
        first, second = await start_data(srv.port), await start_data(srv.port)
        await first.write_raw(message)
        first_reply = asyncio.ensure_future(first.command("."))
        await wait_for(lambda: len(gate.seen) == 1)  # in the plugins, holding 200 K
        await second.write_raw(message)
        second_reply = asyncio.ensure_future(second.command("."))
        await wait_for(lambda: budget.waiting == 1)  # its data is in: it waits for room
        await asyncio.sleep(0.1)
        assert len(gate.seen) == 1 and not second_reply.done()
        gate.open.set()
        assert (await first_reply).startswith("250")
        assert (await second_reply).startswith("250")
        assert len(gate.seen) == 2 and budget.available == budget.total
        for dialog in (first, second):
            await dialog.close()
        assert temp_files(srv) == []


async def test_small_messages_do_not_wait_for_the_budget(make_config):
    gate = Gate()
    config = make_config(
        server_yaml(large_message_threshold="64K", large_message_memory="100K", data_batch_rounds=0)
    )
    async with running_server(config, extra_plugins={"gate": gate}) as srv:
        big = await start_data(srv.port)
        await big.write_raw(large_message(200_000))  # more than the whole budget: takes it all
        big_reply = asyncio.ensure_future(big.command("."))
        await wait_for(lambda: len(gate.seen) == 1)
        small = await start_data(srv.port)
        await small.write_raw(make_message())
        small_reply = asyncio.ensure_future(small.command("."))
        await wait_for(lambda: len(gate.seen) == 2)  # reached the plugins at once
        gate.open.set()
        assert (await big_reply).startswith("250") and (await small_reply).startswith("250")
        for dialog in (big, small):
            await dialog.close()


async def test_large_message_data_is_read_at_the_shared_rate(make_config):
    """server.large_message_rate paces the reading past the threshold (lower bound only)."""
    import time

    config = make_config(server_yaml(large_message_threshold="64K", large_message_rate="1M"))
    async with running_server(config) as srv:
        dialog = await start_data(srv.port)
        started = time.monotonic()
        await dialog.write_raw(large_message(1_600_000))
        assert (await dialog.command(".")).startswith("250")
        elapsed = time.monotonic() - started
        await dialog.close()
    assert elapsed >= 1.2  # about 1.5 MB past the threshold at 1 MiB/s


def nul_first(size: int) -> bytes:
    return b"Subject: a NUL \x00 at once\r\n" + large_message(size)


def disk_full(monkeypatch) -> None:
    import errno

    import mailflow.smtp.data as smtp_data

    def write_all(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(smtp_data, "_write_all", write_all)


@pytest.mark.parametrize(
    ("settings", "message", "expected"),
    [
        # Refused from the first line: nothing is kept, nothing goes to a file.
        ({}, nul_first(1_200_000), "550 5.6.0"),
        # Over the size limit before the large threshold: the rest is read to be dropped.
        ({"large_message_threshold": "256K", "max_message_size": "100K"}, None, "552"),
        # Disk full: the file is gone at once, the rest is read to be dropped.
        ({}, None, "451 4.3.0"),
    ],
    ids=["nul", "too-big", "storage-error"],
)
async def test_refused_data_is_read_at_the_shared_rate_too(
    make_config, monkeypatch, settings, message, expected
):
    """Octets read past the threshold are paced whether they are kept or not: a client
    cannot push refused data at full speed (lower bound only, as above)."""
    import time

    from mailflow.smtp.protocol import DATA_READ_LIMIT

    if expected.startswith("451"):
        disk_full(monkeypatch)
    rate = 512 * 1024
    settings = {"large_message_threshold": 64 * 1024, "large_message_rate": rate, **settings}
    message = message or large_message(1_200_000)
    async with running_server(make_config(server_yaml(**settings))) as srv:
        threshold = srv.app.config.server.large_message_threshold
        dialog = await start_data(srv.port)
        started = time.monotonic()
        await dialog.write_raw(message)
        reply = await dialog.command(".")
        elapsed = time.monotonic() - started
        assert reply.startswith(expected), reply
        assert temp_files(srv) == []
        await dialog.close()
    # Paced: all but the threshold and the last blocks read (less than 2 x the read
    # limit); unpaced, the same data takes a few ms on loopback.
    assert elapsed >= (len(message) - threshold - 2 * DATA_READ_LIMIT - 1024) / rate


@pytest.mark.parametrize(
    "timer",
    [
        {"data_deadline": 0.8},
        {"data_min_rate": "2M", "data_rate_grace": 0.3},
        {"data_timeout": 0.3},
    ],
    ids=["data_deadline", "data_min_rate", "data_timeout"],
)
async def test_time_in_the_pacer_does_not_count_against_the_sender(make_config, timer):
    """The client writes the whole message at once; only mailflow's own pacing makes
    the data take ~1.8 s (600 KB at 300 KiB/s), longer than each timer allows. It is
    the server's pause, not the client's slowness: the message goes through."""
    settings = {"data_deadline": 0, "data_min_rate": 0, "data_timeout": 30, **timer}
    config = make_config(
        server_yaml(large_message_threshold="64K", large_message_rate="300K", **settings)
    )
    message = large_message(600_000)
    async with running_server(config) as srv:
        loop = asyncio.get_running_loop()
        dialog = await start_data(srv.port)
        started = loop.time()
        await dialog.write_raw(message)
        reply = await dialog.command(".")
        paced = loop.time() - started
        assert reply.startswith("250"), reply
        await dialog.close()
        [msg] = await srv.wait_delivered(RCPT)
        assert body_after_trace(msg) == message
        metrics = srv.app.metrics.exposition().decode()
    assert paced >= 1.5  # it was paced: longer than each timer
    assert "mailflow_smtp_timeouts_total{" not in metrics
