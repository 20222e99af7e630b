"""Phishing and URL signals: links whose text shows one domain and lead to another,
display names impersonating our people or domains, look-alikes of our domains, URLs
to raw or disguised IP addresses, IDN homographs, userinfo tricks, forms posting
elsewhere, and optional URIBL/SURBL-style DNS block lists.

URLs come from the shared MIME layer (``mime.html_links``, ``mime.text_urls``):
``href``, ``src``, form actions and bare URLs of every text/plain and text/html part,
at most ``max_urls`` per message, each cut at ``mime.MAX_URL_CHARS``. Every check is
linear in the message or bounded by a setting. Docs: docs/plugins/phishing.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailflow.api import App, MessageContext, Result, Symbol, hookimpl, mime

from .lookalike import domains_in_text, impersonated_name, lookalike_of, normalize_name
from .uribl import LookupReport, lookup_all
from .urls import (
    URL,
    chain,
    listed_suffix,
    org_domain,
    parse_url,
    registered_domain,
    scripts,
    skeleton,
)

# Every symbol this plugin emits, with its default score (docs/plugins/phishing.md).
SCORES: dict[str, float] = {
    "PHISHING_LINK_MISMATCH": 5.0,
    "PHISHING_IMPERSONATION": 5.0,
    "PHISHING_DISPLAY_DOMAIN": 3.0,
    "PHISHING_LOOKALIKE_DOMAIN": 5.0,
    "PHISHING_URL_IP": 2.0,
    "PHISHING_URL_OBFUSCATED_IP": 4.0,
    "PHISHING_URL_USERINFO": 3.0,
    "PHISHING_IDN_HOMOGRAPH": 4.0,
    "PHISHING_FORM_OFFSITE": 1.0,
    "PHISHING_REDIRECTOR": 0.5,
}
REDIRECT_PARAMS = [
    "url", "u", "q", "redirect", "redirect_url", "redirect_uri", "redir", "target",
    "dest", "destination", "goto", "link", "out", "to", "continue", "next", "r",
]  # fmt: skip
MAX_REASONS = 5  # reasons kept per symbol in details
MAX_FROM = 5  # From / Reply-To mailboxes looked at
MAX_SHOWN = 200  # characters of a URL or anchor text shown in details
MAX_MEMO = 16384  # look-alike verdicts kept per host (cleared when full)
_SYMBOL_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
# Anchor text that is itself a URL or a host name: "https://www.paypal.com/...",
# "www.paypal.com", "paypal.com". Anything else ("click here") shows no domain.
_SHOWN_HOST = re.compile(
    r"^(?:(?:https?|ftp)://)?(?:[^\s/@]*@)?((?:[\w-]{1,63}\.)+[^\W\d_]{2,63})\.?(?:[/:?#]\S*)?$",
    re.IGNORECASE,
)
# Names under no listed public suffix that still are domains (RFC 2606 / RFC 6761).
_RESERVED_TLDS = frozenset({"test", "example", "invalid", "localhost"})


class ZoneSettings(BaseModel):
    """One DNS block list of URL domains."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    zone: str = Field(min_length=1, max_length=200)
    symbol: str = ""  # default URIBL_ + the zone's first label upper-cased
    score: float = 4.0
    # Exact answers and what they mean ("127.0.0.2": "listed"); empty with an empty
    # bitmask: any 127.x answer but 127.255.255.x means listed.
    codes: dict[str, str] = {}
    # SURBL multi style: bit of the answer's last octet -> meaning ({2: phishing}).
    bitmask: dict[int, str] = {}
    domains: bool = True  # look registered domains up
    ips: bool = True  # look IP hosts up (reversed octets)

    @field_validator("symbol")
    @classmethod
    def _symbol_name(cls, value: str) -> str:
        if value and not _SYMBOL_NAME.match(value):
            raise ValueError("a symbol is UPPER_SNAKE_CASE, at most 64 characters")
        return value

    @property
    def name(self) -> str:
        if self.symbol:
            return self.symbol
        first = re.sub(r"[^A-Za-z0-9]", "_", self.zone.strip(".").split(".")[0]).upper()
        return f"URIBL_{first}"[:64]


