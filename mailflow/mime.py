"""Decoding helpers for plugins: readable text and attachment facts of a message.

Work is done lazily and at most once per message (cached in ``ctx.extra``), and
only the parts that are asked for are decoded. Charsets that Python does not
know, or bytes that do not fit the declared charset, are decoded with
replacement characters rather than raising.
"""

from __future__ import annotations

import codecs
import html
import re
from dataclasses import dataclass
from email.message import Message

from mailflow.message import MessageContext

MAX_TEXT_CHARS = 1_000_000  # decoded text kept per message; rules look at no more
_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.IGNORECASE | re.DOTALL)
_SPACE = re.compile(r"[ \t\r\f\v]+")


@dataclass(frozen=True, slots=True)
class Part:
    content_type: str
    filename: str
    size: int  # encoded size in the message
    is_attachment: bool


def decode_part(part: Message) -> str:
    """The text of one leaf part, decoded from its transfer encoding and charset."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    text = payload.decode(charset, errors="replace")
    if part.get_content_type() == "text/html":
        text = html_to_text(text)
    return text


def html_to_text(markup: str) -> str:
    """Good-enough HTML to text for matching: drop tags, scripts, styles; unescape."""
    return _SPACE.sub(" ", html.unescape(_TAG.sub(" ", markup)))


def body_text(ctx: MessageContext) -> str:
    """All text/plain and text/html parts that are not attachments, decoded."""
    cached = ctx.extra.get("mime.text")
    if isinstance(cached, str):
        return cached
    chunks: list[str] = []
    total = 0
    for part in ctx.message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        if part.get_content_disposition() == "attachment":
            continue
        text = decode_part(part)
        chunks.append(text)
        total += len(text)
        if total >= MAX_TEXT_CHARS:
            break
    result = "\n".join(chunks)[:MAX_TEXT_CHARS]
    ctx.extra["mime.text"] = result
    return result


def parts(ctx: MessageContext) -> list[Part]:
    """Every leaf part with its type, file name and size."""
    cached = ctx.extra.get("mime.parts")
    if isinstance(cached, list):
        return cached
    out = []
    for part in ctx.message.walk():
        if part.is_multipart():
            continue
        # Parsing header parameters is the costly part; most parts (body text) have no
        # file name, and one can only be there if a header mentions "name".
        maybe_named = (
            "name" in str(part.get("Content-Disposition", "")).lower()
            or "name" in str(part.get("Content-Type", "")).lower()
        )
        filename = (part.get_filename() or "") if maybe_named else ""
        raw = part.get_payload()
        size = len(raw) if isinstance(raw, str | bytes) else 0
        out.append(
            Part(
                part.get_content_type(),
                filename,
                size,
                part.get_content_disposition() == "attachment" or bool(filename),
            )
        )
    ctx.extra["mime.parts"] = out
    return out
