"""What the SMTP front end refuses before any plugin runs: too many connections,
malformed addresses, message data no plugin gets to see (``mailflow check`` refuses
the same data).

Relay control is :func:`mailflow.policy.admit_recipient`, shared with ``check``
through :mod:`mailflow.transaction`.
"""

from __future__ import annotations

import re
from collections import Counter

from mailflow.config import ServerConfig
from mailflow.policy import IPNetwork, in_networks
from mailflow.smtp.data import DataFacts
from mailflow.verdict import SMTPReply

# RFC 5321 3.1: replies given before closing the connection.
R_TOO_MANY_CONNS = SMTPReply(421, "Too many connections, try again later", "4.7.0")
R_TOO_MANY_FROM_IP = SMTPReply(
    421, "Too many connections from your address, try again later", "4.7.0"
)


def connection_refusal(
    server: ServerConfig,
    active: int,
    active_by_ip: Counter[str],
    ip: str,
    exempt: list[IPNetwork],
) -> SMTPReply | None:
    """The 421 for a connection over ``max_connections`` (all clients, this one
    counted) or ``max_connections_per_ip`` (unless ``ip`` is exempt), else None."""
    if active > server.max_connections:
        return R_TOO_MANY_CONNS
    per_ip = server.max_connections_per_ip
    if per_ip is not None and active_by_ip[ip] > per_ip and not in_networks(ip, exempt):
        return R_TOO_MANY_FROM_IP
    return None


# RFC 5321 4.2 replies to message data refused before the plugins.
R_LOOP = SMTPReply(554, "Too many Received headers: mail loop?", "5.4.6")
R_BARE_NEWLINE = SMTPReply(
    550, "Bare CR or LF in message data is not allowed (RFC 5322 2.3)", "5.6.0"
)
R_NUL = SMTPReply(550, "NUL characters are not allowed in message data", "5.6.0")


def data_refusal(facts: DataFacts, server: ServerConfig) -> SMTPReply | None:
    """The refusal of message data that no plugin gets to see, else None."""
    if facts.nul:
        return R_NUL
    if facts.bare_newline and server.bare_newline == "reject":
        return R_BARE_NEWLINE
    if facts.received >= server.max_received_headers:
        return R_LOOP
    return None


_ADDRESS_OK = re.compile(
    r"^[^\s<>()\[\],;:\\\"]+@[A-Za-z0-9.\-\[\]:]+$|^postmaster$", re.IGNORECASE
)


def address_ok(address: str) -> bool:
    """Plausible mailbox syntax, and valid UTF-8 (RFC 6531 3.3): aiosmtpd hands us
    undecodable bytes as surrogate escapes, which must not reach paths or the spool."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return _ADDRESS_OK.match(address) is not None
