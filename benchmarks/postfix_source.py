"""postfix's ``smtp-source`` as an alternative load generator (``--client smtp-source``).

It is C, so it leaves more of a small machine's CPU to the servers than the Python
client does. It reports no per-message latency: only the rate (messages over the
wall time of the whole run, connection set-up included) comes out of it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from benchmarks.smtp_client import LoadResult

SMTP_SOURCE = "/usr/sbin/smtp-source"
RUN_TIMEOUT = 300.0  # seconds: a hung server must not hang the benchmark


def usable() -> bool:
    return Path(SMTP_SOURCE).exists()


def write_message(template: bytes, path: Path) -> Path:
    """smtp-source -F wants plain lines; it adds the CRLFs and the dot-stuffing itself."""
    path.write_bytes(template.replace(b"\r\n", b"\n"))
    return path


def run_smtp_source(
    host: str,
    port: int,
    count: int,
    concurrency: int,
    message_file: Path,
    sender: str,
    recipient: str,
) -> LoadResult:
    argv = [SMTP_SOURCE, "-d", "-s", str(concurrency), "-m", str(count)]
    argv += ["-F", str(message_file), "-f", sender, "-t", recipient, "-M", "loadgen.test"]
    argv.append(f"{host}:{port}")
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    result = LoadResult(elapsed=time.perf_counter() - start)
    if proc.returncode == 0:
        result.sent = count
    else:
        # smtp-source stops at the first unexpected reply and does not say how far it got.
        result.failed = count
        result.errors.append((proc.stderr or proc.stdout).strip()[-300:])
    return result
