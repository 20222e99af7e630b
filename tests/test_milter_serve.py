"""`mailflow serve` with a milter listener: config validation, in-process and as a real process."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from mailflow.app import App
from mailflow.config import ConfigError, parse_config
from mailflow.server import Server
from mailflow.testing import free_port
from tests.test_milter_session import MTA

START_TIMEOUT = 20.0


def test_milter_config_validation():
    config = parse_config("server: {listen: []}\nmilter: {listen: '[::1]:8891'}")
    assert config.server.listen == [] and config.milter.listen == "[::1]:8891"
    assert config.milter.default_action == "tempfail"
    assert parse_config("milter: {listen: 'inet:127.0.0.1:8891'}").milter.listen
    assert parse_config("milter: {listen: 'unix:/run/m.sock'}").milter.listen
    with pytest.raises(ConfigError, match=r"milter\.listen.*absolute socket path"):
        parse_config("milter: {listen: 'unix:relative.sock'}", "m.yaml")
    with pytest.raises(ConfigError, match=r"m\.yaml:1: milter\.default_action"):
        parse_config("milter: {default_action: reject}", "m.yaml")
    with pytest.raises(ConfigError, match=r"milter\.listen"):
        parse_config("milter: {listen: 'nonsense'}")


async def test_server_runs_milter_only(make_config):
    config = make_config("""
        server: {listen: [], hostname: mx.test}
        milter: {listen: "127.0.0.1:0"}
        """)
    server = Server(App(config))
    assert await server.start() == []  # no SMTP listener
    try:
        assert server.milter is not None
        mta = await MTA.open(server.milter.port)
        await mta.negotiate()
        await mta.connect_and_mail()
        await mta.ask(b"R", b"<bob@example.com>\0")
        assert await mta.message([(b"Subject", b" hi")], b"hello\r\n") == [(b"c", b"")]
        await mta.close()
    finally:
        await server.stop()
    assert server.milter is None


@pytest.mark.slow
async def test_mailflow_serve_process_with_milter_listener(tmp_path: Path):
    port = free_port()
    config = tmp_path / "mailflow.yaml"
    config.write_text(
        textwrap.dedent(f"""\
            server: {{listen: []}}
            milter: {{listen: "127.0.0.1:{port}", default_action: accept}}
            delivery: {{maildir: {{root: {tmp_path / "mail"}}}}}
            queue: {{directory: {tmp_path / "spool"}}}
            quarantine: {{directory: {tmp_path / "quarantine"}}}
            """)
    )
    code = "import sys; from mailflow.cli import main; sys.argv[0] = 'mailflow'; main()"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "serve",
        "-c",
        str(config),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(START_TIMEOUT):
            while b"(milter)" not in (line := await proc.stderr.readline()):
                assert line, "serve exited before listening"
        assert f"127.0.0.1:{port}".encode() in line
        mta = await MTA.open(port)
        assert (await mta.negotiate())[0] == 6
        await mta.connect_and_mail()
        await mta.ask(b"R", b"<bob@example.com>\0")
        assert await mta.message([(b"Subject", b" hi")], b"x\r\n") == [(b"c", b"")]
        await mta.close()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await proc.communicate()
    assert proc.returncode == 0
