"""HTML to text: mailflow.mime.html_to_text against HTML parsers, typical and hostile input.

    python -m benchmarks.bench_html [--corpus ../shared/corpus]

Measures CPU time per call (best of several runs) of ``mailflow.mime.html_to_text``
and, when they are installed (they are not dependencies of mailflow), selectolax
(lexbor backend: parse, drop script/style, text of the root) and inscriptis
(``get_text``): on the corpus' text/html parts of 4-16 KB, and on hostile shapes at
n and 2n. Results and the decision are recorded in docs/performance.md
("HTML to text").
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable
from pathlib import Path

from mailflow import mime

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
TYPICAL = (4 * 1024, 16 * 1024)  # characters of a typical HTML part
HOSTILE: dict[str, tuple[Callable[[int], str], int]] = {
    "'<a ' * n": (lambda n: "<a " * n, 1_000_000),
    "'<!--' * n": (lambda n: "<!--" * n + "x", 500_000),
    "'<script>x ' * n": (lambda n: "<script>x " * n, 300_000),
    # lexbor's cost grows faster than the square of the nesting depth: 10,000 levels
    # take it 0.15 s, 20,000 levels 0.86 s (300,000 levels did not finish in 15 min).
    "'<div>' * n (nesting)": (lambda n: "<div>" * n + "x", 10_000),
    "'<p>word ' * n": (lambda n: "<p>word " * n, 300_000),
}


def converters() -> dict[str, Callable[[str], str]]:
    found: dict[str, Callable[[str], str]] = {"mailflow.mime": mime.html_to_text}
    try:
        from selectolax.lexbor import LexborHTMLParser

        def lexbor(markup: str) -> str:
            tree = LexborHTMLParser(markup)
            tree.strip_tags(["script", "style"])
            root = tree.root
            return root.text(separator=" ") if root is not None else ""

        found["selectolax (lexbor)"] = lexbor
    except ImportError:
        pass
    try:
        from inscriptis import get_text

        found["inscriptis"] = get_text
    except ImportError:
        pass
    return found


def best(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def typical_parts(root: Path) -> list[str]:
    with (root / "MANIFEST.tsv").open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    parts = []
    for row in rows:
        for part in mime.parse((root / row["path"]).read_bytes()).parts:
            if part.content_type == "text/html" and not part.is_attachment:
                text = part.text()
                if TYPICAL[0] <= len(text) <= TYPICAL[1]:
                    parts.append(text)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the hostile n")
    args = parser.parse_args()
    found = converters()
    parts = typical_parts(args.corpus)
    mean = sum(map(len, parts)) / len(parts)
    print(f"typical: {len(parts)} corpus text/html parts of 4-16 KB, mean {mean:.0f} chars")
    for name, fn in found.items():

        def run(fn: Callable[[str], str] = fn) -> None:
            for markup in parts:
                fn(markup)

        run()
        print(f"  {name:22s} {best(run, 5) / len(parts) * 1e6:8.1f} us per part")
    for shape, (build, size) in HOSTILE.items():
        n = int(size * args.scale)
        small, large = build(n), build(2 * n)
        for name, fn in found.items():
            a = best(lambda fn=fn, s=small: fn(s), 2)
            b = best(lambda fn=fn, s=large: fn(s), 2)
            print(
                f"{shape:24s} {name:22s} {len(small) / 1e6:5.1f} MB {a:7.3f} s  "
                f"2n {b:7.3f} s  ratio {b / a if a else float('nan'):.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
