"""mailflow.dns: per-message budget and bad names, against the loopback DNS server."""

from __future__ import annotations

import asyncio

import pytest

from mailflow.config import DNSConfig
from mailflow.dns import DNSTempError, Resolver, current_budget, start_budget
from mailflow.testing_dns import dns_server

ZONE = {"ok.test": [("A", "192.0.2.1")], "slow.test": [("A", "192.0.2.2")]}


def resolver_for(port: int, timeout: float = 1.0) -> Resolver:
    return Resolver(DNSConfig(nameservers=["127.0.0.1"], port=port, timeout=timeout))


async def test_spent_budget_fails_new_lookups_without_asking_the_server():
    async with dns_server(ZONE) as srv:
        res = resolver_for(srv.port)
        start_budget(0.000001)
        await asyncio.sleep(0.001)
        with pytest.raises(DNSTempError, match="budget"):
            await res.query("ok.test", "A")
        assert srv.queries == []


async def test_budget_cuts_a_lookup_shorter_than_the_per_query_timeout():
    async with dns_server(ZONE) as srv:
        srv.timeout_names.add("slow.test")
        res = resolver_for(srv.port, timeout=30.0)
        start_budget(0.2)
        with pytest.raises(DNSTempError, match="budget"):
            await res.query("slow.test", "A")


async def test_cached_answers_cost_no_budget():
    async with dns_server(ZONE) as srv:
        res = resolver_for(srv.port)
        assert await res.query("ok.test", "A") == ["192.0.2.1"]
        start_budget(0.000001)
        await asyncio.sleep(0.001)
        assert await res.query("ok.test", "A") == ["192.0.2.1"]


async def test_zero_budget_means_unlimited_and_budgets_are_per_task():
    assert start_budget(0) is None
    start_budget(5)

    async def other_message() -> object:
        start_budget(1)
        return current_budget()

    inner = await asyncio.create_task(other_message())
    assert inner is not current_budget()
    assert current_budget().seconds == 5


@pytest.mark.parametrize("name", ["a..b.test", "x" * 64 + ".test", ".".join(["abc"] * 90)])
async def test_names_that_cannot_exist_have_no_records(name):
    async with dns_server(ZONE) as srv:
        assert await resolver_for(srv.port).query(name, "TXT") == []
        assert srv.queries == []
