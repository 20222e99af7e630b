"""Throttling SMTP AUTH failures across connections: per client address and per user name.

One connection is cut off after a few failures (:mod:`mailflow.auth`), but a guesser
simply opens more. So failures are also counted per client address (an IPv6 client
by its /64, which one host usually has to itself) and per user name, across all
connections: each failure is answered after a delay that grows with those counts,
and at ``max_failures_per_ip`` / ``max_failures_per_user`` the address or name is
locked out for ``lockout_time``: it gets ``454 4.7.0`` at once, without a password
check (RFC 4954 6), after the longest failure delay (so a guesser does not spin).

:class:`AuthGuard` is what the SMTP protocol talks to. It keeps the counts in an
:class:`AuthLimiter` (in memory here; the interface is small so the counts can move
to a shared store) and bounds the password checks: argon2 takes ~50 ms and ~64 MiB
per check on purpose, so at most ``max_concurrent_checks`` run at once, each in a
worker thread, and the rest wait their turn without holding a thread or a core.
Other clients' commands, and their message deliveries in the default thread pool,
never queue behind a burst of guesses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from mailflow.config import AuthThrottleConfig
from mailflow.policy import in_networks

log = logging.getLogger("mailflow.auth")

Scope = Literal["address", "user"]
_T = TypeVar("_T")

# Entries kept per scope; beyond this the least recently updated one is forgotten.
# An entry is ~200 bytes, so both tables together stay under ~5 MB.
TRACKED_PER_SCOPE = 10_000
# User names are counted by at most this many characters (a client picks them).
MAX_USER_KEY = 256
# A failure is answered after failure_delay times the count, at most this many times.
MAX_DELAY_STEPS = 10
# Clients with IPv6 addresses are counted by their network of this length.
IPV6_PREFIX = 64


def address_key(ip: str) -> str:
    """The client address as counted: IPv4 as is (also IPv4-mapped IPv6), IPv6 by /64."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip[:MAX_USER_KEY]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/{IPV6_PREFIX}", strict=False))
    return str(addr)


@dataclass(slots=True)
class Failure:
    """What one more failure did: the highest count now, and what got locked by it."""

    count: int
    locked: list[Scope]


class AuthLimiter(Protocol):
    """Where failure counts live. Keys are already normalized (:func:`address_key`);
    ``address`` is None for a client exempt from the per-address limit."""

    def locked(self, address: str | None, user: str) -> Scope | None:
        """The scope (address before user) that is locked out now, or None."""
        ...

    def failed(self, address: str | None, user: str) -> Failure:
        """Count a failed attempt of ``user`` from ``address``."""
        ...

    def succeeded(self, address: str | None, user: str) -> None:
        """A successful login: the user's count starts over (the address's does not)."""
        ...


@dataclass(slots=True)
class _Entry:
    failures: int
    last: float  # time of the last failure
    locked_until: float = 0.0

    def expired(self, now: float, window: float) -> bool:
        return now >= self.locked_until and now - self.last >= window


