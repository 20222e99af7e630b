"""Growth of the message path on hostile shapes: time at n and 2n, and the ratio.

    python -m benchmarks.bench_mime [--shapes a,b] [--targets layer,bayes,check] [--scale 1]

Each shape of :mod:`benchmarks.hostile` is built at its size n and at 2n, and each
target is timed on both (best of ``--repeat`` runs, CPU time). A linear step gives a
ratio near 2; a quadratic one near 4. Targets:

* ``split``: ``split_header_fields`` of the header block (what header mutations use);
* ``layer``: the MIME/text layer as the rules engine and bayes use it: walk, body
  text, top-level header values, From addresses;
* ``headers`` / ``message``: ``MessageContext.headers`` and ``.message`` (the stdlib
  compat32 views plugins may ask for);
* ``bayes``: bayes feature extraction from the raw bytes;
* ``check``: ``mailflow.check.check_message`` through the builtin chain (dkim, arc,
  dmarc, bayes, rules with rules/content-policy.yaml, authres; DNS pointed at a
  closed local port, so no lookup leaves the machine).

Results are recorded in docs/performance.md ("Hostile input").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.hostile import SHAPES
from mailflow.message import Connection, Envelope, MessageContext

REPO = Path(__file__).resolve().parent.parent
CHAIN = ("dkim", "arc", "dmarc", "bayes", "rules", "authres")


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best CPU time (seconds) of ``repeat`` calls."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def _ctx(raw: bytes) -> MessageContext:
    return MessageContext(
        raw, Envelope("a@example.org", ["b@example.com"]), Connection("192.0.2.1")
    )


def target_split(raw: bytes) -> None:
    from mailflow.message import split_header_fields

    split_header_fields(_ctx(raw).split()[0])


def target_layer(raw: bytes) -> None:
    from mailflow import mime

    ctx = _ctx(raw)
    structure = mime.structure(ctx)
    structure.body_text()
    for part in structure.parts:
        _ = part.filenames
    for name in ("from", "to", "subject", "received", "x-mailer", "content-type"):
        mime.header_values(ctx, name)
    addresses = getattr(mime, "header_addresses", None)
    if addresses is not None:
        addresses(ctx, "from")


def target_headers(raw: bytes) -> None:
    headers = _ctx(raw).headers
    headers.get_all("From")
    list(headers)


def target_message(raw: bytes) -> None:
    for part in _ctx(raw).message.walk():
        part.get_payload(decode=True)


def target_bayes(raw: bytes) -> None:
    from mailflow_plugins.bayes.features import extract_tokens

    extract_tokens(raw)


class CheckTarget:
    """``check_message`` with the builtin chain, one App for all runs."""

    def __init__(self) -> None:
        from mailflow.app import App
        from mailflow.config import Config

        self._tmp = tempfile.TemporaryDirectory()
        tmp = Path(self._tmp.name)
        plugins: list[dict[str, Any]] = []
        for name in CHAIN:
            entry: dict[str, Any] = {"name": name}
            if name == "rules":
                entry["settings"] = {"files": [str(REPO / "rules" / "content-policy.yaml")]}
            plugins.append(entry)
        config = Config.model_validate(
            {
                "local_domains": ["example.com"],
                "queue": {"directory": str(tmp / "spool")},
                "delivery": {"maildir": {"root": str(tmp / "mail")}},
                "dns": {"nameservers": ["127.0.0.1"], "port": 9, "timeout": 0.2},
                "plugins": plugins,
            }
        )
        self.app = App(config)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.app.startup())
        self.errors: list[str] = []

    def __call__(self, raw: bytes) -> None:
        from mailflow.check import check_message

        ctx = self.loop.run_until_complete(
            check_message(self.app, raw, sender="a@example.org", recipients=["b@example.com"])
        )
        self.errors = [f"{r.plugin}: {r.error}" for r in ctx.runs if r.error]

    def close(self) -> None:
        self.loop.run_until_complete(self.app.shutdown())
        self.loop.close()
        self._tmp.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--targets", default="split,layer,headers,message,bayes,check")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every n")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    targets: dict[str, Callable[[bytes], None]] = {
        "split": target_split,
        "layer": target_layer,
        "headers": target_headers,
        "message": target_message,
        "bayes": target_bayes,
    }
    check: CheckTarget | None = None
    if "check" in args.targets.split(","):
        check = CheckTarget()
        targets["check"] = check
    rows = []
    for shape in args.shapes.split(","):
        build, size = SHAPES[shape]
        n = max(1, int(size * args.scale))
        small, large = build(n), build(2 * n)
        for name in args.targets.split(","):
            fn = targets[name]
            try:
                a = best_time(lambda fn=fn, raw=small: fn(raw), args.repeat)
                b = best_time(lambda fn=fn, raw=large: fn(raw), args.repeat)
            except Exception as exc:  # report and go on: a crash is a finding too
                rows.append({"shape": shape, "target": name, "error": repr(exc)[:120]})
                print(f"{shape:22s} {name:8s} ERROR {exc!r:.100}", flush=True)
                continue
            row: dict[str, Any] = {
                "shape": shape,
                "target": name,
                "n": n,
                "bytes": len(small),
                "ms": round(a * 1000, 2),
                "ms_2n": round(b * 1000, 2),
                "ratio": round(b / a, 2) if a > 0.0005 else None,
            }
            if check is not None and fn is check and check.errors:
                row["plugin_errors"] = check.errors
            rows.append(row)
            if not args.json:
                ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "  - "
                errs = f"  errors: {row['plugin_errors']}" if "plugin_errors" in row else ""
                print(
                    f"{shape:22s} {name:8s} n={n:<8d} {len(small) / 1e6:6.2f} MB "
                    f"{row['ms']:9.1f} ms  2n {row['ms_2n']:9.1f} ms  ratio {ratio}{errs}",
                    flush=True,
                )
    if check is not None:
        check.close()
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
