"""DKIM signing (plugin ``dkim_sign``) and ``mailflow dkim keygen``.

Every signature made here is checked by dkimpy's ``dkimverify`` command in a
separate process, fetching the key from the loopback DNS server (see
``dkim_support``): a signature is only "good" when an outside verifier says so.
"""

from __future__ import annotations

import re
import stat

import pytest
from click.testing import CliRunner
from mailflow_plugins.dkim.keys import DKIMKeyError

from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.cli import main as cli
from mailflow.config import ConfigError
from mailflow.hookspecs import hookimpl
from mailflow.testing import make_message, running_server, send, smtp_sink
from mailflow.testing_dns import dns_server
from mailflow.verdict import AddHeader, ReplaceBody, Result
from tests.dkim_support import (
    can_use_namespaces,
    mailflow_key,
    opendkim_testmsg,
    run_dkimverify,
    run_opendkim_verify,
)


def sign_config(make_config, keys, extra: str = "", plugins_before: str = ""):
    key_list = ", ".join(k.settings_yaml() for k in keys)
    return make_config(
        f"""
        plugins:
          {plugins_before}
          - name: dkim_sign
            settings: {{keys: [{key_list}]{extra}}}
        """
    )


async def signed_by_check(config, raw: bytes, **kwargs) -> tuple[bytes, dict]:
    app = App(config)
    await app.startup()
    try:
        ctx = await check_message(app, raw, **kwargs)
    finally:
        await app.shutdown()
    return ctx.raw, report(ctx)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
