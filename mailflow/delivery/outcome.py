"""The result of one delivery attempt for one recipient."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Outcome:
    """``code`` is the SMTP/LMTP reply code (or a synthetic one for local errors)."""

    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


def temp_failure(text: str) -> Outcome:
    """Connection failures, timeouts, local I/O problems: retry later."""
    return Outcome(451, text)
