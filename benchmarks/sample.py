"""A realistic test message: multipart/alternative (text + HTML) plus a small attachment.

Built once as a template; each copy differs only in its Message-ID, so building a
message costs the load generator almost nothing.
"""

from __future__ import annotations

import base64
import random

from mailflow.delivery.smtp_client import dot_stuff

DEFAULT_SIZE = 5 * 1024
_MARKER = b"@@ID@@"
_WORDS = [
    "invoice",
    "meeting",
    "report",
    "quarterly",
    "schedule",
    "please",
    "find",
    "attached",
    "the",
    "review",
    "project",
    "update",
    "budget",
    "team",
    "thanks",
    "regards",
    "tomorrow",
    "agenda",
    "notes",
    "draft",
    "final",
    "version",
    "customer",
    "order",
    "delivery",
    "shipping",
    "account",
    "password",
    "reset",
    "offer",
    "free",
    "winner",
    "click",
    "here",
]


def _prose(rng: random.Random, size: int) -> str:
    """Roughly ``size`` characters of word salad in 72-column lines."""
    lines: list[str] = []
    line = ""
    total = 0
    while total < size:
        word = rng.choice(_WORDS)
        if len(line) + len(word) + 1 > 72:
            lines.append(line)
            total += len(line) + 2
            line = ""
        line = f"{line} {word}" if line else word
    lines.append(line)
    return "\r\n".join(lines)


def message_template(size: int = DEFAULT_SIZE, seed: int = 1) -> bytes:
    """A CRLF message of about ``size`` bytes with an ``@@ID@@`` placeholder."""
    rng = random.Random(seed)
    # Split the budget: ~40% text, ~40% HTML, ~20% base64 attachment, minus headers.
    budget = max(size - 900, 300)
    text = _prose(rng, budget * 2 // 5)
    html_words = _prose(rng, budget * 2 // 5 - 60).replace("\r\n", "<br>\r\n")
    html = f"<html><body><p>{html_words}</p></body></html>"
    attachment = base64.encodebytes(rng.randbytes(budget // 5 * 3 // 4)).decode()
    attachment = attachment.replace("\n", "\r\n").rstrip("\r\n")
    outer, inner = "=_outer_b1", "=_inner_b2"
    parts = [
        "From: Alice Sender <alice@example.org>",
        "To: Bob Receiver <bob@example.com>",
        "Subject: Quarterly report and agenda for tomorrow",
        "Date: Mon, 02 Nov 2026 10:00:00 +0000",
        "Message-ID: <@@ID@@@bench.example.org>",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{outer}"',
        "",
        "This is a multi-part message in MIME format.",
        f"--{outer}",
        f'Content-Type: multipart/alternative; boundary="{inner}"',
        "",
        f"--{inner}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 7bit",
        "",
        text,
        f"--{inner}",
        "Content-Type: text/html; charset=utf-8",
        "Content-Transfer-Encoding: 7bit",
        "",
        html,
        f"--{inner}--",
        f"--{outer}",
        'Content-Type: application/octet-stream; name="report.bin"',
        'Content-Disposition: attachment; filename="report.bin"',
        "Content-Transfer-Encoding: base64",
        "",
        attachment,
        f"--{outer}--",
        "",
    ]
    return "\r\n".join(parts).encode("ascii")


class MessageFactory:
    """Hands out the DATA payload (dot-stuffed, with the ``.`` terminator) per index."""

    def __init__(self, size: int = DEFAULT_SIZE, run: str = "run") -> None:
        stuffed = dot_stuff(message_template(size))  # with its terminator
        self._head, _, self._tail = stuffed.partition(_MARKER)
        self._run = run.encode()
        self.size = len(stuffed)

    def payload(self, index: int) -> bytes:
        return b"%s%s.%d%s" % (self._head, self._run, index, self._tail)
