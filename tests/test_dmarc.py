"""DMARC with SPF (and DKIM) alignment, through `check` and real SMTP, on loopback DNS."""

from __future__ import annotations

import base64
import email

import aiosmtplib
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mailflow_plugins.dmarc.record import (
    Record,
    RecordError,
    author_domains,
    organizational_domain,
    parse_record,
)

from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.testing import make_message, running_server, send
from mailflow.testing_dns import dns_server
from mailflow.verdict import Action

CLIENT = "192.0.2.10"
SPF_OK = [("TXT", "v=spf1 ip4:192.0.2.0/24 ip4:127.0.0.1 -all")]

ZONE = {
    "reject.test": SPF_OK,
    "_dmarc.reject.test": [("TXT", "v=DMARC1; p=reject; rua=mailto:r@reject.test")],
    "quar.test": SPF_OK,
    "_dmarc.quar.test": [("TXT", "v=DMARC1; p=quarantine")],
    "none.test": SPF_OK,
    "_dmarc.none.test": [("TXT", "v=DMARC1; p=none")],
    "other.test": SPF_OK,
    "org.test": SPF_OK,
    "bounce.org.test": SPF_OK,
    "sub.org.test": SPF_OK,
    "_dmarc.org.test": [("TXT", "v=DMARC1; p=reject; sp=quarantine")],
    "strict.test": SPF_OK,
    "bounce.strict.test": SPF_OK,
    "_dmarc.strict.test": [("TXT", "v=DMARC1; p=reject; aspf=s")],
    "pct0.test": SPF_OK,
    "_dmarc.pct0.test": [("TXT", "v=DMARC1; p=reject; pct=0")],
    "nopolicy.test": SPF_OK,
    "twice.test": SPF_OK,
    "_dmarc.twice.test": [("TXT", "v=DMARC1; p=reject"), ("TXT", "v=DMARC1; p=none")],
    "bad.test": SPF_OK,
    "_dmarc.bad.test": [("TXT", "v=DMARC1; p=bogus")],
    "badrua.test": SPF_OK,
    "_dmarc.badrua.test": [("TXT", "v=DMARC1; p=bogus; rua=mailto:x@badrua.test")],
    "junk.test": SPF_OK,
    "_dmarc.junk.test": [("TXT", ["v=DMARC1; p=rej", "\x00\xff;;=;"])],
    "slow.test": SPF_OK,
    "slowspf.test": SPF_OK,
    "_dmarc.slowspf.test": [("TXT", "v=DMARC1; p=reject")],
}


@pytest.fixture
async def dns():
    async with dns_server({k: list(v) for k, v in ZONE.items()}) as srv:
        srv.timeout_names.update({"_dmarc.slow.test", "slowspf.test"})
        yield srv


def dmarc_config(make_config, srv, settings: str = "{}", extra: str = ""):
    return make_config(
        srv.config_yaml(0.3)
        + extra
        + "plugins:\n  - {name: spf}\n  - {name: dkim}\n"
        + f"  - {{name: dmarc, settings: {settings}}}\n  - {{name: authres}}\n"
    )


async def run_check(config, author: str, sender: str, raw: bytes | None = None, **kw):
    app = App(config)
    await app.startup()
    try:
        raw = raw or make_message(sender=author, to="bob@example.com")
        kw.setdefault("recipients", ["bob@example.com"])
        return await check_message(app, raw, sender=sender, ip=CLIENT, helo="h.test", **kw)
    finally:
        await app.shutdown()


def ar_dmarc(raw: bytes) -> str:
    [value] = email.message_from_bytes(raw).get_all("Authentication-Results")
    return " ".join(value.split())


