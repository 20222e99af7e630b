"""URIBL/SURBL-style DNS block lists of URL domains, through the shared resolver.

A domain ``evil.example`` is listed in zone ``multi.uribl.example`` when
``evil.example.multi.uribl.example`` has an A record; an IP host ``192.0.2.1`` is
looked up reversed (``1.2.0.192.zone``). What the returned address means is the
zone's business: exact codes (``127.0.0.2: listed``), a bitmask on the last octet
(SURBL multi: ``2: phishing``, ``4: malware``...), or, when neither is configured,
any address in 127.0.0.0/8 but the error range 127.255.255.0/24 (Spamhaus DBL's
"query refused" codes).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from mailflow.api import DNSTempError

log = logging.getLogger("mailflow.plugins.phishing")


@dataclass(slots=True)
class Listing:
    zone: str
    symbol: str
    score: float
    domain: str
    meanings: list[str]


@dataclass(slots=True)
class LookupReport:
    listings: list[Listing] = field(default_factory=list)
    queried: int = 0
    skipped: int = 0  # names not looked up: over the per-message bound
    errors: list[str] = field(default_factory=list)  # DNS failures: no signal, noted


def query_name(domain: str, ip: bool, zone: str) -> str:
    if ip:
        if ":" in domain:  # IPv6: nibbles reversed (RFC 5782 2.4)
            import ipaddress

            nibbles = ipaddress.IPv6Address(domain).exploded.replace(":", "")
            return ".".join(reversed(nibbles)) + "." + zone
        return ".".join(reversed(domain.split("."))) + "." + zone
    return f"{domain}.{zone}"


def meanings(answers: list[str], codes: dict[str, str], bitmask: dict[int, str]) -> list[str]:
    """What the A records of a listing say; [] when none of them means "listed"."""
    found: list[str] = []
    for address in answers:
        if not address.startswith("127."):
            continue  # not an answer of a block list (a wildcard, a hijacking resolver)
        if codes and address in codes:
            found.append(codes[address])
        if bitmask:
            try:
                last = int(address.rsplit(".", 1)[1])
            except ValueError:
                continue
            found.extend(meaning for bit, meaning in sorted(bitmask.items()) if last & bit)
        if not codes and not bitmask and not address.startswith("127.255.255."):
            found.append(f"listed ({address})")
    return list(dict.fromkeys(found))


async def lookup_all(
    resolver: Any,
    zones: list[Any],
    names: list[tuple[str, bool]],
    max_lookups: int,
    budget: float,
) -> LookupReport:
    """Look every (name, is_ip) up in every zone that takes it, concurrently, at most
    ``max_lookups`` queries, within ``budget`` seconds. A DNS failure or the end of
    the budget is no signal: it is noted in ``errors`` and logged."""
    report = LookupReport()
    jobs: list[tuple[Any, str, str]] = []
    for domain, ip in names:
        for zone in zones:
            if (ip and not zone.ips) or (not ip and not zone.domains):
                continue
            if len(jobs) >= max_lookups:
                report.skipped += 1
                continue
            jobs.append((zone, domain, query_name(domain, ip, zone.zone)))
    report.queried = len(jobs)
    if not jobs:
        return report

    async def one(zone: Any, domain: str, qname: str) -> None:
        try:
            answers = await resolver.query(qname, "A")
        except DNSTempError as exc:
            report.errors.append(f"{qname}: {exc}")
            return
        found = meanings(answers, zone.codes, zone.bitmask)
        if found:
            report.listings.append(Listing(zone.zone, zone.symbol, zone.score, domain, found))

    tasks = [asyncio.ensure_future(one(*job)) for job in jobs]
    done, pending = await asyncio.wait(tasks, timeout=budget)
    for task in pending:
        task.cancel()
    if pending:
        report.errors.append(f"{len(pending)} lookup(s) unanswered within {budget:g}s")
        await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        exc = task.exception()
        if exc is not None:  # not a DNS failure: a bug, or the resolver's own error
            report.errors.append(f"lookup failed: {exc!r}")
    if report.errors:
        log.info(
            "phishing: URIBL lookups gave no answer (no signal): %s", "; ".join(report.errors[:5])
        )
    return report
