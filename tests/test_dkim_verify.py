"""DKIM verification (plugin ``dkim``) against keys served by a real DNS server.

Signatures come from dkimpy's ``dkimsign`` command (an outside signer) or from
``dkim.sign`` in the test; the keys are fetched by mailflow over UDP from the
loopback DNS server, never from the system resolver.
"""

from __future__ import annotations

import asyncio
import email
import json
import random
import shutil
from pathlib import Path

import aiosmtplib
import dkim
import pytest
from mailflow_plugins.dkim.arc import ARCVerify
from mailflow_plugins.dkim.verify import DKIMVerify

from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.dns import DNSTempError
from mailflow.hookspecs import hookimpl
from mailflow.testing import make_message, running_server, send
from mailflow.testing_dns import dns_server
from tests.dkim_support import KeyFixture, foreign_key, run_dkimsign

DOMAIN = "signer.test"


@pytest.fixture
def rsa_key(tmp_path) -> KeyFixture:
    return foreign_key(tmp_path, DOMAIN, "rsa1", "rsa")


@pytest.fixture
def ed_key(tmp_path) -> KeyFixture:
    return foreign_key(tmp_path, DOMAIN, "ed1", "ed25519")


def sign(raw: bytes, key: KeyFixture, **kwargs) -> bytes:
    """Sign in-process with dkimpy (for cases the CLI cannot produce)."""
    header = dkim.sign(
        raw,
        key.selector.encode(),
        key.domain.encode(),
        key.path.read_bytes(),
        signature_algorithm=key.algorithm.encode(),
        **kwargs,
    )
    return header + raw


def message(**kwargs) -> bytes:
    return make_message(sender=f"alice@{DOMAIN}", **kwargs)


async def dkim_report(make_config, dns, raw: bytes, settings: str = "{}", **kwargs) -> dict:
    config = make_config(dns.config_yaml() + f"plugins: [{{name: dkim, settings: {settings}}}]\n")
    app = App(config)
    await app.startup()
    try:
        ctx = await check_message(app, raw, **kwargs)
    finally:
        await app.shutdown()
    return report(ctx)


def results(rep: dict) -> list[tuple[str, str]]:
    return [(s["selector"], s["result"]) for s in rep["plugins"]["dkim"]["signatures"]]


@pytest.mark.parametrize("which", ["rsa", "ed25519"])
async def test_signature_from_dkimsign_command_passes(make_config, rsa_key, ed_key, which):
    key = rsa_key if which == "rsa" else ed_key
    raw = await run_dkimsign(message(), key)
    async with dns_server(key.zone()) as dns:
        rep = await dkim_report(make_config, dns, raw)
        assert dns.queried(key.name, "TXT") == 1
    entry = rep["plugins"]["dkim"]
    assert entry["result"] == "pass"
    [sig] = entry["signatures"]
    assert sig["domain"] == DOMAIN
    assert sig["selector"] == key.selector
    assert sig["algorithm"] == key.algorithm
    assert sig["result"] == "pass"
    assert sig["identity"] == f"@{DOMAIN}"
    assert rep["plugins"]["dkim"]["symbols"][0]["name"] == "DKIM_PASS"
    assert rep["action"] == "accept"