@pytest.mark.parametrize(
    ("author", "sender", "result", "policy", "disposition", "action"),
    [
        ("a@reject.test", "a@reject.test", "pass", "reject", "none", Action.CONTINUE),
        ("a@reject.test", "b@other.test", "fail", "reject", "reject", Action.REJECT),
        ("a@quar.test", "a@quar.test", "pass", "quarantine", "none", Action.CONTINUE),
        ("a@quar.test", "b@other.test", "fail", "quarantine", "quarantine", Action.QUARANTINE),
        ("a@none.test", "a@none.test", "pass", "none", "none", Action.CONTINUE),
        ("a@none.test", "b@other.test", "fail", "none", "none", Action.CONTINUE),
        # relaxed alignment: same organizational domain (RFC 7489 3.1.2)
        ("a@org.test", "b@bounce.org.test", "pass", "reject", "none", Action.CONTINUE),
        # sp= for sub-domains (RFC 7489 6.3)
        ("a@sub.org.test", "b@other.test", "fail", "quarantine", "quarantine", Action.QUARANTINE),
        # aspf=s: the sub-domain no longer aligns
        ("a@strict.test", "b@bounce.strict.test", "fail", "reject", "reject", Action.REJECT),
        # pct=0: outside the sample reject becomes quarantine (RFC 7489 6.6.4)
        ("a@pct0.test", "b@other.test", "fail", "reject", "quarantine", Action.QUARANTINE),
        ("a@nopolicy.test", "b@other.test", "none", "none", "none", Action.CONTINUE),
        ("a@twice.test", "b@other.test", "none", "none", "none", Action.CONTINUE),
        ("a@bad.test", "b@other.test", "none", "none", "none", Action.CONTINUE),
        ("a@badrua.test", "b@other.test", "fail", "none", "none", Action.CONTINUE),
        ("a@junk.test", "b@other.test", "none", "none", "none", Action.CONTINUE),
        ("a@slow.test", "a@slow.test", "temperror", "none", "none", Action.CONTINUE),
        # SPF for the aligned domain timed out: not a failure of a p=reject domain
        ("a@slowspf.test", "a@slowspf.test", "temperror", "reject", "none", Action.CONTINUE),
        ("a@slowspf.test", "b@other.test", "fail", "reject", "reject", Action.REJECT),
    ],
)
async def test_policy_and_alignment_give_result_and_action(
    make_config, dns, author, sender, result, policy, disposition, action
):
    ctx = await run_check(dmarc_config(make_config, dns), author, sender)
    out = report(ctx)
    dmarc = out["plugins"]["dmarc"]
    assert (dmarc["result"], dmarc["policy"], dmarc["disposition"]) == (
        result,
        policy,
        disposition,
    )
    assert dmarc["from_domain"] == author.partition("@")[2]
    assert ctx.action is action
    if action is Action.REJECT:
        assert (ctx.reply.code, ctx.reply.status) == (550, "5.7.1")
        assert ctx.decided_by == "dmarc"
    if action is Action.CONTINUE:
        # authres runs last and reports what DMARC concluded.
        assert f"dmarc={result}" in ar_dmarc(ctx.raw)
        assert f"header.from={author.partition('@')[2]}" in ar_dmarc(ctx.raw)


async def test_policy_override_and_pct_switch(make_config, dns):
    config = dmarc_config(make_config, dns, "{on_reject: quarantine, honour_pct: false}")
    overridden = await run_check(config, "a@reject.test", "b@other.test")
    assert overridden.action is Action.QUARANTINE
    sampled = await run_check(config, "a@pct0.test", "b@other.test")
    assert report(sampled)["plugins"]["dmarc"]["disposition"] == "reject"
    assert sampled.action is Action.QUARANTINE  # reject is overridden to quarantine


async def test_temperror_can_tempfail(make_config, dns):
    ctx = await run_check(
        dmarc_config(make_config, dns, "{on_temperror: tempfail}"), "a@slow.test", "a@slow.test"
    )
    assert (ctx.action, ctx.reply.code) == (Action.TEMPFAIL, 451)


