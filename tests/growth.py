"""Growth checks: doubling the input at most about doubles the time (no absolute times).

A quadratic step shows up as a ratio near 4 whatever the machine's speed; a linear
one stays near 2. Each size is timed as the best of a few runs of CPU time, taken
in turn (n, 2n, n, 2n, ...) so that a busy neighbour slows both sizes alike, with
the garbage collector off; a ratio over the limit is measured again (a busy moment
passes, quadratic work stays near 4 every time).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

MAX_RATIO = 3.0  # linear: ~2; quadratic: ~4
SLACK = 0.004  # seconds: timer and cache noise on steps that take a few milliseconds
REPEAT = 3  # runs per size; the best counts
ATTEMPTS = 3  # measurements before a ratio over MAX_RATIO fails the check


def cpu_time(work: Callable[[], Any]) -> float:
    started = time.process_time()
    work()
    return time.process_time() - started


def best_times(small: Callable[[], Any], large: Callable[[], Any]) -> tuple[float, float]:
    """Best CPU time of ``small`` and of ``large``, run in turn REPEAT times each."""
    a = b = float("inf")
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing in one run is noise, not growth
    try:
        for _ in range(REPEAT):
            a = min(a, cpu_time(small))
            b = min(b, cpu_time(large))
    finally:
        if gc_was_enabled:
            gc.enable()
    return a, b


def check_growth(measure: Callable[[], tuple[float, float]], what: str = "") -> None:
    """``measure()`` -> (time at n, time at 2n); up to ATTEMPTS measurements, the check
    passes as soon as one is under MAX_RATIO x the first (plus SLACK)."""
    seen = []
    for _ in range(ATTEMPTS):
        a, b = measure()
        if b < MAX_RATIO * a + SLACK:
            return
        seen.append(f"{a * 1000:.1f} -> {b * 1000:.1f} ms")
    raise AssertionError(f"doubling the input {what}more than tripled the time: {'; '.join(seen)}")


def assert_linear(build: Callable[[int], Any], run: Callable[[Any], Any], n: int) -> None:
    small, large = build(n), build(2 * n)
    run(small)  # warm caches, imports and compiled patterns
    check_growth(lambda: best_times(lambda: run(small), lambda: run(large)), f"(n={n}) ")
