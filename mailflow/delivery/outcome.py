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


class RefusedUpstream(Exception):
    """The upstream refused every recipient of a message for good, while the client
    still waits for its reply to DATA: the client gets that refusal, nothing is stored."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(str(outcome))
        self.outcome = outcome

    def reply(self) -> str:
        """The refusal as one SMTP reply line for the client (a 5xx, printable, bounded)."""
        code = self.outcome.code if 500 <= self.outcome.code <= 599 else 550
        text = " ".join(self.outcome.text.split())[:400] or "5.0.0 Refused by the next hop"
        text = text.encode("ascii", "replace").decode("ascii")
        return f"{code} {text}"


def temp_failure(text: str) -> Outcome:
    """Connection failures, timeouts, local I/O problems: retry later."""
    return Outcome(451, text)
