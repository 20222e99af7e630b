"""The MIME structure of a message: leaf parts, file names, decoded text, on demand.

A small, forgiving walker instead of the stdlib ``email`` tree (which costs ~0.2 ms
per typical message and is quadratic in the nesting depth): boundaries are found
with ``bytes.find``, each part keeps offsets into the message bytes, and parameters,
transfer decoding and charset decoding happen only for what is asked for, at most
once.

What a leaf's header block says (type, disposition, names) is remembered across
messages for the last 1,024 distinct blocks: mail from one program repeats the same
part headers; multipart headers, with their unique boundaries, are not kept.

Nothing here raises on malformed input: broken base64 or quoted-printable decode to
what can be salvaged, charsets follow the policy of :mod:`mailflow.mime.decode`, a
multipart whose boundary is missing is one leaf, bare LF line ends are accepted.
Work is bounded: at most :data:`MAX_PARTS` parts and :data:`MAX_DEPTH` levels of
nesting are walked. Past a limit the rest is kept as *opaque* parts
(``Part.opaque``, counted as attachments, never decoded) and ``Structure.truncated``
is set, so a rule can refuse what it could not inspect (``mime_truncated: true``)
instead of missing an attachment hidden past the limit. Each container's body is
searched for its own delimiter lines, so the walk reads each byte at most
MAX_DEPTH times. message/* parts sent base64 or quoted-printable encoded are decoded
to be walked, all of them together at most as many bytes as the message itself
(nested ones would otherwise keep a copy per level alive); past that they are opaque.

What differs from the stdlib tree (on purpose): file names have RFC 2047 encoded
words decoded and raw 8-bit names read by the charset policy; every name a part
carries (``filename``, ``filename*``, ``name``, ``name*``) is in ``Part.filenames``
for matching; message/* parts sent base64 or quoted-printable encoded are decoded
before their inner parts are walked; message/delivery-status is one leaf; in a body
a bare CR is not a line break (delimiter lines follow an LF).
"""

from __future__ import annotations

import re

from mailflow.mime.decode import decode_charset, decode_transfer, decode_words, header_text
from mailflow.mime.fields import Fields, block_text, match_few_fields, read_head
from mailflow.mime.filetype import FileType
from mailflow.mime.params import param_values, parse_params
from mailflow.mime.text import collapse_blanks, visible_text

MAX_TEXT_CHARS = 1_000_000  # decoded text kept per message; rules look at no more
MAX_PARTS = 1000  # MIME parts walked per message, multipart containers included
MAX_DEPTH = 30  # nesting levels walked (multipart and message/* containers)
OPAQUE_TYPE = "application/octet-stream"  # content type of the unwalked rest

_DELIM_TAIL = re.compile(rb"(--)?[ \t]*(?:\r\n|\n|\r|\Z)")


class _PartHead:
    """What a leaf's header block says; shared by the parts with identical headers."""

    __slots__ = (
        "_charset",
        "_params",
        "attachment",
        "content_type",
        "cte",
        "ctype_value",
        "disposition",
        "fields",
        "filename",
        "filenames",
    )

    def __init__(
        self,
        fields: Fields,
        content_type: str,
        values: tuple[str | None, str | None, str | None] | None = None,
    ) -> None:
        ctype, disposition, cte = values or _content_values(fields._pairs)
        self.fields = fields
        self.content_type = content_type
        self.ctype_value = ctype or ""
        self.cte = header_text(cte) if cte else ""
        self.disposition = (
            header_text(disposition.split(";", 1)[0]).strip().lower() if disposition else ""
        )
        named = (ctype is not None and "name" in ctype.lower()) or (
            disposition is not None and "name" in disposition.lower()
        )
        self.filenames = _filenames(self.ctype_value, disposition or "") if named else ()
        self.filename = self.filenames[0] if self.filenames else ""
        self.attachment = self.disposition == "attachment" or bool(self.filenames)
        self._params: dict[str, str] | None = None
        self._charset: str | None = None

    @property
    def params(self) -> dict[str, str]:
        """Content-Type parameters as text (8-bit bytes decoded by the charset policy)."""
        if self._params is None:
            raw = parse_params(self.ctype_value)
            self._params = {header_text(k): header_text(v) for k, v in raw.items()}
        return self._params

    @property
    def charset(self) -> str:
        if self._charset is None:
            found = ""
            if "charset" in self.ctype_value.lower():
                found = self.params.get("charset", "").strip().lower()
            self._charset = found
        return self._charset


# Leaf header blocks seen lately -> what they say. Mail from one program repeats the
# same part headers ("Content-Type: text/plain; charset=utf-8" ...) over and over;
# multipart headers (unique boundaries) are never kept.
_PART_HEADS: dict[bytes, _PartHead] = {}
_PART_HEADS_MAX = 1024
_PART_HEAD_KEY_MAX = 1024  # bytes: a larger header block is not kept (<= ~1.5 MB in all)


