"""Header blocks: where they end, their fields, unfolding (RFC 5322 sections 2.2 and 3.2.2).

Every step is one regular-expression pass or ``bytes.find`` loop over the block, with
possessive quantifiers so that no line is read twice: header splitting and
unfolding are linear in the block (a field folded into 300,000 continuation lines
took 15 s with the old ``fields[-1] += line`` splitter; it now takes 30 ms).

Line ends in a header block are CRLF, LF or a bare CR, as the SMTP front end's
normalization (``mailflow.normalize``) and the stdlib parser read them. A field is
a line ``name: value`` (RFC 5322 3.6.8: printable ASCII except ":" in the name)
followed by its continuation lines (starting with a blank). Values are what the
stdlib compat32 parser stores: the text after the colon with leading blanks
removed, continuation lines kept with their line ends, no final line end. Bytes
that are not UTF-8 are kept as surrogate escapes in :class:`Fields`; the text
accessors (:meth:`HeaderBlock.get_all` and friends) decode them by the charset
policy of :mod:`mailflow.mime.decode`, so their results can always be encoded.
"""

from __future__ import annotations

import re

from mailflow.mime.decode import header_text

_NAME = r"[\x21-\x39\x3b-\x7e]"  # RFC 5322 3.6.8 ftext
# The header block: lines that are a field, a continuation or an mbox "From " line.
_HEAD = re.compile(rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*+:|[ \t])[^\r\n]*+(?:\r\n|\r|\n|\Z))*+")
# One field: a name at a line start, its value and its continuation lines.
_FIELD = re.compile(
    rf"(?:^|(?<=[\r\n]))({_NAME}+):[ \t]*+([^\r\n]*+(?:(?:\r\n|\r|\n)[ \t][^\r\n]*+)*+)"
)
# The same for text whose every CR is followed by LF, run on "\n" + text: 2.5x as
# fast (a pattern starting with a literal is searched with memchr, and "[^\n]" is a
# one-character test); values keep a final CR, which field_pairs removes.
_FIELD_LF = re.compile(rf"\n({_NAME}+):[ \t]*+([^\n]*+(?:\n[ \t][^\n]*+)*+)")
# For a header block without bare CR: a line that is not a field, a continuation or
# an mbox "From " line (it ends the block; see head_end).
_NOT_A_HEADER_LINE = re.compile(rb"\n(?![ \t]|From |[\x21-\x39\x3b-\x7e]*+:)")
_HEADER_LINE = re.compile(rb"[ \t]|From |[\x21-\x39\x3b-\x7e]*+:")
# A header block of one to three CRLF fields in which every line is a field or a
# continuation: what the general path gives, in one call (part headers look so).
_ONE_FIELD = rf"({_NAME}+):[ \t]*+([^\r\n]*+(?:\r\n[ \t][^\r\n]*+)*+)\r\n"
_FEW_FIELDS = re.compile(f"{_ONE_FIELD}(?:{_ONE_FIELD}(?:{_ONE_FIELD})?)?")
# A field with its continuation lines and line ends, for header mutations.
_RAW_FIELD = re.compile(rb"[^\r\n]*+(?:\r\n|\r|\n)?(?:[ \t][^\r\n]*+(?:\r\n|\r|\n)?)*+")
_FOLD = re.compile(r"(?:\r\n|\r|\n)(?=[ \t])")
_FOLD_LF = re.compile(r"\n(?=[ \t])")
_BARE_CR = re.compile(rb"\r(?!\n)")


def block_text(block: bytes) -> str:
    """Header bytes as text: ASCII as it is, other bytes as UTF-8 (surrogate escapes)."""
    return block.decode("ascii") if block.isascii() else block.decode("utf-8", "surrogateescape")


class Fields:
    """The header fields of one entity, in order; names are compared without case.

    Values are raw (see the module docstring): use :func:`~mailflow.mime.decode_words`
    or :func:`~mailflow.mime.decode.header_text` for display and matching.
    """

    __slots__ = ("_pairs",)

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs  # (name as written, raw value)

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
    return Fields(field_pairs(block))


def field_pairs(block: bytes) -> list[tuple[str, str]]:
    """(name, raw value) of every field in the header block, in order."""
    text = block_text(block)
    few = _FEW_FIELDS.fullmatch(text)
    if few is not None:
        return few_pairs(few)
    crs = text.count("\r")
    if crs == 0:
        return _FIELD_LF.findall("\n" + text)
    if crs == text.count("\r\n"):  # CRLF line ends: strip the CR each value keeps
        return [(n, v[:-1] if v[-1:] == "\r" else v) for n, v in _FIELD_LF.findall("\n" + text)]
    return _FIELD.findall(text)


