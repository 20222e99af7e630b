"""URLs as a reader and a browser see them: host, userinfo, numeric IPs, IDN labels,
redirector targets. Plain functions, no I/O; every input is cut to a bounded length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import unquote

import tldextract

from mailflow.api import mime

MAX_HOST = mime.MAX_HOST_CHARS  # 253: a longer host is cut
MAX_LABEL = 63
MAX_REDIRECT_DEPTH = 3  # URLs carried inside URLs followed this deep
MAX_QUERY_PARAMS = 50  # query parameters looked at per URL

# Characters that look like Latin letters or digits in common fonts (Unicode's
# confusables.txt, the part attackers use in domain names: Cyrillic, Greek, Armenian,
# fullwidth forms are folded by NFKC first). The "skeleton" of a name maps them to the
# Latin letter they imitate, so "p\u0430ypal" (Cyrillic a) and "paypal" share one skeleton.
# Cyrillic, Armenian, Greek, then Latin letters with strokes (escaped: they look like
# the ASCII letters they are mapped to, position by position).
_CONFUSABLE_FROM = (
    "\u0430\u0432\u0435\u0451\u043a\u043c\u043d\u043e\u0440\u0441\u0442\u0443"
    "\u0445\u0455\u0456\u0457\u0458\u0501\u051b\u051d\u04bb\u04cf\u04af\u0261"
    "\u0578\u057d\u0585\u0581\u0570\u03b1\u03b2\u03b5\u03b7\u03b9\u03ba\u03bd"
    "\u03bf\u03c1\u03c4\u03c5\u03c7\u03c9\u03f2\u03f3\u0131\u0142\u00df\u00f8"
    "\u0111\u0127"
)
_CONFUSABLE_TO = "abeekmhopctyxsiijdqwhlygnuoghabenikvoptuxwcjilbodh"
_CONFUSABLE = str.maketrans(_CONFUSABLE_FROM, _CONFUSABLE_TO)
# Sequences and digits read as letters at a glance ("rn" for "m", "0" for "o").
_ASCII_CONFUSABLE = (("rn", "m"), ("vv", "w"), ("0", "o"), ("1", "l"), ("5", "s"), ("i", "l"))


@lru_cache(maxsize=8192)
def skeleton(label: str) -> str:
    """A name with look-alike characters folded to what they imitate (lower case)."""
    folded = unicodedata.normalize("NFKC", label[:MAX_HOST]).lower().translate(_CONFUSABLE)
    folded = "".join(
        c for c in unicodedata.normalize("NFKD", folded) if not unicodedata.combining(c)
    )
    for seq, letter in _ASCII_CONFUSABLE:
        if seq in folded:
            folded = folded.replace(seq, letter)
    return folded


def _script(char: str) -> str:
    if char.isascii():
        return "LATIN" if char.isalpha() else ""
    try:
        name = unicodedata.name(char)
    except ValueError:
        return "OTHER"
    return name.split(" ", 1)[0]


def scripts(label: str) -> set[str]:
    """The scripts of the letters of ``label`` (LATIN, CYRILLIC, GREEK, ...)."""
    found = {_script(c) for c in label[:MAX_LABEL] if c.isalpha()}
    found.discard("")
    return found


@lru_cache(maxsize=1)
def _extractor() -> tldextract.TLDExtract:
    # tldextract's bundled Public Suffix List snapshot: offline, no cache directory.
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


@lru_cache(maxsize=16384)
def registered_domain(host: str) -> tuple[str, str]:
    """(registered label, public suffix) of a host name: ``www.paypal.co.uk`` ->
    (``paypal``, ``co.uk``). A name under no listed suffix (``.test``, ``.example``)
    takes its last label as the suffix."""
    parts = _extractor()(host)
    if parts.suffix:
        return parts.domain, parts.suffix
    labels = host.rsplit(".", 2)
    return (labels[-2], labels[-1]) if len(labels) >= 2 else (host, "")


def listed_suffix(host: str) -> bool:
    """Whether ``host`` ends in a public suffix of the bundled list (``com``,
    ``co.uk``), not merely in some last label (``invoice.pdf``)."""
    return bool(_extractor()(host).suffix)


def org_domain(host: str) -> str:
    label, suffix = registered_domain(host)
    return f"{label}.{suffix}" if label and suffix else host


def numeric_ip(host: str) -> str | None:
    """The IPv4 address an ``inet_aton``-style host stands for (browsers accept
    ``3232235777``, ``0xC0A80001``, ``0300.0250.0.1``, ``192.168.1``), else None."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(parts):
        return None
    values: list[int] = []
    for p in parts:
        if len(p) > 12:
            return None
        try:
            if p[:2] in ("0x", "0X"):
                values.append(int(p[2:] or "0", 16))
            elif len(p) > 1 and p[0] == "0":
                values.append(int(p, 8))
            elif p.isdigit():
                values.append(int(p))
            else:
                return None
        except ValueError:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        return None
    number = 0
    for v in head:
        number = number * 256 + v
    number = (number << (8 * (5 - len(values)))) | last
    return str(ipaddress.IPv4Address(number))


