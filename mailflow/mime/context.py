"""One message version's header block and MIME structure, shared by every plugin.

:func:`view` gives the :class:`MessageView` of a :class:`~mailflow.message.MessageContext`,
cached on the context for the current bytes (``ctx.raw``). When a plugin's mutation
made a new version, the new view reuses the old one's :class:`Structure` if the body
bytes and the top-level Content-* fields are unchanged, so headers added by earlier
plugins (``X-Spam-*``, ``Authentication-Results``) cost no second walk: a message is
walked and decoded at most once per body per delivery, whichever plugins ask.

The same class serves callers with raw bytes only (``mailflow train``): a
``MessageView(raw)`` reads exactly what a context's view reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailflow.mime.addresses import AddressList, addresses_of
from mailflow.mime.decode import decode_words
from mailflow.mime.fields import HeaderBlock, parse_fields, unfold
from mailflow.mime.walk import Part, Structure, parse_body

if TYPE_CHECKING:
    from mailflow.message import MessageContext


class MessageView:
    """The top-level header fields (:attr:`fields`) and the MIME structure
    (:attr:`structure`, walked on first use) of one version of a message."""

    __slots__ = ("_structure", "fields", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.fields = HeaderBlock(raw)
        self._structure: Structure | None = None

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def structure(self) -> Structure:
        """The leaf parts (walked once; see :mod:`mailflow.mime.walk`)."""
        if self._structure is None:
            head = self.fields
            content = parse_fields(head.content_block())
            self._structure = parse_body(content, self.raw, head.body_start)
        return self._structure

    def header_text(self, name: str) -> str:
        """The first ``name`` field unfolded, with RFC 2047 words decoded ("" if none)."""
        value = self.fields.first(name)
        return "" if value is None else decode_words(unfold(value)).strip()

    def addresses(self, name: str) -> AddressList:
        """The mailboxes of every ``name`` field (From, To, Cc, Reply-To...), in order."""
        return addresses_of([unfold(v) for v in self.fields.raw_values(name)])

    def same_body(self, other: MessageView) -> bool:
        """True when ``other`` has the same body bytes and top-level Content-* fields
        (its structure is then valid for this version too)."""
        mine, theirs = self.fields, other.fields
        if len(self.raw) - mine.body_start != len(other.raw) - theirs.body_start:
            return False
        if mine.content_block() != theirs.content_block():
            return False
        return self.raw.endswith(memoryview(other.raw)[theirs.body_start :])


def view(ctx: MessageContext) -> MessageView:
    """The :class:`MessageView` of the message's current version (cached per version;
    the structure carried over when only headers changed)."""
    raw = ctx.raw
    cached = ctx._view
    if cached is not None:
        if cached.raw is raw:
            return cached
        fresh = MessageView(raw)
        if cached._structure is not None and fresh.same_body(cached):
            fresh._structure = cached._structure
    else:
        fresh = MessageView(raw)
    ctx._view = fresh
    return fresh


def structure(ctx: MessageContext) -> Structure:
    """The message's :class:`Structure`, walked at most once per body."""
    return view(ctx).structure


def parts(ctx: MessageContext) -> list[Part]:
    """Every leaf part with its type, file name, size and whether it is an attachment."""
    return structure(ctx).parts


def body_text(ctx: MessageContext) -> str:
    """All text/plain and text/html parts that are not attachments, decoded."""
    return structure(ctx).body_text()


def header_values(ctx: MessageContext, name: str) -> list[str]:
    """Every value of the top-level header ``name`` as text (compat32 layout:
    continuation lines kept; 8-bit bytes decoded by the charset policy)."""
    return view(ctx).fields.get_all(name)


def header_addresses(ctx: MessageContext, name: str) -> AddressList:
    """The mailboxes of every top-level ``name`` field."""
    return view(ctx).addresses(name)
