"""Smoke tests for the SMTP memory and AUTH-storm benchmarks, so they cannot silently rot.

Each runs for real (a ``mailflow serve`` child process on 127.0.0.1) with tiny numbers
and checks what it counted; the figures themselves are recorded in docs/smtp.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120  # seconds; each run takes a few


def run(module: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_memory_benchmark_sends_every_message():
    out = run(
        "smtp_memory",
        "--messages",
        "2",
        "--size",
        "600K",
        "--",
        "server: {large_message_threshold: 64K}",
    )
    assert "2 concurrent messages of 0.6 MiB; 2 answered 250" in out
    assert re.search(r"RSS idle \d+ MiB, peak \d+ MiB", out)


def test_auth_storm_benchmark_locks_the_guessers_out():
    out = run(
        "auth_storm", "--guessers", "2", "--seconds", "2",
        "--", "server: {auth: {max_failures_per_ip: 2, failure_delay: 0}}",
    )  # fmt: skip
    assert re.search(r"probe during the storm: \d+ messages", out)
    assert "'454'" in out  # locked out after two failures