async def test_keygen_output_signs_mail_that_dkimverify_accepts(tmp_path, make_config, kind):
    result = CliRunner().invoke(
        cli, ["dkim", "keygen", "Example.TEST", "mail2026", "--type", kind, "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    [key_file] = tmp_path.glob("mail2026.example.test.*.key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # The printed zone line: name, then the value as quoted strings to be joined.
    line = next(x for x in result.output.splitlines() if " IN TXT " in x)
    assert line.startswith("mail2026._domainkey.example.test. IN TXT (")
    parts = re.findall(r'"([^"]*)"', line)
    assert all(len(p) <= 255 for p in parts)
    txt = "".join(parts)
    assert txt.startswith(f"v=DKIM1; k={kind}; p=")

    algorithm = "ed25519-sha256" if kind == "ed25519" else "rsa-sha256"
    key_yaml = (
        f"{{domain: example.test, selector: mail2026, key_file: '{key_file}', "
        f"algorithm: {algorithm}}}"
    )
    config = make_config(f"plugins: [{{name: dkim_sign, settings: {{keys: [{key_yaml}]}}}}]")
    raw, rep = await signed_by_check(
        config, make_message(sender="alice@example.test"), authenticated_user="alice"
    )
    assert rep["plugins"]["dkim_sign"]["signed"] == [
        {"domain": "example.test", "selector": "mail2026", "algorithm": algorithm}
    ]
    assert raw.startswith(b"DKIM-Signature: ")
    async with dns_server({"mail2026._domainkey.example.test": [("TXT", txt)]}) as dns:
        code, out = await run_dkimverify(raw, dns.port)
        assert (code, out.strip()) == (0, "signature ok")
        # The verifier can say no: one changed body byte breaks it.
        code, out = await run_dkimverify(
            raw.replace(b"this is a test", b"this is a tesT"), dns.port
        )
        assert code == 1, out


def test_keygen_refuses_to_overwrite_and_checks_arguments(tmp_path):
    runner = CliRunner()
    args = ["dkim", "keygen", "example.test", "s1", "--out", str(tmp_path)]
    assert runner.invoke(cli, args).exit_code == 0
    again = runner.invoke(cli, args)
    assert again.exit_code != 0
    assert "exists" in again.output
    bad_bits = runner.invoke(cli, [*args[:3], "s2", "--bits", "512", "--out", str(tmp_path)])
    assert bad_bits.exit_code != 0
    assert "1024" in bad_bits.output
    bad_selector = runner.invoke(cli, ["dkim", "keygen", "example.test", "a b"])
    assert bad_selector.exit_code != 0


async def test_dual_signature_rsa_and_ed25519_both_verify(tmp_path, make_config):
    rsa_key = mailflow_key(tmp_path, "example.test", "r1", "rsa")
    ed_key = mailflow_key(tmp_path, "example.test", "e1", "ed25519")
    config = sign_config(make_config, [rsa_key, ed_key])
    raw, rep = await signed_by_check(
        config, make_message(sender="Alice <alice@example.test>"), authenticated_user="alice"
    )
    assert [s["algorithm"] for s in rep["plugins"]["dkim_sign"]["signed"]] == [
        "rsa-sha256",
        "ed25519-sha256",
    ]
    assert raw.count(b"DKIM-Signature:") == 2
    async with dns_server({**rsa_key.zone(), **ed_key.zone()}) as dns:
        for index in (0, 1):
            code, out = await run_dkimverify(raw, dns.port, index)
            assert (code, out.strip()) == (0, "signature ok"), index


async def test_only_trusted_clients_with_a_configured_domain_are_signed(tmp_path, make_config):
    key = mailflow_key(tmp_path, "example.test", "s1", "ed25519")
    config = sign_config(make_config, [key])
    raw, rep = await signed_by_check(config, make_message(sender="alice@example.test"))
    assert b"DKIM-Signature" not in raw  # not authenticated, not a relay network
    assert "dkim_sign" not in rep["plugins"] or not rep["plugins"]["dkim_sign"].get("signed")

    raw, rep = await signed_by_check(
        config, make_message(sender="eve@other.test"), authenticated_user="eve"
    )
    assert b"DKIM-Signature" not in raw
    assert rep["plugins"]["dkim_sign"]["reason"] == "no key for the sender's domain"

    # Falls back to the envelope sender's domain when the From domain has no key.
    raw, rep = await signed_by_check(
        config,
        make_message(sender="eve@other.test"),
        sender="bounces@example.test",
        authenticated_user="eve",
    )
    assert rep["plugins"]["dkim_sign"]["signed"][0]["domain"] == "example.test"


async def test_subdomains_are_signed_only_when_enabled(tmp_path, make_config):
    key = mailflow_key(tmp_path, "example.test", "s1", "ed25519")
    message = make_message(sender="news@lists.example.test")
    raw, _ = await signed_by_check(sign_config(make_config, [key]), message, authenticated_user="a")
    assert b"DKIM-Signature" not in raw
    sub_yaml = key.settings_yaml()[:-1] + ", subdomains: true}"
    config = make_config(f"plugins: [{{name: dkim_sign, settings: {{keys: [{sub_yaml}]}}}}]")
    raw, rep = await signed_by_check(config, message, authenticated_user="a")
    assert rep["plugins"]["dkim_sign"]["signed"][0]["domain"] == "example.test"
    async with dns_server(key.zone()) as dns:
        assert (await run_dkimverify(raw, dns.port))[0] == 0


async def test_duplicate_from_is_not_signed(tmp_path, make_config):
    key = mailflow_key(tmp_path, "example.test", "s1", "ed25519")
    message = b"From: a@example.test\r\nFrom: b@example.test\r\nSubject: x\r\n\r\nhi\r\n"
    raw, rep = await signed_by_check(
        sign_config(make_config, [key]), message, authenticated_user="a", recipients=["b@x.test"]
    )
    assert b"DKIM-Signature" not in raw
    assert rep["plugins"]["dkim_sign"]["reason"] == "not signed: 2 From headers"


async def test_unreadable_or_wrong_key_file_stops_startup_naming_the_file(tmp_path, make_config):
    key = mailflow_key(tmp_path, "example.test", "s1", "rsa")
    missing = key.settings_yaml().replace(str(key.path), str(tmp_path / "nope.key"))
    config = make_config(f"plugins: [{{name: dkim_sign, settings: {{keys: [{missing}]}}}}]")
    with pytest.raises(DKIMKeyError, match=r"nope\.key: cannot read DKIM key"):
        await App(config).startup()
    # An RSA PEM file configured as ed25519 is reported, not used.
    wrong = key.settings_yaml().replace("rsa-sha256", "ed25519-sha256")
    config = make_config(f"plugins: [{{name: dkim_sign, settings: {{keys: [{wrong}]}}}}]")
    with pytest.raises(DKIMKeyError, match="not an ed25519 DKIM key"):
        await App(config).startup()


def test_settings_refuse_headers_that_must_not_be_signed(tmp_path, make_config):
    key = mailflow_key(tmp_path, "example.test", "s1", "rsa")
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.settings\.headers.*Received"):
        App(sign_config(make_config, [key], extra=", headers: [From, Received]"))


class Footer:
    """A content-changing plugin that runs before dkim_sign (like a disclaimer)."""

    @hookimpl
    def mailflow_data(self, message):
        return Result(
            mutations=[
                ReplaceBody(message.body + b"-- \r\nSent via mailflow\r\n"),
                AddHeader("X-Disclaimer", "added"),
            ]
        )


async def test_smtp_signature_covers_earlier_mutations_and_survives_delivery(tmp_path, make_config):
    key = mailflow_key(tmp_path, "example.test", "s1", "rsa")
    key_list = key.settings_yaml()
    config = make_config(
        f"""
        relay_networks: [127.0.0.0/8]
        plugins:
          - name: footer
          - name: dkim_sign
            settings: {{keys: [{key_list}], headers: [From, To, Subject, X-Disclaimer]}}
        """
    )
    async with running_server(config, extra_plugins={"footer": Footer()}) as srv:
        await send(
            srv.port,
            "alice@example.test",
            ["bob@example.com"],
            make_message(sender="alice@example.test"),
        )
        [delivered] = await srv.wait_delivered("bob@example.com")
    assert b"Sent via mailflow" in delivered
    signature = delivered.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
    [h_tag] = re.findall(rb"[; ]h=([^;]*);", signature)
    # Oversigned From/To/Subject (present once, listed twice); the plugin's header too.
    assert h_tag.split() == b"from : from : to : to : subject : subject : x-disclaimer".split()
    async with dns_server(key.zone()) as dns:
        code, out = await run_dkimverify(delivered, dns.port)
        assert (code, out.strip()) == (0, "signature ok")
        tampered = delivered.replace(b"X-Disclaimer: added", b"X-Disclaimer: removed")
        assert (await run_dkimverify(tampered, dns.port))[0] == 1


async def test_relayed_mail_still_verifies_at_the_next_hop(tmp_path, make_config):
    """Outbound through the queue and relay client to a real SMTP sink, strict body."""
    key = mailflow_key(tmp_path, "example.org", "s1", "ed25519")
    body = ".leading dot\r\n..two dots\r\ntrailing space \r\n\r\n\r\n"
    async with smtp_sink() as sink:
        config = make_config(
            f"""
            local_domains: [example.org]
            relay_networks: ["127.0.0.0/8"]
            relay:
              default: up
              targets:
                up: {{host: 127.0.0.1, port: {sink.port}, timeout: 5, tls: none}}
            plugins:
              - name: dkim_sign
                settings: {{keys: [{key.settings_yaml()}], body_canonicalization: simple}}
            """
        )
        async with running_server(config) as srv:
            await send(
                srv.port,
                "alice@example.org",
                ["carol@remote.test"],
                make_message(sender="alice@example.org", to="carol@remote.test", body=body),
            )
            [relayed] = await sink.wait_messages()
    assert b"c=relaxed/simple" in relayed.data.replace(b"\r\n\t", b" ")
    async with dns_server(key.zone()) as dns:
        code, out = await run_dkimverify(relayed.data, dns.port)
    assert (code, out.strip()) == (0, "signature ok")


@pytest.mark.skipif(
    opendkim_testmsg() is None or not can_use_namespaces(),
    reason="needs opendkim-tools and permission to create network namespaces",
)
@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
async def test_opendkim_verifies_our_signatures(tmp_path, make_config, kind):
    """OpenDKIM's C library as a verifier that shares no code with dkimpy."""
    key = mailflow_key(tmp_path, "example.test", "od", kind)
    raw, _ = await signed_by_check(
        sign_config(make_config, [key]),
        make_message(sender="alice@example.test"),
        authenticated_user="alice",
    )
    assert await run_opendkim_verify(raw, key) == (0, "")
    tampered = raw.replace(b"this is a test", b"this is a tesT")
    assert await run_opendkim_verify(tampered, key) == (
        70,
        "opendkim-testmsg: dkim_eom(): Bad signature",
    )