class _Table:
    """Failure counts for one scope, bounded: expired entries go, then the oldest."""

    def __init__(self, limit: int, window: float, lockout: float, capacity: int) -> None:
        self.limit = limit
        self.window = window
        self.lockout = lockout
        self.capacity = capacity
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently failed first

    def __len__(self) -> int:
        return len(self._entries)

    def locked(self, key: str, now: float) -> bool:
        entry = self._entries.get(key)
        return entry is not None and now < entry.locked_until

    def fail(self, key: str, now: float) -> tuple[int, bool]:
        """Count a failure; returns the count and whether this one locked ``key`` out."""
        entry = self._entries.pop(key, None)
        if entry is None or entry.expired(now, self.window):
            entry = _Entry(0, now)
        entry.failures += 1
        entry.last = now
        newly_locked = entry.failures >= self.limit and now >= entry.locked_until
        if newly_locked:
            entry.locked_until = now + self.lockout
            entry.failures = 0  # after the lockout, counting starts over
        self._entries[key] = entry
        self._trim(now)
        return (self.limit if newly_locked else entry.failures), newly_locked

    def forget(self, key: str, now: float) -> None:
        """Start ``key``'s count over, unless it is locked out right now.

        A lockout that is over is no reason to keep counting: the login just proved
        the user knows the password.
        """
        entry = self._entries.get(key)
        if entry is not None and now >= entry.locked_until:
            del self._entries[key]

    def _trim(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest = next(iter(entries.values()))
            if not oldest.expired(now, self.window):
                break
            entries.popitem(last=False)
        while len(entries) > self.capacity:
            entries.popitem(last=False)


class MemoryAuthLimiter:
    """:class:`AuthLimiter` in this process's memory, at most ``capacity`` keys per scope."""

    def __init__(
        self,
        settings: AuthThrottleConfig,
        *,
        capacity: int = TRACKED_PER_SCOPE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        window, lockout = settings.failure_window, settings.lockout_time
        self.addresses = _Table(settings.max_failures_per_ip, window, lockout, capacity)
        self.users = _Table(settings.max_failures_per_user, window, lockout, capacity)
        self._clock = clock

    def locked(self, address: str | None, user: str) -> Scope | None:
        now = self._clock()
        if address is not None and self.addresses.locked(address, now):
            return "address"
        if self.users.locked(user, now):
            return "user"
        return None

    def failed(self, address: str | None, user: str) -> Failure:
        now = self._clock()
        by_address, address_locked = 0, False
        if address is not None:
            by_address, address_locked = self.addresses.fail(address, now)
        by_user, user_locked = self.users.fail(user, now)
        locked: list[Scope] = []
        if address_locked:
            locked.append("address")
        if user_locked:
            locked.append("user")
        return Failure(max(by_address, by_user), locked)

    def succeeded(self, address: str | None, user: str) -> None:
        self.users.forget(user, self._clock())


LockoutListener = Callable[[Scope, str], None]


class LockedOut(Exception):
    """The client address or the user name was locked out while the check waited."""

    def __init__(self, scope: Scope) -> None:
        super().__init__(scope)
        self.scope = scope


class AuthGuard:
    """The AUTH failure policy of one server: counts, delays, lockouts, password checks."""

    def __init__(
        self,
        settings: AuthThrottleConfig,
        limiter: AuthLimiter | None = None,
        *,
        on_lockout: LockoutListener | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.limiter: AuthLimiter = limiter or MemoryAuthLimiter(settings)
        self._on_lockout = on_lockout
        self._on_failure = on_failure
        self._checks = asyncio.Semaphore(settings.max_concurrent_checks)
        self._exempt = [
            ipaddress.ip_network(net, strict=False) for net in settings.max_failures_per_ip_exempt
        ]

    def keys(self, ip: str, login: bytes) -> tuple[str | None, str]:
        """The (address, user) keys counted for a client address and a login name;
        the address None when ``max_failures_per_ip_exempt`` exempts it."""
        # At most 4 octets per character in UTF-8: decode no more than the key keeps.
        user = login[: 4 * MAX_USER_KEY].decode("utf-8", "replace")[:MAX_USER_KEY]
        if self._exempt and in_networks(ip, self._exempt):
            return None, user
        return address_key(ip), user

    def locked(self, ip: str, login: bytes) -> Scope | None:
        return self.limiter.locked(*self.keys(ip, login))

    @property
    def lockout_delay(self) -> float:
        """How long a locked-out attempt waits for its 454: the longest failure delay."""
        return self.settings.failure_delay * MAX_DELAY_STEPS

    async def check(self, ip: str, login: bytes, verify: Callable[[], _T]) -> _T:
        """Run the blocking password check ``verify`` in a worker thread, when a slot is free.

        The lockout is looked at again once the slot is ours: guesses that queued up
        before the address or name was locked out are refused then (:class:`LockedOut`),
        not checked one after the other. (A failure is counted right after its check,
        before the next one in line runs: see ``AuthMechanisms._check_password``.)
        """
        async with self._checks:
            scope = self.locked(ip, login)
            if scope is not None:
                raise LockedOut(scope)
            return await asyncio.to_thread(verify)

    def failed(self, ip: str, login: bytes, connection_failures: int) -> float:
        """Count a failure; returns how long to wait before answering it."""
        address, user = self.keys(ip, login)
        failure = self.limiter.failed(address, user)
        if self._on_failure is not None:
            self._on_failure()
        for scope in failure.locked:
            key = (address or "") if scope == "address" else user
            limit = (
                self.settings.max_failures_per_ip
                if scope == "address"
                else self.settings.max_failures_per_user
            )
            log.warning(
                "AUTH lockout: %s %s locked out for %gs after %d failed attempts",
                scope,
                key,
                self.settings.lockout_time,
                limit,
            )
            if self._on_lockout is not None:
                self._on_lockout(scope, key)
        steps = min(max(failure.count, connection_failures), MAX_DELAY_STEPS)
        return self.settings.failure_delay * steps

    def succeeded(self, ip: str, login: bytes) -> None:
        self.limiter.succeeded(*self.keys(ip, login))
