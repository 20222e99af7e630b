"""The phishing plugin: CPU time per corpus message, and the share of messages each
symbol fires on.

    python -m benchmarks.bench_phishing [--corpus ../shared/corpus] [--protect DOMAIN ...]

Two figures per label (ham, spam), in microseconds per message (best of --repeat
passes over all messages):

* ``own``: the plugin's local analysis (``PhishingPlugin.analyse``) on a message whose
  MIME walk, decoded text and From field were already read, as in ``serve`` where
  bayes and dmarc run first and the view is shared;
* ``with walk``: the same on a fresh ``MessageView`` (walk, decoding and HTML to text
  included): the cost when phishing is the only content plugin.

URIBL lookups are not included (network time, bounded by ``uribl_budget``). The
symbol shares are those of docs/plugins/phishing.md ("False positives"); --protect
adds protected domains (the corpus' own, for the worst case of the look-alike check).
Figures are recorded in docs/performance.md ("Phishing plugin").
"""

from __future__ import annotations

import argparse
import collections
import platform
import statistics
import time
from pathlib import Path

from mailflow_plugins.phishing import PhishingPlugin, PhishingSettings

from mailflow import mime

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"


def load(folder: Path, limit: int) -> list[bytes]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return [p.read_bytes() for p in files[:limit]]


def warm(raw: bytes) -> mime.MessageView:
    view = mime.MessageView(raw)
    view.structure.body_text()
    view.addresses("From")
    view.addresses("Reply-To")
    return view


def measure(plugin: PhishingPlugin, messages: list[bytes], repeat: int) -> dict[str, float]:
    """Per-message times (the best of ``repeat`` for each message), in microseconds:
    mean, median and 90th percentile of ``own``, and the mean ``with walk``."""
    views = [warm(raw) for raw in messages]
    own = [float("inf")] * len(messages)
    with_walk = [float("inf")] * len(messages)
    clock = time.perf_counter
    for _ in range(repeat):
        for i, view in enumerate(views):
            start = clock()
            plugin.analyse(view)
            own[i] = min(own[i], clock() - start)
        for i, raw in enumerate(messages):
            start = clock()
            plugin.analyse(mime.MessageView(raw))
            with_walk[i] = min(with_walk[i], clock() - start)
    ordered = sorted(own)
    return {
        "mean": statistics.fmean(own) * 1e6,
        "median": statistics.median(own) * 1e6,
        "p90": ordered[int(0.9 * (len(ordered) - 1))] * 1e6,
        "with walk": statistics.fmean(with_walk) * 1e6,
    }


def shares(plugin: PhishingPlugin, messages: list[bytes]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for raw in messages:
        counts.update(list(plugin.analyse(mime.MessageView(raw)).reasons))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--limit", type=int, default=100_000, help="messages per label")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--protect", nargs="*", default=[], help="protected domains")
    args = parser.parse_args()
    plugin = PhishingPlugin(PhishingSettings(protected_domains=args.protect))
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    for label in ("ham", "spam"):
        folder = args.corpus / label
        if not folder.is_dir():
            continue
        messages = load(folder, args.limit)
        t = measure(plugin, messages, args.repeat)
        print(
            f"{label}: {len(messages)} messages; own: mean {t['mean']:.1f} us, median "
            f"{t['median']:.1f} us, p90 {t['p90']:.1f} us; with walk: mean {t['with walk']:.1f} us"
        )
        for symbol, n in shares(plugin, messages).most_common():
            print(f"  {symbol}: {n} ({100 * n / len(messages):.2f}%)")


if __name__ == "__main__":
    main()
