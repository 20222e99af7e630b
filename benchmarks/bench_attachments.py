"""Attachments plugin benchmark: CPU time per message, archives reported separately.

    python -m benchmarks.bench_attachments [--corpus ../shared/corpus] [--messages 1000]
                                           [--rounds 5] [--json FILE]

Message sets:

* ``corpus``: every n-th message of the shared SpamAssassin corpus (ham and spam;
  tests/messages when the corpus is absent);
* ``typical``: the benchmark message (benchmarks/sample.py: text + HTML and a small
  attachment) at 2, 5 and 20 KB;
* ``attachment-heavy``: five attachments each (PDF, PNG, DOCX, CSV, JPEG; ~60 KB);
* ``archives``: a zip of 20 documents, a zip in a zip with an executable, a .tar.gz,
  a docm (OOXML with macros);
* ``bomb``: nested zips of zeros (16^3 x 8 MiB inside ~30 KB), stopped by the budget.

Each message is checked in a fresh message context, as the plugin sees it at end of
DATA, so the time includes the MIME walk and decoding of the attachments; the walk
alone (shared with the other plugins) is reported beside it. CPU time per message
(``time.process_time_ns``), ``--rounds`` rounds after a warm-up; median and p99.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailflow_plugins.attachments import AttachmentsPlugin

from benchmarks.sample import message_template
from mailflow import mime
from mailflow.message import Connection, Envelope, MessageContext
from tests.attachment_support import (
    ELF,
    PDF,
    PE,
    PNG,
    message,
    nested_zip,
    tar_of,
    zip_bomb,
    zip_of,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
AIM_US = 100.0  # this plugin's share of the 300 us aim for the three new plugins


def context(raw: bytes) -> MessageContext:
    return MessageContext(
        raw, Envelope("sender@example.org", ["bob@example.com"]), Connection("203.0.113.5")
    )


def corpus_messages(corpus: Path, count: int) -> list[bytes]:
    files = sorted(p for p in corpus.glob("*/*") if p.is_file() and p.suffix != ".tsv")
    if not files:
        files = sorted((REPO / "tests" / "messages").rglob("*.eml"))
    step = max(len(files) // max(count, 1), 1)
    crlf = [p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for p in files]
    return crlf[::step][:count]


def heavy_messages() -> list[bytes]:
    docx = zip_of(("[Content_Types].xml", b"<Types/>" * 50), ("word/document.xml", b"<w/>" * 2000))
    jpeg = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40
    csv = b"date,amount,customer\n" + b"2026-01-01,12.50,ACME\n" * 400
    return [
        message(
            ("report.pdf", PDF + bytes(range(256)) * 60, "application/pdf"),
            ("chart.png", PNG + bytes(range(256)) * 30, "image/png"),
            ("notes.docx", docx, "application/vnd.openxmlformats-officedocument"),
            ("figures.csv", csv, "text/csv"),
            ("photo.jpg", jpeg, "image/jpeg"),
            subject=f"quarterly files {i}",
        )
        for i in range(3)
    ]


def archive_messages() -> list[bytes]:
    docs = zip_of(*((f"docs/file{i}.pdf", PDF + b"x" * 3000) for i in range(20)))
    docm = zip_of(("[Content_Types].xml", b"<Types/>"), ("word/vbaProject.bin", b"\x00" * 500))
    return [
        message(("docs.zip", docs, "application/zip")),
        message(("inner.zip", nested_zip(3, ("setup.exe", PE)), "application/zip")),
        message(
            ("logs.tar.gz", tar_of(("bin/tool", ELF), ("a.txt", b"y" * 5000)), "application/gzip")
        ),
        message(("q3.docm", docm, "application/msword")),
    ]


def time_per_message(
    raws: list[bytes], run: Callable[[MessageContext], Any], rounds: int
) -> list[float]:
    for raw in raws:  # warm-up
        run(context(raw))
    samples: list[float] = []
    for _ in range(rounds):
        for raw in raws:
            ctx = context(raw)
            start = time.process_time_ns()
            run(ctx)
            samples.append((time.process_time_ns() - start) / 1000)
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    plugin = AttachmentsPlugin()

    def walk(ctx: MessageContext) -> None:
        mime.structure(ctx).attachments()

    sets = {
        "corpus": corpus_messages(args.corpus, args.messages),
        "typical": [message_template(s, seed) for s in (2048, 5120, 20480) for seed in (1, 2)],
        "attachment-heavy": heavy_messages(),
        "archives": archive_messages(),
        "bomb": [message(("b.zip", zip_bomb(3, 16), "application/zip"))],
    }
    rows = []
    for name, raws in sets.items():
        rounds = 1 if name == "bomb" else args.rounds
        total = time_per_message(raws, plugin.mailflow_data, rounds)
        alone = time_per_message(raws, walk, rounds)
        rows.append(
            {
                "set": name,
                "messages": len(raws),
                "mean_kb": round(sum(map(len, raws)) / len(raws) / 1024, 1),
                "median_us": round(statistics.median(total), 1),
                "p99_us": round(percentile(total, 0.99), 1),
                "walk_median_us": round(statistics.median(alone), 1),
            }
        )
    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "python": sys.version.split()[0],
        "aim_us": AIM_US,
        "rows": rows,
    }
    print(f"{'set':18} {'msgs':>5} {'KB':>6} {'median us':>10} {'p99 us':>10} {'walk us':>8}")
    for r in rows:
        print(
            f"{r['set']:18} {r['messages']:5} {r['mean_kb']:6} {r['median_us']:10} "
            f"{r['p99_us']:10} {r['walk_median_us']:8}"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
