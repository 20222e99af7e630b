"""Growth checks: doubling the input at most about doubles the time (no absolute times).

A quadratic step shows up as a ratio near 4 whatever the machine's speed; a linear
one stays near 2. Each size is timed as the best of a few runs of CPU time, which
another process on the machine can slow down but not speed up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

MAX_RATIO = 3.0  # linear: ~2; quadratic: ~4


def best_time(work: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best


def growth_ratio(build: Callable[[int], Any], run: Callable[[Any], Any], n: int) -> float:
    """time(run(build(2n))) / time(run(build(n)))."""
    small, large = build(n), build(2 * n)
    run(small)  # warm caches and imports
    return best_time(lambda: run(large)) / max(best_time(lambda: run(small)), 1e-6)


def assert_linear(build: Callable[[int], Any], run: Callable[[Any], Any], n: int) -> None:
    ratio = growth_ratio(build, run, n)
    assert ratio < MAX_RATIO, f"doubling the input multiplied the time by {ratio:.1f}"
