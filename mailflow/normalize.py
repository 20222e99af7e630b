"""Line-ending hygiene for message data (SMTP smuggling defence).

aiosmtpd ends DATA only at <CRLF>.<CRLF>, so a bare LF or CR cannot end a message
here. But if such bytes were passed on, a downstream MTA that honours <LF>.<LF>
could split one message into two (SMTP smuggling, 2023). So every bare CR or LF is
either turned into CRLF ("normalize", the default) or refused ("reject").
"""

from __future__ import annotations

import re
from typing import Literal

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


class BareNewlineError(ValueError):
    """Message data contains a CR or LF that is not part of a CRLF pair."""


def has_bare_newline(data: bytes) -> bool:
    return _BARE.search(data) is not None


def normalize_newlines(data: bytes, mode: Literal["normalize", "reject"] = "normalize") -> bytes:
    """Return ``data`` with only CRLF line endings, or raise in ``reject`` mode."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data  # every CR and LF is in a CRLF pair: three C-speed counts, no regex
    if _BARE.search(data) is None:
        return data
    if mode == "reject":
        raise BareNewlineError("bare CR or LF in message data")
    return _BARE.sub(b"\r\n", data)
