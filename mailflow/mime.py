"""The MIME structure of a message for plugins: leaf parts, file names, readable text.

A small, forgiving walker instead of the stdlib ``email`` tree (which costs ~0.2 ms
per typical message): boundaries are found with ``bytes.find``, each part keeps
offsets into the message bytes, and parameters, transfer decoding and charset
decoding happen only for what is asked for, at most once.

* :func:`parse` walks raw bytes into a :class:`Structure` (pure; for any caller).
* :func:`structure` does the same for a :class:`MessageContext`, cached in
  ``ctx.extra`` and keyed on the body bytes and the top-level ``Content-*`` fields,
  so header changes by earlier plugins (``X-Spam-*``, ``Received``) do not cause a
  second walk.
* :func:`parts` and :func:`body_text`: the leaf parts, and the readable text of the
  body (text/plain and text/html parts that are not attachments).
* :func:`header_values`: a top-level header's values, as ``ctx.headers.get_all``
  gives them, without building a ``Message`` for the common case.

What a leaf's header block says (type, disposition, names) is remembered across
messages for the last 1,024 distinct blocks: mail from one program repeats the same
part headers; multipart headers, with their unique boundaries, are not kept.

Nothing here raises on malformed input: broken base64 or quoted-printable decode to
what can be salvaged, unknown charsets fall back to UTF-8 with replacement
characters, a multipart whose boundary is missing is one leaf, bare LF line ends
are accepted. Work is bounded: at most :data:`MAX_PARTS` parts and
:data:`MAX_DEPTH` levels of nesting are walked. Past a limit the rest is kept as
*opaque* parts (``Part.opaque``, counted as attachments, never decoded) and
``Structure.truncated`` is set, so a rule can refuse what it could not inspect
(``mime_truncated: true``) instead of missing an attachment hidden past the limit.

What differs from the stdlib tree (on purpose): file names have RFC 2047 encoded
words decoded and raw 8-bit names read as UTF-8; every name a part carries
(``filename``, ``filename*``, ``name``, ``name*``) is in ``Part.filenames`` for
matching; message/* parts sent base64 or quoted-printable encoded are decoded
before their inner parts are walked; message/delivery-status is one leaf; a bare CR
is not a line break.
"""

from __future__ import annotations

import binascii
import codecs
import html
import re
import urllib.parse
from typing import TYPE_CHECKING

from mailflow.message import MessageContext

if TYPE_CHECKING:
    from email.message import Message

MAX_TEXT_CHARS = 1_000_000  # decoded text kept per message; rules look at no more
MAX_PARTS = 1000  # MIME parts walked per message, multipart containers included
MAX_DEPTH = 30  # nesting levels walked (multipart and message/* containers)
OPAQUE_TYPE = "application/octet-stream"  # content type of the unwalked rest

_HEAD = re.compile(rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*+:|[ \t])[^\n]*+(?:\n|\Z))*+")
_DELIM_TAIL = re.compile(rb"(--)?[ \t]*(?:\r\n|\n|\r|\Z)")
_SEGMENT = re.compile(r'((?:"(?:\\.|[^"\\])*(?:"|\Z)|[^;"])*)(?:;|\Z)', re.DOTALL)
_RFC2231 = re.compile(r"(\w+)\*(?:(\d+)\*?)?", re.ASCII)
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"\?=[ \t\r\n]+=\?")
_BASE64_JUNK = re.compile(rb"[^A-Za-z0-9+/]+")
_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.IGNORECASE | re.DOTALL)
_RAW_OPEN = re.compile(r"<(script|style)\b", re.IGNORECASE)
_RAW_CLOSE = re.compile(r"</(script|style)\s*>", re.IGNORECASE)
_TAG_ONLY = re.compile(r"<[^>]*>")
_RAW_STARTS = ("<s", "<S", "<\u017f")
_OTHER_SPACE = ("\t", "\r", "\f", "\v")
_SPACES = re.compile("  +")  # a literal prefix: 5x faster than " {2,}"
# One plain parameter (no RFC 2231 star, no escapes, no ";" or "<" in its value): what
# the general parser below gives, found in one call.
_ONE_PARAM = re.compile(r'[^;]*;\s*([\w.-]+)\s*=\s*(?:"([^"\\;]*)"|([^"\\;\s<*]*))\s*')
# A header block of one to three CRLF fields in which every line is a field or a
# continuation: what the general path gives, in one call.
_ONE_FIELD = r"([\x21-\x39\x3b-\x7e]+):[ \t]*+([^\r\n]*+(?:\r\n[ \t][^\r\n]*+)*+)\r\n"
_FEW_FIELDS = re.compile(f"{_ONE_FIELD}(?:{_ONE_FIELD}(?:{_ONE_FIELD})?)?")
_FIELD = re.compile(
    r"^([\x21-\x39\x3b-\x7e]+):[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.MULTILINE
)


