"""The loopback DNS test server, exercised through mailflow's own resolver."""

from __future__ import annotations

import pytest

from mailflow.config import DNSConfig
from mailflow.dns import DNSTempError, Resolver
from mailflow.testing_dns import dns_server

ZONE = {
    "example.test": [
        ("MX", "10 mx.example.test."),
        ("TXT", "v=spf1 ip4:127.0.0.1 -all"),
    ],
    "mx.example.test": [("A", "127.0.0.1"), ("AAAA", "::1")],
    "alias.example.test": [("CNAME", "mx.example.test.")],
    "sel._domainkey.example.test": [("TXT", "v=DKIM1; p=" + "A" * 400)],
    "zero.example.test": [("A", "192.0.2.1", 0)],
}


def resolver_for(port: int, timeout: float = 1.0) -> Resolver:
    return Resolver(DNSConfig(nameservers=["127.0.0.1"], port=port, timeout=timeout))


async def test_answers_known_records_by_type():
    async with dns_server(ZONE) as srv:
        assert srv.host == "127.0.0.1" and srv.port > 0
        res = resolver_for(srv.port)
        assert await res.query("example.test", "MX") == ["10 mx.example.test."]
        assert await res.query("example.test", "TXT") == ["v=spf1 ip4:127.0.0.1 -all"]
        assert await res.addresses("mx.example.test") == ["127.0.0.1", "::1"]
        assert await res.mx("example.test") == [(10, "mx.example.test")]
        assert ("example.test", "MX") in srv.queries


async def test_unknown_name_and_missing_type_are_empty_answers():
    async with dns_server(ZONE) as srv:
        res = resolver_for(srv.port)
        assert await res.query("nope.example.test", "A") == []  # NXDOMAIN
        assert await res.query("example.test", "A") == []  # NODATA
        assert await res.query("_domainkey.example.test", "TXT") == []  # empty non-terminal


async def test_cname_is_followed_inside_the_zone():
    async with dns_server(ZONE) as srv:
        assert await resolver_for(srv.port).query("alias.example.test", "A") == ["127.0.0.1"]


async def test_long_txt_is_split_into_character_strings_and_joined_back():
    import dns.asyncresolver

    async with dns_server(ZONE) as srv:
        raw = dns.asyncresolver.Resolver(configure=False)
        raw.nameservers, raw.port = ["127.0.0.1"], srv.port
        answer = await raw.resolve("sel._domainkey.example.test", "TXT")
        strings = answer.rrset[0].strings
        assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
        joined = await resolver_for(srv.port).query("sel._domainkey.example.test", "TXT")
        assert joined == ["v=DKIM1; p=" + "A" * 400]


async def test_large_answer_sets_tc_and_the_resolver_retries_over_tcp():
    big = {"big.test": [("TXT", f"record-{i:03d}-" + "x" * 90) for i in range(40)]}
    async with dns_server(big) as srv:
        records = await resolver_for(srv.port).query("big.test", "TXT")
        assert len(records) == 40
        assert srv.tcp_queries == 1


async def test_timeout_and_servfail_names_become_temp_errors():
    async with dns_server(ZONE) as srv:
        srv.timeout_names.add("example.test")
        srv.servfail_names.add("mx.example.test")
        res = resolver_for(srv.port, timeout=0.2)
        with pytest.raises(DNSTempError):
            await res.query("example.test", "TXT")
        with pytest.raises(DNSTempError):
            await res.query("mx.example.test", "A")


async def test_cache_respects_ttl_and_records_are_live():
    async with dns_server(ZONE) as srv:
        res = resolver_for(srv.port)
        await res.query("mx.example.test", "A")
        await res.query("mx.example.test", "A")
        assert srv.queried("mx.example.test", "A") == 1  # second answer from the cache
        await res.query("zero.example.test", "A")
        await res.query("zero.example.test", "A")
        assert srv.queried("zero.example.test", "A") == 2  # TTL 0: never cached
        srv.records["new.example.test"] = [("A", "192.0.2.7")]
        assert await res.query("new.example.test", "A") == ["192.0.2.7"]


async def test_garbage_datagrams_are_ignored():
    import asyncio
    import socket

    async with dns_server(ZONE) as srv:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x00garbage", ("127.0.0.1", srv.port))
        await asyncio.sleep(0)
        assert await resolver_for(srv.port).query("example.test", "MX")


async def test_ttl_defaults_to_300_and_can_be_set_per_record():
    import dns.asyncresolver

    async with dns_server({**ZONE, "ttl.test": [("A", "192.0.2.9", 42)]}) as srv:
        raw = dns.asyncresolver.Resolver(configure=False)
        raw.nameservers, raw.port = ["127.0.0.1"], srv.port
        assert (await raw.resolve("mx.example.test", "A")).rrset.ttl == 300
        assert (await raw.resolve("ttl.test", "A")).rrset.ttl == 42
