"""The authres plugin: one Authentication-Results header, forgeries of ours removed."""

from __future__ import annotations

import email

import authres
import pytest
from mailflow_plugins.authres import authserv_id_of

from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.hookspecs import hookimpl
from mailflow.testing import make_message, running_server, send
from mailflow.testing_dns import dns_server
from mailflow.verdict import Result

ZONE = {
    "pass.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 ip4:127.0.0.1 -all")],
    "soft.test": [("TXT", "v=spf1 ~all")],
}
FORGED = {
    "Authentication-Results": "mx.test; spf=pass smtp.mailfrom=evil@pass.test",
}


def ar_values(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw)
    return [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results", [])]


def parsed(value: str):
    return authres.all_features().parse_value(value)


@pytest.fixture
async def dns():
    async with dns_server(dict(ZONE)) as srv:
        yield srv


async def run_check(config, raw: bytes, sender: str = "a@pass.test", **kw):
    app = App(config, extra_plugins=kw.pop("extra_plugins", None))
    await app.startup()
    try:
        return await check_message(app, raw, sender=sender, ip="192.0.2.10", helo="h.test", **kw)
    finally:
        await app.shutdown()


async def test_one_header_carries_the_spf_result(make_config, dns):
    config = make_config(dns.config_yaml() + "plugins: [{name: spf}, {name: authres}]\n")
    ctx = await run_check(config, make_message(sender="a@soft.test"), sender="a@soft.test")
    [value] = ar_values(ctx.raw)
    header = parsed(value)
    assert header.authserv_id == "mx.test"
    [spf] = header.results
    assert (spf.method, spf.result, spf.smtp_mailfrom) == ("spf", "softfail", "a@soft.test")
    assert "discourages" in spf.reason
    assert report(ctx)["plugins"]["authres"]["header"] == value
    # The header is the first field: above our own Received trace field.
    assert ctx.raw.startswith(b"Authentication-Results: mx.test;")


@pytest.mark.parametrize(
    "forged",
    [
        "mx.test; spf=pass smtp.mailfrom=evil@pass.test",
        "MX.TEST; dkim=pass header.d=pass.test",
        '(sneaky comment) "mx.test"; dmarc=pass',
        "mx.test;;; garbage that no parser accepts (",
        "mx.test",
    ],
)
async def test_forged_header_with_our_id_is_removed_others_kept(make_config, dns, forged):
    config = make_config(dns.config_yaml() + "plugins: [{name: spf}, {name: authres}]\n")
    raw = make_message(extra_headers={"Authentication-Results": forged, "X-Other": "y"}).replace(
        b"X-Other: y", b"Authentication-Results: other.example; spf=fail smtp.helo=x"
    )
    ctx = await run_check(config, raw)
    values = ar_values(ctx.raw)
    assert len(values) == 2
    ours, theirs = values
    assert parsed(ours).authserv_id == "mx.test"
    assert parsed(ours).results[0].result == "pass"
    assert theirs == "other.example; spf=fail smtp.helo=x"
    assert report(ctx)["plugins"]["authres"]["removed"] == 1


async def test_no_method_applied_gives_none(make_config):
    ctx = await run_check(make_config("plugins: [{name: authres}]\n"), make_message())
    assert ar_values(ctx.raw) == ["mx.test; none"]


async def test_authenticated_client_is_reported_and_spf_skipped(make_config, dns):
    config = make_config(
        dns.config_yaml() + "authserv_id: auth.example\nplugins: [{name: spf}, {name: authres}]\n"
    )
    ctx = await run_check(config, make_message(), authenticated_user="alice")
    [value] = ar_values(ctx.raw)
    header = parsed(value)
    assert header.authserv_id == "auth.example"
    assert [(r.method, r.result) for r in header.results] == [("auth", "pass")]
    assert header.results[0].smtp_auth == "alice"


class FakeResults:
    """Stands in for dkim/arc/dmarc to pin the header for each shape of details."""

    def __init__(self, details: dict) -> None:
        self.details = details

    @hookimpl
    def mailflow_data(self, message):
        return Result(details=self.details)


async def test_each_dkim_signature_and_dmarc_get_their_own_result(make_config, dns):
    dkim = FakeResults(
        {
            "result": "pass",
            "signatures": [
                {"domain": "pass.test", "selector": "s1", "algorithm": "rsa-sha256",
                 "result": "pass", "header_b": "AbCdEfGh", "identity": "@pass.test"},
                {"domain": "other.test", "selector": "s2", "algorithm": "ed25519-sha256",
                 "result": "fail", "reason": 'body hash "did not" verify\r\nX-Evil: 1',
                 "header_b": "ZzZzZzZz"},
            ],
        }
    )  # fmt: skip
    dmarc = FakeResults({"result": "pass", "policy": "reject", "from_domain": "pass.test"})
    arc = FakeResults({"result": "bogus-value"})
    config = make_config(
        dns.config_yaml()
        + "plugins: [{name: spf}, {name: dkim}, {name: arc}, {name: dmarc}, {name: authres}]\n"
    )
    ctx = await run_check(
        config, make_message(), extra_plugins={"dkim": dkim, "dmarc": dmarc, "arc": arc}
    )
    [value] = ar_values(ctx.raw)
    results = parsed(value).results
    assert [(r.method, r.result) for r in results] == [
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dkim", "fail"),
        ("arc", "none"),  # not in the RFC 8601 vocabulary: reported as none
        ("dmarc", "pass"),
    ]
    assert (results[1].header_d, results[1].header_b) == ("pass.test", "AbCdEfGh")
    assert results[2].header_d == "other.test"
    assert "X-Evil" in results[2].reason  # folded into the value, never a new field
    assert b"\r\nX-Evil" not in ctx.raw
    assert results[4].header_from == "pass.test"
    assert "policy.dmarc=reject" in value


async def test_smtp_delivers_exactly_one_header_of_ours(make_config, dns):
    config = make_config(dns.config_yaml() + "plugins: [{name: spf}, {name: authres}]\n")
    async with running_server(config) as srv:
        message = make_message(sender="a@pass.test", extra_headers=FORGED)
        assert await send(srv.port, "a@pass.test", ["bob@example.com"], message) == {}
        [delivered] = await srv.wait_delivered("bob@example.com")
    [value] = ar_values(delivered)
    [spf] = parsed(value).results
    assert (spf.result, spf.smtp_mailfrom) == ("pass", "a@pass.test")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mx.test; none", "mx.test"),
        ("  (c (nested)) mx.test (x); spf=pass", "mx.test"),
        ('"quoted\\"id"; none', 'quoted"id'),
        ("", ""),
        ("(unterminated", ""),
        ("mx.test", "mx.test"),
    ],
)
def test_authserv_id_is_read_from_odd_values(value, expected):
    assert authserv_id_of(value) == expected