class PhishingSettings(BaseModel):
    """``plugins: [{name: phishing, settings: {...}}]``; every key is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # People whose names in a From display name, from outside, are impersonation
    # ("Jane Doe", "CEO Name"); compared case- and confusable-insensitively.
    protected_names: list[str] = []
    # Domains to protect besides the config's local_domains (which count unless "*").
    protected_domains: list[str] = []
    # Domains never reported as link targets or look-alikes (your mailing service's
    # click tracker, a partner's name that happens to be one edit from yours).
    trusted_domains: list[str] = []
    # Query parameters whose value is a URL a redirector sends the reader on to.
    redirect_params: list[str] = REDIRECT_PARAMS
    max_urls: Annotated[int, Field(ge=1, le=100_000)] = 200  # URLs inspected per message
    max_scan_chars: Annotated[int, Field(ge=1)] = 1_000_000  # text scanned per message
    max_details: Annotated[int, Field(ge=0, le=1000)] = 20  # URLs listed in details
    scores: dict[str, float] = {}  # symbol -> score, overriding SCORES
    uribl_zones: list[ZoneSettings] = []  # off by default: no internet assumed
    uribl_max_lookups: Annotated[int, Field(ge=0, le=1000)] = 20  # DNS queries per message
    uribl_budget: Annotated[float, Field(gt=0, le=60)] = 2.0  # seconds for all of them

    @field_validator("scores")
    @classmethod
    def _known_symbols(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(SCORES))
        if unknown:
            raise ValueError(f"unknown symbol(s) {unknown}; expected some of {sorted(SCORES)}")
        return value


def _clean_domain(name: str) -> str:
    return name.strip().lower().rstrip(".").removeprefix("*.")


@dataclass(slots=True)
class Findings:
    """What one message showed: reasons per symbol, the URLs looked at."""

    reasons: dict[str, list[str]] = field(default_factory=dict)
    urls: list[URL] = field(default_factory=list)
    flagged: set[int] = field(default_factory=set)  # ids of URLs behind a symbol
    shown: dict[int, str] = field(default_factory=dict)  # anchor text per URL id
    links: int = 0
    tags: int = 0
    truncated: bool = False

    def add(self, symbol: str, reason: str, url: URL | None = None) -> None:
        reasons = self.reasons.setdefault(symbol, [])
        if len(reasons) < MAX_REASONS and reason not in reasons:
            reasons.append(reason)
        if url is not None:
            self.flagged.add(id(url))


class PhishingPlugin:
    Settings = PhishingSettings
    # Linear in the message: in the server process for ordinary mail, in a worker for
    # large messages (as bayes and rules).
    isolate = "large"

    def __init__(self, settings: PhishingSettings | None = None) -> None:
        self.settings = s = settings or PhishingSettings()
        self.resolver: Any = None
        self.scores = {**SCORES, **s.scores}
        self.redirect_params = frozenset(p.lower() for p in s.redirect_params)
        self.trusted = {org_domain(_clean_domain(d)) for d in s.trusted_domains if d.strip()}
        self.protected_names = {normalize_name(n): n for n in s.protected_names if n.strip()}
        self.zones = [_Zone.of(z) for z in s.uribl_zones]
        self.protected: dict[str, tuple[str, str]] = {}
        self._set_protected([])

    def _set_protected(self, local_domains: list[str]) -> None:
        names = [*local_domains, *self.settings.protected_domains]
        protected: dict[str, tuple[str, str]] = {}
        for name in names:
            if "*" in name.removeprefix("*."):
                continue  # "*": every domain is local, which protects nothing
            domain = org_domain(_clean_domain(name))
            if domain:
                protected[domain] = registered_domain(domain)
        self.protected = protected
        self._lookalikes: dict[str, tuple[str, str] | None] = {}

    @hookimpl
    def mailflow_startup(self, app: App) -> None:
        self.resolver = app.resolver
        self._set_protected(list(app.config.local_domains))

    # --- extraction ---------------------------------------------------------------------

    def extract(self, view: mime.MessageView) -> Findings:
        """The URLs of every text part, parsed, at most ``max_urls``."""
        found = Findings()
        budget = self.settings.max_scan_chars
        limit = self.settings.max_urls
        seen: set[tuple[str, str]] = set()
        for part in view.structure.parts:
            if budget <= 0 or len(found.urls) >= limit:
                found.truncated = found.truncated or budget <= 0
                break
            ctype = part.content_type
            if ctype not in ("text/html", "text/plain"):
                continue
            text = part.text()
            if len(text) > budget:
                text, found.truncated = text[:budget], True
            budget -= len(text)
            scans = []
            if ctype == "text/html":
                scans.append(mime.html_links(text, limit - len(found.urls)))
                text = part.plain_text()[:budget]  # cached: shared with bayes and rules
            scans.append(mime.text_urls(text, limit))
            for scan in scans:
                found.tags += scan.tags
                found.truncated = found.truncated or scan.truncated
                for link in scan.links:
                    found.links += 1
                    key = (link.kind, link.url)
                    if key in seen and not link.text:
                        continue
                    seen.add(key)
                    if len(found.urls) >= limit:
                        found.truncated = True
                        break
                    url = parse_url(link.url, link.kind, self.redirect_params)
                    if url is None:
                        continue
                    found.urls.append(url)
                    if link.text:
                        found.shown[id(url)] = link.text
        return found

    # --- signals ------------------------------------------------------------------------

    def _is_ours(self, domain: str) -> bool:
        return domain in self.protected or domain in self.trusted

    def check_urls(self, found: Findings, sender_domains: set[str]) -> None:
        for url in found.urls:
            links = chain(url)
            text = found.shown.get(id(url))
            if text:
                self._check_mismatch(found, url, links, text)
            for link in links:
                if "obfuscated-ip" in link.flags:
                    found.add("PHISHING_URL_OBFUSCATED_IP", f"{link.host} is {link.ip}", url)
                elif "ip" in link.flags:
                    found.add("PHISHING_URL_IP", f"{link.source} to {link.ip}", url)
                if "userinfo" in link.flags and link.scheme != "ftp":
                    found.add(
                        "PHISHING_URL_USERINFO",
                        f"{link.userinfo[:60]!r}@ before the real host {link.host}",
                        url,
                    )
                if "idn" in link.flags:
                    self._check_homograph(found, url, link)
            if len(links) > 1 and links[-1].domain != url.domain:
                found.add("PHISHING_REDIRECTOR", f"{url.host} redirects to {links[-1].host}", url)
            if url.source.startswith("form.") or url.source.endswith(".formaction"):
                target = url.domain
                if target and target not in sender_domains and not self._is_ours(target):
                    found.add("PHISHING_FORM_OFFSITE", f"form posts to {target}", url)

    def _check_mismatch(self, found: Findings, url: URL, links: list[URL], text: str) -> None:
        m = _SHOWN_HOST.match(text[: MAX_SHOWN * 4])
        if m is None or not url.host:
            return
        shown_host = m.group(1).lower()
        label, suffix = registered_domain(shown_host)
        if not suffix:
            return
        if (
            suffix not in _RESERVED_TLDS
            and not listed_suffix(shown_host)
            and not text.lstrip().lower().startswith(("http://", "https://", "ftp://", "www."))
        ):
            return  # "invoice.pdf", "node.js": a file or a word with a dot, not a domain
        shown = f"{label}.{suffix}"
        if any(link.domain == shown for link in links):
            return
        target = links[-1].domain if links[-1].host else url.domain
        if target in self.trusted:
            return
        found.add("PHISHING_LINK_MISMATCH", f"text shows {shown}, link goes to {target}", url)

    def _check_homograph(self, found: Findings, url: URL, link: URL) -> None:
        for label in link.display_host.split("."):
            if label.isascii():
                continue
            kinds = scripts(label)
            if len(kinds) > 1:
                found.add(
                    "PHISHING_IDN_HOMOGRAPH",
                    f"{link.display_host} mixes {'+'.join(sorted(kinds))}",
                    url,
                )
                return
            if skeleton(label).isascii():
                found.add(
                    "PHISHING_IDN_HOMOGRAPH",
                    f"{link.display_host} reads as {skeleton(link.display_host)}",
                    url,
                )
                return

    def check_senders(
        self, found: Findings, view: mime.MessageView, envelope_from: str
    ) -> set[str]:
        """Display names and look-alike sender domains; returns the sender org domains."""
        senders: set[str] = set()
        from_addresses = view.addresses("From")[:MAX_FROM]
        for address in from_addresses:
            domain = org_domain(address.domain) if address.domain else ""
            senders.add(domain)
            if not address.name or self._is_ours(domain):
                continue
            person = None
            if self.protected_names:
                person = impersonated_name(address.name, self.protected_names)
            if person is not None:
                found.add(
                    "PHISHING_IMPERSONATION",
                    f"From name {address.name[:60]!r} is {person}, address at {address.domain}",
                )
            for shown in domains_in_text(address.name):
                shown_org = org_domain(shown)
                if shown_org == domain:
                    continue
                if shown_org in self.protected or "@" in address.name:
                    found.add(
                        "PHISHING_DISPLAY_DOMAIN",
                        f"From name shows {shown}, address at {address.domain}",
                    )
                    break
        others = [a.domain for a in view.addresses("Reply-To")[:MAX_FROM]]
        if "@" in envelope_from:
            others.append(envelope_from.rpartition("@")[2].lower().rstrip("."))
        for domain in [a.domain for a in from_addresses] + others:
            self._check_lookalike(found, domain, "sender")
        return senders

    def _check_lookalike(
        self, found: Findings, host: str, where: str, url: URL | None = None
    ) -> None:
        if not host or not self.protected:
            return
        if org_domain(host) in self.trusted:
            return
        memo = self._lookalikes
        if host in memo:
            hit = memo[host]
        else:
            if len(memo) >= MAX_MEMO:  # hosts repeat across messages; bounded memory
                memo.clear()
            hit = memo[host] = lookalike_of(host, self.protected)
        if hit is not None:
            found.add(
                "PHISHING_LOOKALIKE_DOMAIN", f"{where} {host} imitates {hit[0]} ({hit[1]})", url
            )

    # --- the hook -----------------------------------------------------------------------

    def analyse(self, view: mime.MessageView, envelope_from: str = "") -> Findings:
        """Every local (non-DNS) signal of one message."""
        found = self.extract(view)
        senders = self.check_senders(found, view, envelope_from)
        if self.protected:
            checked: set[str] = set()
            for url in found.urls:
                for link in chain(url):
                    if link.ip or not link.host or link.host in checked:
                        continue
                    checked.add(link.host)
                    self._check_lookalike(found, link.display_host, "link to", url)
        self.check_urls(found, senders)
        return found

    def lookup_names(self, found: Findings) -> list[tuple[str, bool]]:
        names: dict[str, bool] = {}
        for url in found.urls:
            for link in chain(url):
                domain = link.domain
                if link.ip or (domain and "." in domain and not self._is_ours(domain)):
                    names.setdefault(domain, bool(link.ip))
        return list(names.items())

    @hookimpl
    async def mailflow_data(self, message: MessageContext) -> Result:
        view = mime.view(message)
        found = self.analyse(view, message.envelope.mail_from)
        report: LookupReport | None = None
        if self.zones and self.resolver is not None:
            names = self.lookup_names(found)
            if names:
                report = await lookup_all(
                    self.resolver,
                    self.zones,
                    names,
                    self.settings.uribl_max_lookups,
                    self.settings.uribl_budget,
                )
        return self.result(found, report)

    def result(self, found: Findings, report: LookupReport | None = None) -> Result:
        symbols = [
            Symbol(name, self.scores[name], "; ".join(reasons))
            for name, reasons in found.reasons.items()
        ]
        details: dict[str, Any] = {
            "counts": {
                "links": found.links,
                "urls": len(found.urls),
                "tags": found.tags,
                "truncated": found.truncated,
            },
            "findings": {name: list(reasons) for name, reasons in found.reasons.items()},
        }
        if self.settings.max_details:
            flagged = [u for u in found.urls if id(u) in found.flagged]
            rest = [u for u in found.urls if id(u) not in found.flagged]
            details["urls"] = [
                self._describe(u, found, id(u) in found.flagged)
                for u in (flagged + rest)[: self.settings.max_details]
            ]
        if report is not None:
            listed: dict[str, list[str]] = {}
            for hit in report.listings:
                reason = f"{hit.domain} in {hit.zone}: {', '.join(hit.meanings)}"
                listed.setdefault(hit.symbol, []).append(reason)
                if not any(s.name == hit.symbol for s in symbols):
                    symbols.append(Symbol(hit.symbol, hit.score, reason))
            details["uribl"] = {
                "queried": report.queried,
                "skipped": report.skipped,
                "listed": listed,
                "errors": report.errors[:MAX_REASONS],
            }
        return Result(
            score=round(sum(s.score for s in symbols), 3), symbols=symbols, details=details
        )

    @staticmethod
    def _describe(url: URL, found: Findings, flagged: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "url": url.raw[:MAX_SHOWN],
            "source": url.source,
            "host": url.display_host[:MAX_SHOWN],
        }
        if url.ip:
            entry["ip"] = url.ip
        if url.flags:
            entry["flags"] = list(url.flags)
        text = found.shown.get(id(url))
        if text:
            entry["text"] = text[:MAX_SHOWN]
        if url.inner:
            # One URL of 2,048 characters can carry a hundred inner ones: a few shown.
            inner = chain(url)[1:]
            entry["redirects_to"] = [u.raw[:MAX_SHOWN] for u in inner[:MAX_REASONS]]
            if len(inner) > MAX_REASONS:
                entry["redirects_more"] = len(inner) - MAX_REASONS
        entry["flagged"] = flagged
        return entry


@dataclass(frozen=True, slots=True)
class _Zone:
    zone: str
    symbol: str
    score: float
    codes: dict[str, str]
    bitmask: dict[int, str]
    domains: bool
    ips: bool

    @classmethod
    def of(cls, z: ZoneSettings) -> _Zone:
        return cls(
            z.zone.strip(".").lower(),
            z.name,
            z.score,
            dict(z.codes),
            dict(z.bitmask),
            z.domains,
            z.ips,
        )