class Part:
    """One leaf MIME part: its headers, type, file name and (on demand) decoded content.

    ``content_type`` is lower-case ``type/subtype`` (text/plain when missing or
    invalid, message/rfc822 inside multipart/digest); ``disposition`` is the
    lower-case Content-Disposition type or ""; ``filename`` the part's file name
    (Content-Disposition ``filename`` first, then Content-Type ``name``) and
    ``filenames`` every distinct name it carries; ``size`` the encoded size in
    bytes; ``is_attachment``: disposition attachment or a file name (or opaque).
    ``opaque`` parts are the unwalked rest past a limit: never decoded.
    ``head_start`` is where the part's header block starts in the bytes it was
    walked from (-1 for the message's own body: it has no header block of its own). For the
    message itself (a single-part message seen through :func:`structure`),
    ``fields`` holds only its Content-* fields. ``container`` is the types of the
    containers the part is in, outermost first, joined by ">" ("" at the top).
    """

    __slots__ = (
        "_end",
        "_filetype",
        "_head",
        "_payload",
        "_plain",
        "_src",
        "_start",
        "_text",
        "_visible",
        "container",
        "content_type",
        "depth",
        "disposition",
        "fields",
        "filename",
        "filenames",
        "head_start",
        "is_attachment",
        "opaque",
        "size",
    )

    def __init__(
        self,
        fields: Fields | _PartHead,
        content_type: str,
        src: bytes,
        start: int,
        end: int,
        depth: int = 0,
        opaque: bool = False,
        container: str = "",
        head_start: int = -1,
    ) -> None:
        head = fields if isinstance(fields, _PartHead) else _PartHead(fields, content_type)
        self.head_start = head_start
        self._head = head
        self.fields = head.fields
        self.content_type = content_type
        self.disposition = head.disposition
        self.filename = head.filename
        self.filenames = head.filenames
        self.is_attachment = opaque or head.attachment
        self.depth = depth
        self.opaque = opaque
        self.container = container
        self.size = end - start
        self._src = src
        self._start = start
        self._end = end
        self._payload: bytes | None = None
        self._text: str | None = None
        self._plain: str | None = None
        self._visible = -1
        self._filetype: FileType | None = None

    @property
    def path(self) -> str:
        """The part's type after its containers' types ("multipart/mixed>text/plain")."""
        return f"{self.container}>{self.content_type}" if self.container else self.content_type

    @property
    def transfer_encoding(self) -> str:
        """The Content-Transfer-Encoding as written ("" when none)."""
        return self._head.cte

    @property
    def params(self) -> dict[str, str]:
        """Content-Type parameters (lower-case names; see :func:`parse_params`)."""
        return dict(self._head.params)

    @property
    def charset(self) -> str:
        """The declared charset, lower-case ("" when none)."""
        return self._head.charset

    def raw(self) -> bytes:
        """The part's body as it is in the message (still transfer-encoded)."""
        return self._src[self._start : self._end]

    def payload(self) -> bytes:
        """The body with its Content-Transfer-Encoding undone (cached)."""
        if self._payload is None:
            raw = self.raw()
            cte = self._head.cte
            self._payload = raw if self.opaque or not cte else decode_transfer(raw, cte)
        return self._payload

    def text(self) -> str:
        """The body decoded to text by the charset policy (:mod:`mailflow.mime.decode`;
        cached)."""
        if self._text is None:
            self._text = decode_charset(self.payload(), self._head.charset)
        return self._text

    def plain_text(self) -> str:
        """:meth:`text`, converted by :func:`html_to_text` for text/html (cached)."""
        if self._plain is None:
            text = self.text()
            if self.content_type == "text/html":
                text = visible_text(text)
                self._visible = len(text)
                text = collapse_blanks(text)
            else:
                self._visible = len(text)
            self._plain = text
        return self._plain

    @property
    def visible_chars(self) -> int:
        """The length of :meth:`plain_text` before runs of blanks were collapsed (each
        HTML tag counted as one blank): the amount of text a reader scrolls through."""
        if self._visible < 0:
            self.plain_text()
        return self._visible

    def __repr__(self) -> str:
        name = f" {self.filename!r}" if self.filename else ""
        return f"<Part {self.content_type}{name} {self.size} bytes>"


def _content_values(pairs: list[tuple[str, str]]) -> tuple[str | None, str | None, str | None]:
    """The first Content-Type, Content-Disposition and Content-Transfer-Encoding values."""
    ctype = disposition = encoding = None
    for name, value in pairs:
        key = name.lower()
        if key == "content-type":
            if ctype is None:
                ctype = value
        elif key == "content-disposition":
            if disposition is None:
                disposition = value
        elif key == "content-transfer-encoding" and encoding is None:
            encoding = value
    return ctype, disposition, encoding