def decode_idn(host: str) -> str:
    """Punycode labels (``xn--``) decoded; a label that does not decode stays as it is."""
    if "xn--" not in host:
        return host
    out = []
    for label in host.split("."):
        if label.startswith("xn--") and len(label) <= MAX_LABEL:
            with contextlib.suppress(UnicodeError, ValueError):
                label = label[4:].encode("ascii").decode("punycode")
        out.append(label)
    return ".".join(out)


@dataclass(slots=True)
class URL:
    """One URL as looked at: ``raw`` (cut), ``host`` (lower case, ASCII as written),
    ``display_host`` (IDN decoded), ``ip`` (when the host is an address, in canonical
    form), ``flags`` (what is odd about it), ``inner`` (URLs carried in its query)."""

    raw: str
    source: str
    scheme: str = ""
    host: str = ""
    display_host: str = ""
    userinfo: str = ""
    ip: str = ""
    flags: list[str] = field(default_factory=list)
    inner: list[URL] = field(default_factory=list)
    query: str = ""

    @property
    def domain(self) -> str:
        """The registered domain (``paypal.com``), or the IP."""
        return self.ip or (org_domain(self.host) if self.host else "")


def parse_url(raw: str, source: str, redirect_params: frozenset[str]) -> URL | None:
    """Read one absolute URL (or ``www.`` name); None for relative links, ``mailto:``
    and other schemes without a host. A new object per call (the parse is cached:
    mailing-list footers and trackers repeat across messages; treat it as read-only)."""
    parsed = _parse_cached(raw, redirect_params)
    return None if parsed is None else dataclasses.replace(parsed, source=source)


@lru_cache(maxsize=4096)
def _parse_cached(raw: str, redirect_params: frozenset[str]) -> URL | None:
    return _parse(raw, "", redirect_params, 0)


def _parse(raw: str, source: str, redirect_params: frozenset[str], depth: int) -> URL | None:
    raw = raw.strip()[: mime.MAX_URL_CHARS]
    low = raw[:12].lower()
    if low.startswith("www."):
        raw = "http://" + raw
        scheme = "http"
    else:
        colon = raw.find("://", 0, 12)
        if colon <= 0:
            if raw[:2] in ("//", "\\\\"):  # scheme-relative
                colon, scheme = -1, ""
            else:
                return None
        else:
            scheme = raw[:colon].lower()
            if scheme not in ("http", "https", "ftp"):
                return None
    start = raw.find("//") + 2
    rest = raw[start:]
    end = len(rest)
    for sep in "/?#\\":
        i = rest.find(sep)
        if 0 <= i < end:
            end = i
    authority = rest[:end]
    url = URL(raw=raw, source=source, scheme=scheme)
    if "@" in authority:
        url.userinfo, _, authority = authority.rpartition("@")
        url.userinfo = unquote(url.userinfo)[:MAX_HOST]
    if "%" in authority:
        authority = unquote(authority)
    authority = unicodedata.normalize("NFKC", authority)
    if authority.startswith("["):
        host = authority[1 : authority.find("]")] if "]" in authority else authority[1:]
        with contextlib.suppress(ValueError):
            url.ip = str(ipaddress.ip_address(host))
    else:
        host = authority.rsplit(":", 1)[0] if ":" in authority else authority
    host = host.lower().rstrip(".")[:MAX_HOST]
    # Browsers read the full stop look-alikes (U+3002, U+FF0E, U+FF61) as dots.
    for dot in "\u3002\uff0e\uff61":
        host = host.replace(dot, ".")
    url.host = host
    if not host:
        return None
    if not url.ip and (host[0].isdigit() or host.startswith("0x")):
        ip = numeric_ip(host)
        if ip is not None:
            url.ip = ip
            if host != ip:
                url.flags.append("obfuscated-ip")
    if url.ip:
        url.flags.append("ip")
    display = decode_idn(host)
    url.display_host = display
    if url.userinfo:
        url.flags.append("userinfo")
    if not display.isascii() and not url.ip:
        url.flags.append("idn")
    q = rest.find("?", end)
    if q >= 0:
        h = rest.find("#", q)
        url.query = rest[q + 1 : h if h >= 0 else len(rest)]
    if url.query and depth < MAX_REDIRECT_DEPTH:
        for i, pair in enumerate(url.query.split("&")):
            if i >= MAX_QUERY_PARAMS:
                break
            name, eq, value = pair.partition("=")
            if not eq or name.lower() not in redirect_params:
                continue
            value = unquote(unquote(value.replace("+", " ")))
            low = value[:12].lower()
            if low.startswith(("http://", "https://", "www.", "ftp://")):
                inner = _parse(value, "redirect", redirect_params, depth + 1)
                if inner is not None:
                    url.inner.append(inner)
        if url.inner:
            url.flags.append("redirector")
    return url


def chain(url: URL) -> list[URL]:
    """The URL and every URL carried inside it, depth first (bounded by the depth and
    the parameters per URL)."""
    out = [url]
    for inner in url.inner:
        out.extend(chain(inner))
    return out
