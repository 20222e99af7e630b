"""Plugins for the isolation tests; importable by name, so worker processes can build them."""

from __future__ import annotations

import os
import re
import time
from typing import Any

from mailflow.hookspecs import hookimpl
from mailflow.verdict import AddHeader, Result

# Nested quantifiers: Python's backtracking engine needs ~2**n steps to fail on
# n "a"s followed by "!", and it does them in one C call that never yields.
CATASTROPHIC = re.compile(r"(a+)+$")


class Marker:
    """Adds X-Worker-Pid (the process it ran in) and says what it saw."""

    isolate = True

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.header = (settings or {}).get("header", "X-Worker-Pid")

    @hookimpl
    def mailflow_data(self, message: Any) -> Result:
        seen = {
            "pid": os.getpid(),
            "saw_first": message.header("X-First"),
            "saw_middle": message.header("X-Middle"),
            "score_before": message.score,
        }
        return Result(score=1.5, mutations=[AddHeader(self.header, str(os.getpid()))], details=seen)


class First(Marker):
    """Isolated, adds X-First."""

    @hookimpl
    def mailflow_data(self, message: Any) -> Result:
        return Result(score=0.5, mutations=[AddHeader("X-First", "1")])


class Middle:
    """Runs in the server process and changes the message between two isolated ones."""

    @hookimpl
    def mailflow_data(self, message: Any) -> Result:
        return Result(mutations=[AddHeader("X-Middle", "1")])


class Runaway:
    """Never returns for a message whose subject says "evil": a regex that backtracks."""

    isolate = True

    @hookimpl
    def mailflow_data(self, message: Any) -> Result:
        if "evil" in message.header("Subject"):
            CATASTROPHIC.search("a" * 60 + "!")  # ~2**60 steps: never ends on its own
        return Result(mutations=[AddHeader("X-Runaway-Checked", "yes")])


class Spinner:
    """Pure Python that never yields, for "evil" subjects."""

    isolate = True

    @hookimpl
    def mailflow_data(self, message: Any) -> Result:
        if "evil" in message.header("Subject"):
            while True:
                time.monotonic()
        return Result()


class Crasher:
    """Kills its own process for "evil" subjects (a crash in a C extension, say)."""

    isolate = True

    @hookimpl
    def mailflow_data(self, message: Any) -> Result:
        if "evil" in message.header("Subject"):
            os._exit(3)
        return Result()


class Sleeper:
    """Takes ``seconds`` (default 1) of wall time on every message, then says so."""

    isolate = True

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.seconds = float((settings or {}).get("seconds", 1.0))

    @hookimpl
    def mailflow_data(self, message: Any) -> Result:
        time.sleep(self.seconds)
        return Result(mutations=[AddHeader("X-Slept", str(self.seconds))])


class Unpicklable:
    """Leaves something that cannot be pickled in its details."""

    isolate = True

    @hookimpl
    def mailflow_data(self, message: Any) -> Result:
        return Result(score=1.0, details={"callback": lambda: None})


class InPlace:
    """Changes the message itself instead of returning mutations (a plugin bug)."""

    isolate = True

    @hookimpl
    def mailflow_data(self, message: Any) -> Result:
        message.apply([AddHeader("X-In-Place", "1")])
        return Result(score=0.5)
