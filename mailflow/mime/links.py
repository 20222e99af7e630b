"""Links in markup and text: anchors with their visible text, ``src``, form actions,
and bare URLs in text. Linear in the input, with a cap on what is returned.

* A tag is ``<name`` followed by anything but ``<`` and ``>`` up to ``>``: every
  character is looked at by at most one tag match, so ``'<a ' * n`` (no ``>``) and
  ``'<a href=x>' * n`` both cost one pass. (A ``<`` inside an attribute value ends
  the tag early here, where a browser would read on; such links are simply missed.)
* The visible text of an anchor runs from its tag to the next ``</a`` or the next
  anchor, whichever comes first, and at most :data:`MAX_ANCHOR_TEXT` characters: the
  closing tags are found in one forward pass, shared by all anchors.
* Bare URLs are at most :data:`MAX_URL_CHARS` characters; a longer run is cut there
  (so a megabyte of ``http://a.`` is a few hundred cut URLs, not one huge string).
* At most ``limit`` links are returned; :attr:`LinkScan.truncated` says when more
  were there. :attr:`LinkScan.tags` counts the tags looked at (never more than the
  ``<`` in the markup): tests use it to check the scan is linear without timing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailflow.mime.text import collapse_blanks, html_to_text, unescape

MAX_URL_CHARS = 2048  # a longer URL is cut here (browsers and servers cap near this)
MAX_ANCHOR_TEXT = 1000  # characters of markup read for one anchor's visible text
MAX_LINKS = 1000  # default cap on the links returned per call

# The elements whose attributes carry a URL a reader may follow or a browser loads.
_TAG = re.compile(
    r"<(a|area|form|img|iframe|frame|embed|script|link|source|input|button|base)\b([^<>]*)>",
    re.IGNORECASE,
)
_ATTR = re.compile(
    r"""(?<![\w-])(href|src|action|formaction)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""",
    re.IGNORECASE,
)
_ANCHOR_END = re.compile(r"</a\s*>|<a\b", re.IGNORECASE)
# What follows "://" or "www." in a bare URL: up to a blank, a quote or an angle
# bracket, at most MAX_URL_CHARS characters (one bounded match per URL).
_URL_TAIL = re.compile(rf"[^\s<>\"'\x00-\x1f]{{0,{MAX_URL_CHARS}}}")
_SCHEMES = ("http", "https", "ftp")
_TRAILING = ".,;:!?)]}'\""  # prose punctuation after a URL is not part of it


@dataclass(frozen=True, slots=True)
class Link:
    """One link: ``kind`` is the element and attribute (``a.href``, ``img.src``,
    ``form.action``...) or ``text`` for a bare URL; ``url`` is the attribute value
    with character references decoded, cut at MAX_URL_CHARS; ``text`` is an anchor's
    visible text (blanks collapsed), "" for the other kinds."""

    kind: str
    url: str
    text: str = ""


@dataclass(slots=True)
class LinkScan:
    links: list[Link] = field(default_factory=list)
    truncated: bool = False  # more links than the limit
    tags: int = 0  # tags looked at (a bound on the work done)


def html_links(markup: str, limit: int = MAX_LINKS) -> LinkScan:
    """The links in HTML ``markup``: ``href``, ``src``, ``action`` and ``formaction``
    of the elements that load or lead somewhere, with each anchor's visible text.
    Linear in ``markup``; at most ``limit`` links."""
    scan = LinkScan()
    if "<" not in markup:
        return scan
    ends = _ANCHOR_END.finditer(markup)
    next_end: re.Match[str] | None = None
    for tag in _TAG.finditer(markup):
        scan.tags += 1
        name = tag.group(1).lower()
        for attr in _ATTR.finditer(tag.group(2)):
            value = attr.group(2) if attr.group(2) is not None else attr.group(3)
            if value is None:
                value = attr.group(4)
            value = value.strip()
            if not value:
                continue
            if len(scan.links) >= limit:
                scan.truncated = True
                return scan
            if "&" in value:
                value = unescape(value[: MAX_URL_CHARS * 2])
            value = value[:MAX_URL_CHARS]
            text = ""
            if name == "a" and attr.group(1).lower() == "href":
                # The anchor's text ends at the first "</a" or "<a" after its tag.
                if next_end is None or next_end.start() < tag.end():
                    next_end = next(ends, None)
                    while next_end is not None and next_end.start() < tag.end():
                        next_end = next(ends, None)
                stop = len(markup) if next_end is None else next_end.start()
                stop = min(stop, tag.end() + MAX_ANCHOR_TEXT)
                chunk = markup[tag.end() : stop]
                if "<" in chunk or "&" in chunk:
                    text = html_to_text(chunk).strip()
                else:  # plain text: what html_to_text gives, without its scans
                    text = collapse_blanks(chunk).strip()
            scan.links.append(Link(f"{name}.{attr.group(1).lower()}", value, text))
    return scan


def text_urls(text: str, limit: int = MAX_LINKS) -> LinkScan:
    """Bare URLs in text (``http://``, ``https://``, ``ftp://``, ``www.``), each cut at
    MAX_URL_CHARS, prose punctuation at the end removed, in order. Linear; at most
    ``limit``.

    As in :func:`mailflow.mime.text.url_hosts`, the scans are literal searches
    (``str.find``, far faster than a regex with a case-insensitive alternation at
    every position): "://" with the scheme checked before it, then "www." / "WWW."
    outside the URLs already found. A URL's tail is one bounded match, and the next
    search starts after it, so a megabyte of ``http://a.`` is read once.
    """
    scan = LinkScan()
    found: list[tuple[int, int]] = []  # (start, end) of each URL, in order
    pos = text.find("://")
    while pos >= 0 and len(found) <= limit:
        scan.tags += 1
        head = text[max(0, pos - 5) : pos].lower()
        scheme = next((s for s in _SCHEMES if head.endswith(s)), "")
        start = pos - len(scheme)
        end = pos + 3
        if scheme and not (start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_")):
            tail = _URL_TAIL.match(text, end)
            end = tail.end() if tail is not None else end
            found.append((start, end))
        pos = text.find("://", end)
    schemed = found
    found = list(schemed)
    for www in ("www.", "WWW."):
        pos = text.find(www)
        covered = 0
        while pos >= 0 and len(found) <= limit:
            scan.tags += 1
            while covered < len(schemed) and schemed[covered][1] <= pos:
                covered += 1
            inside = covered < len(schemed) and schemed[covered][0] <= pos
            before = text[pos - 1] if pos > 0 else " "
            if inside or before.isalnum() or before in "._-/":
                pos = text.find(www, pos + 4)
                continue
            tail = _URL_TAIL.match(text, pos)
            end = tail.end() if tail is not None else pos + 4
            if "." in text[pos + 4 : end]:
                found.append((pos, end))
            pos = text.find(www, end)
    if len(found) > limit:
        scan.truncated = True
        found = found[:limit]
    for start, end in sorted(found):
        url = text[start : min(end, start + MAX_URL_CHARS)].rstrip(_TRAILING)
        if len(url) > 7:
            scan.links.append(Link("text", url))
    return scan
