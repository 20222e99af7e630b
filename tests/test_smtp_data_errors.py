"""Errors while message data arrives: the store, the reader, and cleaning up after them.

A storage error (disk full) in the middle of DATA is answered 451 4.3.0 once the
rest of the message has been read to its end, so the session stays in step with the
client; any other error of the reader is answered 421 and the connection closed.
Every path that ends a DATA early (an error, a hang-up, a limit, a timer) closes and
deletes the temporary file: no descriptor and no file is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from mailflow.smtp.protocol import R_DATA_READ_FAILED
from mailflow.testing import SMTPDialog, running_server
from tests.test_smtp_badinput import RCPT, still_works
from tests.test_smtp_slow_large import large_message, server_yaml, start_data, wait_for


def incoming(srv) -> Path:
    return Path(srv.server.handler.incoming_dir)


def open_in(directory: Path) -> list[str]:
    """This process's descriptors open on files in ``directory`` (deleted ones too)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory) + os.sep):
                found.append(target)
    return found


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


async def nothing_left(srv) -> None:
    """No temporary file, and no descriptor on one, once the session is over."""
    directory = incoming(srv)
    await wait_for(lambda: files_in(directory) == [] and open_in(directory) == [])


async def read_until_closed(dialog: SMTPDialog) -> str:
    """The replies the server sends until it closes the connection (a reset ends it too)."""
    received = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):
            while chunk := await dialog.reader.read(65536):
                received += chunk
    return received.decode()


# --- every early end of DATA leaves nothing behind ----------------------------------------------

LARGE = {"large_message_threshold": "64K", "data_timeout": 30, "data_min_rate": 0}


async def _hang_up(srv, dialog: SMTPDialog) -> None:
    dialog.writer.transport.abort()


async def _go_quiet(srv, dialog: SMTPDialog) -> None:
    # data_timeout / data_deadline / data_min_rate cut the client off: a 421, then close.
    assert (await read_until_closed(dialog)).startswith("421 4.4.2")


@pytest.mark.parametrize(
    ("settings", "ending"),
    [
        ({}, _hang_up),
        ({"data_timeout": 0.5}, _go_quiet),
        ({"data_deadline": 0.5}, _go_quiet),
        ({"data_min_rate": "10M", "data_rate_grace": 0.3}, _go_quiet),
    ],
    ids=["hang-up", "data-timeout", "data-deadline", "data-min-rate"],
)
async def test_a_data_ended_early_leaves_no_file_and_no_descriptor(make_config, settings, ending):
    async with running_server(make_config(server_yaml(**{**LARGE, **settings}))) as srv:
        dialog = await start_data(srv.port)
        await dialog.write_raw(large_message(400_000))
        await wait_for(lambda: len(files_in(incoming(srv))) == 1)
        assert len(open_in(incoming(srv))) == 1
        await ending(srv, dialog)
        await dialog.close()
        await nothing_left(srv)
        await still_works(srv)
        assert srv.delivered(RCPT) == []


async def test_a_message_over_the_size_limit_leaves_no_file_and_no_descriptor(make_config):
    config = make_config(server_yaml(max_message_size="200K", **LARGE))
    async with running_server(config) as srv:
        dialog = await start_data(srv.port)
        await dialog.write_raw(large_message(600_000))
        assert (await dialog.command(".")).startswith("552")
        await nothing_left(srv)
        # ... and the session goes on.
        assert (await dialog.command("NOOP")).startswith("250")
        await dialog.close()


# --- a storage error mid-DATA: read to the end, then 451 ----------------------------------------


def failing_writes(monkeypatch, errno_: int, from_write: int) -> list[int]:
    """Writes to temporary message files fail with ``errno_`` from the ``from_write``-th
    (0: creating the file); returns a counter of the writes that went through."""
    import mailflow.smtp.data as smtp_data

    real = smtp_data._write_all
    done = [0]

    def write_all(fd: int, data: bytes) -> None:
        if done[0] >= from_write:
            raise OSError(errno_, os.strerror(errno_))
        real(fd, data)
        done[0] += 1

    monkeypatch.setattr(smtp_data, "_write_all", write_all)
    return done


@pytest.mark.parametrize(
    ("errno_", "from_write"),
    [(28, 0), (5, 1)],  # ENOSPC creating the file; EIO once it holds some data
    ids=["ENOSPC-first-write", "EIO-later-write"],
)
async def test_a_storage_error_mid_data_is_answered_451_after_the_end(
    make_config, monkeypatch, errno_, from_write
):
    written = failing_writes(monkeypatch, errno_, from_write)
    config = make_config(server_yaml(**LARGE))
    message = large_message(1_000_000)
    async with running_server(config) as srv:
        dialog = await start_data(srv.port)
        # The rest of the message after the error is full of command-like lines: read
        # as commands they would get 500s (and a 502 and a close after five).
        rest = b"".join(b"NOOP %d\r\nMAIL FROM:<x@example.org>\r\n" % i for i in range(20))
        await dialog.write_raw(message + rest)
        reply = await dialog.command(".")
        assert reply.startswith("451 4.3.0 Local error storing the message data"), reply
        assert written[0] == from_write  # the error did happen where planned
        # In step with the client: the next command is answered as such, and the
        # next transaction on this connection goes through once the disk is back.
        assert (await dialog.command("NOOP")).startswith("250")
        await nothing_left(srv)
        monkeypatch.undo()
        assert (await dialog.command("MAIL FROM:<a@example.org>")).startswith("250")
        assert (await dialog.command(f"RCPT TO:<{RCPT}>")).startswith("250")
        assert (await dialog.command("DATA")).startswith("354")
        await dialog.write_raw(message)
        assert (await dialog.command(".")).startswith("250")
        await dialog.close()
        [delivered] = await srv.wait_delivered(RCPT)
        assert delivered.endswith(message)
        await nothing_left(srv)


async def test_a_read_back_error_is_answered_451(make_config, monkeypatch):
    import mailflow.smtp.data as smtp_data

    def read_all(fd: int, size: int) -> bytes:
        raise OSError(5, os.strerror(5))

    monkeypatch.setattr(smtp_data, "_read_all", read_all)
    async with running_server(make_config(server_yaml(**LARGE))) as srv:
        dialog = await start_data(srv.port)
        await dialog.write_raw(large_message(300_000))
        reply = await dialog.command(".")
        assert reply.startswith("451 4.3.0"), reply
        assert (await dialog.command("NOOP")).startswith("250")
        # The transaction is over: DATA needs a new MAIL and RCPT.
        assert (await dialog.command("DATA")).startswith("503")
        await dialog.close()
        await nothing_left(srv)
        assert srv.delivered(RCPT) == []


async def test_other_errors_of_the_reader_are_answered_421_and_close(make_config, monkeypatch):
    from mailflow.smtp.data import DataScanner

    def broken(self: DataScanner, block: bytes) -> bytes:
        raise RuntimeError("a bug in the scanner")

    monkeypatch.setattr(DataScanner, "feed", broken)
    async with running_server(make_config()) as srv:
        dialog = await start_data(srv.port)
        # Command lines in the data: none of them may run once the reader has failed.
        # (The reader takes its first block at the first ".<CRLF>".)
        await dialog.write_raw(b"Subject: t.\r\n\r\nRSET\r\nMAIL FROM:<x@example.org>\r\n")
        received = await read_until_closed(dialog)
        assert received == f"{R_DATA_READ_FAILED}\r\n"  # one reply, nothing run after it
        assert received.startswith("421 4.3.0 ")
        await dialog.close()
        monkeypatch.undo()
        await still_works(srv)
        assert srv.delivered(RCPT) == []
