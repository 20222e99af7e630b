"""Growth checks: doubling the input at most about doubles the time (no absolute times).

A quadratic step shows up as a ratio near 4 whatever the machine's speed; a linear
one stays near 2. Each size is timed as the best of a few runs of CPU time, which
another process on the machine can slow down but not speed up.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

MAX_RATIO = 3.0  # linear: ~2; quadratic: ~4
ATTEMPTS = 3  # a ratio over MAX_RATIO is measured again: noise passes, quadratic stays ~4


def best_time(work: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing in one run is noise, not growth
    try:
        for _ in range(repeat):
            started = time.process_time()
            work()
            best = min(best, time.process_time() - started)
    finally:
        if gc_was_enabled:
            gc.enable()
    return best


def growth_ratio(build: Callable[[int], Any], run: Callable[[Any], Any], n: int) -> float:
    """time(run(build(2n))) / time(run(build(n)))."""
    small, large = build(n), build(2 * n)
    run(small)  # warm caches and imports
    return best_time(lambda: run(large)) / max(best_time(lambda: run(small)), 1e-6)


def assert_linear(build: Callable[[int], Any], run: Callable[[Any], Any], n: int) -> None:
    """The smallest ratio of up to ATTEMPTS measurements must stay under MAX_RATIO: a
    busy machine can inflate one measurement, but quadratic work is ~4 every time."""
    ratios = []
    for _ in range(ATTEMPTS):
        ratios.append(growth_ratio(build, run, n))
        if ratios[-1] < MAX_RATIO:
            return
    raise AssertionError(
        f"doubling the input multiplied the time by {min(ratios):.1f} "
        f"(measured {', '.join(f'{r:.1f}' for r in ratios)})"
    )
