"""Structural edits: replace whole MIME parts (headers and body) of a message.

Used to strip an attachment and leave a short note in its place. The edit works on
the offsets the walk (:mod:`mailflow.mime.walk`) recorded, so everything outside the
replaced parts, the other parts, the delimiter lines, preamble and epilogue, stays
byte for byte as it was, and the structure stays valid: a part is replaced by a
part, between the same delimiter lines.

A part that cannot be replaced this way is refused (the function returns None):
the message's own body (a message that *is* one attachment, no multipart around it),
a part inside a message/rfc822 part that was sent base64 or quoted-printable encoded
(its offsets are into the decoded copy), or an opaque part past a walking limit.
"""

from __future__ import annotations

from mailflow.mime.walk import Part


def can_replace(raw: bytes, part: Part) -> bool:
    """True when :func:`replace_parts` can replace ``part`` of message ``raw``."""
    return part._src is raw and part.head_start >= 0 and not part.opaque


def replace_parts(raw: bytes, replacements: list[tuple[Part, bytes]]) -> bytes | None:
    """``raw`` with each part's entity (header block and body) replaced by the given
    bytes (a header block, a blank line, a body; no final line end: the one before
    the next delimiter stays). None when any part cannot be replaced
    (:func:`can_replace`) or two of them overlap."""
    spans: list[tuple[int, int, bytes]] = []
    for part, entity in replacements:
        if not can_replace(raw, part):
            return None
        spans.append((part.head_start, part._end, entity))
    spans.sort(key=lambda s: s[0])
    out: list[bytes] = []
    at = 0
    for start, end, entity in spans:
        if start < at:
            return None
        out.append(raw[at:start])
        out.append(entity)
        at = end
    out.append(raw[at:])
    return b"".join(out)


def note_entity(text: str) -> bytes:
    """A text/plain part carrying ``text`` (any line starting with "-" is indented, so
    the note can never look like a delimiter line)."""
    lines = []
    for line in text.splitlines() or [""]:
        clean = "".join(c if c.isprintable() else "?" for c in line)
        lines.append(" " + clean if clean.startswith("-") else clean)
    body = "\r\n".join(lines).encode("utf-8")
    return (
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Disposition: inline\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + body
    )