def _filenames(ctype: str, disposition: str) -> tuple[str, ...]:
    names: list[str] = []
    for value, param in ((disposition, "filename"), (ctype, "name")):
        if "name" not in value.lower():
            continue
        for raw in param_values(value, param):
            if "=?" in raw:
                raw = decode_words(raw)
            name = header_text(raw).strip()
            if name and name not in names:
                names.append(name)
    return tuple(names)


class Structure:
    """The leaf parts of a message, in order, and whether a walking limit was hit
    (``truncated``: MAX_PARTS or MAX_DEPTH reached, the rest is in opaque parts)."""

    __slots__ = ("_body_text", "parts", "truncated")

    def __init__(self, parts: list[Part], truncated: bool = False) -> None:
        self.parts = parts
        self.truncated = truncated
        self._body_text: str | None = None

    def __repr__(self) -> str:
        return f"<Structure {self.parts!r}{' truncated' if self.truncated else ''}>"

    def attachments(self) -> list[Part]:
        """The parts that are attachments (disposition attachment, or a file name)."""
        return [p for p in self.parts if p.is_attachment]

    def body_parts(self) -> list[Part]:
        """The parts the body text is made of: text/* parts that are not attachments
        (Content-Disposition other than "attachment"), in order."""
        return [
            p
            for p in self.parts
            if p.content_type.startswith("text/") and p.disposition != "attachment" and not p.opaque
        ]

    def body_text(self) -> str:
        """The :meth:`body_parts` decoded, HTML converted to text (:func:`html_to_text`),
        joined by newlines, at most MAX_TEXT_CHARS (cached)."""
        if self._body_text is None:
            chunks: list[str] = []
            total = 0
            for part in self.body_parts():
                text = part.plain_text()
                chunks.append(text)
                total += len(text)
                if total >= MAX_TEXT_CHARS:
                    break
            self._body_text = "\n".join(chunks)[:MAX_TEXT_CHARS]
        return self._body_text


class _Walker:
    """Walks one message into its leaf parts, within MAX_PARTS and MAX_DEPTH."""

    def __init__(self, decode_budget: int) -> None:
        self.parts: list[Part] = []
        self.seen = 0  # parts walked, containers included
        self.truncated = False
        # Bytes of encoded message/* parts that may still be decoded to walk them.
        self.decode_budget = decode_budget

    def entity(
        self, src: bytes, start: int, end: int, default_type: str, depth: int, container: str
    ) -> None:
        """An entity with its own header block in src[start:end], inside ``container``."""
        blank = src.find(b"\r\n\r\n", start, end)
        if blank > start:  # the usual part: CRLF header fields, then a blank line
            key = src[start:blank]
            known = _PART_HEADS.get(key)
            if known is not None:
                self.seen += 1
                part = Part(
                    known, known.content_type, src, blank + 4, end, depth, False, container, start
                )
                self.parts.append(part)
                return
            few = match_few_fields(block_text(src[start : blank + 2]))
            if few is not None:
                self.body(
                    Fields(few), src, blank + 4, end, default_type, depth, container, key, start
                )
                return
        pairs, body = read_head(src, start, end)
        self.body(Fields(pairs), src, body, end, default_type, depth, container, None, start)

    def body(
        self,
        fields: Fields,
        src: bytes,
        start: int,
        end: int,
        default_type: str,
        depth: int,
        container: str = "",
        key: bytes | None = None,
        head_start: int = -1,
    ) -> None:
        """An entity whose header fields are known and whose body is src[start:end]
        (``key``: its header block, to remember what a leaf's headers say)."""
        self.seen += 1
        values = _content_values(fields._pairs)
        ctype_value = values[0]
        if ctype_value is None:
            ctype = default_type
            key = None  # what the headers say depends on where the part is
        else:  # Message.get_content_type: invalid types are text/plain (RFC 2045 5.2)
            ctype = ctype_value.split(";", 1)[0].strip().lower()
            if ctype.count("/") != 1 or not ctype.isascii():  # RFC 2045 5.1: ASCII tokens
                ctype = "text/plain"
        descend = depth < MAX_DEPTH
        inside = f"{container}>{ctype}" if container else ctype
        if ctype.startswith("multipart/"):
            boundary = parse_params(ctype_value or "").get("boundary", "").rstrip()
            if boundary and descend:
                inner = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
                if self.multipart(src, start, end, boundary, inner, depth, inside):
                    return
            key = None
        elif ctype.startswith("message/"):
            encoding = (values[2] or "").strip().lower()
            encoded = encoding in ("base64", "quoted-printable")
            if encoded and end - start > self.decode_budget:
                descend = False  # opaque: decoding it would pass the budget
            if ctype != "message/delivery-status" and descend and self.seen < MAX_PARTS:
                if encoded:
                    self.decode_budget -= end - start
                    inner_src = decode_transfer(src[start:end], encoding)
                    self.entity(inner_src, 0, len(inner_src), "text/plain", depth + 1, inside)
                else:
                    self.entity(src, start, end, "text/plain", depth + 1, inside)
                return
            key = None
        opaque = ctype.startswith(("multipart/", "message/")) and (
            not descend or self.seen >= MAX_PARTS
        )
        self.truncated = self.truncated or opaque
        head = _PartHead(fields, ctype, values)
        if key is not None and len(key) <= _PART_HEAD_KEY_MAX:
            if len(_PART_HEADS) >= _PART_HEADS_MAX:
                _PART_HEADS.clear()
            _PART_HEADS[key] = head
        self.parts.append(Part(head, ctype, src, start, end, depth, opaque, container, head_start))

    def multipart(
        self,
        src: bytes,
        start: int,
        end: int,
        boundary: str,
        inner: str,
        depth: int,
        container: str,
    ) -> bool:
        """Walk the body parts; False when no delimiter was found (a leaf then)."""
        delimiter = boundary.encode("utf-8", "surrogateescape")
        ranges, rest = _body_parts(src, start, end, delimiter, MAX_PARTS - self.seen)
        if ranges is None:
            return False
        for part_start, part_end in ranges:
            if self.seen >= MAX_PARTS:
                rest = part_start
                break
            self.entity(src, part_start, part_end, inner, depth + 1, container)
        if rest >= 0:
            self.truncated = True
            opaque = Part(Fields([]), OPAQUE_TYPE, src, rest, end, depth + 1, True, container, rest)
            self.parts.append(opaque)
        return True