async def test_a_flood_of_forged_headers_is_removed_and_others_kept(make_config, dns):
    config = make_config(dns.config_yaml() + "plugins: [{name: spf}, {name: authres}]\n")
    forged = "".join(
        f"Authentication-Results: {'mx.test' if i % 2 else f'o{i}.example'}; spf=pass\r\n"
        for i in range(2000)
    )
    raw = forged.encode() + make_message(sender="a@pass.test")
    ctx = await run_check(config, raw)
    values = ar_values(ctx.raw)
    assert report(ctx)["plugins"]["authres"]["removed"] == 1000
    assert len(values) == 1001
    assert [parsed(v).authserv_id for v in values].count("mx.test") == 1
    assert values[1:3] == ["o0.example; spf=pass", "o2.example; spf=pass"]


async def test_a_checked_helo_identity_gets_its_own_spf_result(make_config, dns):
    dns.records["mx.soft.test"] = [("TXT", "v=spf1 ip4:192.0.2.10 -all")]
    config = make_config(dns.config_yaml() + "plugins: [{name: spf}, {name: authres}]\n")
    app = App(config)
    await app.startup()
    ctx = await check_message(
        app, make_message(), sender="a@soft.test", ip="192.0.2.10", helo="mx.soft.test"
    )
    await app.shutdown()
    [value] = ar_values(ctx.raw)
    results = [(r.method, r.result, r.smtp_mailfrom, r.smtp_helo) for r in parsed(value).results]
    assert results == [
        ("spf", "softfail", "a@soft.test", None),
        ("spf", "pass", None, "mx.soft.test"),
    ]


async def test_forgery_after_a_malformed_header_line_is_still_removed(make_config):
    raw = make_message().replace(
        b"Subject:",
        b"this line is not a header field\r\n"
        b"Authentication-Results: mx.test; dmarc=pass header.from=example.org\r\nSubject:",
    )
    ctx = await run_check(make_config("plugins: [{name: authres}]\n"), raw)
    assert report(ctx)["plugins"]["authres"]["removed"] == 1
    assert b"dmarc=pass" not in ctx.raw


def test_remembered_values_follow_every_input():
    """Values are cached by their inputs: a change in any of them gives a fresh value."""
    from mailflow_plugins.authres import AuthResPlugin

    from mailflow.message import Connection, Envelope, MessageContext, PluginRun

    def value(plugin, ip="192.0.2.1", dkim="none", user=""):
        conn = Connection(ip, authenticated_user=user)
        ctx = MessageContext(make_message(), Envelope("a@x.test", ["b@y.test"]), conn)
        ctx.record(PluginRun("dkim", "data", Result(details={"result": dkim}), 0.1))
        return plugin.build(ctx)

    plugin = AuthResPlugin()
    assert value(plugin) == "localhost; dkim=none"
    assert value(plugin, dkim="fail") == "localhost; dkim=fail"
    assert value(plugin, user="alice") == "localhost; auth=pass smtp.auth=alice; dkim=none"
    plugin.authserv_id = "mx.test"
    assert value(plugin) == "mx.test; dkim=none"
    assert value(plugin) == value(plugin)