# --- header fields ----------------------------------------------------------------------


class Fields:
    """The header fields of one entity, in order; names are compared without case.

    Values are what the compat32 parser stores: the text after the colon with
    leading blanks removed, continuation lines kept (with their line ends), no
    final line end. Bytes that are not UTF-8 are kept as surrogate escapes.
    """

    __slots__ = ("_pairs",)

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs  # (name as written, value)

    def first(self, name: str) -> str | None:
        """The first value of ``name``, None when absent."""
        key = name.lower()
        size = len(key)
        for field, value in self._pairs:
            if len(field) == size and field.lower() == key:
                return value
        return None

    def get(self, name: str, default: str = "") -> str:
        """The first value of ``name`` (``default`` when absent)."""
        value = self.first(name)
        return default if value is None else value

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        key = name.lower()
        return [value for field, value in self._pairs if field.lower() == key]

    def items(self) -> list[tuple[str, str]]:
        """(name, value) pairs, names as written."""
        return list(self._pairs)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.first(name) is not None

    def __len__(self) -> int:
        return len(self._pairs)

    def __repr__(self) -> str:
        return f"Fields({self._pairs!r})"


def parse_fields(block: bytes) -> Fields:
    """Header block (as cut by :func:`split_entity`) -> :class:`Fields`.

    Lines that are neither a field nor a continuation ("From " envelope lines, a
    line starting with a colon) are skipped, and so are continuations following
    them, as the compat32 parser does.
    """
    return Fields(_pairs(block))


def _text(block: bytes) -> str:
    """Header bytes as text: ASCII as it is, other bytes as UTF-8 (surrogate escapes)."""
    return block.decode("ascii") if block.isascii() else block.decode("utf-8", "surrogateescape")


def _pairs(block: bytes) -> list[tuple[str, str]]:
    text = _text(block)
    few = _FEW_FIELDS.fullmatch(text)
    if few is not None:
        return _few_pairs(few)
    return _FIELD.findall(text)


def _few_pairs(match: re.Match[str]) -> list[tuple[str, str]]:
    n1, v1, n2, v2, n3, v3 = match.groups()
    if n2 is None:
        return [(n1, v1)]
    if n3 is None:
        return [(n1, v1), (n2, v2)]
    return [(n1, v1), (n2, v2), (n3, v3)]


def _read_head(src: bytes, start: int, end: int) -> tuple[list[tuple[str, str]], int]:
    """(header fields, body start) of the entity in src[start:end] (see _head_end)."""
    if src.startswith(b"\r\n", start, end):
        return [], start + 2
    blank = src.find(b"\r\n\r\n", start, end)
    if blank >= 0:  # the usual part header: up to three CRLF fields, then a blank line
        block = src[start : blank + 2]
        text = _text(block)
        few = _FEW_FIELDS.fullmatch(text)
        if few is not None:
            return _few_pairs(few), blank + 4
    head, body = _head_end(src, start, end)
    return _pairs(src[start:head]), body


def _head_end(src: bytes, start: int, end: int) -> tuple[int, int]:
    """(end of the header block, start of the body) of the entity in src[start:end].

    The header block ends at the first blank line, or at the first line that is
    neither a header field nor a continuation (that line then starts the body).
    """
    match = _HEAD.match(src, start, end)
    head = match.end() if match else start
    if src.startswith(b"\r\n", head, end):
        return head, head + 2
    if src.startswith(b"\n", head, end):
        return head, head + 1
    return head, head


def split_entity(raw: bytes) -> tuple[bytes, bytes]:
    """(header block, body) of a message or part; the blank line belongs to neither."""
    head, body = _head_end(raw, 0, len(raw))
    return raw[:head], raw[body:]


# --- parameters and file names ----------------------------------------------------------


