"""Readable text from markup: HTML to text, element names, URL host names.

Regular expressions over the decoded text, written so that no position is scanned
more than a bounded number of times (measured: ``benchmarks/bench_mime.py``):

* nothing after the last ">" can be part of a tag, so the tag pattern never runs to
  the end of the text from an unclosed "<" (``'<a ' * n`` was quadratic in the
  bayes plugin's former converter: 10 s for 300 KB);
* a ``<script>`` or ``<style>`` block is removed only when its closing tag exists,
  found by one forward search; an unclosed one is a plain tag (its content stays);
* a comment ``<!-- ... -->`` is removed with its content (hidden text in comments
  is an old trick against content filters); one that is never closed hides the
  rest of the text, as it does in a browser (HTML: the end of the file ends it);
  ``<!-->`` and ``<!--->`` are empty comments, as browsers read them;
* numeric character references of more than :data:`MAX_CHARREF_DIGITS` digits are
  out of Unicode's range anyway: they become U+FFFD without ``int()``, which is not
  linear in the digits and refuses more than 4,300 of them (``html.unescape`` would
  raise).

Why regular expressions and not an HTML parser: measured on the corpus and on
hostile shapes (docs/performance.md, "HTML to text"), selectolax (lexbor) was no
faster per typical message and grew faster than linearly on ``'<a ' * n``, and
as a C extension it holds the GIL while it runs.
"""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING

from mailflow.mime.decode import decode_charset

if TYPE_CHECKING:
    from email.message import Message

MAX_CHARREF_DIGITS = 10  # "&#" + more digits than this is checked before unescaping
MAX_HOST_CHARS = 253  # RFC 1035 2.3.4: a longer "host name" is cut here

# Script and style are spelled out rather than matched with a back-reference: under
# IGNORECASE a literal "s" also matches U+017F, a back-reference does not, and the
# checks that every block closes (_LAST_OPEN/_LAST_CLOSE) must read names as this does.
_TAG = re.compile(
    r"<!(?=--).*?-->|<script\b.*?</script\s*>|<style\b.*?</style\s*>|<[^>]*>",
    re.IGNORECASE | re.DOTALL,
)
_COMMENT_OPEN = "<!--"
_COMMENT_CLOSE = "-->"
_COMMENT_CLOSE_FROM = 2  # "-->" may overlap the opening's "--": "<!-->" is a comment
_RAW_OPEN = re.compile(r"<(script|style)\b", re.IGNORECASE)
_RAW_CLOSE = re.compile(r"</(script|style)\s*>", re.IGNORECASE)
_TAG_ONLY = re.compile(r"<[^>]*>")
_RAW_NAMES = ("script", "style")
_CLOSE = {n: re.compile(rf"</{n}\s*>", re.IGNORECASE) for n in _RAW_NAMES}
MAX_SLOW_STEPS = 10_000  # blocks and comments stepped through around an unclosed one
# The last opening and closing tag of each: a greedy ".*" runs to the end and backs up
# to the last match, in C (iterating over every match in Python cost 0.3 s for 3 MB).
_LAST_OPEN = {n: re.compile(rf"(?s:.*)<({n})\b", re.IGNORECASE) for n in _RAW_NAMES}
_LAST_CLOSE = {n: re.compile(rf"(?s:.*)</({n})\s*>", re.IGNORECASE) for n in _RAW_NAMES}
_SPECIAL = re.compile(r"<(?:!--|(script|style)\b)", re.IGNORECASE)  # where _TAG differs
_RAW_STARTS = ("<s", "<S", "<\u017f")
_OTHER_SPACE = ("\t", "\r", "\f", "\v")
_SPACES = re.compile("  +")  # a literal prefix: 5x faster than " {2,}"
_LONG_CHARREF = re.compile(
    rf"&#(?:[xX][0-9a-fA-F]{{{MAX_CHARREF_DIGITS},}}|[0-9]{{{MAX_CHARREF_DIGITS},}});?"
)
_MAX_CODE_POINT_DIGITS = {True: 6, False: 7}  # hex / decimal digits of U+10FFFF
_ELEMENT = re.compile(r"<\s*([a-zA-Z][a-zA-Z0-9]{0,9})")
_ELEMENT_LOWER = re.compile(r"<\s*([a-z][a-z0-9]{0,9})")  # _ELEMENT on lower-cased ASCII
# Both URL patterns start with a literal, so the regex engine can skip ahead quickly;
# they run on lower-cased text. The scheme before "://" is checked by hand (_SCHEMES).
_URL = re.compile(r"://([^/\s\"'<>?#\\]+)")
_WWW = re.compile(r"www\.([a-z0-9-]+(?:\.[a-z0-9-]+)+)")
_SCHEMES = ("http", "https", "ftp")


