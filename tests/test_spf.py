"""SPF through `mailflow check` and real SMTP, against the loopback DNS server."""

from __future__ import annotations

import asyncio
import json
import sys

import aiosmtplib
import pytest
from mailflow_plugins.spf import received_spf

from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.config import ConfigError
from mailflow.testing import make_message, running_server, send
from mailflow.testing_dns import dns_server
from mailflow.verdict import Action

CLIENT = "192.0.2.10"
TOO_MANY = " ".join(f"a:h{i}.many.test" for i in range(11))

ZONE = {
    "pass.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 ip4:127.0.0.1 -all")],
    "fail.test": [("TXT", "v=spf1 ip4:198.51.100.1 -all")],
    "explained.test": [("TXT", "v=spf1 -all exp=why.explained.test")],
    "why.explained.test": [("TXT", "Mail from %{d} must come from our servers")],
    "soft.test": [("TXT", "v=spf1 ~all")],
    "neutral.test": [("TXT", "v=spf1 ?all")],
    "none.test": [("A", "192.0.2.1")],
    "include.test": [("TXT", "v=spf1 include:_spf.include.test -all")],
    "_spf.include.test": [("TXT", "v=spf1 ip4:192.0.2.10 -all")],
    "redirect.test": [("TXT", "v=spf1 redirect=pass.test")],
    "macro.test": [("TXT", "v=spf1 exists:%{i}._ok.macro.test -all")],
    "192.0.2.10._ok.macro.test": [("A", "127.0.0.2")],
    "many.test": [("TXT", f"v=spf1 {TOO_MANY} -all")],
    **{f"h{i}.many.test": [("A", "198.51.100.7")] for i in range(11)},
    "badip.test": [("TXT", "v=spf1 ip4:192.0.2.999 -all")],
    "twice.test": [("TXT", "v=spf1 -all"), ("TXT", "v=spf1 +all")],
    "unknown-mech.test": [("TXT", "v=spf1 frobnicate:x -all")],
    "slow.test": [("TXT", "v=spf1 +all")],
    "broken.test": [("TXT", "v=spf1 +all")],
    "mx.pass.test": [("TXT", "v=spf1 ip4:192.0.2.10 -all")],
    "mx.fail.test": [("TXT", "v=spf1 -all")],
    "nonascii.test": [("TXT", [b"v=spf1 ip4:192.0.2.10 \xff\xfe -all"])],
    "void.test": [("TXT", "v=spf1 a:n1.void.test a:n2.void.test a:n3.void.test -all")],
    "v6.test": [("TXT", "v=spf1 ip6:2001:db8::/32 -all")],
    "mx.test": [("TXT", "v=spf1 mx -all"), ("MX", "10 m.mx.test.")],
    "m.mx.test": [("A", "192.0.2.10")],
    "cname.test": [("CNAME", "pass.test.")],
}


@pytest.fixture
async def dns():
    async with dns_server({k: list(v) for k, v in ZONE.items()}) as srv:
        srv.timeout_names.add("slow.test")
        srv.servfail_names.add("broken.test")
        yield srv


def spf_config(make_config, srv, settings: str = "{}", timeout: float = 1.0) -> object:
    return make_config(
        srv.config_yaml(timeout) + f"plugins:\n  - name: spf\n    settings: {settings}\n"
    )


async def run_check(config, sender: str, *, ip: str = CLIENT, helo: str = "mx.pass.test", **kw):
    app = App(config)
    await app.startup()
    try:
        raw = make_message(sender=sender, to="bob@example.com")
        return await check_message(app, raw, sender=sender, ip=ip, helo=helo, **kw)
    finally:
        await app.shutdown()


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("a@pass.test", "pass"),
        ("a@fail.test", "fail"),
        ("a@soft.test", "softfail"),
        ("a@neutral.test", "neutral"),
        ("a@none.test", "none"),
        ("a@nxdomain.test", "none"),
        ("a@include.test", "pass"),
        ("a@redirect.test", "pass"),
        ("a@macro.test", "pass"),
        ("a@many.test", "permerror"),  # RFC 7208 4.6.4: more than 10 lookups
        ("a@badip.test", "permerror"),
        ("a@twice.test", "permerror"),  # RFC 7208 4.5: two records
        ("a@unknown-mech.test", "permerror"),
        ("a@slow.test", "temperror"),
        ("a@broken.test", "temperror"),
    ],
)
async def test_each_record_gives_its_result(make_config, dns, sender, expected):
    ctx = await run_check(spf_config(make_config, dns, timeout=0.3), sender)
    spf = report(ctx)["plugins"]["spf"]
    assert spf["result"] == expected
    assert spf["domain"] == sender.partition("@")[2]
    assert spf["identity"] == "mailfrom"
    assert spf["helo_result"] == "pass"
    # Only fail is refused by default; everything else is tagged and goes on.
    assert (ctx.action is Action.REJECT) == (expected == "fail")


