"""The clamav plugin against a real clamd (Debian's clamav-daemon) on loopback.

clamd runs once per session with a signature database the test writes
(tests/clamd_instance.py); mailflow runs through ``serve``'s server on 127.0.0.1.
Failures (clamd down, clamd hanging) use real sockets too: a path nobody listens on,
and a listening socket that accepts and never answers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from mailflow_plugins.clamav import ClamAVSettings, ScanError, parse_reply
from pydantic import ValidationError

from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.testing import config_for, make_message, running_server, send
from tests.clamd_instance import (
    EICAR,
    EICAR_NAME,
    STREAM_MAX,
    ZIP_NAME,
    ZIP_PATTERN,
    Clamd,
    clamd_binary,
    running_clamd,
)

RCPT = "bob@example.com"
SENDER = "alice@example.org"


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    if clamd_binary() is None:
        pytest.skip("clamd is not installed (Debian: apt-get install clamav-daemon)")
    with running_clamd(tmp_path_factory.mktemp("clamd")) as instance:
        yield instance


def with_attachment(filename: str, payload: bytes, subject: str = "files") -> bytes:
    """A multipart message with ``payload`` as a base64 attachment (CRLF lines)."""
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        (
            f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
            "Message-ID: <clamav-test@example.org>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            "--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            f"--b1\r\nContent-Type: application/octet-stream\r\n"
            f'Content-Disposition: attachment; filename="{filename}"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        + encoded
        + b"--b1--\r\n"
    )


def zip_with_pattern() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("report.txt", b"quarterly figures\n" * 50 + ZIP_PATTERN + b"\nend\n" * 50)
    data = buf.getvalue()
    assert ZIP_PATTERN not in data  # deflated: only an unpacking scanner can see it
    return data


def config(tmp_path: Path, address: str, **settings: Any) -> Any:
    entry = {"name": "clamav", "settings": {"address": address, **settings}}
    return config_for(tmp_path, "plugins: " + json.dumps([entry]))


async def refused_with(srv: Any, message: bytes) -> tuple[int, str]:
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await send(srv.port, SENDER, [RCPT], message)
    return refused.value.code, refused.value.message


def quarantined(srv: Any) -> list[dict[str, Any]]:
    directory = srv.app.config.quarantine.directory
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


@pytest.fixture
async def hanging_clamd(tmp_path: Path) -> AsyncIterator[tuple[str, list[int]]]:
    """A unix socket that accepts connections and never answers; counts open ones."""
    path = tmp_path / "hang.sock"
    state = [0, 0]  # open now, most open at once
    release = asyncio.Event()

    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        counted = False
        try:
            # The client closes a connection before it opens the next one; this
            # handler runs on the client's loop, so let the loop see that end of file
            # first (counting at once raced with it: 2 "at once" under load, once).
            await asyncio.sleep(0.05)
            state[0] += 1
            counted = True
            state[1] = max(state[1], state[0])
            # Read (so the sender never blocks on a full buffer) and never answer.
            while not release.is_set() and await reader.read(65536):
                pass
        finally:
            if counted:
                state[0] -= 1
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_unix_server(handle, path=str(path))
    try:
        yield str(path), state
    finally:
        release.set()
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


# --- through serve, against the real clamd ----------------------------------------------


async def test_eicar_is_rejected_and_named(clamd: Clamd, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(config(tmp_path, str(clamd.socket_path))) as srv:
        code, text = await refused_with(srv, with_attachment("eicar.com", EICAR))
        assert code == 550
        assert text.startswith("5.7.1 ") and EICAR_NAME in text
        assert srv.delivered(RCPT) == []
    assert any(f"infected: {EICAR_NAME}" in r.getMessage() for r in caplog.records)


async def test_virus_in_a_zip_attachment_is_found_over_tcp(clamd: Clamd, tmp_path: Path) -> None:
    cfg = config(tmp_path, clamd.tcp_address, on_virus="quarantine", header="X-Virus-Scanned")
    async with running_server(cfg) as srv:
        assert (
            await send(srv.port, SENDER, [RCPT], with_attachment("q3.zip", zip_with_pattern()))
            == {}
        )
        held = quarantined(srv)
        assert len(held) == 1 and ZIP_NAME in json.dumps(held[0])
        assert srv.delivered(RCPT) == []
        # rejected by default
    async with running_server(config(tmp_path / "r", clamd.tcp_address)) as srv:
        code, text = await refused_with(srv, with_attachment("q3.zip", zip_with_pattern()))
        assert code == 550 and ZIP_NAME in text


async def test_clean_message_is_delivered_with_the_header(clamd: Clamd, tmp_path: Path) -> None:
    cfg = config(tmp_path, str(clamd.socket_path), header="X-Virus-Scanned")
    forged = make_message(extra_headers={"X-Virus-Scanned": "clean by ClamAV at forged.example"})
    async with running_server(cfg) as srv:
        await send(srv.port, SENDER, [RCPT], forged)
        (delivered,) = await srv.wait_delivered(RCPT)
    headers = delivered.split(b"\r\n\r\n", 1)[0]
    assert b"X-Virus-Scanned: clean by ClamAV at mx.test" in headers
    assert b"forged.example" not in headers  # the sender's copy is removed


async def test_check_json_shows_symbol_and_details(clamd: Clamd, tmp_path: Path) -> None:
    app = App(config(tmp_path, str(clamd.socket_path)))
    ctx = await check_message(app, with_attachment("eicar.com", EICAR), recipients=[RCPT])
    entry = report(ctx)["plugins"]["clamav"]
    assert entry["action"] == "reject"
    assert {"name": "CLAM_VIRUS", "score": 0.0, "reason": EICAR_NAME} in entry["symbols"]
    assert entry["result"] == "infected" and entry["viruses"] == [EICAR_NAME]
    clean = report(await check_message(app, make_message(), recipients=[RCPT]))
    assert clean["plugins"]["clamav"]["result"] == "clean"
    assert clean["plugins"]["clamav"]["action"] == "continue"


# --- clamd unavailable: the failure policy, never a silent accept -------------------------


async def test_clamd_down_tempfails_by_default(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(config(tmp_path, str(tmp_path / "nobody.sock"))) as srv:
        # start-up went on, with a warning: clamd may come up later
        assert any("does not answer" in r.getMessage() for r in caplog.records)
        code, text = await refused_with(srv, make_message())
        assert code == 451 and text == "4.3.0 Virus scanner unavailable, please try again later"
        assert srv.delivered(RCPT) == []
    # the log names the reason, which the client does not see
    assert any(
        "not scanned (tempfail): cannot connect to clamd" in r.getMessage() for r in caplog.records
    )


async def test_clamd_down_over_tcp_quarantines_when_configured(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nobody listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(tmp_path, f"127.0.0.1:{port}", on_error="quarantine")
    async with running_server(cfg) as srv:
        assert await send(srv.port, SENDER, [RCPT], make_message()) == {}
        (held,) = quarantined(srv)
        assert "virus scan failed" in json.dumps(held)
        assert srv.delivered(RCPT) == []


async def test_on_error_accept_delivers_marked_unscanned(tmp_path: Path) -> None:
    cfg = config(
        tmp_path, str(tmp_path / "nobody.sock"), on_error="accept", header="X-Virus-Scanned"
    )
    async with running_server(cfg) as srv:
        await send(srv.port, SENDER, [RCPT], make_message())
        (delivered,) = await srv.wait_delivered(RCPT)
    assert b"X-Virus-Scanned: unscanned (scanner error) by ClamAV at mx.test" in delivered
    ctx = await check_message(App(cfg), make_message(), recipients=[RCPT])
    symbols = report(ctx)["plugins"]["clamav"]["symbols"]
    assert [s["name"] for s in symbols] == ["CLAM_ERROR"]


async def test_hanging_clamd_times_out_into_the_failure_action(
    tmp_path: Path, hanging_clamd: tuple[str, list[int]]
) -> None:
    path, state = hanging_clamd
    cfg = config(tmp_path, path, timeout=0.5, connect_timeout=0.2, max_concurrent=1)
    async with running_server(cfg) as srv:
        results = await asyncio.gather(
            *(refused_with(srv, make_message(subject=f"m{i}")) for i in range(3))
        )
    assert [code for code, _ in results] == [451, 451, 451]
    # max_concurrent bounds the connections to clamd: never more than one at a time.
    assert state[1] == 1


# --- larger than clamd's StreamMaxLength ---------------------------------------------------


def big_message(virus_at_end: bool) -> bytes:
    filler = b"A" * (STREAM_MAX + 200_000)
    payload = filler + EICAR if virus_at_end else EICAR + filler
    return with_attachment("big.bin", payload, subject="big")


async def test_oversize_is_an_error_by_default(clamd: Clamd, tmp_path: Path) -> None:
    cfg = config(tmp_path, str(clamd.socket_path), max_size=STREAM_MAX)
    async with running_server(cfg) as srv:
        code, _ = await refused_with(srv, big_message(virus_at_end=False))
        assert code == 451


async def test_oversize_truncate_scans_the_first_bytes(clamd: Clamd, tmp_path: Path) -> None:
    app = App(config(tmp_path, str(clamd.socket_path), max_size=STREAM_MAX, oversize="truncate"))
    early = report(await check_message(app, big_message(virus_at_end=False), recipients=[RCPT]))
    assert early["plugins"]["clamav"]["action"] == "reject"
    # Past the first max_size bytes nothing is seen: documented, and marked by a symbol.
    late = report(await check_message(app, big_message(virus_at_end=True), recipients=[RCPT]))
    entry = late["plugins"]["clamav"]
    assert entry["action"] == "continue" and entry["result"] == "clean"
    assert [s["name"] for s in entry["symbols"]] == ["CLAM_TRUNCATED"]


async def test_oversize_skip_marks_unscanned(clamd: Clamd, tmp_path: Path) -> None:
    app = App(config(tmp_path, str(clamd.socket_path), max_size=STREAM_MAX, oversize="skip"))
    entry = report(await check_message(app, big_message(True), recipients=[RCPT]))["plugins"][
        "clamav"
    ]
    assert entry["result"] == "unscanned"
    assert [s["name"] for s in entry["symbols"]] == ["CLAM_UNSCANNED"]


async def test_max_size_above_clamds_limit_is_a_failure_not_a_pass(
    clamd: Clamd, tmp_path: Path
) -> None:
    # max_size misconfigured above StreamMaxLength: clamd refuses the stream with
    # "INSTREAM size limit exceeded. ERROR"; that is on_error (451), never "clean".
    cfg = config(tmp_path, str(clamd.socket_path), max_size=4 * STREAM_MAX)
    async with running_server(cfg) as srv:
        code, _ = await refused_with(srv, big_message(virus_at_end=True))
        assert code == 451
    ctx = await check_message(App(cfg), big_message(True), recipients=[RCPT])
    assert "size limit exceeded" in report(ctx)["plugins"]["clamav"]["error"]
    # over TCP too: clamd's answer is read although it closed while we were sending
    tcp = config(tmp_path / "tcp", clamd.tcp_address, max_size=4 * STREAM_MAX)
    ctx = await check_message(App(tcp), big_message(True), recipients=[RCPT])
    assert "size limit exceeded" in report(ctx)["plugins"]["clamav"]["error"]


# --- pure parts ----------------------------------------------------------------------------


def test_parse_reply() -> None:
    assert parse_reply(b"stream: OK\0").viruses == ()
    assert parse_reply(b"stream: Eicar-Sig FOUND\0").viruses == ("Eicar-Sig",)
    two = parse_reply(b"stream: A FOUND\0stream: B\r\nX FOUND\0")
    assert two.viruses == ("A", "B_X")  # control characters never reach a reply or header
    for bad in (b"", b"\0", b"INSTREAM size limit exceeded. ERROR\0", b"stream: huh\0"):
        with pytest.raises(ScanError):
            parse_reply(bad)


def test_settings_are_checked() -> None:
    assert ClamAVSettings().on_error == "tempfail" and ClamAVSettings().on_virus == "reject"
    ClamAVSettings(address="[::1]:3310")
    for bad in ({"address": "localhost"}, {"on_error": "continue"}, {"header": "X-A: b"}):
        with pytest.raises(ValidationError):
            ClamAVSettings(**bad)


async def test_runs_in_a_content_worker_process(clamd: Clamd, tmp_path: Path) -> None:
    entry = {"name": "clamav", "isolate": True, "settings": {"address": str(clamd.socket_path)}}
    cfg = config_for(tmp_path, "isolation: {processes: 1}\nplugins: " + json.dumps([entry]))
    async with running_server(cfg) as srv:
        assert srv.app.pipeline.isolation is not None
        code, text = await refused_with(srv, with_attachment("eicar.com", EICAR))
        assert code == 550 and EICAR_NAME in text
        await send(srv.port, SENDER, [RCPT], make_message())
        await srv.wait_delivered(RCPT)


async def test_many_virus_names_keep_the_reply_short(tmp_path: Path) -> None:
    # clamd with AllMatchScan names every signature that matched: a message carrying
    # many samples must not make a reply line longer than RFC 5321's 512 bytes.
    path = tmp_path / "many.sock"
    names = [f"Sample.{i:03d}.{'X' * 150}" for i in range(300)]
    answer = b"".join(f"stream: {n} FOUND\0".encode() for n in names)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while not data.endswith(b"\0\0\0\0"):
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    try:
        async with running_server(config(tmp_path, str(path), header="X-Virus-Scan")) as srv:
            code, text = await refused_with(srv, make_message())
    finally:
        server.close()
    assert code == 554 or code == 550
    assert len(f"{code} {text}") <= 512
    assert names[0] in text and "and 298 more" in text
