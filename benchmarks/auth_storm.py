"""Reply latency of an ordinary client while others guess SMTP AUTH passwords.

    python -m benchmarks.auth_storm [--guessers 10] [--seconds 20] [--code DIR] [-- YAML...]

Starts ``mailflow serve`` in a child process (embedded default config with STARTTLS
and AUTH from a users file holding one argon2 hash made with argon2-cffi's default
parameters), then runs for ``--seconds``: ``--guessers`` connections from 127.0.0.1
each send wrong passwords as fast as they are answered (reconnecting when cut off),
while a probe client on 127.0.0.2 sends small messages one after another. Reports
the probe's per-message latency (p50/p99/max), the guesses answered 535, the
refusals (454 lockout / 421), and what a probe without the storm measures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from argon2 import PasswordHasher

from benchmarks.smtp_memory import config_text, free_port, wait_ready

PROBE_SOURCE = "127.0.0.2"
GUESS_SOURCE = "127.0.0.1"
MESSAGE = b"Subject: probe\r\nFrom: a@example.org\r\nTo: bob@example.com\r\n\r\nsmall\r\n"


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=mx.test"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


class Dialog:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str, tls: ssl.SSLContext) -> Dialog:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        dialog = cls(reader, writer)
        await dialog.reply()
        await dialog.command(b"EHLO bench.test")
        await dialog.command(b"STARTTLS")
        await writer.start_tls(tls)
        await dialog.command(b"EHLO bench.test")
        return dialog

    async def reply(self) -> bytes:
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return line

    async def command(self, line: bytes) -> bytes:
        self.writer.write(line + b"\r\n")
        return await self.reply()

    def close(self) -> None:
        self.writer.close()


async def guesser(port: int, tls: ssl.SSLContext, stop: float, counts: dict[str, int]) -> None:
    guess = base64.b64encode(b"\0alice\0wrong-password").decode().encode()
    while time.monotonic() < stop:
        try:
            dialog = await Dialog.open(port, GUESS_SOURCE, tls)
        except (ConnectionError, OSError, ssl.SSLError):
            await asyncio.sleep(0.05)
            continue
        try:
            while time.monotonic() < stop:
                reply = await dialog.command(b"AUTH PLAIN " + guess)
                code = reply[:3].decode()
                counts[code] = counts.get(code, 0) + 1
                if code == "421":
                    break
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            dialog.close()


async def probe(port: int, tls: ssl.SSLContext, stop: float) -> list[float]:
    dialog = await Dialog.open(port, PROBE_SOURCE, tls)
    latencies = []
    try:
        while time.monotonic() < stop:
            start = time.perf_counter()
            await dialog.command(b"MAIL FROM:<a@example.org>")
            await dialog.command(b"RCPT TO:<bob@example.com>")
            await dialog.command(b"DATA")
            reply = await dialog.command(MESSAGE + b".")
            assert reply.startswith(b"250"), reply
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.01)
    finally:
        dialog.close()
    return latencies


async def run(port: int, tls: ssl.SSLContext, guessers: int, seconds: float) -> None:
    quiet = await probe(port, tls, time.monotonic() + min(seconds / 4, 3.0))
    counts: dict[str, int] = {}
    stop = time.monotonic() + seconds
    tasks = [asyncio.ensure_future(guesser(port, tls, stop, counts)) for _ in range(guessers)]
    await asyncio.sleep(0.5)
    loaded = await probe(port, tls, stop)
    await asyncio.gather(*tasks)
    for name, values in (("without guessers", quiet), ("during the storm", loaded)):
        values.sort()
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        print(
            f"probe {name}: {len(values)} messages, p50 {statistics.median(values) * 1000:.1f} ms,"
            f" p99 {p99 * 1000:.1f} ms, max {values[-1] * 1000:.1f} ms"
        )
    print(f"guesser replies in {seconds:g} s: {dict(sorted(counts.items()))}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guessers", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--code", help="directory of another mailflow checkout to run")
    parser.add_argument("yaml", nargs=argparse.REMAINDER, help="more config lines, after --")
    args = parser.parse_args(argv)
    extra = "\n".join(line for line in args.yaml if line != "--")
    with tempfile.TemporaryDirectory(prefix="mailflow-auth-") as tmp:
        root = Path(tmp)
        cert, key = make_cert(root)
        users = root / "users"
        users.write_text(f"alice:{PasswordHasher().hash('right-password')}\n")
        port = free_port()
        tls_yaml = f"server: {{tls: {{cert: {cert}, key: {key}}}, auth: {{users_file: {users}}}}}"
        config = root / "mailflow.yaml"
        config.write_text(config_text(root, port, tls_yaml, extra))
        cwd = args.code or str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": cwd}
        command = [sys.executable, "-c", "from mailflow.cli import main; main()"]
        proc = subprocess.Popen(
            [*command, "serve", "-c", str(config)],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(port, proc)
            tls = ssl.create_default_context(cafile=str(cert))
            tls.check_hostname = False
            print(f"code: {args.code or 'this checkout'}; {args.guessers} guessers")
            asyncio.run(run(port, tls, args.guessers, args.seconds))
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
