"""Bytes to text: transfer encodings, the one charset policy, RFC 2047 encoded words.

**The charset policy** (every part body, RFC 2047 word, RFC 2231 parameter and raw
8-bit header byte goes through :func:`decode_charset`):

1. The declared charset, when Python has a codec for it and the bytes decode in it.
   ``iso-8859-1``/``latin-1`` are read as Windows-1252, a superset whose extra
   characters (curly quotes, dashes, the euro sign) are what 0x80-0x9F mean in
   mail labelled Latin-1 (the WHATWG Encoding Standard does the same for the web).
2. Otherwise, if the bytes are valid UTF-8: UTF-8. This covers no charset, an
   unknown one, ``us-ascii`` (which cannot describe 8-bit bytes at all) and mail
   whose declared charset does not fit its bytes.
3. Otherwise: a declared charset that Python knows (it did not fit every byte)
   decodes with U+FFFD for the bytes that do not fit; anything else is read as
   UTF-8 where it is valid and each invalid byte sequence as Windows-1252 (bytes
   Windows-1252 leaves undefined as the Latin-1 control characters).

Cost: decoding is done by C codecs. Repairing an invalid sequence in mixed text is
a Python call (~1.5 us), so a codec error handler repairs sparse mixes only (at most
one 8-bit byte in :data:`REPAIR_DENSITY`); denser mixes are decoded with surrogate
escapes that one ``str.translate`` maps to Windows-1252 (~0.06 us a character),
whichever costs less. Above :data:`MAX_MIXED_BYTES` a mix needing more than
:data:`MAX_REPAIRS` repairs is read as Windows-1252 entirely (one C call), so
every path is linear, at most ~0.06 us a byte and ~60 ms a text.

Why not UTF-8 with U+FFFD for undeclared 8-bit text: mislabelled or unlabelled
8-bit mail is common, and it is Windows-1252/Latin-1: in the SpamAssassin corpus,
188 of the 644 readable text parts with 8-bit bytes (183 of 6,046 messages)
declare no charset, us-ascii or one Python does not know, and not one of them is
valid UTF-8. Replacement would turn "café" into "caf\\ufffd", a different word
for the spam classifier and for a rule looking for "café", and would lose the
bytes. A run of bytes that is valid UTF-8 by accident is rare in Latin-1 text,
so trying UTF-8 first costs little accuracy.

Nothing here raises on any input, and no result holds a lone surrogate, so text
from this module can always be ``.encode()``-d. Work is linear in the input:
decoding is done by C codecs; the error handler runs once per invalid sequence.
"""

from __future__ import annotations

import binascii
import codecs
import encodings
import encodings.aliases
import pkgutil
import re

_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]+")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"\?=[ \t\r\n]+=\?")
# A valid UTF-8 multi-byte sequence (RFC 3629 section 4): when undeclared 8-bit text
# has none, it is all Windows-1252 and one C call decodes it.
_UTF8_SEQUENCE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}"
)
_SURROGATE = re.compile("[\ud800-\udfff]")
_REPLACEMENT = "\ufffd"
UUENCODE_NAMES = ("x-uuencode", "uuencode", "uue", "x-uue")

# Windows-1252 with its five undefined bytes (0x81, 0x8D, 0x8F, 0x90, 0x9D) as the
# Latin-1 control characters of the same value: a total mapping of the 256 bytes.
_WIN1252_TABLE = "".join(bytes([b]).decode("cp1252", "ignore") or chr(b) for b in range(256))
# The surrogate escape of each 8-bit byte -> that byte in Windows-1252.
_ESCAPED_WIN1252 = {0xDC00 + b: _WIN1252_TABLE[b] for b in range(0x80, 0x100)}
# Charsets whose labels mean Windows-1252 in practice (see the module docstring).
_WIN1252_LABELS = frozenset({"latin_1", "iso8859_1", "cp1252"})
# Labels that say nothing about 8-bit bytes: the undeclared policy applies to those.
_UNDECLARED = frozenset({"", "ascii", "utf_8"})
# Codecs Python has that are not charsets (escape codecs, IDNA labels, "undefined"
# always raises): such a label counts as unknown. Punycode decoding is also not
# linear in the worst case.
_NOT_CHARSETS = frozenset(
    {"unicode_escape", "raw_unicode_escape", "idna", "punycode", "undefined", "charmap"}
)
# Codecs whose decoder can yield lone surrogates: their output is checked.
_MAY_YIELD_SURROGATES = frozenset({"utf_7"})
REPAIR_DENSITY = 25  # mixed text is repaired one sequence at a time when at most one
# byte in this many is 8-bit (then that costs less than str.translate: ~0.06 us a byte)
MAX_MIXED_BYTES = 1 << 20  # a larger mix is repaired only when it needs ...
MAX_REPAIRS = 10_000  # ... at most this many repairs (~15 ms); else all Windows-1252
_HIGH_BYTES = bytes(range(0x80, 0x100))
_CODEC_CACHE_MAX = 256  # distinct charset labels remembered
_CHARSET_NAME_MAX = 64  # a longer label is not a charset name (RFC 2978 allows 40)