@pytest.mark.slow  # the CLI process imports every installed plugin (about 5 s)
async def test_check_json_command_reports_each_signature(tmp_path, rsa_key, ed_key):
    """``mailflow check --json`` (the real CLI, in a subprocess) with two signatures."""
    raw = await run_dkimsign(await run_dkimsign(message(), rsa_key), ed_key)
    raw = raw.replace(b"this is a test", b"this is a TEST")  # both body hashes break
    raw = await run_dkimsign(raw, ed_key)  # a third, good one on the changed body
    eml = tmp_path / "m.eml"
    eml.write_bytes(raw)
    async with dns_server({**rsa_key.zone(), **ed_key.zone()}) as dns:
        cfg = tmp_path / "mailflow.yaml"
        cfg.write_text(dns.config_yaml() + "plugins: [{name: dkim}]\n")
        mailflow = shutil.which("mailflow")
        assert mailflow, "the mailflow console script is not installed"
        proc = await asyncio.create_subprocess_exec(
            mailflow,
            "check",
            "--json",
            "-c",
            str(cfg),
            str(eml),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    entry = json.loads(out)["plugins"]["dkim"]
    assert entry["result"] == "pass"
    assert [(s["selector"], s["algorithm"], s["result"]) for s in entry["signatures"]] == [
        ("ed1", "ed25519-sha256", "pass"),
        ("ed1", "ed25519-sha256", "fail"),
        ("rsa1", "rsa-sha256", "fail"),
    ]
    assert entry["signatures"][1]["reason"] == "body hash did not verify"


async def test_absent_signature_is_none(make_config):
    async with dns_server({}) as dns:
        rep = await dkim_report(make_config, dns, message())
        assert dns.queries == []
    assert rep["plugins"]["dkim"]["result"] == "none"
    assert rep["plugins"]["dkim"]["signatures"] == []


async def test_tampered_body_and_header_fail(make_config, rsa_key):
    signed = sign(message(subject="original"), rsa_key)
    async with dns_server(rsa_key.zone()) as dns:
        body = await dkim_report(make_config, dns, signed.replace(b"Hello,", b"Hullo,"))
        head = await dkim_report(make_config, dns, signed.replace(b"original", b"changed!"))
    assert body["plugins"]["dkim"]["result"] == "fail"
    assert body["plugins"]["dkim"]["signatures"][0]["reason"] == "body hash did not verify"
    assert head["plugins"]["dkim"]["result"] == "fail"
    assert head["plugins"]["dkim"]["signatures"][0]["reason"] == "signature did not verify"
    assert head["action"] == "accept"  # DMARC, not DKIM, decides by default


async def test_added_second_from_header_fails(make_config, rsa_key):
    signed = sign(message(), rsa_key)
    doubled = signed.replace(b"\r\n\r\n", b"\r\nFrom: mallory@evil.test\r\n\r\n", 1)
    async with dns_server(rsa_key.zone()) as dns:
        rep = await dkim_report(make_config, dns, doubled)
    assert results(rep) == [("rsa1", "fail")]


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        ({}, "no key for signature (rsa1._domainkey.signer.test)"),
        ({"rsa1._domainkey.signer.test": [("TXT", "v=DKIM1; k=rsa; p=")]}, "key revoked"),
        (
            {"rsa1._domainkey.signer.test": [("TXT", "v=DKIM1; k=rsa; p=bm90IGEga2V5")]},
            "key record unusable",
        ),
        ({"rsa1._domainkey.signer.test": [("TXT", "hello world")]}, "key record unusable"),
        (
            {"rsa1._domainkey.signer.test": [("TXT", "v=DKIM1; k=dsa; p=AAAA")]},
            "key record unusable",
        ),
        ({"rsa1._domainkey.signer.test": [("A", "127.0.0.1")]}, "no key for signature"),
    ],
    ids=["nxdomain", "revoked", "bad-base64-key", "not-a-key", "unknown-k", "nodata"],
)
async def test_missing_or_malformed_key_is_permerror(make_config, rsa_key, records, reason):
    signed = sign(message(), rsa_key)
    async with dns_server(records) as dns:
        rep = await dkim_report(make_config, dns, signed)
    [sig] = rep["plugins"]["dkim"]["signatures"]
    assert sig["result"] == "permerror"
    assert sig["reason"].startswith(reason)
    assert rep["plugins"]["dkim"]["result"] == "permerror"