def unquote(value: str) -> str:
    """A parameter value without its quotes (and backslash escapes), as the stdlib does."""
    if len(value) > 1:
        if value[0] == '"' and value[-1] == '"':
            value = value[1:-1]
            return value.replace("\\\\", "\\").replace('\\"', '"') if "\\" in value else value
        if value[0] == "<" and value[-1] == ">":
            return value[1:-1]
    return value


def parse_params(value: str) -> dict[str, str]:
    """Parameters of a Content-Type / Content-Disposition value: lower-case names,
    values unquoted, RFC 2231 continuations joined and their charsets decoded.

    The first occurrence of a name wins, plain (``name=``) before extended
    (``name*=``), as ``Message.get_param`` has it; see :func:`param_values` for all.
    """
    one = _ONE_PARAM.fullmatch(value)
    if one is not None:  # the common case, in one regular expression call
        quoted = one.group(2)
        return {one.group(1).lower(): one.group(3) if quoted is None else quoted}
    params: dict[str, str] = {}
    for key, val in _raw_params(value):
        params.setdefault(key, val)
    return params


def param_values(value: str, name: str) -> list[str]:
    """Every value of parameter ``name`` (plain and RFC 2231 extended), in that order."""
    one = _ONE_PARAM.fullmatch(value)
    if one is not None:
        if one.group(1).lower() != name:
            return []
        quoted = one.group(2)
        return [one.group(3) if quoted is None else quoted]
    return [val for key, val in _raw_params(value) if key == name]


def _raw_params(value: str) -> list[tuple[str, str]]:
    if ";" not in value:
        return []
    segments = value.split(";")
    if '"' in value and ("\\" in value or any(seg.count('"') % 2 for seg in segments)):
        segments = _SEGMENT.findall(value)  # a quoted value holds a ";" (or an escape)
    plain: list[tuple[str, str]] = []
    extended: dict[str, list[tuple[int, str, bool]]] = {}
    for segment in segments[1:]:
        key, _, val = segment.partition("=")
        key = key.strip().lower()
        if not key:
            continue
        val = val.strip()
        if val[:1] in ('"', "<"):
            val = unquote(val)
        star = _RFC2231.fullmatch(key) if "*" in key else None
        if star is None:
            plain.append((key, val))
        else:
            number = int(star.group(2)) if star.group(2) else 0
            extended.setdefault(star.group(1), []).append((number, val, key.endswith("*")))
    for key, pieces in extended.items():
        plain.append((key, _join_rfc2231(pieces)))
    return plain


def _join_rfc2231(pieces: list[tuple[int, str, bool]]) -> str:
    """RFC 2231 sections 3-4: join continuations; percent-decode the encoded ones and
    decode the result in the charset named before the first two apostrophes."""
    pieces.sort(key=lambda p: p[0])
    if not any(encoded for _, _, encoded in pieces):
        return "".join(val for _, val, _ in pieces)
    data = b"".join(
        urllib.parse.unquote_to_bytes(val) if encoded else val.encode("utf-8", "surrogateescape")
        for _, val, encoded in pieces
    )
    charset = ""
    fields = data.split(b"'", 2)
    if len(fields) == 3:
        charset = fields[0].decode("ascii", "replace")
        data = fields[2]
    return decode_charset(data, charset)


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words (``=?charset?B?...?=``); other text is kept.

    Whitespace between two adjacent encoded words is dropped (RFC 2047 section 6.2).
    Malformed words stay as they are.
    """
    if "=?" not in value:
        return value
    value = _BETWEEN_WORDS.sub("?==?", value)
    return _ENCODED_WORD.sub(_decode_word, value)


def _decode_word(match: re.Match[str]) -> str:
    charset = match.group(1).split("*", 1)[0]  # RFC 2231 section 5: charset*language
    data = match.group(3).encode("ascii", "replace")
    base64 = match.group(2) in "bB"
    raw = decode_base64(data) if base64 else binascii.a2b_qp(data, header=True)
    return decode_charset(raw, charset)


def _clean(text: str) -> str:
    """Text for display and matching: surrogate escapes (invalid UTF-8) become U+FFFD."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# --- decoding ---------------------------------------------------------------------------