async def test_fail_is_rejected_at_mail_from_with_rfc7372_status(make_config, dns):
    ctx = await run_check(spf_config(make_config, dns), "a@explained.test")
    assert ctx.action is Action.REJECT
    assert ctx.decided_by == "spf"
    assert (ctx.reply.code, ctx.reply.status) == (550, "5.7.23")
    assert "Mail from explained.test must come from our servers" in ctx.reply.text
    assert not ctx.envelope.rcpt_tos  # stopped before RCPT


async def test_actions_and_scores_are_configurable(make_config, dns):
    settings = "{actions: {fail: tag, softfail: reject, temperror: tempfail}, scores: {fail: 7}}"
    config = spf_config(make_config, dns, settings, timeout=0.3)
    tagged = await run_check(config, "a@fail.test")
    assert tagged.action is not Action.REJECT
    assert tagged.score == 7
    assert [s["name"] for s in report(tagged)["plugins"]["spf"]["symbols"]] == ["SPF_FAIL"]
    soft = await run_check(config, "a@soft.test")
    assert (soft.action, soft.reply.code, soft.reply.status) == (Action.REJECT, 550, "5.7.23")
    temp = await run_check(config, "a@slow.test")
    assert (temp.action, temp.reply.code, temp.reply.status) == (Action.TEMPFAIL, 451, "4.7.24")


async def test_unknown_result_name_in_settings_is_a_config_error(make_config, dns):
    with pytest.raises(ConfigError, match="unknown SPF result"):
        App(spf_config(make_config, dns, "{actions: {failed: reject}}"))


async def test_helo_identity_is_checked_and_used_for_the_null_sender(make_config, dns):
    ctx = await run_check(spf_config(make_config, dns), "", helo="mx.fail.test")
    spf = report(ctx)["plugins"]["spf"]
    # RFC 7208 2.4: the null sender is checked as postmaster@<HELO>.
    assert (spf["result"], spf["identity"], spf["domain"]) == ("fail", "helo", "mx.fail.test")
    assert spf["helo_result"] == "fail"
    assert ctx.action is Action.REJECT


async def test_address_literal_helo_is_not_looked_up(make_config, dns):
    ctx = await run_check(spf_config(make_config, dns), "a@pass.test", helo="[192.0.2.10]")
    spf = report(ctx)["plugins"]["spf"]
    assert (spf["result"], spf["helo_result"]) == ("pass", "none")


async def test_authenticated_users_are_not_checked(make_config, dns):
    ctx = await run_check(spf_config(make_config, dns), "a@fail.test", authenticated_user="a")
    spf = report(ctx)["plugins"]["spf"]
    assert (spf["result"], spf["skipped"]) == ("none", "authenticated")
    assert ctx.action is not Action.REJECT
    assert dns.queries == []


async def test_relay_networks_are_not_checked(make_config, dns):
    config = make_config(
        dns.config_yaml() + "relay_networks: [192.0.2.0/24]\nplugins: [{name: spf}]\n"
    )
    ctx = await run_check(config, "a@fail.test")
    assert report(ctx)["plugins"]["spf"]["skipped"] == "relay network"
    assert dns.queries == []


async def test_smtp_refuses_failing_sender_at_mail_from(make_config, dns):
    async with running_server(spf_config(make_config, dns)) as srv:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
            await send(srv.port, "a@fail.test", ["bob@example.com"], make_message())
        assert info.value.code == 550
        assert "5.7.23" in info.value.message
        # A passing sender from the same client goes through.
        assert await send(srv.port, "a@pass.test", ["bob@example.com"], make_message()) == {}
        await srv.wait_delivered("bob@example.com")


