"""Crash safety: `kill -9` a real `mailflow serve` mid-stream, restart it on the same
spool, and check the promise: every message that got a 250 is delivered (at least once).

Duplicates are allowed by the promise (a crash between delivering and recording it
repeats the delivery); they are counted and printed, not failed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from mailflow.testing import free_port, make_message, smtp_sink

pytestmark = pytest.mark.slow

TOTAL = 200  # messages offered
KILL_AFTER = 80  # acknowledged messages before the kill
SENDERS = 4  # concurrent client connections
START_TIMEOUT = 20.0
DRAIN_TIMEOUT = 60.0
_MSGID = re.compile(rb"^Message-ID:\s*(<[^>]+>)", re.MULTILINE | re.IGNORECASE)


def write_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    config = tmp_path / "mailflow.yaml"
    config.write_text(
        textwrap.dedent(f"""\
            server:
              listen: ["127.0.0.1:{port}"]
              hostname: mx.test
            delivery:
              maildir:
                root: {tmp_path / "mail"}
            queue:
              directory: {tmp_path / "spool"}
              scan_interval: 0.1
              retry_schedule: [0.3]
            quarantine:
              directory: {tmp_path / "quarantine"}
            log:
              level: WARNING
            """)
        + textwrap.dedent(extra)
    )
    return config


def log_text(log: Path) -> str:
    return log.read_text(errors="replace")


@contextlib.asynccontextmanager
async def serve(config: Path, port: int, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`mailflow serve -c config` in a subprocess, ready when its port accepts."""
    code = "import sys; from mailflow.cli import main; sys.argv[0] = 'mailflow'; main()"
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, "serve", "-c", str(config), stdout=out, stderr=out
        )
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                if proc.returncode is not None:
                    raise AssertionError(f"server exited: {log_text(log)[-2000:]}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                break
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def stream_and_kill(
    port: int, proc: asyncio.subprocess.Process, rcpt: str
) -> tuple[set[str], int]:
    """Send TOTAL messages over SENDERS connections; SIGKILL the server after KILL_AFTER
    acknowledgements. Returns (Message-IDs that got 250, how many were offered)."""
    acked: set[str] = set()
    offered = 0
    todo = list(range(TOTAL))
    killed = asyncio.Event()

    async def sender() -> None:
        nonlocal offered
        try:
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, start_tls=False, timeout=10
            ) as client:
                while todo and not killed.is_set():
                    n = todo.pop()
                    msgid = f"<crash-{n}@example.org>"
                    msg = make_message(subject=f"n{n}", extra_headers={"Message-ID": msgid})
                    offered += 1
                    await client.sendmail("alice@example.org", [rcpt], msg)
                    acked.add(msgid)
                    if len(acked) >= KILL_AFTER and not killed.is_set():
                        killed.set()
                        os.kill(proc.pid, signal.SIGKILL)
        except (aiosmtplib.SMTPException, OSError):
            pass  # the server died under us: whatever was in flight is not acknowledged

    await asyncio.gather(*(sender() for _ in range(SENDERS)))
    await proc.wait()
    assert killed.is_set() and proc.returncode == -signal.SIGKILL
    return acked, offered


def ids_in(blobs: list[bytes]) -> list[str]:
    out = []
    for blob in blobs:
        m = _MSGID.search(blob)
        assert m, blob[:300]
        out.append(m.group(1).decode())
    return out


def report(name: str, acked: set[str], delivered: list[str], offered: int) -> None:
    duplicates = len(delivered) - len(set(delivered))
    print(
        f"\n{name}: offered={offered} acknowledged={len(acked)} "
        f"delivered={len(set(delivered))} duplicates={duplicates}"
    )
    missing = acked - set(delivered)
    assert not missing, f"{len(missing)} acknowledged message(s) lost: {sorted(missing)[:5]}"


async def wait_spool_empty(spool: Path, timeout: float = DRAIN_TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while any((spool / "queue").glob("*.json")):
            await asyncio.sleep(0.1)


async def test_kill_9_during_maildir_delivery_loses_nothing_acknowledged(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port)
    log = tmp_path / "server.log"
    rcpt = "bob@example.com"
    async with serve(config, port, log) as proc:
        acked, offered = await stream_and_kill(port, proc, rcpt)
    async with serve(config, port, log):
        await wait_spool_empty(tmp_path / "spool")
    new = tmp_path / "mail" / rcpt / "new"
    delivered = ids_in([p.read_bytes() for p in new.iterdir()]) if new.exists() else []
    report("maildir", acked, delivered, offered)
    assert "Traceback" not in log_text(log)


async def test_kill_9_with_relay_down_keeps_the_spool_and_delivers_after_restart(tmp_path):
    port = free_port()
    upstream = free_port()  # down during the first run: everything stays in the spool
    extra = f"""\
        local_domains: [example.org]
        relay_networks: ["127.0.0.0/8"]
        relay:
          default: up
          targets:
            up: {{host: 127.0.0.1, port: {upstream}, tls: none, timeout: 5}}
        """
    config = write_config(tmp_path, port, extra)
    log = tmp_path / "server.log"
    async with serve(config, port, log) as proc:
        acked, offered = await stream_and_kill(port, proc, "bob@remote.test")
    queued = list((tmp_path / "spool" / "queue").glob("*.json"))
    assert len(queued) >= len(acked)  # the kill found them all still queued
    async with smtp_sink(port=upstream) as sink, serve(config, port, log):
        await wait_spool_empty(tmp_path / "spool")
    delivered = ids_in([m.data for m in sink.messages])
    report("relay", acked, delivered, offered)
    assert all(m.rcpt_tos == ["bob@remote.test"] for m in sink.messages)
