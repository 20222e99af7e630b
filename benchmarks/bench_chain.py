"""In-process cost of the data-stage plugin chain, per plugin (CPU time, no SMTP).

    python -m benchmarks.bench_chain [-n 2000] [--plugins dkim,arc,bayes,rules,authres]
        [--isolation N]

``--isolation N`` starts N content-analysis worker processes as ``serve`` does
(default 0: every hook in this process). bayes and rules use them for messages of
``isolation.large_message`` bytes and more, which the benchmark message is not;
``--isolate-always`` sends them there for every message, to measure what a worker
costs: the wall-clock time per message is then the figure to read, as the CPU time
of this process no longer includes their work.

Builds the same chain as ``smtp_load``'s ``+plugins`` targets, runs
``Pipeline.run_data`` on the benchmark message (unique Message-ID each time, CRLF,
with a Received header as ``serve`` adds), and prints the CPU time per message of
the whole stage and each plugin's own share (median of the per-plugin timings).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.sample import MessageFactory
from benchmarks.smtp_load import select_plugins
from mailflow.app import App
from mailflow.config import Config
from mailflow.message import Connection, Envelope, MessageContext

RECEIVED = (
    b"Received: from client.example (localhost [127.0.0.1])\r\n"
    b"\tby mx.bench.test (mailflow) with ESMTP id 0123456789AB\r\n"
    b"\tfor <user@example.com>; Sun, 22 Nov 2026 18:00:00 +0000\r\n"
)


def payload_message(factory: MessageFactory, i: int) -> bytes:
    data = factory.payload(i)[: -len(b".\r\n")]
    return RECEIVED + data.replace(b"\r\n..", b"\r\n.")


async def run(n: int, plugins: list[dict[str, object]], isolation: int = 0) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Config.model_validate(
            {
                "local_domains": ["example.com"],
                "server": {"data_batch_rounds": 0},  # one message at a time: no gate
                "queue": {"directory": str(Path(tmp) / "spool")},
                "delivery": {"maildir": {"root": str(Path(tmp) / "mail")}},
                "dns": {"nameservers": ["127.0.0.1"], "port": 9, "timeout": 0.2},
                "plugins": plugins,
                "isolation": {"processes": isolation},
            }
        )
        app = App(config)
        await app.startup()
        await app.pipeline.start_isolation()
        factory = MessageFactory()
        per_plugin: dict[str, list[float]] = {}
        conn = Connection(ip="127.0.0.1", port=40000, helo="client.example")
        raws = [payload_message(factory, i) for i in range(n + 200)]
        for i in range(200):  # warm caches
            ctx = MessageContext(raws[i], Envelope("a@example.org", ["user@example.com"]), conn)
            await app.pipeline.run_data(ctx)
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        for raw in raws[200:]:
            ctx = MessageContext(raw, Envelope("a@example.org", ["user@example.com"]), conn)
            await app.pipeline.run_data(ctx)
            for r in ctx.runs:
                per_plugin.setdefault(r.plugin, []).append(r.elapsed_ms * 1000)
        cpu = (time.process_time() - cpu0) / n * 1e6
        wall = (time.perf_counter() - wall0) / n * 1e6
        await app.pipeline.stop_isolation()
        await app.shutdown()
    out = {"total": cpu, "wall": wall}
    out.update({k: statistics.median(v) for k, v in per_plugin.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--plugins", default="dkim,arc,bayes,rules,authres")
    parser.add_argument("--isolation", type=int, default=0, help="worker processes")
    parser.add_argument(
        "--isolate-always", action="store_true", help="isolate bayes and rules for every message"
    )
    args = parser.parse_args()
    plugins = select_plugins(args.plugins)
    if args.isolate_always:
        for entry in plugins:
            if entry["name"] in ("bayes", "rules"):
                entry["isolate"] = True
    result = asyncio.run(run(args.n, plugins, args.isolation))
    print(f"run_data CPU per message (this process): {result.pop('total'):.0f} us")
    print(f"run_data wall-clock per message: {result.pop('wall'):.0f} us")
    for name, us in result.items():
        print(f"  {name:10s} median {us:7.1f} us")


if __name__ == "__main__":
    main()
