"""Summarise py-spy's collapsed stacks (``--format raw``): where did the CPU go?

    python -m benchmarks.stacks serve.txt [--top 30]

Prints the functions with the most samples inclusive (anywhere on the stack) and
exclusive (on top of the stack), as a percentage of all samples.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def summarise(path: Path, top: int = 30) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text("utf-8", "replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    lines = [f"{path.name}: {total} samples"]
    for title, counter in (("inclusive", inclusive), ("own (top of stack)", own)):
        lines.append(f"\n-- {title} --")
        for frame, count in counter.most_common(top):
            lines.append(f"{100 * count / max(total, 1):6.1f}%  {frame}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    for path in args.files:
        print(summarise(path, args.top))


if __name__ == "__main__":
    main()