def raw_with_from(*from_values: str) -> bytes:
    head = "".join(f"From: {v}\r\n" for v in from_values)
    return (head + "To: bob@example.com\r\nSubject: x\r\n\r\nbody\r\n").encode()


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (raw_with_from(), "no From"),
        (raw_with_from("a@reject.test", "a@reject.test"), "2 From header fields"),
        (raw_with_from("undisclosed"), "no usable domain"),
        (raw_with_from("a@"), "no usable domain"),
        (raw_with_from(", ".join(f"u@d{i}.test" for i in range(50))), "limit"),
        # a second From hidden behind a line that is not a header field
        (raw_with_from("a@none.test", "x").replace(b"From: x", b"junk\r\nFrom: x"), "2 From"),
    ],
)
async def test_missing_or_duplicate_from_is_a_permerror_not_a_pass(make_config, dns, raw, problem):
    ctx = await run_check(dmarc_config(make_config, dns), "", "a@reject.test", raw=raw)
    dmarc = report(ctx)["plugins"]["dmarc"]
    assert dmarc["result"] == "permerror"
    assert problem in dmarc["reason"]
    assert ctx.action is Action.REJECT


def test_internationalized_from_domain_is_evaluated_as_a_label():
    assert author_domains(["J\u00f6rg <j@b\u00fccher.example>"]) == (["xn--bcher-kva.example"], "")


async def test_several_author_domains_take_the_strictest_outcome(make_config, dns):
    raw = raw_with_from("a@none.test, b@reject.test")
    ctx = await run_check(dmarc_config(make_config, dns), "", "x@none.test", raw=raw)
    dmarc = report(ctx)["plugins"]["dmarc"]
    assert (dmarc["result"], dmarc["from_domain"], dmarc["disposition"]) == (
        "fail",
        "reject.test",
        "reject",
    )
    assert [d["result"] for d in dmarc["from_domains"]] == ["pass", "fail"]
    assert ctx.action is Action.REJECT


async def test_trusted_clients_are_not_evaluated(make_config, dns):
    ctx = await run_check(
        dmarc_config(make_config, dns), "a@reject.test", "b@other.test", authenticated_user="u"
    )
    assert report(ctx)["plugins"]["dmarc"]["skipped"] == "trusted client"
    assert ctx.action is Action.CONTINUE


# --- DKIM alignment, with real signatures and keys served by the loopback DNS ------------


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, base64.b64encode(der).decode()


def signed(pem: bytes, domain: str, author: str) -> bytes:
    raw = make_message(sender=author, to="bob@example.com")
    sig = dkim.sign(raw, b"sel", domain.encode(), pem, include_headers=[b"from", b"subject"])
    return sig + raw


@pytest.mark.parametrize(
    ("signer", "tamper", "dkim_result", "result", "action"),
    [
        ("reject.test", False, "pass", "pass", Action.CONTINUE),  # aligned DKIM alone passes
        ("reject.test", True, "fail", "fail", Action.REJECT),  # tampered body
        ("other.test", False, "pass", "fail", Action.REJECT),  # valid but not aligned
    ],
)
async def test_dkim_alignment(
    make_config, dns, rsa_key, signer, tamper, dkim_result, result, action
):
    pem, public = rsa_key
    dns.records[f"sel._domainkey.{signer}"] = [("TXT", f"v=DKIM1; k=rsa; p={public}")]
    raw = signed(pem, signer, "a@reject.test")
    if tamper:
        raw = raw.replace(b"this is a test", b"this is a fake")
    ctx = await run_check(dmarc_config(make_config, dns), "", "b@other.test", raw=raw)
    out = report(ctx)["plugins"]
    [sig] = out["dkim"]["signatures"]
    assert (sig["domain"], sig["selector"], sig["result"]) == (signer, "sel", dkim_result)
    assert out["dmarc"]["result"] == result
    assert out["dmarc"]["aligned"] == {"spf": False, "dkim": result == "pass"}
    assert ctx.action is action


# --- through SMTP --------------------------------------------------------------------------


async def test_smtp_reject_quarantine_and_pass(make_config, dns):
    async with running_server(dmarc_config(make_config, dns)) as srv:
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            await send(
                srv.port, "b@other.test", ["bob@example.com"], make_message(sender="a@reject.test")
            )
        assert info.value.code == 550 and "5.7.1" in info.value.message
        await send(
            srv.port, "b@other.test", ["bob@example.com"], make_message(sender="a@quar.test")
        )
        await send(
            srv.port, "a@reject.test", ["carol@example.com"], make_message(sender="a@reject.test")
        )
        [delivered] = await srv.wait_delivered("carol@example.com")
        assert srv.delivered("bob@example.com") == []  # the quarantined one never arrives
    header = ar_dmarc(delivered)
    assert "spf=pass" in header and "dmarc=pass" in header and "dkim=none" in header


