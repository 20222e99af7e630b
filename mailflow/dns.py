"""One shared async DNS resolver (dnspython) with a TTL-respecting cache.

Every plugin and the relay use this, so lookups never block the event loop and
identical questions inside a TTL cost nothing. Failures surface as
:class:`DNSTempError` (servfail, timeout, no nameserver, budget spent) or an empty
answer (NXDOMAIN/NODATA, or a name that cannot exist), never as a hang.

Time is bounded twice (see docs/dns.md): every query by ``dns.timeout``, and all
the queries made for one message by ``dns.budget``. The budget is a deadline kept
in a context variable: the pipeline starts a fresh one at MAIL FROM (and at end of
data when none is running), and every coroutine and worker thread of that SMTP
transaction sees it, because asyncio tasks and ``asyncio.to_thread`` copy the
caller's context.
"""

from __future__ import annotations

import asyncio
import contextvars
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


@dataclass(frozen=True, slots=True)
class Budget:
    """The DNS time one message may still spend: a monotonic deadline."""

    seconds: float
    deadline: float

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


_budget: contextvars.ContextVar[Budget | None] = contextvars.ContextVar(
    "mailflow_dns_budget", default=None
)


def start_budget(seconds: float) -> Budget | None:
    """Give the current message (this task's context) ``seconds`` of DNS time.

    ``0`` means unlimited (only the per-query timeout applies). Returns the budget.
    """
    budget = Budget(seconds, time.monotonic() + seconds) if seconds > 0 else None
    _budget.set(budget)
    return budget


def current_budget() -> Budget | None:
    """The budget of the message being processed in this context, if any."""
    return _budget.get()


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
        budget = _budget.get()
        if budget is not None and budget.remaining() <= 0:
            raise DNSTempError(f"{rdtype} {key[0]}: DNS budget of {budget.seconds}s spent")
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            records = await self._bounded_lookup(key[0], rdtype, budget)
            future.set_result(records)
            return records
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[key]

    async def _bounded_lookup(self, name: str, rdtype: str, budget: Budget | None) -> list[str]:
        if budget is None:
            return await self._lookup(name, rdtype)
        try:
            async with asyncio.timeout(budget.remaining()):
                return await self._lookup(name, rdtype)
        except TimeoutError:
            raise DNSTempError(f"{rdtype} {name}: DNS budget of {budget.seconds}s spent") from None

    async def _lookup(self, name: str, rdtype: str) -> list[str]:
        try:
            # A name that cannot exist (empty or over-long label, RFC 1035 2.3.4) has no
            # records; asking would only turn a permanent fact into a temporary error.
            dns.name.from_text(name)
        except dns.exception.DNSException:
            return []
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
