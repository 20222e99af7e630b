"""Per-message cost of a clamd INSTREAM scan (the clamav plugin's client).

    python -m benchmarks.bench_clamav [--corpus ../shared/corpus] [-n 300] [-k 4]

Starts a private clamd (Debian's clamav-daemon) with the tests' two-signature database
(tests/clamd_instance.py) and streams messages to it over its unix socket with
``mailflow_plugins.clamav.ClamdClient``: corpus messages one after the other (latency
per message, p50/p95), the same with ``-k`` scans in flight (messages per second),
and synthetic messages with a base64 attachment of 100 KB and 1 MB, and a 100 KB zip.
clamd's cache of clean files' hashes is off, since the runs repeat their input.
The database is tiny: a real one (millions of signatures, ~300 MB in memory) costs
more per byte, so these figures are a floor for the protocol and clamd's decoding,
not a forecast of production latency. Results go in docs/performance.md ("ClamAV").
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

from mailflow_plugins.clamav import ClamdClient

from tests.clamd_instance import running_clamd
from tests.test_clamav import with_attachment

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
MIB = 1024 * 1024


def corpus_messages(root: Path, n: int) -> list[bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in (".md", ".tsv"))
    random.Random(14).shuffle(files)
    return [p.read_bytes() for p in files[:n]]


def zipped(size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data.bin", os.urandom(size))
    return buf.getvalue()


async def latencies(client: ClamdClient, messages: list[bytes]) -> list[float]:
    out = []
    for raw in messages:
        started = time.perf_counter()
        verdict = await client.scan(raw)
        out.append((time.perf_counter() - started) * 1000)
        assert not verdict.viruses
    return out


async def throughput(client: ClamdClient, messages: list[bytes], k: int) -> float:
    queue = list(messages)

    async def worker() -> None:
        while queue:
            await client.scan(queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(k)))
    return len(messages) / (time.perf_counter() - started)


def row(name: str, ms: list[float]) -> str:
    ms = sorted(ms)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return f"| {name} | {len(ms)} | {statistics.median(ms):.2f} | {p95:.2f} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("-k", type=int, default=4)
    args = parser.parse_args()
    messages = corpus_messages(args.corpus, args.n)
    sizes = sorted(len(m) for m in messages)
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_clamd(Path(tmp), stream_max=25 * MIB, cache=False) as clamd,
    ):
        client = ClamdClient(str(clamd.socket_path), 2.0, 64 * 1024)
        await latencies(client, messages[:20])  # warm up clamd's threads and caches
        print(f"corpus: {len(messages)} messages, median {statistics.median(sizes)} bytes")
        print("| messages | n | p50 ms | p95 ms |\n|---|---|---|---|")
        cpu = time.process_time()
        print(row("corpus, one at a time", await latencies(client, messages)))
        cpu_us = (time.process_time() - cpu) / len(messages) * 1e6
        print(f"(mailflow's side of it: {cpu_us:.0f} us of CPU per message)")
        for label, payload in (
            ("100 KB attachment", os.urandom(100_000)),
            ("1 MB attachment", os.urandom(1_000_000)),
            ("100 KB zip attachment", zipped(100_000)),
        ):
            raw = with_attachment("file.bin", payload)
            print(row(label, await latencies(client, [raw] * 30)))
        rate = await throughput(client, messages, args.k)
        print(f"\ncorpus with {args.k} scans in flight: {rate:.0f} messages/s")


if __name__ == "__main__":
    asyncio.run(main())
