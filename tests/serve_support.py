"""`mailflow serve` as a real subprocess: start it, read its log, signal it, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from pathlib import Path


class ServeProcess:
    """One ``mailflow serve`` child; its stderr (log and banner) is collected in ``lines``."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.port = 0

    @classmethod
    async def start(cls, *args: str, cwd: Path) -> ServeProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from mailflow.cli import main; main()",
            "serve",
            *args,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        serve = cls(proc)
        try:
            line = await serve.wait_for(r"listening on 127\.0\.0\.1:(\d+) \(SMTP\)")
        except BaseException:
            await serve.stop()
            raise
        m = re.search(r"listening on 127\.0\.0\.1:(\d+) \(SMTP\)", line)
        assert m is not None
        serve.port = int(m.group(1))
        return serve

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode("utf-8", "replace"))
            self._new_line.set()
        self._new_line.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    async def wait_for(self, pattern: str, start: int = 0, timeout: float = 60) -> str:
        """The first line from ``start`` on matching ``pattern``; fails if serve exits."""
        seen = start
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[seen:]:
                    if re.search(pattern, line):
                        return line
                seen = max(seen, len(self.lines))
                if self._reader.done():
                    raise AssertionError(f"serve ended without {pattern!r}:\n{self.log}")
                self._new_line.clear()
                await self._new_line.wait()

    async def reload(self, expect: str = r"reloaded |reload refused") -> str:
        """Send SIGHUP; return the log from then on, once a line matches ``expect``."""
        start = len(self.lines)
        self.proc.send_signal(signal.SIGHUP)
        await self.wait_for(expect, start)
        return "".join(self.lines[start:])

    async def stop(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            code = await self.proc.wait()
            await self._reader
        return code