async def test_dns_timeout_and_servfail_are_temperror(make_config, rsa_key, ed_key):
    raw = sign(sign(message(), rsa_key), ed_key)
    async with dns_server({**rsa_key.zone(), **ed_key.zone()}) as dns:
        dns.timeout_names.add(rsa_key.name)
        dns.servfail_names.add(ed_key.name)
        rep = await dkim_report(make_config, dns, raw, "{temperror_action: tempfail}")
    assert results(rep) == [("ed1", "temperror"), ("rsa1", "temperror")]
    assert all("key lookup failed" in s["reason"] for s in rep["plugins"]["dkim"]["signatures"])
    assert rep["action"] == "tempfail"
    assert rep["smtp_reply"]["code"] == 451


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda h: h.replace(b" b=", b" x="), "missing b="),
        (lambda h: h.replace(b"a=rsa-sha256", b"a=rsa-md5"), "unknown signature algorithm"),
        (lambda h: h.replace(b"v=1;", b"v=1; ; ==;"), "malformed tag list"),
        (
            lambda h: h.replace(b"h=from", b"h=x-a").replace(b": from;", b": x-b;"),
            "From field not signed",
        ),
        (lambda h: h.replace(b"signer.test", b"sign er..test"), "invalid d= or s="),
        (lambda h: h.replace(b"s=rsa1", b"s=" + b"a" * 300), "invalid d= or s="),
        (lambda h: h.replace(b"v=1;", b"v=1; l=12e3;"), "l= value is not a decimal integer"),
        (lambda h: h.replace(b"i=@signer.test", b"i=signer.test"), "malformed signature"),
    ],
    ids=["no-b", "bad-a", "garbage", "from-unsigned", "bad-d", "long-s", "bad-l", "i-is-d"],
)
async def test_broken_signature_tags_are_permerror(make_config, rsa_key, edit, reason):
    signed = sign(message(), rsa_key)
    header, rest = signed.split(b"\r\n", 1)
    while rest[:1] in (b" ", b"\t"):  # take the folded continuation lines too
        line, rest = rest.split(b"\r\n", 1)
        header += b"\r\n" + line
    broken = edit(header) + b"\r\n" + rest
    assert broken != signed
    async with dns_server(rsa_key.zone()) as dns:
        rep = await dkim_report(make_config, dns, broken)
    [sig] = rep["plugins"]["dkim"]["signatures"]
    assert (sig["result"], reason in sig["reason"]) == ("permerror", True), sig


async def test_many_signatures_are_bounded_and_reported(make_config, rsa_key):
    signed = sign(message(), rsa_key)
    header = signed[: signed.index(b"From: ")]
    raw = header * 199 + signed  # 200 copies of one valid signature
    async with dns_server(rsa_key.zone()) as dns:
        rep = await dkim_report(make_config, dns, raw, "{max_signatures: 3}")
        assert dns.queried(rsa_key.name) == 1  # one lookup serves them all
    entry = rep["plugins"]["dkim"]
    assert [s["result"] for s in entry["signatures"]] == ["pass"] * 3
    assert entry["not_verified"] == 197
    assert entry["result"] == "pass"
    # 200 different selectors: still only as many lookups as signatures verified.
    distinct = b"".join(header.replace(b"s=rsa1", b"s=x%d" % i) for i in range(200)) + signed
    async with dns_server(rsa_key.zone()) as dns:
        rep = await dkim_report(make_config, dns, distinct, "{max_signatures: 3}")
        assert len(dns.queries) == 3
    assert [s["result"] for s in rep["plugins"]["dkim"]["signatures"]] == ["permerror"] * 3


async def test_thousands_of_headers_still_verify(make_config, ed_key):
    noise = b"".join(b"X-Noise-%d: %d\r\n" % (i, i) for i in range(5000))
    raw = sign(noise + message(), ed_key)
    async with dns_server(ed_key.zone()) as dns:
        rep = await dkim_report(make_config, dns, raw)
    assert results(rep) == [("ed1", "pass")]


async def test_unparsable_header_block_gives_a_result(make_config):
    raw = b"DKIM-Signature: v=1; a=rsa-sha256\r\n\x01\x02 no colon here\r\n\r\nbody\r\n"
    async with dns_server({}) as dns:
        rep = await dkim_report(make_config, dns, raw, recipients=["bob@example.com"])
    assert rep["plugins"]["dkim"]["result"] in ("permerror", "none")
    assert "error" not in rep["plugins"]["dkim"]


async def test_fail_score_and_fail_action_are_configurable(make_config, rsa_key):
    tampered = sign(message(), rsa_key).replace(b"Hello,", b"Hullo,")
    async with dns_server(rsa_key.zone()) as dns:
        scored = await dkim_report(make_config, dns, tampered, "{fail_score: 2.5}")
        rejected = await dkim_report(make_config, dns, tampered, "{fail_action: reject}")
    assert scored["score"] == 2.5
    assert scored["plugins"]["dkim"]["symbols"] == [
        {"name": "DKIM_FAIL", "score": 2.5, "reason": ""}
    ]
    assert rejected["action"] == "reject"
    assert rejected["decided_by"] == "dkim"


