"""Relay transports: a configured smarthost, or direct delivery to the domain's MX.

Both share one :class:`~mailflow.delivery.smtp_pool.SMTPPool` per process (made by
:func:`relay_pool`, owned by the :class:`~mailflow.delivery.dispatch.Dispatcher`, which
closes it), so idle sessions are reused across messages. Which host to use is decided
here; how to talk to it (TLS policy, AUTH, the SMTP transaction) lives in
``smtp_pool.py``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from mailflow.config import Config, RelayTarget
from mailflow.delivery.outcome import Outcome
from mailflow.delivery.smtp_pool import Destination, SessionError, SMTPPool
from mailflow.delivery.spool import QueueEntry, RecipientState
from mailflow.dns import DNSTempError, Resolver
from mailflow.verdict import Route

log = logging.getLogger("mailflow.relay")

# Bound the work of one MX attempt: a domain listing dozens of hosts/addresses must not
# keep a worker busy for hours (RFC 5321 5.1 lets the client limit the tries).
MAX_MX_ADDRESSES = 8

NO_RELAY = Outcome(550, "5.7.1 relaying not configured")


def relay_pool(config: Config) -> SMTPPool:
    """The pool the relay and the MX transport share (one per process)."""
    relay = config.relay
    helo = relay.helo_name or config.server.hostname
    return SMTPPool(helo, size=relay.pool_size, idle=relay.pool_idle)


def _ca(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def target_destination(target: RelayTarget) -> Destination:
    return Destination(
        host=target.host,
        port=target.port,
        tls=target.tls,
        tls_name=target.host,
        username=target.username,
        password=target.password,
        timeout=target.timeout,
        ca_file=_ca(target.ca_file),
    )


def _parse_host_port(text: str) -> RelayTarget | None:
    """A route target of the form ``host:port`` or ``[v6]:port`` (plugins may set one)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return RelayTarget(host=host.strip("[]"), port=int(port))


class RelayTransport:
    """Route kind ``relay``: every recipient goes to one configured target."""

    def __init__(self, config: Config, pool: SMTPPool) -> None:
        self.config = config
        self.pool = pool
        self._destinations: dict[str, Destination] = {}  # target name -> how to reach it

    def resolve(self, name: str) -> RelayTarget | None:
        return self.config.relay.targets.get(name) or _parse_host_port(name)

    def destination(self, name: str) -> Destination | None:
        """The :class:`Destination` of a target name (remembered: the config is fixed)."""
        dest = self._destinations.get(name)
        if dest is None:
            target = self.resolve(name)
            if target is None:
                return None
            if len(self._destinations) >= 1024:  # host:port targets set by plugins
                self._destinations.clear()
            dest = self._destinations[name] = target_destination(target)
        return dest

    async def __call__(
        self, entry: QueueEntry, message: bytes, rcpts: list[RecipientState], route: Route
    ) -> dict[str, Outcome]:
        name = route.target or self.config.relay.default
        if name == "none":
            return {r.address: NO_RELAY for r in rcpts}
        dest = self.destination(name)
        if dest is None:
            # The config changed under a queued message: keep it until the admin fixes it.
            outcome = Outcome(451, f"4.3.5 unknown relay target {name!r}")
            return {r.address: outcome for r in rcpts}
        try:
            return await self.pool.send(dest, entry.sender, [r.address for r in rcpts], message)
        except SessionError as exc:
            log.info("relay %s: %s", entry.id, exc.outcome)
            return exc.outcomes([r.address for r in rcpts])


class MXTransport:
    """Route kind ``mx``: look up each recipient domain's MX hosts (RFC 5321 5.1)."""

    def __init__(self, config: Config, resolver: Resolver, pool: SMTPPool) -> None:
        self.config = config
        self.resolver = resolver
        self.pool = pool

    async def __call__(
        self, entry: QueueEntry, message: bytes, rcpts: list[RecipientState], route: Route
    ) -> dict[str, Outcome]:
        by_domain: dict[str, list[str]] = defaultdict(list)
        for r in rcpts:
            by_domain[r.address.rpartition("@")[2].lower()].append(r.address)
        out: dict[str, Outcome] = {}
        for domain, addresses in by_domain.items():
            out.update(await self.deliver_domain(entry, domain, addresses, message))
        return out

    async def deliver_domain(
        self, entry: QueueEntry, domain: str, rcpts: list[str], message: bytes
    ) -> dict[str, Outcome]:
        def all_(outcome: Outcome) -> dict[str, Outcome]:
            return dict.fromkeys(rcpts, outcome)

        resolver = self.resolver
        try:
            hosts = await resolver.mx(domain)
        except DNSTempError as exc:
            return all_(Outcome(451, f"4.4.3 MX lookup for {domain} failed: {exc}"))
        if not hosts:
            # RFC 7505 section 4.1 (null MX): fail at once with 5.1.10, do not retry.
            return all_(Outcome(556, f"5.1.10 {domain} does not accept mail (null MX)"))
        relay = self.config.relay
        last: Outcome | None = None
        tried = 0
        dns_trouble = False
        for _, host in hosts:  # already sorted by preference
            try:
                ips = await resolver.addresses(host)
            except DNSTempError as exc:
                dns_trouble = True
                last = Outcome(451, f"4.4.3 address lookup for {host} failed: {exc}")
                continue
            for ip in ips:
                if tried >= MAX_MX_ADDRESSES:
                    break
                tried += 1
                dest = Destination(
                    host=ip,
                    port=relay.mx_port,
                    tls=relay.mx_tls,
                    tls_name=host,
                    timeout=relay.mx_timeout,
                    ca_file=_ca(relay.mx_ca_file),
                )
                try:
                    return await self.pool.send(dest, entry.sender, rcpts, message)
                except SessionError as exc:
                    # Unreachable or unusable: try the next address/MX (RFC 5321 5.1).
                    log.info("mx %s: %s (%s): %s", entry.id, host, ip, exc.outcome)
                    last = exc.outcome
        if last is None and not dns_trouble:
            # No MX host has an address: Postfix-style "host not found" is permanent.
            return all_(Outcome(550, f"5.4.4 no address found for any MX of {domain}"))
        return all_(last or Outcome(451, f"4.4.1 no MX of {domain} was reachable"))