def decode_base64(data: bytes) -> bytes:
    """Base64 -> bytes, ignoring characters outside the alphabet and fixing padding;
    a truncated last group is dropped rather than failing."""
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        pass
    clean = _BASE64_JUNK.sub(b"", data.split(b"=", 1)[0])
    clean = clean[: len(clean) - len(clean) % 4] if len(clean) % 4 == 1 else clean
    try:
        return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - clean input cannot fail
        return b""


def decode_uu(data: bytes) -> bytes:
    """uuencoded data between ``begin`` and ``end`` lines; undecodable lines are skipped."""
    out: list[bytes] = []
    started = False
    for line in data.splitlines():
        if not started:
            started = line.startswith(b"begin ")
            continue
        if line.strip() == b"end":
            break
        if not line:
            continue
        try:
            out.append(binascii.a2b_uu(line))
        except (binascii.Error, ValueError):
            try:  # broken encoders pad lines: decode what the length byte announces
                out.append(binascii.a2b_uu(line[: (((line[0] - 32) & 63) * 4 + 5) // 3]))
            except (binascii.Error, ValueError):
                continue
    return b"".join(out) if started else data


def decode_transfer(data: bytes, encoding: str) -> bytes:
    """Undo a Content-Transfer-Encoding (base64, quoted-printable, uuencode); other
    encodings (7bit, 8bit, binary, unknown) are returned as they are."""
    encoding = encoding.strip().lower()
    if encoding == "base64":
        return decode_base64(data)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(data)
    if encoding in ("x-uuencode", "uuencode", "uue", "x-uue"):
        return decode_uu(data)
    return data


_CODECS: dict[str, str] = {}


def _codec(charset: str) -> str:
    """A Python codec for a MIME charset name; unknown ones (and "") map to UTF-8."""
    known = _CODECS.get(charset)
    if known is None:
        name = charset.strip().strip('"').lower()
        try:
            info = codecs.lookup(name)
            known = name if getattr(info, "_is_text_encoding", True) else "utf-8"
        except (LookupError, ValueError):
            known = "utf-8"
        if len(_CODECS) < 256:
            _CODECS[charset] = known
    return known


def decode_charset(data: bytes, charset: str) -> str:
    """Bytes -> text in ``charset``; bytes that do not fit become U+FFFD; never raises."""
    try:
        return data.decode(_codec(charset), "replace")
    except Exception:  # exotic codecs raise their own errors on garbage
        return data.decode("utf-8", "replace")


# --- readable text ----------------------------------------------------------------------


def decode_part(part: Message) -> str:
    """The text of one stdlib ``email`` leaf part (for plugins that walk ``ctx.message``
    themselves): transfer encoding and charset undone, HTML converted to text."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    text = decode_charset(payload, part.get_content_charset() or "")
    return html_to_text(text) if part.get_content_type() == "text/html" else text


def html_to_text(markup: str) -> str:
    """Good-enough HTML to text for matching: drop tags, scripts, styles; unescape;
    runs of blanks (space, tab, CR, FF, VT) become one space.

    Linear in the input: unclosed ``<``, ``<script`` and ``<style`` cannot make the
    tag pattern rescan the rest of the text for every occurrence.
    """
    if "<" in markup:
        markup = _strip_tags(markup)
    if "&" in markup:
        markup = html.unescape(markup)
    return collapse_blanks(markup)


def collapse_blanks(text: str) -> str:
    """Each run of space, tab, CR, FF and VT -> one space (newlines are kept)."""
    for char in _OTHER_SPACE:  # one-character replace is a memchr loop: fast
        if char in text:
            text = text.replace(char, " ")
    return _SPACES.sub(" ", text) if "  " in text else text


def _strip_tags(markup: str) -> str:
    # Nothing after the last ">" can be part of a tag (every tag ends with one).
    last = markup.rfind(">")
    if last < 0:
        return markup
    head, tail = markup[: last + 1], markup[last + 1 :]
    # "<s" with s, S or U+017F (which IGNORECASE matches to s) can start <script or
    # <style; without one, two-character searches rule both out faster than the regex.
    if not any(opening in head for opening in _RAW_STARTS) or _RAW_OPEN.search(head) is None:
        return _TAG_ONLY.sub(" ", head) + tail
    if _every_raw_block_closes(head):
        return _TAG.sub(" ", head) + tail
    return _strip_tags_slowly(head) + tail


def _every_raw_block_closes(markup: str) -> bool:
    """True when each <script>/<style> opening has a closing tag after it (then the
    lazy ``.*?`` of the tag pattern never scans to the end of the text in vain)."""
    last_close: dict[str, int] = {}
    for m in _RAW_CLOSE.finditer(markup):
        last_close[m.group(1).lower()] = m.start()
    last_open: dict[str, int] = {}
    for m in _RAW_OPEN.finditer(markup):
        last_open[m.group(1).lower()] = m.end()
    return all(last_close.get(name, -1) >= pos for name, pos in last_open.items())


def _strip_tags_slowly(markup: str) -> str:
    """What ``_TAG.sub(" ", markup)`` gives, for markup with unclosed script/style
    blocks, in linear time: a block whose closing tag is missing is a plain tag."""
    out: list[str] = []
    pos = 0
    unclosed: set[str] = set()  # names with no closing tag after the current position
    while True:
        lt = markup.find("<", pos)
        if lt < 0:
            break
        out.append(markup[pos:lt])
        opening = _RAW_OPEN.match(markup, lt)
        if opening is not None and opening.group(1).lower() not in unclosed:
            name = opening.group(1).lower()
            closing = re.compile(rf"</{name}\s*>", re.IGNORECASE).search(markup, opening.end())
            if closing is not None:
                out.append(" ")
                pos = closing.end()
                continue
            unclosed.add(name)
        gt = markup.find(">", lt)
        if gt < 0:  # pragma: no cover - callers cut the text after its last ">"
            out.append(markup[lt:])
            return "".join(out)
        out.append(" ")
        pos = gt + 1
    out.append(markup[pos:])
    return "".join(out)


# --- parts ------------------------------------------------------------------------------


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
        self.cte = cte or ""
        self.disposition = disposition.split(";", 1)[0].strip().lower() if disposition else ""
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
        if self._params is None:
            self._params = parse_params(self.ctype_value)
        return self._params

    @property
    def charset(self) -> str:
        if self._charset is None:
            found = ""
            if "charset" in self.ctype_value.lower():
                found = _clean(self.params.get("charset", "")).strip().lower()
            self._charset = found
        return self._charset


# Leaf header blocks seen lately -> what they say. Mail from one program repeats the
# same part headers ("Content-Type: text/plain; charset=utf-8" ...) over and over;
# multipart headers (unique boundaries) are never kept.
_PART_HEADS: dict[bytes, _PartHead] = {}
_PART_HEADS_MAX = 1024


class Part:
    """One leaf MIME part: its headers, type, file name and (on demand) decoded content.

    ``content_type`` is lower-case ``type/subtype`` (text/plain when missing or
    invalid, message/rfc822 inside multipart/digest); ``disposition`` is the
    lower-case Content-Disposition type or ""; ``filename`` the part's file name
    (Content-Disposition ``filename`` first, then Content-Type ``name``) and
    ``filenames`` every distinct name it carries; ``size`` the encoded size in
    bytes; ``is_attachment``: disposition attachment or a file name (or opaque).
    ``opaque`` parts are the unwalked rest past a limit: never decoded. For the
    message itself (a single-part message seen through :func:`structure`),
    ``fields`` holds only its Content-* fields.
    """

    __slots__ = (
        "_end",
        "_head",
        "_payload",
        "_src",
        "_start",
        "_text",
        "content_type",
        "depth",
        "disposition",
        "fields",
        "filename",
        "filenames",
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
    ) -> None:
        head = fields if isinstance(fields, _PartHead) else _PartHead(fields, content_type)
        self._head = head
        self.fields = head.fields
        self.content_type = content_type
        self.disposition = head.disposition
        self.filename = head.filename
        self.filenames = head.filenames
        self.is_attachment = opaque or head.attachment
        self.depth = depth
        self.opaque = opaque
        self.size = end - start
        self._src = src
        self._start = start
        self._end = end
        self._payload: bytes | None = None
        self._text: str | None = None

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
        """The body decoded to text in its charset (UTF-8 when none or unknown; cached)."""
        if self._text is None:
            self._text = decode_charset(self.payload(), self._head.charset)
        return self._text

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
            name = _clean(raw).strip()
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
                text = part.text()
                if part.content_type == "text/html":
                    text = html_to_text(text)
                chunks.append(text)
                total += len(text)
                if total >= MAX_TEXT_CHARS:
                    break
            self._body_text = "\n".join(chunks)[:MAX_TEXT_CHARS]
        return self._body_text


class _Walker:
    """Walks one message into its leaf parts, within MAX_PARTS and MAX_DEPTH."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.seen = 0  # parts walked, containers included
        self.truncated = False

    def entity(self, src: bytes, start: int, end: int, default_type: str, depth: int) -> None:
        """An entity with its own header block in src[start:end]."""
        blank = src.find(b"\r\n\r\n", start, end)
        if blank > start:  # the usual part: CRLF header fields, then a blank line
            key = src[start:blank]
            known = _PART_HEADS.get(key)
            if known is not None:
                self.seen += 1
                self.parts.append(Part(known, known.content_type, src, blank + 4, end, depth))
                return
            few = _FEW_FIELDS.fullmatch(_text(src[start : blank + 2]))
            if few is not None:
                self.body(Fields(_few_pairs(few)), src, blank + 4, end, default_type, depth, key)
                return
        pairs, body = _read_head(src, start, end)
        self.body(Fields(pairs), src, body, end, default_type, depth)

    def body(
        self,
        fields: Fields,
        src: bytes,
        start: int,
        end: int,
        default_type: str,
        depth: int,
        key: bytes | None = None,
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
            if ctype.count("/") != 1:
                ctype = "text/plain"
        descend = depth < MAX_DEPTH
        if ctype.startswith("multipart/"):
            boundary = parse_params(ctype_value or "").get("boundary", "").rstrip()
            if boundary and descend:
                inner = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
                if self.multipart(src, start, end, boundary, inner, depth):
                    return
            key = None
        elif ctype.startswith("message/"):
            if ctype != "message/delivery-status" and descend and self.seen < MAX_PARTS:
                encoding = (values[2] or "").strip().lower()
                if encoding in ("base64", "quoted-printable"):
                    inner_src = decode_transfer(src[start:end], encoding)
                    self.entity(inner_src, 0, len(inner_src), "text/plain", depth + 1)
                else:
                    self.entity(src, start, end, "text/plain", depth + 1)
                return
            key = None
        opaque = ctype.startswith(("multipart/", "message/")) and (
            not descend or self.seen >= MAX_PARTS
        )
        self.truncated = self.truncated or opaque
        head = _PartHead(fields, ctype, values)
        if key is not None:
            if len(_PART_HEADS) >= _PART_HEADS_MAX:
                _PART_HEADS.clear()
            _PART_HEADS[key] = head
        self.parts.append(Part(head, ctype, src, start, end, depth, opaque))

    def multipart(
        self, src: bytes, start: int, end: int, boundary: str, inner: str, depth: int
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
            self.entity(src, part_start, part_end, inner, depth + 1)
        if rest >= 0:
            self.truncated = True
            self.parts.append(Part(Fields([]), OPAQUE_TYPE, src, rest, end, depth + 1, True))
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
    walker = _Walker()
    walker.entity(raw, 0, len(raw), "text/plain", 0)
    return Structure(walker.parts, walker.truncated)


def parse_body(fields: Fields, src: bytes, start: int = 0, end: int | None = None) -> Structure:
    """Walk a body (src[start:end]) whose top-level header fields are ``fields``."""
    walker = _Walker()
    walker.body(fields, src, start, len(src) if end is None else end, "text/plain", 0)
    return Structure(walker.parts, walker.truncated)


# --- per-message cache ------------------------------------------------------------------

_HEAD_KEY = "mime.head"
_BARE_CR = re.compile(rb"\r(?!\n)")
_STRUCTURE_KEY = "mime.structure"


class _Head:
    """The top-level header block of one version of the message."""

    __slots__ = ("_clean", "_content", "_lower", "_values", "block", "body_start", "raw")

    def __init__(self, raw: bytes) -> None:
        head, self.body_start = _head_end(raw, 0, len(raw))
        self.raw = raw
        self.block = raw[:head]
        self._lower: bytes | None = None
        self._clean: bool | None = None
        self._content: bytes | None = None
        self._values: dict[str, list[str] | None] = {}

    @property
    def lower(self) -> bytes:
        """The block lower-cased, after a newline (so every field follows one)."""
        if self._lower is None:
            self._lower = b"\n" + self.block.lower()
        return self._lower

    @property
    def clean(self) -> bool:
        """No bare CR (compat32 would split lines there): fields can be read directly."""
        if self._clean is None:
            self._clean = _BARE_CR.search(self.block) is None
        return self._clean

    def _field_end(self, start: int) -> int:
        """Where the field containing ``start`` ends (continuation lines included)."""
        block = self.block
        while True:
            nl = block.find(b"\n", start)
            if nl < 0:
                return len(block)
            start = nl + 1
            if block[start : start + 1] not in (b" ", b"\t"):
                return start

    def values(self, name: str) -> list[bytes]:
        """Raw values of the fields called ``name`` (any case), as compat32 stores them."""
        key = b"\n" + name.lower().encode("ascii", "replace") + b":"
        lower = self.lower
        out: list[bytes] = []
        pos = lower.find(key)
        while pos >= 0:
            start = pos + len(key) - 1  # self.lower is one byte ahead of self.block
            value = self.block[start : self._field_end(start)]
            out.append(value.lstrip(b" \t").rstrip(b"\r\n"))
            pos = lower.find(key, pos + 1)
        return out

    def text_values(self, name: str) -> list[str] | None:
        """The values of ``name`` as compat32 gives them, or None when they cannot be
        read directly (bare CR in the block, non-ASCII name or values); cached."""
        if name in self._values:
            return self._values[name]
        found: list[str] | None = None
        if name.isascii() and self.clean:
            raw = self.values(name)
            if all(v.isascii() for v in raw):
                found = [v.decode("ascii") for v in raw]
        self._values[name] = found
        return found

    def content_block(self) -> bytes:
        """The Content-* fields as written: all the body's structure depends on."""
        if self._content is None:
            lower = self.lower
            pieces: list[bytes] = []
            pos = lower.find(b"\ncontent-")
            while pos >= 0:  # pos is where the field starts in self.block
                end = self._field_end(pos)
                pieces.append(self.block[pos:end])
                pos = lower.find(b"\ncontent-", end)
            self._content = b"".join(pieces)
        return self._content


def _head(ctx: MessageContext) -> _Head:
    raw = ctx.raw
    cached = ctx.extra.get(_HEAD_KEY)
    if isinstance(cached, _Head) and cached.raw is raw:
        return cached
    head = _Head(raw)
    ctx.extra[_HEAD_KEY] = head
    return head


def header_values(ctx: MessageContext, name: str) -> list[str]:
    """Every value of the top-level header ``name``, as ``str`` of what
    ``ctx.headers.get_all(name)`` gives (compat32: continuation lines kept).

    Read straight from the header block when it is plain (ASCII values, CRLF or LF
    line ends); anything else is left to ``ctx.headers``.
    """
    found = _head(ctx).text_values(name)
    if found is not None:
        return list(found)
    return [str(v) for v in ctx.headers.get_all(name, [])]


def structure(ctx: MessageContext) -> Structure:
    """The message's :class:`Structure`, walked at most once per body.

    Cached in ``ctx.extra``; a new version of the message (after a mutation) reuses
    it when the body bytes and the top-level Content-* fields are unchanged, so
    headers added by earlier plugins cost no second walk.
    """
    head = _head(ctx)
    cached = ctx.extra.get(_STRUCTURE_KEY)
    if isinstance(cached, _Cached):
        if cached.head is head:
            return cached.structure
        if cached.same_body(head):
            cached.head = head
            return cached.structure
    content = head.content_block()
    result = parse_body(parse_fields(content), head.raw, head.body_start)
    ctx.extra[_STRUCTURE_KEY] = _Cached(head, content, result)
    return result


class _Cached:
    __slots__ = ("content", "head", "structure")

    def __init__(self, head: _Head, content: bytes, structure: Structure) -> None:
        self.head, self.content, self.structure = head, content, structure

    def same_body(self, head: _Head) -> bool:
        old = self.head
        if len(head.raw) - head.body_start != len(old.raw) - old.body_start:
            return False
        if head.content_block() != self.content:
            return False
        return head.raw.endswith(memoryview(old.raw)[old.body_start :])


def parts(ctx: MessageContext) -> list[Part]:
    """Every leaf part with its type, file name, size and whether it is an attachment."""
    return structure(ctx).parts


def body_text(ctx: MessageContext) -> str:
    """All text/plain and text/html parts that are not attachments, decoded."""
    return structure(ctx).body_text()
