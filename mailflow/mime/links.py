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

from mailflow.mime.text import html_to_text, unescape

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
# A bare URL: a scheme and "://", or "www." + a dot-separated name; what follows
# runs to a blank, a quote or an angle bracket. Bounded length per match.
_TEXT_URL = re.compile(
    rf"(?:\b(?:https?|ftp)://|\bwww\.(?=[a-z0-9-]+\.))[^\s<>\"'\x00-\x1f]{{0,{MAX_URL_CHARS}}}",
    re.IGNORECASE,
)
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
                text = html_to_text(markup[tag.end() : stop]).strip()
            scan.links.append(Link(f"{name}.{attr.group(1).lower()}", value, text))
    return scan


def text_urls(text: str, limit: int = MAX_LINKS) -> LinkScan:
    """Bare URLs in text (``http://``, ``https://``, ``ftp://``, ``www.``), each cut at
    MAX_URL_CHARS, prose punctuation at the end removed. Linear; at most ``limit``."""
    scan = LinkScan()
    if ":" not in text and "www." not in text and "WWW." not in text:
        return scan
    for m in _TEXT_URL.finditer(text):
        scan.tags += 1
        if len(scan.links) >= limit:
            scan.truncated = True
            break
        url = m.group(0).rstrip(_TRAILING)
        if url:
            scan.links.append(Link("text", url))
    return scan
