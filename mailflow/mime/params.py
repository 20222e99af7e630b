"""Content-Type / Content-Disposition parameters (RFC 2045 5.1, RFC 2183 2) and their
RFC 2231 continuations and charsets.

Linear: a value is split at its semicolons once (a second pass with a pattern whose
alternatives start with different characters when a quoted value holds a ";"),
continuations are sorted by their section number, and section numbers are at most
:data:`MAX_SECTION_DIGITS` digits (``int()`` of a long digit string is not linear,
and Python refuses more than 4,300 digits: a longer "number" is a plain name).
"""

from __future__ import annotations

import re
import urllib.parse

from mailflow.mime.decode import decode_charset

MAX_SECTION_DIGITS = 4  # RFC 2231 section numbers ("name*12*") up to 9999

_SEGMENT = re.compile(r'((?:"(?:\\.|[^"\\])*+(?:"|\Z)|[^;"])*+)(?:;|\Z)', re.DOTALL)
_RFC2231 = re.compile(rf"(\w+)\*(?:(\d{{1,{MAX_SECTION_DIGITS}}})\*?)?", re.ASCII)
# One plain parameter (no RFC 2231 star, no escapes, no ";" or "<" in its value): what
# the general parser below gives, found in one call.
_ONE_PARAM = re.compile(r'[^;]*+;\s*+([\w.-]+)\s*=\s*(?:"([^"\\;]*)"|([^"\\;\s<*]*))\s*')


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
    raws = [(val.encode("utf-8", "surrogateescape"), encoded) for _, val, encoded in pieces]
    data = b"".join(urllib.parse.unquote_to_bytes(raw) if enc else raw for raw, enc in raws)
    charset = ""
    fields = data.split(b"'", 2)
    if len(fields) == 3:
        charset = fields[0].decode("ascii", "replace")
        data = fields[2]
    return decode_charset(data, charset)
