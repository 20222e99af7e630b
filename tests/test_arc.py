"""ARC chain verification (plugin ``arc``) with chains sealed by dkimpy in the test.

Each hop adds an Authentication-Results header for its own authserv-id, then
``dkim.arc_sign`` seals; keys are served by the loopback DNS server.
"""

from __future__ import annotations

import re

import dkim
import pytest
from mailflow_plugins.dkim.keys import DKIMKeyError

from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.hookspecs import hookimpl
from mailflow.testing import make_message, running_server, send
from mailflow.testing_dns import dns_server
from tests.dkim_support import KeyFixture, foreign_key, run_arcverify


@pytest.fixture
def hop1(tmp_path) -> KeyFixture:
    return foreign_key(tmp_path, "hop1.test", "arc1", "rsa")


@pytest.fixture
def hop2(tmp_path) -> KeyFixture:
    return foreign_key(tmp_path, "hop2.test", "arc2", "rsa")


def seal(raw: bytes, key: KeyFixture, results: str) -> bytes:
    """One forwarding hop: record its results, then add the ARC set (RFC 8617 5.1)."""
    raw = f"Authentication-Results: {key.domain}; {results}\r\n".encode() + raw
    headers = dkim.arc_sign(
        raw,
        key.selector.encode(),
        key.domain.encode(),
        key.path.read_bytes(),
        key.domain.encode(),
    )
    assert headers, "dkimpy declined to seal"
    return b"".join(headers) + raw


def two_hops(hop1: KeyFixture, hop2: KeyFixture, between: bytes = b"") -> bytes:
    raw = seal(make_message(subject="list post"), hop1, "spf=pass smtp.mailfrom=a@origin.test")
    raw = raw.replace(b"Subject: list post", b"Subject: [list] list post" + between)
    return seal(raw, hop2, "arc=pass")


async def arc_report(make_config, dns, raw: bytes, settings: str = "{}") -> dict:
    config = make_config(dns.config_yaml() + f"plugins: [{{name: arc, settings: {settings}}}]\n")
    app = App(config)
    await app.startup()
    try:
        ctx = await check_message(app, raw, recipients=["bob@example.com"])
    finally:
        await app.shutdown()
    return report(ctx)["plugins"]["arc"]


async def test_no_arc_headers_is_none(make_config):
    async with dns_server({}) as dns:
        rep = await arc_report(make_config, dns, make_message())
        assert dns.queries == []
    assert (rep["result"], rep["chain_length"]) == ("none", 0)


async def test_one_and_two_hop_chains_pass(make_config, hop1, hop2):
    one = seal(make_message(), hop1, "spf=pass smtp.mailfrom=a@origin.test")
    async with dns_server({**hop1.zone(), **hop2.zone()}) as dns:
        rep1 = await arc_report(make_config, dns, one)
        rep2 = await arc_report(make_config, dns, two_hops(hop1, hop2))
    assert (rep1["result"], rep1["chain_length"]) == ("pass", 1)
    assert (rep2["result"], rep2["chain_length"]) == ("pass", 2)
    assert [(s["instance"], s["as_domain"], s["cv"]) for s in rep2["sets"]] == [
        (2, "hop2.test", "pass"),
        (1, "hop1.test", "none"),
    ]
    assert rep2["symbols"] == [{"name": "ARC_PASS", "score": 0.0, "reason": ""}]


async def test_change_after_the_last_seal_fails(make_config, hop1, hop2):
    raw = two_hops(hop1, hop2).replace(b"this is a test", b"this is a trap")
    async with dns_server({**hop1.zone(), **hop2.zone()}) as dns:
        rep = await arc_report(make_config, dns, raw, "{fail_score: 1.5}")
    assert rep["result"] == "fail"
    assert "ARC-Message-Signature did not validate" in rep["reason"]
    assert rep["score"] == 1.5


async def test_forged_seal_fails(make_config, hop1, hop2):
    raw = two_hops(hop1, hop2)
    # Claim the first hop saw a passing chain: the seal's own signature breaks.
    forged = re.sub(rb"(ARC-Seal: i=1;[^\r]*?)cv=none", rb"\1cv=pass", raw)
    assert forged != raw
    async with dns_server({**hop1.zone(), **hop2.zone()}) as dns:
        rep = await arc_report(make_config, dns, forged)
    assert rep["result"] == "fail"


async def test_incomplete_set_and_bad_instance_fail(make_config, hop1):
    raw = seal(make_message(), hop1, "spf=pass smtp.mailfrom=a@origin.test")
    no_aar = re.sub(rb"ARC-Authentication-Results: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*", b"", raw)
    assert no_aar != raw
    high = raw.replace(b"ARC-Seal: i=1;", b"ARC-Seal: i=51;")
    async with dns_server(hop1.zone()) as dns:
        incomplete = await arc_report(make_config, dns, no_aar)
        beyond = await arc_report(make_config, dns, high)
    assert incomplete["result"] == "fail"
    assert "Incomplete ARC set" in incomplete["reason"]
    assert (beyond["result"], beyond["reason"]) == ("fail", "invalid ARC instance i=51")