def html_to_text(markup: str) -> str:
    """Good-enough HTML to text for matching: drop tags, scripts, styles, comments;
    unescape; runs of blanks (space, tab, CR, FF, VT) become one space. Linear.
    """
    return collapse_blanks(visible_text(markup))


def visible_text(markup: str) -> str:
    """:func:`html_to_text` before runs of blanks are collapsed (each tag a space)."""
    if "<" in markup:
        markup = _strip_tags(markup)
    if "&" in markup:
        markup = unescape(markup)
    return markup


def unescape(text: str) -> str:
    """``html.unescape`` that cannot raise on (or spend superlinear time in) long
    numeric character references."""
    if "&#" in text and _LONG_CHARREF.search(text) is not None:
        text = _LONG_CHARREF.sub(_short_charref, text)
    return html.unescape(text)


def _short_charref(match: re.Match[str]) -> str:
    """A numeric reference without leading zeros, or U+FFFD when out of range (what
    ``html.unescape`` gives for a code point above U+10FFFF)."""
    ref = match.group(0)
    hexadecimal = ref[2] in "xX"
    digits = ref[3 if hexadecimal else 2 :].rstrip(";").lstrip("0") or "0"
    if len(digits) > _MAX_CODE_POINT_DIGITS[hexadecimal]:
        return "\ufffd"
    return ("&#x" if hexadecimal else "&#") + digits + ";"


def collapse_blanks(text: str) -> str:
    """Each run of space, tab, CR, FF and VT -> one space (newlines are kept)."""
    for char in _OTHER_SPACE:  # one-character replace is a memchr loop: fast
        if char in text:
            text = text.replace(char, " ")
    return _SPACES.sub(" ", text) if "  " in text else text


def _strip_tags(markup: str) -> str:
    # Nothing after the last ">" can be part of a tag (every tag ends with one), but a
    # comment opened there is never closed: it hides the rest.
    last = markup.rfind(">")
    head, tail = markup[: last + 1], markup[last + 1 :]
    hidden = tail.find(_COMMENT_OPEN)
    if hidden >= 0:
        tail = tail[:hidden] + " "
    if last < 0:
        return tail
    comments = _COMMENT_OPEN in head
    # "<s" with s, S or U+017F (which IGNORECASE matches to s) can start <script or
    # <style; without one, two-character searches rule both out faster than the regex.
    raw = any(opening in head for opening in _RAW_STARTS) and _RAW_OPEN.search(head) is not None
    if not raw and not comments:
        return _TAG_ONLY.sub(" ", head) + tail
    if (not raw or _every_raw_block_closes(head)) and (not comments or _every_comment_closes(head)):
        return _TAG.sub(" ", head) + tail
    text, rest_hidden = _strip_tags_slowly(head)
    return text if rest_hidden else text + tail


def _every_comment_closes(markup: str) -> bool:
    """True when the last "<!--" has a "-->" after it (then so has every other, and
    the lazy ``.*?`` of the comment pattern never scans to the end in vain)."""
    last_open = markup.rfind(_COMMENT_OPEN)
    return markup.find(_COMMENT_CLOSE, last_open + _COMMENT_CLOSE_FROM) >= 0


def _every_raw_block_closes(markup: str) -> bool:
    """True when each <script>/<style> opening has a closing tag after it (then the
    lazy ``.*?`` of the tag pattern never scans to the end of the text in vain)."""
    for name in _RAW_NAMES:
        opening = _LAST_OPEN[name].match(markup)
        if opening is not None:
            closing = _LAST_CLOSE[name].match(markup)
            if closing is None or closing.start(1) - 2 < opening.end():
                return False
    return True


