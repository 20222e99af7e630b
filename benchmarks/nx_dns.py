"""A loopback DNS responder that answers every query at once with NXDOMAIN.

Both milters of :mod:`benchmarks.milter_load` point their resolvers here: lookups
(rspamd's RBL/URIBL checks, say) cost one quick round trip instead of a timeout, and
nothing leaves the machine. Runs in a daemon thread of the benchmark process.
"""

from __future__ import annotations

import socket
import struct
import threading

RCODE_NXDOMAIN = 3
_HEADER = struct.Struct("!HHHHHH")


def nxdomain(query: bytes) -> bytes | None:
    """The NXDOMAIN answer to ``query`` (its ID and question echoed), None if malformed."""
    if len(query) < _HEADER.size:
        return None
    ident, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(query)
    if flags & 0x8000:  # a response, not a query
        return None
    # QR, the query's opcode and RD, RA, rcode; the question section copied as sent
    # (EDNS records in the additional section are dropped: ARCOUNT 0).
    reply_flags = 0x8000 | (flags & 0x7900) | 0x0080 | RCODE_NXDOMAIN
    question = _question(query, qdcount)
    if question is None:
        return None
    return _HEADER.pack(ident, reply_flags, qdcount, 0, 0, 0) + question


def _question(query: bytes, count: int) -> bytes | None:
    pos = _HEADER.size
    for _ in range(count):
        while True:
            if pos >= len(query):
                return None
            length = query[pos]
            pos += 1 + length
            if length == 0:
                break
        pos += 4  # QTYPE, QCLASS
    if pos > len(query):
        return None
    return query[_HEADER.size : pos]


class NxDns:
    """``start()`` binds 127.0.0.1 on a free UDP port (``port``) and serves until exit."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.answered = 0

    def start(self) -> None:
        threading.Thread(target=self._serve, name="nx-dns", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            reply = nxdomain(query)
            if reply is not None:
                self.sock.sendto(reply, peer)
                self.answered += 1

    def stop(self) -> None:
        self.sock.close()