# --- record parsing and organizational domains (pure functions) ----------------------------


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("mail.example.com", "example.com"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),
        ("x.y.blogspot.com", "y.blogspot.com"),  # private section of the list counts
        ("deep.sub.example.test", "example.test"),  # not in the list: default rule "*"
        ("EXAMPLE.COM.", "example.com"),
    ],
)
def test_organizational_domain_uses_the_bundled_public_suffix_list(domain, org):
    assert organizational_domain(domain) == org


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v=DMARC1; p=reject", Record("reject", "reject")),
        ("v=DMARC1;p=quarantine;sp=none;adkim=s;aspf=s;pct=20",
         Record("quarantine", "none", "s", "s", 20)),
        ("v=DMARC1; p=none; pct=500; adkim=x; sp=maybe; future=1", Record("none", "none")),
        ("v=DMARC1; p=reject; pct=abc", Record("reject", "reject")),
        ("v=DMARC1; rua=mailto:a@b.test", Record("none", "none")),
    ],
)  # fmt: skip
def test_record_parsing_falls_back_to_defaults(text, expected):
    assert parse_record(text) == expected


@pytest.mark.parametrize(
    "text", ["p=reject; v=DMARC1", "v=DMARC2; p=reject", "v=DMARC1; p=later", "v=DMARC1; junk"]
)
def test_unusable_records_are_refused(text):
    with pytest.raises(RecordError):
        parse_record(text)


# --- the DNS budget spans the whole transaction ---------------------------------------------


async def test_dns_budget_is_shared_by_spf_at_mail_from_and_dmarc_at_data(make_config, dns):
    dns.timeout_names.update({"slow.test", "_dmarc.slow.test"})
    config = make_config(
        f"dns: {{nameservers: [127.0.0.1], port: {dns.port}, timeout: 0.3, budget: 0.45}}\n"
        + "plugins: [{name: spf}, {name: dmarc}, {name: authres}]\n"
    )
    async with running_server(config) as srv:
        await send(srv.port, "a@slow.test", ["bob@example.com"], make_message(sender="a@slow.test"))
        [delivered] = await srv.wait_delivered("bob@example.com")
    header = ar_dmarc(delivered)
    assert "spf=temperror" in header
    # SPF spent most of the budget at MAIL FROM; the DMARC lookup at DATA hit its end.
    assert "dmarc=temperror" in header and "budget" in header


async def test_check_json_cli_reports_spf_dkim_and_dmarc(make_config, dns, rsa_key, tmp_path):
    import asyncio
    import json
    import sys

    pem, public = rsa_key
    dns.records["sel._domainkey.reject.test"] = [("TXT", f"v=DKIM1; k=rsa; p={public}")]
    cfg = tmp_path / "mailflow.yaml"
    cfg.write_text(
        dns.config_yaml()
        + f"queue: {{directory: {tmp_path / 'spool'}}}\n"
        + "plugins: [{name: spf}, {name: dkim}, {name: dmarc}, {name: authres}]\n"
    )
    eml = tmp_path / "m.eml"
    eml.write_bytes(signed(pem, "reject.test", "a@reject.test"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from mailflow.cli import main; main()",
        "check", "--json", "-c", str(cfg), "--from", "b@other.test",
        "--ip", CLIENT, "--helo", "h.test", str(eml),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    plugins = json.loads(out)["plugins"]
    assert (plugins["spf"]["result"], plugins["spf"]["domain"]) == ("pass", "other.test")
    [sig] = plugins["dkim"]["signatures"]
    assert (sig["domain"], sig["selector"], sig["result"]) == ("reject.test", "sel", "pass")
    dmarc = plugins["dmarc"]
    assert (dmarc["result"], dmarc["policy"], dmarc["disposition"]) == ("pass", "reject", "none")
    assert dmarc["aligned"] == {"spf": False, "dkim": True}  # SPF passed for another domain
    assert "dkim=pass" in plugins["authres"]["header"]
