"""A small authoritative DNS server on 127.0.0.1 for tests (UDP and TCP, one port).

Tests of SPF, DKIM, DMARC and relay-by-MX need real DNS answers, and must never
touch the internet. This server answers from a plain dict, inside the caller's
event loop, and can be told to stay silent (timeouts) or fail (SERVFAIL) per name::

    async with dns_server({
        "example.test": [("MX", "10 mx.example.test."), ("TXT", "v=spf1 -all")],
        "mx.example.test": [("A", "127.0.0.1", 60)],  # optional per-record TTL
    }) as srv:
        config = make_config(f"dns: {{nameservers: [127.0.0.1], port: {srv.port}}}")

``srv.records`` is the live dict: tests may add or change records at any time.
A record value is the RDATA in zone-file text, except for TXT, whose value is the
string itself (split into 255-byte character-strings as RFC 1035 3.3.14 requires)
or a list of strings to send exactly those character-strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

log = logging.getLogger("mailflow.testing_dns")

DEFAULT_TTL = 300
TXT_CHUNK = 255  # RFC 1035 3.3: a <character-string> holds at most 255 octets
CLASSIC_UDP_SIZE = 512  # RFC 1035 4.2.1: the UDP limit without EDNS
MAX_CNAME_CHAIN = 8
BIND_ATTEMPTS = 20  # UDP and TCP must share a port; retry if TCP's is taken

# (type, value) or (type, value, ttl); value is str, or list[str] for TXT
RecordSpec = tuple[Any, ...]
Zone = dict[str, list[RecordSpec]]


def _key(name: str | dns.name.Name) -> str:
    return str(name).rstrip(".").lower()


def _txt_strings(value: str | bytes | list[str] | list[bytes]) -> list[bytes]:
    if isinstance(value, list):
        return [v.encode() if isinstance(v, str) else v for v in value]
    data = value.encode() if isinstance(value, str) else value
    if not data:
        return [b""]
    return [data[i : i + TXT_CHUNK] for i in range(0, len(data), TXT_CHUNK)]


def _rdata(rdtype: dns.rdatatype.RdataType, value: Any) -> dns.rdata.Rdata:
    if rdtype == dns.rdatatype.TXT:
        return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, rdtype, _txt_strings(value))
    return dns.rdata.from_text(
        dns.rdataclass.IN, rdtype, str(value), origin=dns.name.root, relativize=False
    )


@dataclass
class DNSTestServer:
    """What ``dns_server`` yields: the address, the live zone and a query log."""

    records: Zone
    ttl: int = DEFAULT_TTL
    host: str = "127.0.0.1"
    port: int = 0
    timeout_names: set[str] = field(default_factory=set)  # never answered
    servfail_names: set[str] = field(default_factory=set)  # answered with SERVFAIL
    queries: list[tuple[str, str]] = field(default_factory=list)  # (name, type) log
    tcp_queries: int = 0  # how many of them came over TCP (truncation fallback)

    def config_yaml(self, timeout: float = 1.0) -> str:
        """The ``dns:`` section pointing mailflow's resolver at this server."""
        return f"dns: {{nameservers: ['{self.host}'], port: {self.port}, timeout: {timeout}}}\n"

    def queried(self, name: str, rdtype: str | None = None) -> int:
        """How many queries arrived for ``name`` (and ``rdtype``, when given)."""
        key = _key(name)
        return sum(1 for n, t in self.queries if n == key and rdtype in (None, t))

    # --- answering ------------------------------------------------------------------------

    def _lookup(self, name: str) -> list[RecordSpec] | None:
        for key, specs in self.records.items():
            if _key(key) == name:
                return specs
        return None

    def _exists(self, name: str) -> bool:
        """True for names with records, and for empty non-terminals (RFC 8020)."""
        if self._lookup(name) is not None:
            return True
        suffix = "." + name
        return any(_key(k).endswith(suffix) for k in self.records)

    def _rrset(
        self, owner: dns.name.Name, rdtype: dns.rdatatype.RdataType, specs: list[RecordSpec]
    ) -> dns.rrset.RRset | None:
        rrset: dns.rrset.RRset | None = None
        for spec in specs:
            if dns.rdatatype.from_text(str(spec[0]).upper()) != rdtype:
                continue
            ttl = int(spec[2]) if len(spec) > 2 else self.ttl
            if rrset is None:
                rrset = dns.rrset.RRset(owner, dns.rdataclass.IN, rdtype)
            rrset.add(_rdata(rdtype, spec[1]), ttl)
        return rrset

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to ``query``, or None to stay silent (a simulated timeout).

        A record the test wrote wrongly (bad RDATA text) is logged and answered with
        SERVFAIL, so the mistake shows at once instead of as a slow timeout.
        """
        try:
            return self._answer(query)
        except Exception:
            log.exception("DNS test server: cannot answer %s", query.question)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        name = _key(question.name)
        self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
        if name in {_key(n) for n in self.timeout_names}:
            return None
        if name in {_key(n) for n in self.servfail_names}:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        owner = question.name
        for _ in range(MAX_CNAME_CHAIN):
            specs = self._lookup(_key(owner))
            if specs is None:
                if not self._exists(_key(owner)):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return response  # NODATA for an empty non-terminal
            rrset = self._rrset(owner, question.rdtype, specs)
            if rrset is not None:
                response.answer.append(rrset)
                return response
            cname = self._rrset(owner, dns.rdatatype.CNAME, specs)
            if cname is None or question.rdtype == dns.rdatatype.CNAME:
                return response  # NODATA: the name exists, the type does not
            response.answer.append(cname)
            owner = cname[0].target
        return response


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSTestServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return  # not DNS: ignore, as real servers do with garbage
        response = self.server.answer(query)
        if response is None or self.transport is None:
            return
        # RFC 6891 6.2.3: the client's EDNS payload size, else the classic 512 octets.
        limit = max(query.payload, CLASSIC_UDP_SIZE) if query.edns >= 0 else CLASSIC_UDP_SIZE
        try:
            wire = response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # RFC 1035 4.2.1 / RFC 7766: set TC so the client retries over TCP.
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            wire = truncated.to_wire()
        self.transport.sendto(wire, addr)


async def _serve_tcp(
    server: DNSTestServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """RFC 1035 4.2.2 / RFC 7766: two-octet length prefix, several queries per connection."""
    try:
        while True:
            try:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                data = await reader.readexactly(size)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                return
            server.tcp_queries += 1
            response = server.answer(query)
            if response is None:
                continue  # stay silent; the client times out
            wire = response.to_wire()
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def dns_server(
    records: Zone | None = None, *, ttl: int = DEFAULT_TTL
) -> AsyncIterator[DNSTestServer]:
    """Serve ``records`` on 127.0.0.1, UDP and TCP on one free port, in this loop."""
    server = DNSTestServer(records if records is not None else {}, ttl=ttl)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            tasks.add(task)
        try:
            await _serve_tcp(server, reader, writer)
        finally:
            if task is not None:
                tasks.discard(task)

    udp: asyncio.DatagramTransport | None = None
    tcp: asyncio.Server | None = None
    for _ in range(BIND_ATTEMPTS):
        udp, _proto = await loop.create_datagram_endpoint(
            lambda: _UDP(server), local_addr=(server.host, 0)
        )
        port = udp.get_extra_info("sockname")[1]
        try:
            tcp = await asyncio.start_server(on_tcp, server.host, port)
        except OSError:
            udp.close()  # the TCP side of this port is taken: try another
            continue
        server.port = port
        break
    if udp is None or tcp is None:
        raise OSError("could not bind UDP and TCP on one port")
    try:
        yield server
    finally:
        udp.close()
        tcp.close()
        for task in list(tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(tcp.wait_closed(), 5)