def _strip_tags_slowly(markup: str) -> tuple[str, bool]:
    """What ``_TAG.sub(" ", markup)`` gives, for markup with unclosed script/style
    blocks or comments, in linear time: a script/style block whose closing tag is
    missing is a plain tag; an unclosed comment hides the rest (then the second
    value is True).

    Python steps only at comment and script/style openings; the plain tags between
    them go through ``_TAG_ONLY`` in C, and once no opening that could still start a
    block or a comment lies ahead, the rest does too. After MAX_SLOW_STEPS steps (a
    step is a few microseconds) the rest is read as plain tags: script and style
    contents there stay in the text.
    """
    last_opening: dict[str, int] = {}
    for name in _RAW_NAMES:
        opening = _LAST_OPEN[name].match(markup)
        if opening is not None:
            last_opening[name] = opening.start(1) - 1
    last_comment = markup.rfind(_COMMENT_OPEN)
    out: list[str] = []
    pos = 0
    unclosed: set[str] = set()  # names with no closing tag after the current position
    for _ in range(MAX_SLOW_STEPS):
        if last_comment < pos and all(
            at < pos for name, at in last_opening.items() if name not in unclosed
        ):
            break  # only plain tags are left
        special = _SPECIAL.search(markup, pos)
        if special is None:
            break
        at = special.start()
        chunk = markup[pos:at]
        lt = chunk.find("<", chunk.rfind(">") + 1)
        if lt >= 0:  # a tag opened before runs past the opening: it swallows it
            out.append(_TAG_ONLY.sub(" ", chunk[:lt]))
            out.append(" ")
            pos = markup.find(">", pos + lt) + 1  # callers cut the text after its last ">"
            continue
        out.append(_TAG_ONLY.sub(" ", chunk))
        out.append(" ")
        if markup.startswith(_COMMENT_OPEN, at):
            end = markup.find(_COMMENT_CLOSE, at + _COMMENT_CLOSE_FROM)
            if end < 0:
                return "".join(out), True
            pos = end + len(_COMMENT_CLOSE)
            continue
        name = "style" if special.group(1)[-1] in "eE" else "script"
        if name not in unclosed:
            closing = _CLOSE[name].search(markup, special.end())
            if closing is not None:
                pos = closing.end()
                continue
            unclosed.add(name)
        pos = markup.find(">", at) + 1  # a plain tag
    out.append(_TAG_ONLY.sub(" ", markup[pos:]))
    return "".join(out), False


def element_names(markup: str) -> set[str]:
    """Lower-case names of the elements used in ``markup`` (``<b>``, ``<a href>``...),
    names of at most ten characters."""
    if markup.isascii():  # lower-casing ASCII changes nothing but A-Z: same matches
        return set(_ELEMENT_LOWER.findall(markup.lower()))
    return {t.lower() for t in _ELEMENT.findall(markup)}


def url_hosts(lowered: str) -> list[str]:
    """Host names of the URLs in lower-cased text: after ``http://``, ``https://``
    or ``ftp://``, and ``www.`` names without a scheme (cut at MAX_HOST_CHARS).

    Scans are chosen by cost: a multi-character ``in`` test ("://", "www.") runs
    CPython's skip-table search at ~0.7 ns per character, slower than the regex's own
    literal-prefix scan, while a one-character ``find`` is a ``memchr`` (~20x faster).
    So "://" is looked for only from the first ":" on (prose often has none) and the
    "www." pattern scans by itself; both find exactly the matches a scan of the whole
    text finds (the patterns start with their literal and look at nothing before it).
    """
    hosts: list[str] = []
    colon = lowered.find(":")
    if colon >= 0:
        for m in _URL.finditer(lowered, colon):
            if lowered[max(0, m.start() - 5) : m.start()].endswith(_SCHEMES):
                hosts.append(m.group(1)[:MAX_HOST_CHARS])
    for m in _WWW.finditer(lowered):
        hosts.append(("www." + m.group(1))[:MAX_HOST_CHARS])
    return hosts


def decode_part(part: Message) -> str:
    """The text of one stdlib ``email`` leaf part (for plugins that walk ``ctx.message``
    themselves): transfer encoding and charset undone, HTML converted to text."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    text = decode_charset(payload, part.get_content_charset() or "")
    return html_to_text(text) if part.get_content_type() == "text/html" else text
