"""DMARC building blocks without I/O (RFC 7489): records, organizational domains, alignment.

Kept apart from the plugin so that each rule can be tested as a plain function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import tldextract

from mailflow.api import mime

POLICIES = ("none", "quarantine", "reject")
MAX_FROM_DOMAINS = 10  # distinct author domains evaluated per message; more is abuse
_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{1,63}$"
)


@lru_cache(maxsize=1)
def _extractor() -> tldextract.TLDExtract:
    # The Public Suffix List snapshot bundled with tldextract: no download, no cache dir
    # (suffix_list_urls=() keeps it offline). Private entries count, as RFC 7489 3.2 asks
    # for "the" public suffix list.
    return tldextract.TLDExtract(
        suffix_list_urls=(), cache_dir=None, include_psl_private_domains=True
    )


def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label.

    A name whose last label is not in the list (e.g. ``.test``) falls under the
    list's default rule ``*``: its last label is the public suffix.
    """
    domain = domain.lower().rstrip(".")
    parts = _extractor()(domain)
    if parts.suffix:
        return f"{parts.domain}.{parts.suffix}" if parts.domain else domain
    labels = domain.split(".")
    return ".".join(labels[-2:])


def aligned(identifier: str, author: str, mode: str) -> bool:
    """RFC 7489 3.1.1 / 3.1.2: strict needs the same name, relaxed the same org domain."""
    identifier, author = identifier.lower().rstrip("."), author.lower().rstrip(".")
    if not identifier or not author:
        return False
    if mode == "s":
        return identifier == author
    return organizational_domain(identifier) == organizational_domain(author)


def valid_domain(domain: str) -> bool:
    return bool(_DOMAIN_RE.match(domain))


@dataclass(frozen=True, slots=True)
class Record:
    """A parsed ``v=DMARC1`` record (RFC 7489 6.3), with defaults filled in."""

    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


class RecordError(ValueError):
    """The text is not a usable DMARC record."""


def parse_record(text: str) -> Record:
    """Parse one DMARC TXT record.

    RFC 7489 6.3: ``v=DMARC1`` must come first; unknown tags are ignored; a bad
    value of an optional tag falls back to its default. 6.6.3: a missing or bad
    ``p`` counts as ``p=none`` when ``rua`` is present, else the record is unusable.
    """
    tags: dict[str, str] = {}
    for index, part in enumerate(text.split(";")):
        name, sep, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if index == 0:
            if name != "v" or value != "DMARC1":
                raise RecordError("record does not start with v=DMARC1")
            continue
        if not sep or not name:
            if part.strip():
                raise RecordError(f"malformed tag {part.strip()[:40]!r}")
            continue
        tags.setdefault(name, value)
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        if "rua" not in tags:
            raise RecordError(f"missing or invalid p= ({tags.get('p', '')[:20]!r})")
        p = "none"
    sp = tags.get("sp", "").lower()
    if sp not in POLICIES:
        sp = p
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    if not 0 <= pct <= 100:
        pct = 100
    return Record(
        p=p,
        sp=sp,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        pct=pct,
    )


def select_record(texts: list[str]) -> Record | None:
    """RFC 7489 6.6.3 step 3-4: only records starting with v=DMARC1 count; more than one
    means no policy. A single record that is unusable also means no policy."""
    candidates = [t for t in texts if t.strip().lower().startswith("v=dmarc1")]
    if len(candidates) != 1:
        return None
    try:
        return parse_record(candidates[0].strip())
    except RecordError:
        return None


def from_fields(head: bytes) -> list[str]:
    """Every From field of the header block ``head``, unfolded.

    Counted with the core's field splitter, not the email parser: the parser stops
    at the first malformed line, which would hide a second From field placed after it.
    """
    values = []
    for item in mime.split_header_fields(head):
        name, sep, value = item.partition(b":")
        if sep and name.strip().lower() == b"from":
            text = value.decode("utf-8", "replace")
            values.append(" ".join(text.replace("\r\n", " ").split()))
    return values


def _a_label(domain: str) -> str:
    """U-labels (RFC 6532 From addresses) as A-labels, the form DNS and DKIM d= use."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain  # not convertible: valid_domain() refuses it


def author_domains(from_fields: list[str]) -> tuple[list[str], str]:
    """The RFC5322.From domains, or ([], problem) when DMARC cannot apply.

    RFC 7489 6.6.1: a message without exactly one From field violates RFC 5322
    3.6 and is not evaluated as if it were valid; several addresses in one field
    are evaluated each (the caller takes the strictest outcome).
    """
    if not from_fields:
        return [], "no From header field"
    if len(from_fields) > 1:
        return [], f"{len(from_fields)} From header fields (RFC 5322 3.6 allows one)"
    addresses = mime.parse_addresses(from_fields[0])  # linear; at most MAX_ADDRESSES
    if addresses.truncated:
        return [], f"From names more than {len(addresses)} addresses"
    domains: dict[str, None] = {}  # in order, each once (a list's `in` made this quadratic)
    for mailbox in addresses:
        addr = mailbox.address
        domain = _a_label(mailbox.domain)
        if not addr or "@" not in addr or not valid_domain(domain):
            return [], f"From address {addr or from_fields[0][:60]!r} has no usable domain"
        domains[domain] = None
    if not domains:
        return [], "From header field holds no address"
    if len(domains) > MAX_FROM_DOMAINS:
        return [], f"From names {len(domains)} domains (limit {MAX_FROM_DOMAINS})"
    return list(domains), ""
