"""Relay control: who may send to which recipients (no open relay).

Pure functions of the config and the client, shared by every front end (SMTP,
``mailflow check``) so they cannot drift apart.
"""

from __future__ import annotations

import ipaddress

from mailflow.config import Config
from mailflow.message import Connection
from mailflow.verdict import SMTPReply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

R_RELAY_DENIED = SMTPReply(554, "Relay access denied", "5.7.1")
R_NO_ROUTE = SMTPReply(550, "No route to this domain", "5.1.2")


def in_networks(ip: str, networks: list[IPNetwork]) -> bool:
    """Is ``ip`` in one of ``networks``? IPv4-mapped IPv6 (RFC 4291 2.5.5.2) counts as IPv4."""
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def is_local_recipient(config: Config, address: str) -> bool:
    """A recipient we accept from anyone: a local domain, or postmaster (RFC 5321 4.5.1)."""
    return is_postmaster(config, address) or config.is_local_domain(address.rpartition("@")[2])


def is_postmaster(config: Config, address: str) -> bool:
    """``address`` is the reserved postmaster mailbox of this server (RFC 5321 4.5.1).

    That is ``postmaster`` without a domain, and postmaster@ each local domain that
    ``local_domains`` names or matches with a ``*.`` pattern; all in any case. With
    the catch-all ``"*"`` every address is already delivered as it is, so
    postmaster@ a domain only ``"*"`` matches keeps its own mailbox.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower() == "postmaster"
    if local.lower() != "postmaster":
        return False
    domain = domain.lower().rstrip(".")
    for pattern in config.local_domains:
        p = pattern.lower()
        if p == domain or (p.startswith("*.") and domain.endswith(p[1:])):
            return True
    return False


def resolve_recipient(config: Config, address: str) -> str:
    """The address a recipient is delivered to: the postmaster mailbox for postmaster.

    Applied at RCPT by every front end (SMTP, ``mailflow check``), so routing and
    delivery only ever see an ordinary address (``Config.postmaster_mailbox``).
    """
    return config.postmaster_mailbox if is_postmaster(config, address) else address


def admit_recipient(config: Config, conn: Connection, address: str) -> tuple[str, SMTPReply | None]:
    """Relay control for one RCPT: ``(address to deliver to, None)`` or ``(address, refusal)``.

    Postmaster is accepted from anyone (RFC 5321 4.5.1) and becomes the configured
    mailbox, even when that mailbox is relayed; every other address goes through
    :func:`relay_refusal`.
    """
    if is_postmaster(config, address):
        return config.postmaster_mailbox, None
    return address, relay_refusal(config, conn, address)


def relay_refusal(config: Config, conn: Connection, address: str) -> SMTPReply | None:
    """The answer refusing ``address`` at RCPT, or None when relay control allows it.

    No open relay (RFC 5321 7.1): a non-local recipient needs a trusted client
    (SMTP AUTH or ``relay_networks``) and a route other than "none".
    """
    if is_local_recipient(config, address):
        return None
    if not conn.trusted:
        return R_RELAY_DENIED
    domain = address.rpartition("@")[2].lower()
    if config.relay.routes.get(domain, config.relay.default) == "none":
        return R_NO_ROUTE
    return None
