"""Delivery status notifications (bounces) per RFC 3464, in the RFC 6522 report format.

The DSN is::

    multipart/report; report-type=delivery-status
      text/plain                 what happened, for a human
      message/delivery-status    per-message and per-recipient fields (RFC 3464 2.2, 2.3)
      text/rfc822-headers        the original header (RFC 6522 4; the body is not returned)

It goes to the original envelope sender with a null envelope sender (RFC 5321 6.1, done
by the queue) and ``Auto-Submitted: auto-replied`` (RFC 3834 5) so that autoresponders
leave it alone.
"""

from __future__ import annotations

import email.utils
import re
import secrets
import time

from mailflow.delivery.spool import EXPIRED, QueueEntry, RecipientState

# RFC 3463 enhanced status code at the start of a reply's text: "5.1.1 No such user".
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPLY = re.compile(r"^\s*(\d{3})[ -]?(.*)$", re.DOTALL)
EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired
HEADER_LIMIT = 64 * 1024  # bytes of original header returned; a header bomb is cut here
LINE_LIMIT = 900  # keep DSN field lines under RFC 5322's 998-octet limit


def _ascii(text: str) -> str:
    """One line of printable US-ASCII: DSN fields are header-like (RFC 3464 2.1.1)."""
    text = " ".join(text.split())
    return text.encode("ascii", "replace").decode("ascii")[:LINE_LIMIT]


def status_for(r: RecipientState) -> str:
    """The RFC 3464 Status: the reply's enhanced code, else one from its class."""
    if r.status == EXPIRED:
        return EXPIRED_STATUS
    m = _REPLY.match(r.last_reply)
    text = m.group(2) if m else r.last_reply
    enhanced = _ENHANCED.match(text)
    if enhanced and (not r.final_code or enhanced.group(1) == str(r.final_code)[0]):
        return ".".join(enhanced.groups())
    return "4.0.0" if 400 <= r.final_code < 500 else "5.0.0"


def original_header(message: bytes) -> bytes:
    """The header block of ``message`` (up to the first empty line), with CRLF endings."""
    head = message.replace(b"\r\n", b"\n").partition(b"\n\n")[0]
    if len(head) > HEADER_LIMIT:
        head = head[:HEADER_LIMIT].rpartition(b"\n")[0]  # cut at a line boundary
    return head.replace(b"\n", b"\r\n").rstrip(b"\r\n") + b"\r\n"


def _human_text(entry: QueueEntry, failed: list[RecipientState], reporting_mta: str) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It is attached below (headers only).",
        "",
    ]
    for r in failed:
        why = "gave up after the queue lifetime" if r.status == EXPIRED else "failed"
        lines.append(f"<{_ascii(r.address)}>: delivery {why}")
        if r.last_reply:
            lines.append(f"    last reply: {_ascii(r.last_reply)}")
    lines.append("")
    return "\r\n".join(lines)


def _status_part(
    entry: QueueEntry, failed: list[RecipientState], reporting_mta: str, now: float
) -> str:
    # RFC 3464 2.2: per-message fields, then one block per recipient (2.3), each block
    # separated by an empty line.
    blocks = [
        [
            f"Reporting-MTA: dns; {_ascii(reporting_mta)}",
            f"X-Mailflow-Queue-ID: {_ascii(entry.id)}",
        ]
    ]
    if entry.helo:
        blocks[0].append(f"Received-From-MTA: dns; {_ascii(entry.helo)}")
    blocks[0].append(f"Arrival-Date: {email.utils.formatdate(entry.created)}")
    for r in failed:
        block = [
            f"Final-Recipient: rfc822; {_ascii(r.address)}",
            "Action: failed",
            f"Status: {status_for(r)}",
        ]
        if r.last_reply:
            block.append(f"Diagnostic-Code: smtp; {_ascii(r.last_reply)}")
        block.append(f"Last-Attempt-Date: {email.utils.formatdate(now)}")
        blocks.append(block)
    return "\r\n\r\n".join("\r\n".join(b) for b in blocks) + "\r\n"


def build_dsn(
    entry: QueueEntry,
    failed: list[RecipientState],
    message: bytes,
    *,
    reporting_mta: str,
    bounce_from: str = "MAILER-DAEMON",
) -> bytes:
    """The complete DSN message (CRLF line ends) for the ``failed`` recipients."""
    now = time.time()
    boundary = f"={secrets.token_hex(12)}/{_ascii(reporting_mta)}"
    header = original_header(message)
    header_cte = "7bit" if header.isascii() else "8bit"
    head = [
        f"From: Mail Delivery System <{bounce_from}@{reporting_mta}>",
        f"To: <{entry.sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate(now, localtime=True)}",
        f"Message-ID: {email.utils.make_msgid('dsn', domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",  # RFC 3834 5: no autoresponder replies to this
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    parts = [
        "\r\n".join(head),
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        _human_text(entry, failed, reporting_mta),
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        _status_part(entry, failed, reporting_mta, now),
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        f"Content-Transfer-Encoding: {header_cte}",
        "Content-Description: Undelivered message headers",
        "",
    ]
    text = "\r\n".join(parts).encode("ascii") + b"\r\n"
    return text + header + f"\r\n--{boundary}--\r\n".encode("ascii")
