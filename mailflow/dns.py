"""One shared async DNS resolver (dnspython) with a TTL-respecting cache.

Every plugin and the relay use this, so lookups never block the event loop and
identical questions inside a TTL cost nothing. Failures surface as
:class:`DNSTempError` (servfail, timeout, no nameserver) or an empty answer
(NXDOMAIN/NODATA), never as a hang.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

from mailflow.config import DNSConfig

NEGATIVE_TTL = 60.0  # seconds to remember NXDOMAIN/NODATA
MAX_CACHE_ENTRIES = 50_000


class DNSTempError(Exception):
    """The answer could not be obtained now (timeout, SERVFAIL, unreachable server)."""


@dataclass(slots=True)
class _Entry:
    expires: float
    records: list[str]


class Resolver:
    """Async resolver with a small TTL cache; safe to share across plugins."""

    def __init__(self, config: DNSConfig | None = None) -> None:
        config = config or DNSConfig()
        if config.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = list(config.nameservers)
        else:
            try:
                resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]
        resolver.port = config.port
        resolver.timeout = config.timeout
        resolver.lifetime = config.timeout
        self._resolver = resolver
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[list[str]]] = {}
        self.timeout = config.timeout

    async def query(self, name: str, rdtype: str) -> list[str]:
        """Records of ``rdtype`` at ``name`` as text; [] for NXDOMAIN/NODATA."""
        key = (name.lower().rstrip("."), rdtype)
        now = time.monotonic()
        entry = self._cache.get(key)
        if entry is not None and entry.expires > now:
            return entry.records
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            records = await self._lookup(key[0], rdtype)
            future.set_result(records)
            return records
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[key]

    async def _lookup(self, name: str, rdtype: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            self._store((name, rdtype), [], NEGATIVE_TTL)
            return []
        except (
            dns.exception.Timeout,
            dns.resolver.NoNameservers,
            dns.resolver.LifetimeTimeout,
        ) as exc:
            raise DNSTempError(f"{rdtype} {name}: {exc.__class__.__name__}") from exc
        except dns.exception.DNSException as exc:
            raise DNSTempError(f"{rdtype} {name}: {exc}") from exc
        rrset = answer.rrset
        if rrset is None:
            self._store((name, rdtype), [], NEGATIVE_TTL)
            return []
        records = [self._text(r) for r in rrset]
        self._store((name, rdtype), records, float(rrset.ttl))
        return records

    @staticmethod
    def _text(rdata: object) -> str:
        strings = getattr(rdata, "strings", None)
        if strings is not None:  # TXT: join the character-strings (RFC 7208 3.3)
            return b"".join(strings).decode("utf-8", "replace")
        return str(rdata)

    def _store(self, key: tuple[str, str], records: list[str], ttl: float) -> None:
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            now = time.monotonic()
            self._cache = {k: v for k, v in self._cache.items() if v.expires > now}
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._cache.clear()
        self._cache[key] = _Entry(time.monotonic() + ttl, records)

    # --- conveniences ---------------------------------------------------------------------

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """MX hosts sorted by preference; falls back to the domain itself (RFC 5321 5.1)."""
        records = await self.query(domain, "MX")
        hosts = []
        for rec in records:
            pref, _, host = rec.partition(" ")
            hosts.append((int(pref), host.rstrip(".")))
        hosts.sort()
        if not hosts:
            return [(0, domain)]
        if hosts == [(0, "")]:  # null MX (RFC 7505): the domain accepts no mail
            return []
        return hosts

    async def addresses(self, host: str) -> list[str]:
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        v4 = await self.query(host, "A")
        v6 = await self.query(host, "AAAA")
        return v4 + v6

    async def ptr(self, ip: str) -> str | None:
        """The reverse name of ``ip`` or None (lookup failures count as unknown)."""
        try:
            name = dns.reversename.from_address(ip).to_text()
            records = await self.query(name, "PTR")
        except (DNSTempError, ValueError, dns.exception.SyntaxError):
            return None
        return records[0].rstrip(".") if records else None
