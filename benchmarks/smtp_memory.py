"""Peak memory of ``mailflow serve`` while many large messages arrive at once.

    python -m benchmarks.smtp_memory [--messages 8] [--size 24M] [--code DIR] [-- YAML...]

Starts ``mailflow serve`` in a child process (the embedded default config, so the
bundled Bayes plugin runs, with listen/spool/Maildir/quarantine in a temporary
directory), measures its resident memory once idle, then sends ``--messages``
messages of ``--size`` at the same time, each on its own connection, and reports
the child's peak resident set (``VmHWM``) and the growth per message. ``--code``
runs another checkout's ``mailflow`` (e.g. the commit before a change, for a
before/after figure); extra YAML lines after ``--`` are merged into the config.

The messages are text with a base64 "attachment" (76-character lines), so every
plugin has something to look at; they are written as fast as the server takes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

from mailflow.config import _parse_size, default_config_text

READY_TIMEOUT = 60.0
REPLY_TIMEOUT = 600.0
SAMPLE_EVERY = 0.05  # seconds between RSS samples
COMMANDS = (b"EHLO bench.test", b"MAIL FROM:<a@example.org>", b"RCPT TO:<bob@example.com>", b"DATA")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` figure in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def message(size: int, index: int) -> bytes:
    head = (
        f"From: sender{index}@example.org\r\nTo: bob@example.com\r\n"
        f"Subject: large message {index}\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nThe attachment follows.\r\n"
        "--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="data.bin"\r\n\r\n'
    ).encode()
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0" + b"\r\n"
    body = line * ((size - len(head) - 10) // len(line))
    return head + body + b"--b--\r\n"


async def send_one(port: int, data: bytes) -> tuple[str, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()

    async def reply() -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
            lines.append(line.decode(errors="replace").rstrip())
            if len(line) < 4 or line[3:4] != b"-":
                return lines[-1]

    try:
        await reply()
        for command in (
            b"EHLO bench.test",
            b"MAIL FROM:<a@example.org>",
            b"RCPT TO:<bob@example.com>",
            b"DATA",
        ):
            writer.write(command + b"\r\n")
            await reply()
        writer.write(data + b".\r\n")
        await writer.drain()
        final = await reply()
        writer.write(b"QUIT\r\n")
        return final, time.perf_counter() - start
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def load(port: int, pid: int, count: int, size: int) -> tuple[list[tuple[str, float]], int]:
    payloads = [message(size, i) for i in range(count)]
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, status_kib(pid, "VmRSS"))
            await asyncio.sleep(SAMPLE_EVERY)

    sampler = asyncio.ensure_future(sample())
    results = await asyncio.gather(*(send_one(port, p) for p in payloads))
    done.set()
    await sampler
    return results, peak


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mailflow serve exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            if s.recv(100).startswith(b"220"):
                return
        time.sleep(0.1)
    raise SystemExit("mailflow serve did not start")


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def config_text(tmp: Path, port: int, *extras: str) -> str:
    """The embedded default, in ``tmp`` and on ``port``, with ``extras`` (YAML) merged in."""
    config = yaml.safe_load(default_config_text())
    local = {
        "server": {"listen": [f"127.0.0.1:{port}"]},
        "delivery": {"maildir": {"root": str(tmp / "mail")}},
        "queue": {"directory": str(tmp / "spool")},
        "quarantine": {"directory": str(tmp / "quarantine")},
    }
    config = merged(config, local)
    for extra in extras:
        config = merged(config, yaml.safe_load(textwrap.dedent(extra)) or {})
    return yaml.safe_dump(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=8)
    parser.add_argument("--size", default="24M", help="size of each message (default 24M)")
    parser.add_argument("--code", help="directory of another mailflow checkout to run")
    parser.add_argument("yaml", nargs=argparse.REMAINDER, help="more config lines, after --")
    args = parser.parse_args(argv)
    size = int(_parse_size(args.size))
    extra = "\n".join(line for line in args.yaml if line != "--")
    with tempfile.TemporaryDirectory(prefix="mailflow-mem-") as tmp:
        port = free_port()
        config = Path(tmp) / "mailflow.yaml"
        config.write_text(config_text(Path(tmp), port, extra))
        env = dict(os.environ)
        cwd = args.code or str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = cwd
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from mailflow.cli import main; main()",
                "serve",
                "-c",
                str(config),
            ],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(port, proc)
            time.sleep(1.0)
            idle = status_kib(proc.pid, "VmRSS")
            results, peak_sampled = asyncio.run(load(port, proc.pid, args.messages, size))
            peak = max(status_kib(proc.pid, "VmHWM"), peak_sampled)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ok = sum(1 for reply, _ in results if reply.startswith("250"))
    slowest = max(t for _, t in results)
    mib = 1024
    print(f"code: {args.code or 'this checkout'}")
    print(f"{args.messages} concurrent messages of {size / 2**20:.1f} MiB; {ok} answered 250")
    print(f"replies: {sorted({r[:3] for r, _ in results})}; slowest {slowest:.1f} s")
    growth = (peak - idle) / mib
    print(f"RSS idle {idle / mib:.0f} MiB, peak {peak / mib:.0f} MiB, growth {growth:.0f} MiB")
    print(f"per message: {(peak - idle) / mib / max(args.messages, 1):.1f} MiB")


if __name__ == "__main__":
    main()