def few_pairs(match: re.Match[str]) -> list[tuple[str, str]]:
    """The pairs of a :data:`_FEW_FIELDS` match."""
    n1, v1, n2, v2, n3, v3 = match.groups()
    if n2 is None:
        return [(n1, v1)]
    if n3 is None:
        return [(n1, v1), (n2, v2)]
    return [(n1, v1), (n2, v2), (n3, v3)]


def match_few_fields(text: str) -> list[tuple[str, str]] | None:
    """The pairs of a block of one to three plain CRLF fields, else None."""
    few = _FEW_FIELDS.fullmatch(text)
    return None if few is None else few_pairs(few)


def read_head(src: bytes, start: int, end: int) -> tuple[list[tuple[str, str]], int]:
    """(header fields, body start) of the entity in src[start:end] (see head_end)."""
    if src.startswith(b"\r\n", start, end):
        return [], start + 2
    blank = src.find(b"\r\n\r\n", start, end)
    if blank >= 0:  # the usual part header: up to three CRLF fields, then a blank line
        few = _FEW_FIELDS.fullmatch(block_text(src[start : blank + 2]))
        if few is not None:
            return few_pairs(few), blank + 4
    head, body = head_end(src, start, end)
    return field_pairs(src[start:head]), body


def head_end(src: bytes, start: int, end: int) -> tuple[int, int]:
    """(end of the header block, start of the body) of the entity in src[start:end].

    The header block ends at the first blank line, or at the first line that is
    neither a header field nor a continuation (that line then starts the body).
    """
    head = _plain_head_end(src, start, end)
    if head < 0:  # a bare CR before the first blank line: the general pattern
        match = _HEAD.match(src, start, end)
        head = match.end() if match else start
    if src.startswith(b"\r\n", head, end):
        return head, head + 2
    if src.startswith((b"\n", b"\r"), head, end):
        return head, head + 1
    return head, head


def _plain_head_end(src: bytes, start: int, end: int) -> int:
    """Where the header block in src[start:end] ends, or -1 when a bare CR comes before
    its first blank line (then ``_HEAD`` decides). What ``_HEAD.match`` gives, with two
    C-level searches and one memchr-driven pattern instead of a match per line."""
    if src.startswith((b"\n", b"\r\n"), start, end):
        return start
    blank = src.find(b"\n\n", start, end)
    crlf = src.find(b"\n\r\n", start, blank + 2 if blank >= 0 else end)
    stop = (crlf if crlf >= 0 else blank) + 1 if (crlf >= 0 or blank >= 0) else end
    crs = src.count(b"\r", start, stop)
    if crs and crs != src.count(b"\r\n", start, stop):
        return -1
    if _HEADER_LINE.match(src, start, stop) is None:
        return start
    bad = _NOT_A_HEADER_LINE.search(src, start, stop)
    return bad.start() + 1 if bad is not None else stop


def split_entity(raw: bytes) -> tuple[bytes, bytes]:
    """(header block, body) of a message or part; the blank line belongs to neither."""
    head, body = head_end(raw, 0, len(raw))
    return raw[:head], raw[body:]


def split_header_fields(head: bytes) -> list[bytes]:
    """Split a header block into fields, each with its continuation lines and line ends.

    Every line is kept (a line that is not a field stays a field of its own, and
    the lines folded under it stay with it), so joining the result gives ``head``
    back. One regular-expression pass: linear in the block.
    """
    return [field for field in _RAW_FIELD.findall(head) if field]


def unfold(value: str) -> str:
    """RFC 5322 2.2.3: a line break followed by a blank is removed (the blank stays)."""
    if "\n" not in value and "\r" not in value:
        return value
    return _FOLD.sub("", value)


def value_end(block: bytes, start: int) -> int:
    """Where the field whose value starts at ``start`` ends (after its last line end)."""
    while True:
        nl = block.find(b"\n", start)
        if nl < 0:
            return len(block)
        start = nl + 1
        if block[start : start + 1] not in (b" ", b"\t"):
            return start


def _strip_line_end(value: bytes) -> bytes:
    """A value without its final line end (CRLF or LF)."""
    if value.endswith(b"\n"):
        value = value[:-2] if value.endswith(b"\r\n") else value[:-1]
    return value