class Recorder:
    """Runs after ``dkim`` and keeps what it concluded, as DMARC/authres would read it."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    @hookimpl
    def mailflow_data(self, message):
        self.seen.append(message.result_of("dkim").details)


async def test_through_smtp_pass_fail_and_reject(make_config, rsa_key, ed_key):
    good = await run_dkimsign(message(subject="one"), ed_key)
    bad = sign(message(subject="two"), rsa_key).replace(b"Hello,", b"Hullo,")
    recorder = Recorder()
    async with dns_server({**rsa_key.zone(), **ed_key.zone()}) as dns:
        config = make_config(
            dns.config_yaml()
            + "plugins: [{name: dkim, settings: {fail_action: reject}}, {name: recorder}]\n"
        )
        async with running_server(config, extra_plugins={"recorder": recorder}) as srv:
            await send(srv.port, f"alice@{DOMAIN}", ["bob@example.com"], good)
            [delivered] = await srv.wait_delivered("bob@example.com")
            with pytest.raises(aiosmtplib.SMTPResponseException) as info:
                await send(srv.port, f"alice@{DOMAIN}", ["bob@example.com"], bad)
    assert info.value.code == 550
    assert b"Subject: one" in delivered
    assert [d["result"] for d in recorder.seen] == ["pass"]  # the reject ends the chain


async def test_authentication_results_header_for_valid_tampered_and_absent(make_config, rsa_key):
    """With the ``authres`` plugin: one RFC 8601 header per delivered message."""
    valid = await run_dkimsign(message(subject="valid"), rsa_key)
    tampered = (await run_dkimsign(message(subject="tampered"), rsa_key)).replace(
        b"Hello,", b"Hullo,"
    )
    absent = message(subject="absent")
    async with dns_server(rsa_key.zone()) as dns:
        config = make_config(dns.config_yaml() + "plugins: [{name: dkim}, {name: authres}]\n")
        async with running_server(config) as srv:
            for raw in (valid, tampered, absent):
                await send(srv.port, f"alice@{DOMAIN}", ["bob@example.com"], raw)
            delivered = await srv.wait_delivered("bob@example.com", 3)
        # The same through `check --json`'s report: one added header, same results.
        for raw, expected in ((valid, "dkim=pass"), (tampered, "dkim=fail"), (absent, "dkim=none")):
            app = App(config)
            await app.startup()
            try:
                rep = report(await check_message(app, raw))
            finally:
                await app.shutdown()
            [value] = [v for n, v in rep["headers_added"] if n == "Authentication-Results"]
            assert expected in value
            assert rep["action"] == "accept"
    by_subject = {}
    for raw in delivered:
        msg = email.message_from_bytes(raw)
        [header] = msg.get_all("Authentication-Results")
        by_subject[msg["Subject"]] = " ".join(header.split())
    assert by_subject["valid"].startswith("mx.test;")
    assert "dkim=pass" in by_subject["valid"]
    assert f"header.d={DOMAIN}" in by_subject["valid"]
    assert "dkim=fail" in by_subject["tampered"]
    assert "body hash did not verify" in by_subject["tampered"]
    assert "dkim=none" in by_subject["absent"]


OPENDKIM_TESTMSG = shutil.which("opendkim-testmsg") or (
    "/usr/sbin/opendkim-testmsg" if Path("/usr/sbin/opendkim-testmsg").exists() else None
)


@pytest.mark.skipif(OPENDKIM_TESTMSG is None, reason="needs opendkim-tools (Debian package)")
async def test_signature_from_opendkim_is_checked_and_rsa_sha1_is_refused(make_config, rsa_key):
    """OpenDKIM's C library as a second, unrelated signer. ``opendkim-testmsg`` can
    only sign with rsa-sha1, which RFC 8301 3.1 forbids verifiers to accept: by
    default the result is ``policy``; with ``allow_rsa_sha1`` the cryptography is
    checked (pass, and fail once the body changes)."""
    assert OPENDKIM_TESTMSG is not None
    proc = await asyncio.create_subprocess_exec(
        OPENDKIM_TESTMSG,
        "-C",
        "-d",
        DOMAIN,
        "-s",
        rsa_key.selector,
        "-k",
        str(rsa_key.path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate(message())
    assert proc.returncode == 0, err.decode()
    signed = out.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert b"a=rsa-sha1" in signed
    async with dns_server(rsa_key.zone()) as dns:
        default = await dkim_report(make_config, dns, signed)
        allowed = await dkim_report(make_config, dns, signed, "{allow_rsa_sha1: true}")
        changed = await dkim_report(
            make_config, dns, signed.replace(b"Hello,", b"Hullo,"), "{allow_rsa_sha1: true}"
        )
    [sig] = default["plugins"]["dkim"]["signatures"]
    assert (sig["result"], sig["reason"]) == ("policy", "rsa-sha1 is not acceptable (RFC 8301 3.1)")
    assert results(allowed) == [("rsa1", "pass")]
    assert results(changed) == [("rsa1", "fail")]


class ChaoticResolver:
    """A resolver seam for the fuzz test: temp errors, no records or odd key records."""

    RECORDS = [
        "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA",
        "k=ed25519; p=AAAA",
        "p=",
        "garbage;;==",
        "v=DKIM2; p=AAAA",
        "v=DKIM1; p=" + "A" * 400,
    ]

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd

    async def query(self, name: str, rdtype: str) -> list[str]:
        roll = self.rnd.random()
        if roll < 0.2:
            raise DNSTempError(name)
        return [] if roll < 0.4 else [self.rnd.choice(self.RECORDS)]


async def test_random_broken_dkim_and_arc_fields_always_give_a_result():
    """Seeded fuzzing of tag lists: every message gets a valid result, nothing raises."""
    pieces = [
        *("v=1", "a=rsa-sha256", "a=ed25519-sha256", "a=rsa-sha1", "a=x", "d=example.com"),
        *("d=", "d=ex ample", "s=sel", "s=", "h=from", "h=from:to", "h=", "bh=AAAA", "bh=!!"),
        *("b=AAAA", "b=", "c=relaxed/relaxed", "c=foo/bar", "l=5", "l=999999", "t=1"),
        *("t=99999999999", "x=1", "x=abc", "i=@example.com", "i=example.com", "i=", "q=x"),
        *("=", ";", "\x00", "é", "i=1", "i=51", "cv=none", "cv=pass", "cv=x"),
    ]
    names = ["DKIM-Signature", "ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results"]
    rnd = random.Random(8617)
    dkim_plugin, arc_plugin = DKIMVerify(), ARCVerify()
    dkim_plugin.resolver = arc_plugin.resolver = ChaoticResolver(rnd)
    seen: set[str] = set()
    for _ in range(300):
        fields = b""
        for _ in range(rnd.randint(1, 4)):
            value = "; ".join(rnd.sample(pieces, rnd.randint(0, 10)))
            if rnd.random() < 0.3:
                value = value.replace("; ", ";\r\n\t")  # folded
            fields += f"{rnd.choice(names)}: {value}\r\n".encode()
        raw = fields + message()
        dkim_result = (await dkim_plugin.evaluate(raw))["result"]
        arc_result = (await arc_plugin.evaluate(raw))["result"]
        assert dkim_result in {"fail", "none", "temperror", "permerror", "policy"}
        assert arc_result in {"fail", "none"}
        seen |= {f"dkim={dkim_result}", f"arc={arc_result}"}
    # The generator reaches the interesting outcomes, not only one of them.
    assert {"dkim=permerror", "dkim=none", "arc=fail", "arc=none"} <= seen


async def test_a_large_message_is_verified_in_a_worker_process(make_config, rsa_key):
    """``isolate: large``: past isolation.large_message bytes the DKIM hook (relaxed
    canonicalization is regular expressions over the whole body) runs in a worker,
    which does its own key lookup; the result is the one the server would get."""
    body = "a line of the body, with  some   spaces \r\n" * 400
    good = sign(message(subject="big", body=body), rsa_key)
    bad = sign(message(subject="bad", body=body), rsa_key).replace(b"a line", b"A line", 1)
    async with dns_server(rsa_key.zone()) as dns:
        config = make_config(
            dns.config_yaml()
            + "isolation: {processes: 1, large_message: 4000}\n"
            + "plugins: [{name: dkim}, {name: authres}]\n"
        )
        async with running_server(config) as srv:
            assert srv.app.pipeline.isolation is not None
            for raw in (good, bad):
                assert len(raw) > 4000
                await send(srv.port, f"alice@{DOMAIN}", ["bob@example.com"], raw)
            delivered = await srv.wait_delivered("bob@example.com", 2)
        assert dns.queried(rsa_key.name, "TXT") >= 1  # asked from the worker process
    results = [email.message_from_bytes(m)["Authentication-Results"] for m in delivered]
    assert "dkim=pass" in results[0] and "dkim=fail" in results[1]