def _win1252_fallback(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: the bytes that are not UTF-8, read as Windows-1252."""
    if not isinstance(exc, UnicodeDecodeError):  # pragma: no cover - decoding only
        raise exc
    bad = exc.object[exc.start : exc.end]
    return codecs.charmap_decode(bad, "strict", _WIN1252_TABLE)[0], exc.end


FALLBACK_HANDLER = "mailflow-win1252"
codecs.register_error(FALLBACK_HANDLER, _win1252_fallback)


def decode_win1252(data: bytes) -> str:
    """Windows-1252 with the undefined bytes as Latin-1: never fails, one C call."""
    return codecs.charmap_decode(data, "strict", _WIN1252_TABLE)[0]


def decode_undeclared(data: bytes) -> str:
    """Bytes with no usable charset: UTF-8 where valid, Windows-1252 for the rest."""
    if data.isascii():
        return data.decode("ascii")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if _UTF8_SEQUENCE.search(data) is None:  # no UTF-8 at all: one C call
        return decode_win1252(data)
    high = len(data) - len(data.translate(None, _HIGH_BYTES))
    small = len(data) <= MAX_MIXED_BYTES
    if high * REPAIR_DENSITY <= len(data) and (small or high <= MAX_REPAIRS):
        return data.decode("utf-8", FALLBACK_HANDLER)
    if small:
        return data.decode("utf-8", "surrogateescape").translate(_ESCAPED_WIN1252)
    return decode_win1252(data)


def _repair_each(data: bytes) -> str:
    """The sparse path of :func:`decode_undeclared` alone (for tests)."""
    return data.decode("utf-8", FALLBACK_HANDLER)


def _repair_all(data: bytes) -> str:
    """The dense path of :func:`decode_undeclared` alone (for tests)."""
    return data.decode("utf-8", "surrogateescape").translate(_ESCAPED_WIN1252)


_CODECS: dict[str, str | None] = {}


def _codec_names() -> frozenset[str]:
    """The names the standard library's codec search finds: its aliases and modules."""
    names = set(encodings.aliases.aliases) | set(encodings.aliases.aliases.values())
    names.update(module.name for module in pkgutil.iter_modules(encodings.__path__))
    return frozenset(names)


_KNOWN_CODECS = _codec_names()


def _may_be_codec(name: str) -> bool:
    """Whether ``codecs.lookup`` could know ``name``. Asked about any other label, the
    standard library tries an import and remembers the miss forever (its own cache has
    no bound): a message with thousands of made-up charset labels would grow it and
    cost ~40 us each."""
    key = encodings.normalize_encoding(name)
    return key in _KNOWN_CODECS or key.replace(".", "_") in _KNOWN_CODECS


def codec_name(charset: str) -> str | None:
    """Python's codec name for a MIME charset label; None when unknown or not a charset.

    Never raises: a label with NUL or surrogate-escaped 8-bit bytes is unknown.
    """
    known = _CODECS.get(charset, False)
    if known is not False:
        return known  # type: ignore[return-value]
    name = charset.strip().strip('"').strip().lower()
    found: str | None = None
    if name and len(name) <= _CHARSET_NAME_MAX and name.isascii() and _may_be_codec(name):
        try:
            info = codecs.lookup(name)
        except (LookupError, ValueError):
            info = None
        if info is not None and getattr(info, "_is_text_encoding", True):
            found = info.name.replace("-", "_")
            if found in _NOT_CHARSETS:
                found = None
    if len(charset) <= _CHARSET_NAME_MAX:  # the cache holds short labels only
        if len(_CODECS) >= _CODEC_CACHE_MAX:
            _CODECS.clear()
        _CODECS[charset] = found
    return found


def decode_charset(data: bytes, charset: str) -> str:
    """Bytes -> text by the charset policy (module docstring); never raises."""
    codec = codec_name(charset) if charset else ""
    if codec is None or codec in _UNDECLARED:
        return decode_undeclared(data)
    if codec in _WIN1252_LABELS:
        return decode_win1252(data)
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        try:
            text = data.decode(codec, "replace")
        except Exception:  # a codec that cannot even replace: the undeclared policy
            return decode_undeclared(data)
    except Exception:  # exotic codecs raise their own errors on garbage
        return decode_undeclared(data)
    if codec in _MAY_YIELD_SURROGATES:
        text = _SURROGATE.sub(_REPLACEMENT, text)
    return text


def header_text(value: str) -> str:
    """A raw header value (8-bit bytes kept as surrogate escapes, as the fields layer
    reads them) as text: the raw bytes decoded by the charset policy."""
    if value.isascii():
        return value
    return decode_undeclared(value.encode("utf-8", "surrogateescape"))


# --- transfer encodings (RFC 2045 section 6) --------------------------------------------


def decode_base64(data: bytes) -> bytes:
    """Base64 -> bytes, ignoring characters outside the alphabet and fixing padding;
    a truncated last group is dropped rather than failing."""
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        pass
    clean = _NOT_BASE64.sub(b"", data.split(b"=", 1)[0])
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
    if encoding in UUENCODE_NAMES:
        return decode_uu(data)
    return data


# --- RFC 2047 encoded words -------------------------------------------------------------


def decode_words(value: str) -> str:
    """A raw header value as text: RFC 2047 encoded words (``=?charset?B?...?=``)
    decoded, raw 8-bit bytes decoded by the charset policy, other text kept.

    Whitespace between two adjacent encoded words is dropped (RFC 2047 section 6.2).
    Malformed words stay as they are. Linear: the word pattern cannot run past a "?"
    or a blank, so no position is scanned twice.
    """
    value = header_text(value)
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
