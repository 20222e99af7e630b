"""Line-ending hygiene for message data (SMTP smuggling defence).

aiosmtpd ends DATA only at <CRLF>.<CRLF>, so a bare LF or CR cannot end a message
here. But if such bytes were passed on, a downstream MTA that honours <LF>.<LF>
could split one message into two (SMTP smuggling, 2023). So every bare CR or LF is
either turned into CRLF ("normalize", the default) or refused ("reject").

Everything here runs at C speed (``bytes.count`` and ``bytes.replace``), linear in
the data: a regex substitution over megabytes of bare LF held the event loop (and
the GIL) for far longer than one client may wait. The SMTP front end normalizes
block by block as the data arrives (:class:`NewlineNormalizer`).
"""

from __future__ import annotations

from typing import Literal


class BareNewlineError(ValueError):
    """Message data contains a CR or LF that is not part of a CRLF pair."""


def has_bare_newline(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def _to_crlf(data: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF as one CRLF.

    CRLF pairs become LF first (leftmost, non-overlapping: in CR CR LF the first CR
    stays bare), then the bare CRs become LF, and then every LF is one line end.
    """
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def normalize_newlines(data: bytes, mode: Literal["normalize", "reject"] = "normalize") -> bytes:
    """Return ``data`` with only CRLF line endings, or raise in ``reject`` mode."""
    if not has_bare_newline(data):
        return data  # every CR and LF is in a CRLF pair: three C-speed counts
    if mode == "reject":
        raise BareNewlineError("bare CR or LF in message data")
    return _to_crlf(data)


class NewlineNormalizer:
    """:func:`normalize_newlines` for data that arrives in blocks.

    A CR at the end of a block may be the first half of a CRLF whose LF starts the
    next block, so it is held back until the next block (or :meth:`finish`) says
    which. ``bare`` tells whether any bare CR or LF was seen so far.
    """

    __slots__ = ("_cr_held", "bare")

    def __init__(self) -> None:
        self._cr_held = False
        self.bare = False

    def feed(self, block: bytes) -> bytes:
        """The block with CRLF line ends only (minus a final CR, held back)."""
        if self._cr_held:
            block = b"\r" + block
            self._cr_held = False
        if block.endswith(b"\r"):
            block = block[:-1]
            self._cr_held = True
        if has_bare_newline(block):
            self.bare = True
            return _to_crlf(block)
        return block

    def finish(self) -> bytes:
        """What is still held back: a CR that no LF followed, as a line end."""
        if self._cr_held:
            self._cr_held = False
            self.bare = True
            return b"\r\n"
        return b""
