"""The three content-defence plugins together (issue 14's aim): CPU time per message.

    python -m benchmarks.bench_content [--corpus ../shared/corpus] [--messages 1000]

Each message gets a fresh ``MessageContext`` and goes through the data hooks of
``attachments``, ``phishing`` (local signals; no URIBL zones) and ``clamav``, in that
order, as ``serve`` runs them. Two figures, CPU time of this process
(``time.process_time_ns``) in microseconds per message:

* ``plugins``: the three hooks on a message whose MIME walk and decoded text were
  already read (in ``serve`` the bayes plugin runs first and the view is shared);
* ``with walk``: the same plus the walk and decoding, when these are the only content
  plugins.

clamd is replaced by a stand-in in another process that answers ``stream: OK`` as
soon as a stream ends: what is measured is mailflow's side of the scan (connect,
send, read the answer), not ClamAV's own work, which docs/performance.md reports
apart ("ClamAV"). Archive-heavy messages are reported apart too (the aim excepts
them). Figures are recorded in docs/performance.md ("Content defence: the three
plugins together").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mailflow_plugins.attachments import AttachmentsPlugin
from mailflow_plugins.clamav import ClamAVPlugin, ClamAVSettings
from mailflow_plugins.phishing import PhishingPlugin

from benchmarks.bench_attachments import archive_messages, corpus_messages, heavy_messages
from benchmarks.sample import message_template
from mailflow import mime
from mailflow.app import App
from mailflow.config import load_config
from mailflow.message import Connection, Envelope, MessageContext

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
AIM_US = 300.0

# A clamd stand-in: PING -> PONG; zINSTREAM -> read chunks until the empty one -> OK.
FAKE_CLAMD = r"""
import socket, struct, sys, os, threading
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(64)
print("ready", flush=True)

def exactly(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data

def serve(conn):
    try:
        command = b""
        while not command.endswith(b"\0"):
            byte = conn.recv(1)
            if not byte:
                return
            command += byte
        if command == b"zPING\0":
            conn.sendall(b"PONG\0")
            return
        while True:
            (size,) = struct.unpack("!I", exactly(conn, 4))
            if not size:
                break
            exactly(conn, size)
        conn.sendall(b"stream: OK\0")
    except (EOFError, OSError):
        pass
    finally:
        conn.close()

while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def context(raw: bytes) -> MessageContext:
    return MessageContext(
        raw, Envelope("sender@example.org", ["bob@example.com"]), Connection("203.0.113.5")
    )


def prewalk(ctx: MessageContext) -> None:
    """What the bayes plugin leaves in the shared view before these plugins run."""
    view = mime.view(ctx)
    view.structure.body_text()
    view.addresses("From")


async def per_message(
    raws: list[bytes], plugins: tuple[object, ...], rounds: int, walked: bool
) -> dict[str, list[float]]:
    """Per-message CPU times: the three hooks together ("all") and each alone."""
    attachments, phishing, clamav = plugins
    samples: dict[str, list[float]] = {"all": [], "attachments": [], "phishing": [], "clamav": []}
    clock = time.process_time_ns
    for round_ in range(rounds + 1):  # the first round warms caches and is dropped
        for raw in raws:
            ctx = context(raw)
            if walked:
                prewalk(ctx)
            t0 = clock()
            attachments.mailflow_data(message=ctx)  # type: ignore[attr-defined]
            t1 = clock()
            await phishing.mailflow_data(message=ctx)  # type: ignore[attr-defined]
            t2 = clock()
            await clamav.mailflow_data(message=ctx)  # type: ignore[attr-defined]
            t3 = clock()
            if round_:
                for key, ns in (
                    ("all", t3 - t0),
                    ("attachments", t1 - t0),
                    ("phishing", t2 - t1),
                    ("clamav", t3 - t2),
                ):
                    samples[key].append(ns / 1000)
    return samples


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[min(int(0.9 * len(ordered)), len(ordered) - 1)]
    return (
        f"mean {statistics.fmean(samples):7.1f}  median {statistics.median(samples):7.1f}"
        f"  p90 {p90:7.1f}"
    )


async def run(args: argparse.Namespace, socket_path: str) -> None:
    app = App(load_config(None))
    attachments = AttachmentsPlugin()
    phishing = PhishingPlugin()
    clamav = ClamAVPlugin(ClamAVSettings(address=socket_path))
    phishing.mailflow_startup(app)
    await clamav.mailflow_startup(app)
    plugins = (attachments, phishing, clamav)
    sets = {
        "corpus": corpus_messages(args.corpus, args.messages),
        "typical (2-20 KB)": [
            message_template(size, seed) for size in (2048, 5120, 20480) for seed in (1, 2)
        ],
        "attachment-heavy": heavy_messages(),
        "archives (excepted from the aim)": archive_messages(),
    }
    python = platform.python_version()
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {python}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"us of CPU per message, {args.rounds} rounds; aim < {AIM_US:.0f} us for typical mail")
    for name, raws in sets.items():
        for walked, label in ((True, "plugins"), (False, "with walk")):
            samples = await per_message(raws, plugins, args.rounds, walked)
            print(f"  {name:34} {label:9} n={len(raws):4}  {summary(samples['all'])}")
            if walked:
                medians = "  ".join(
                    f"{key} {statistics.median(samples[key]):.1f}"
                    for key in ("attachments", "phishing", "clamav")
                )
                print(f"  {'':34} {'':9} {'':6}  medians of each: {medians}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        socket_path = str(Path(tmp) / "clamd.sock")
        fake = subprocess.Popen(
            [sys.executable, "-c", FAKE_CLAMD, socket_path], stdout=subprocess.PIPE, text=True
        )
        try:
            assert fake.stdout is not None
            if fake.stdout.readline().strip() != "ready":
                raise SystemExit("the clamd stand-in did not start")
            asyncio.run(run(args, socket_path))
        finally:
            fake.kill()
            fake.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