def _body_parts(
    src: bytes, start: int, end: int, boundary: bytes, limit: int
) -> tuple[list[tuple[int, int]] | None, int]:
    """(start, end) of up to ``limit`` body parts of the multipart body src[start:end],
    and where the parts past the limit start (-1: none); None when no delimiter.

    RFC 2046 5.1.1: a delimiter is a whole line ``--boundary`` (``--boundary--`` to
    close, trailing blanks allowed); the line end before it belongs to it. Text
    before the first delimiter (preamble) and after the close (epilogue) is not a
    part; adjacent delimiter lines give no empty part; without a close delimiter the
    last part runs to the end. Only line starts are searched ("\\n--boundary"), so
    text that merely contains the boundary costs nothing.
    """
    delimiter = b"--" + boundary
    marker = b"\n" + delimiter
    size = len(delimiter)
    ranges: list[tuple[int, int]] = []
    part_start = -1  # -1: still in the preamble
    if src.startswith(delimiter, start, end):
        at = start
    else:
        at = src.find(marker, start, end)
        at = at + 1 if at >= 0 else -1
    while at >= 0:
        after = at + size
        if src.startswith(b"\r\n", after, end):
            next_line, close = after + 2, False
        else:
            tail = _DELIM_TAIL.match(src, after, end)
            if tail is None:  # "--boundary" followed by more text: not a delimiter
                at = src.find(marker, at, end)
                at = at + 1 if at >= 0 else -1
                continue
            next_line, close = tail.end(), tail.group(1) is not None
        if part_start >= 0 and at > part_start:
            if len(ranges) >= limit:
                return ranges, part_start
            stop = at - 2 if src.startswith(b"\r\n", at - 2, at) else at - 1
            ranges.append((part_start, max(part_start, stop)))
        if close:
            return (ranges if part_start >= 0 else None), -1
        part_start = next_line
        at = src.find(marker, next_line - 1, end)
        at = at + 1 if at >= 0 else -1
    if part_start < 0:
        return None, -1
    if part_start < end:
        if len(ranges) >= limit:
            return ranges, part_start
        stop = end
        if end == len(src):  # no close delimiter before the end: compat32 drops a line end
            stop = end - 2 if src.endswith(b"\r\n") else end - (src[end - 1] in b"\r\n")
        ranges.append((part_start, max(part_start, stop)))
    return ranges, -1


def parse(raw: bytes) -> Structure:
    """Walk a whole message (headers and body) into its leaf parts. Never raises."""
    walker = _Walker(len(raw))
    walker.entity(raw, 0, len(raw), "text/plain", 0, "")
    return Structure(walker.parts, walker.truncated)


def parse_body(fields: Fields, src: bytes, start: int = 0, end: int | None = None) -> Structure:
    """Walk a body (src[start:end]) whose top-level header fields are ``fields``."""
    walker = _Walker(len(src))
    walker.body(fields, src, start, len(src) if end is None else end, "text/plain", 0)
    return Structure(walker.parts, walker.truncated)