async def test_missing_key_and_dns_timeout_fail_with_reason(make_config, hop1, hop2):
    raw = two_hops(hop1, hop2)
    async with dns_server(hop2.zone()) as dns:  # hop1's key is not published
        missing = await arc_report(make_config, dns, raw)
    async with dns_server({**hop1.zone(), **hop2.zone()}) as dns:
        dns.timeout_names.add(hop1.name)
        timeout = await arc_report(make_config, dns, raw)
    assert missing["result"] == "fail"
    assert "ARC-Seal[1] did not validate" in missing["reason"]
    assert timeout["result"] == "fail"
    assert "key lookup failed" in timeout["reason"]


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    def mailflow_data(self, message):
        self.seen.append(
            (
                message.result_of("dkim").details["result"],
                message.result_of("arc").details["result"],
            )
        )


async def test_forwarded_mail_through_smtp_dkim_fails_but_arc_passes(make_config, tmp_path, hop1):
    """The case ARC exists for: a list footer breaks DKIM, the list's seal vouches."""
    author = foreign_key(tmp_path, "origin.test", "s1", "ed25519")
    original = make_message(sender="a@origin.test")
    signed = (
        dkim.sign(
            original,
            b"s1",
            b"origin.test",
            author.path.read_bytes(),
            signature_algorithm=b"ed25519-sha256",
        )
        + original
    )
    forwarded = signed.replace(b"this is a test.\r\n", b"this is a test.\r\n--\r\nlist footer\r\n")
    sealed = seal(forwarded, hop1, "dkim=pass header.d=origin.test")
    recorder = Recorder()
    async with dns_server({**author.zone(), **hop1.zone()}) as dns:
        config = make_config(
            dns.config_yaml() + "plugins: [{name: dkim}, {name: arc}, {name: recorder}]\n"
        )
        async with running_server(config, extra_plugins={"recorder": recorder}) as srv:
            await send(srv.port, "list@hop1.test", ["bob@example.com"], sealed)
            await srv.wait_delivered("bob@example.com")
    assert recorder.seen == [("fail", "pass")]


# --- sealing (plugin arc_seal) --------------------------------------------------------------


def seal_config(make_config, dns, key: KeyFixture, before: str = "{name: arc}, {name: authres}, "):
    settings = f"{{domain: {key.domain}, selector: {key.selector}, key_file: '{key.path}'}}"
    return make_config(
        dns.config_yaml() + f"plugins: [{before}{{name: arc_seal, settings: {settings}}}]\n"
    )


async def run_check(config, raw: bytes) -> tuple[bytes, dict]:
    app = App(config)
    await app.startup()
    try:
        ctx = await check_message(app, raw, recipients=["bob@example.com"])
    finally:
        await app.shutdown()
    return ctx.raw, report(ctx)


async def test_seal_first_hop_and_continue_a_chain(make_config, tmp_path, hop1):
    ours = foreign_key(tmp_path, "mx.test", "seal", "rsa")
    async with dns_server({**hop1.zone(), **ours.zone()}) as dns:
        config = seal_config(make_config, dns, ours)
        first, rep = await run_check(config, make_message())
        assert rep["plugins"]["arc_seal"]["sealed"] is True
        assert rep["plugins"]["arc_seal"]["instance"] == 1
        assert re.search(rb"ARC-Seal: i=1; cv=none;", first)
        assert await run_arcverify(first, dns.port) == "arc verification: cv=b'pass' success"

        chained = seal(make_message(), hop1, "spf=pass smtp.mailfrom=a@origin.test")
        second, rep = await run_check(config, chained)
        assert rep["plugins"]["arc"]["result"] == "pass"
        assert rep["plugins"]["arc_seal"]["instance"] == 2
        assert re.search(rb"ARC-Seal: i=2; cv=pass;", second)
        assert b"ARC-Authentication-Results: i=2; mx.test; arc=pass" in second
        assert await run_arcverify(second, dns.port) == "arc verification: cv=b'pass' success"
        # Our own verifier agrees, and a later change is caught by it.
        assert (await arc_report(make_config, dns, second))["result"] == "pass"
        changed = second.replace(b"this is a test", b"this is a trap")
        assert (await arc_report(make_config, dns, changed))["result"] == "fail"


async def test_seal_records_a_failed_chain_as_cv_fail(make_config, tmp_path, hop1):
    ours = foreign_key(tmp_path, "mx.test", "seal", "rsa")
    broken = seal(make_message(), hop1, "spf=pass").replace(b"Hello,", b"Hullo,")
    async with dns_server({**hop1.zone(), **ours.zone()}) as dns:
        sealed, rep = await run_check(seal_config(make_config, dns, ours), broken)
    assert rep["plugins"]["arc"]["result"] == "fail"
    assert re.search(rb"ARC-Seal: i=2; cv=fail;", sealed)


async def test_without_authres_nothing_is_sealed(make_config, tmp_path):
    ours = foreign_key(tmp_path, "mx.test", "seal", "rsa")
    async with dns_server(ours.zone()) as dns:
        raw, rep = await run_check(seal_config(make_config, dns, ours, before=""), make_message())
    assert b"ARC-Seal" not in raw
    assert rep["plugins"]["arc_seal"]["sealed"] is False
    assert "no Authentication-Results from mx.test" in rep["plugins"]["arc_seal"]["reason"]


async def test_seal_key_must_be_rsa(make_config, tmp_path):
    ed = foreign_key(tmp_path, "mx.test", "seal", "ed25519")
    async with dns_server({}) as dns:
        with pytest.raises(DKIMKeyError, match="not an unencrypted PEM RSA private key"):
            await App(seal_config(make_config, dns, ed)).startup()
