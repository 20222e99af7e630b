"""The Received trace field the SMTP front end puts in front of every message.

RFC 5321 4.4: "from" the client's HELO name, PTR name (when looked up) and address,
"by" this host, "with" the RFC 3848 protocol name, the queue id and, for one
recipient, "for". ``mailflow check`` adds the same field, so plugins see the message
as ``serve`` hands it to them.
"""

from __future__ import annotations

import email.utils
import functools
import re
import time

from mailflow.message import Connection, format_header
from mailflow.mime import HeaderBlock

# RFC 5322 2.2 field name (printable ASCII except ":"), with obsolete WSP before ":".
_HEADER_START = re.compile(rb"[!-9;-~]+[ \t]*:")


def is_header_start(raw: bytes) -> bool:
    """True when ``raw`` starts with a header field name and its colon."""
    return _HEADER_START.match(raw) is not None


def with_trace(raw: bytes, received: bytes) -> bytes:
    """``raw`` with the ``received`` field in front."""
    if not raw.startswith(b"\r\n") and not is_header_start(raw):
        # No header section at all (RFC 5322 3.5 wants a blank line before the
        # body): add the blank line, or the Received field would turn the first
        # body line into a broken header field.
        raw = b"\r\n" + raw
    return received + raw


def protocol_name(esmtp: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 name of the protocol a message came in by, for Received's "with"."""
    return ("ESMTP" if esmtp else "SMTP") + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(
    conn: Connection, by: str, protocol: str, recipients: list[str], queue_id: str
) -> bytes:
    """RFC 5321 4.4 trace header of a message received from ``conn`` by host ``by``."""
    helo = _sanitize(conn.helo or "unknown")
    rdns = _sanitize(conn.reverse_name or "")
    ip = f"[{conn.ip}]" if ":" not in conn.ip else f"[IPv6:{conn.ip}]"
    rcpt = recipients[0] if len(recipients) == 1 else ""
    value = (
        f"from {helo} ({rdns + ' ' if rdns else ''}{ip}) by {by} (mailflow) "
        f"with {protocol} id {queue_id}"
    )
    if rcpt:
        value += f" for <{_sanitize(rcpt)}>"
    value += "; " + _date_now()
    return format_header("Received", value)


_date_cache: tuple[int, str] = (0, "")


def _date_now() -> str:
    """RFC 5322 3.3 date-time of now, local time, formatted once per second (~9 us each)."""
    global _date_cache
    now = time.time()
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, localtime=True))
    return _date_cache[1]


# Printable ASCII except the characters that delimit a Received clause: ( ) ; < >
_UNSAFE_IN_RECEIVED = re.compile(r"[^\x21-\x27\x2a-\x3a\x3d\x3f-\x7e]")


@functools.lru_cache(maxsize=4096)
def _sanitize(text: str) -> str:
    """``text`` safe inside a Received header: every other character becomes ``_``.

    Cached: the same HELO names and recipients come back message after message.
    """
    return _UNSAFE_IN_RECEIVED.sub("_", text[:255])


def count_received(raw: bytes) -> int:
    """Received fields in the header block (mailflow.mime: one C-level count)."""
    return HeaderBlock(raw).count("received")