async def test_smtp_reject_at_rcpt_keeps_postmaster_reachable(make_config, dns):
    config = spf_config(make_config, dns, "{reject_at: rcpt}")
    async with running_server(config) as srv:
        refused = await send(
            srv.port, "a@fail.test", ["bob@example.com", "postmaster@example.com"], make_message()
        )
        assert list(refused) == ["bob@example.com"]
        assert refused["bob@example.com"][0] == 550
        await srv.wait_delivered("postmaster@example.com")


async def test_results_are_cached_across_messages(make_config, dns):
    config = spf_config(make_config, dns)
    app = App(config)
    await app.startup()
    for _ in range(3):
        await check_message(app, make_message(), sender="a@include.test", ip=CLIENT, helo="x.y")
    await app.shutdown()
    assert dns.queried("include.test", "TXT") == 1
    assert dns.queried("_spf.include.test", "TXT") == 1


async def test_check_json_cli_shows_spf_result(make_config, dns, tmp_path):
    cfg = tmp_path / "mailflow.yaml"
    cfg.write_text(
        dns.config_yaml()
        + f"queue: {{directory: {tmp_path / 'spool'}}}\nplugins: [{{name: spf}}]\n"
    )
    eml = tmp_path / "m.eml"
    eml.write_bytes(make_message(sender="a@soft.test"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from mailflow.cli import main; main()",
        "check", "--json", "-c", str(cfg), "--ip", CLIENT, "--helo", "mx.pass.test", str(eml),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    spf = json.loads(out)["plugins"]["spf"]
    assert (spf["result"], spf["domain"], spf["helo_result"]) == ("softfail", "soft.test", "pass")


@pytest.mark.parametrize(
    ("sender", "ip", "expected"),
    [
        ("a@nonascii.test", CLIENT, "permerror"),  # RFC 7208 3.1: records are ASCII
        ("a@void.test", CLIENT, "permerror"),  # RFC 7208 4.6.4: more than 2 void lookups
        ("a@v6.test", "2001:db8::1", "pass"),
        ("a@v6.test", "2001:db9::1", "fail"),
        ("a@mx.test", CLIENT, "pass"),
        ("a@cname.test", CLIENT, "pass"),
        ("a@-bad-.test", CLIENT, "none"),
        ("a@" + "x" * 70 + ".test", CLIENT, "none"),  # label over 63 octets
        ("a@b@c.test", CLIENT, "none"),
        ("a@\u00e9.test", CLIENT, "none"),
        ("noatsign", CLIENT, "none"),
    ],
)
async def test_bad_records_and_odd_senders_give_a_clear_result(
    make_config, dns, sender, ip, expected
):
    ctx = await run_check(spf_config(make_config, dns, timeout=0.3), sender, ip=ip)
    assert report(ctx)["plugins"]["spf"]["result"] == expected


@pytest.mark.parametrize("enabled", [True, False])
async def test_received_spf_field_when_asked_for(make_config, dns, enabled):
    """RFC 7208 9.1: with ``received_spf`` the message gets a Received-SPF trace field;
    Authentication-Results, built from the same result, is unchanged."""
    config = make_config(
        dns.config_yaml()
        + f"plugins:\n  - {{name: spf, settings: {{received_spf: {str(enabled).lower()}}}}}\n"
        + "  - {name: authres}\nauthserv_id: mx.test\n"
    )
    out = report(await run_check(config, "a@pass.test"))
    fields = dict(out["headers_added"])
    assert "spf=pass" in fields["Authentication-Results"]
    assert out["plugins"]["spf"]["result"] == "pass"
    if not enabled:
        assert "Received-SPF" not in fields
        return
    assert fields["Received-SPF"] == (
        "pass (mx.test: domain of pass.test designates 192.0.2.10 as permitted sender) "
        'client-ip=192.0.2.10; envelope-from="a@pass.test"; helo=mx.pass.test; '
        'receiver=mx.test; identity=mailfrom; mechanism="ip4:192.0.2.0/24";'
    )


def test_received_spf_quotes_what_the_client_chose():
    """A HELO name or sender with quotes, backslashes or control characters can
    neither break the field nor start another one."""
    details = {"result": "fail", "client_ip": CLIENT, "domain": "a(b)", "sender": 'x"y\\z@a'}
    value = received_spf(details, "mx.test", 'evil"name\x01\r\nX-Injected: 1')
    assert "\r" not in value and "\n" not in value and "\x01" not in value
    assert "(mx.test: domain of ab does not designate" in value
    assert 'envelope-from="x\\"y\\\\z@a";' in value
    assert 'helo="evil\\"nameX-Injected: 1";' in value