class HeaderBlock:
    """The top-level header block of one message version, read on demand.

    ``block`` is the header block as cut by :func:`head_end` and ``body_start`` where
    the body begins. Values are looked up per name with ``bytes.find`` on the
    lower-cased block (one C scan a name, the cheapest for a few names) while the
    block has no bare CR; otherwise, and once :meth:`index` was asked for (the
    cheapest for many names), from all fields read once with :func:`field_pairs`.
    Both give the same values.
    """

    __slots__ = (
        "_content",
        "_fields",
        "_index",
        "_lower",
        "_plain",
        "_values",
        "block",
        "body_start",
        "raw",
    )

    def __init__(self, raw: bytes) -> None:
        head, self.body_start = head_end(raw, 0, len(raw))
        self.raw = raw
        self.block = raw[:head]
        self._lower: bytes | None = None
        self._plain: bool | None = None
        self._fields: Fields | None = None
        self._index: dict[str, list[str]] | None = None
        self._content: bytes | None = None
        self._values: dict[str, list[str]] = {}

    # --- raw access ---------------------------------------------------------------------

    @property
    def lower(self) -> bytes:
        """The block lower-cased, after a newline (so every field follows one)."""
        if self._lower is None:
            self._lower = b"\n" + self.block.lower()
        return self._lower

    @property
    def plain(self) -> bool:
        """No bare CR in the block: every line starts after an LF."""
        if self._plain is None:
            self._plain = _BARE_CR.search(self.block) is None
        return self._plain

    def fields(self) -> Fields:
        """Every field of the block (raw values), read once."""
        if self._fields is None:
            self._fields = Fields(field_pairs(self.block))
        return self._fields

    def index(self) -> dict[str, list[str]]:
        """{lower-case name: raw values} of every field (built once; later lookups of
        any name use it)."""
        if self._index is None:
            index: dict[str, list[str]] = {}
            for name, value in self.fields()._pairs:
                key = name.lower()
                values = index.get(key)
                if values is None:
                    index[key] = [value]
                else:
                    values.append(value)
            self._index = index
        return self._index

    def unfolded_index(self) -> dict[str, list[str]]:
        """{lower-case name: raw values unfolded (RFC 5322 2.2.3), without leading
        blanks} of every field: the block is unfolded once and read with one pattern
        (for readers of many fields)."""
        if not self.plain:
            return {k: [unfold(v).lstrip(" \t") for v in vs] for k, vs in self.index().items()}
        # Every CR is in a CRLF here: LF line ends make both patterns start with a
        # literal "\n" (searched with memchr), 5x as fast as "(?:\r\n|\r|\n)".
        text = block_text(self.block)
        if "\r" in text:  # a one-character test is a memchr; replace always scans
            text = text.replace("\r\n", "\n")
        if "\n " in text or "\n\t" in text:
            text = _FOLD_LF.sub("", text)
        index: dict[str, list[str]] = {}
        for name, value in _FIELD_LF.findall("\n" + text):
            key = name.lower()
            values = index.get(key)
            if values is None:
                index[key] = [value]
            else:
                values.append(value)
        return index

    def raw_values(self, name: str) -> list[str]:
        """Raw values (surrogate escapes for bytes that are not UTF-8) of ``name``."""
        if self._index is not None:
            return list(self._index.get(name.lower(), ()))
        if not self.plain or not name.isascii():
            return self.fields().get_all(name)
        key = b"\n" + name.lower().encode("ascii") + b":"
        lower, block = self.lower, self.block
        out: list[str] = []
        pos = lower.find(key)
        while pos >= 0:
            start = pos + len(key) - 1  # self.lower is one byte ahead of self.block
            value = _strip_line_end(block[start : value_end(block, start)].lstrip(b" \t"))
            out.append(block_text(value))
            pos = lower.find(key, pos + 1)
        return out

    # --- text access (what plugins and rules read) --------------------------------------

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name`` as text (compat32 layout: continuation lines kept;
        8-bit bytes decoded by the charset policy; no RFC 2047 decoding); cached."""
        found = self._values.get(name)
        if found is None:
            found = [header_text(v) for v in self.raw_values(name)]
            self._values[name] = found
        return list(found)

    def first(self, name: str) -> str | None:
        """The first value of ``name`` as text, None when absent."""
        values = self.get_all(name)
        return values[0] if values else None

    def get(self, name: str, default: str = "") -> str:
        """The first value of ``name`` as text (``default`` when absent)."""
        value = self.first(name)
        return default if value is None else value

    def names(self) -> list[str]:
        """Every field's name as written, in order, duplicates included."""
        return [name for name, _ in self.fields().items()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.get_all(name))

    def count(self, name: str) -> int:
        """How many fields are called ``name`` (one C-level count for a plain block)."""
        if not self.plain or not name.isascii():
            return len(self.fields().get_all(name))
        return self.lower.count(b"\n" + name.lower().encode("ascii") + b":")

    def content_block(self) -> bytes:
        """The Content-* fields as written: all the body's structure depends on."""
        if self._content is None:
            if not self.plain:
                lines = [
                    f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")
                    for name, value in self.fields().items()
                    if name.lower().startswith("content-")
                ]
                self._content = b"".join(lines)
                return self._content
            lower = self.lower
            pieces: list[bytes] = []
            pos = lower.find(b"\ncontent-")
            while pos >= 0:  # pos is where the field starts in self.block
                end = value_end(self.block, pos)
                pieces.append(self.block[pos:end])
                pos = lower.find(b"\ncontent-", end)
            self._content = b"".join(pieces)
        return self._content
