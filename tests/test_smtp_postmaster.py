"""Finding 6: postmaster (RFC 5321 4.5.1) reaches the configured postmaster mailbox.

With an explicit local_domains, RCPT TO:<postmaster> used to get 250 and then 550
"relaying not configured" after DATA, or was relayed to the smarthost as a bare
<postmaster>. Postmaster is now resolved once, at RCPT, by the function both front
ends share (mailflow.policy.admit_recipient), so routing sees an ordinary address.
"""

from __future__ import annotations

import pytest

from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.config import ConfigError
from mailflow.message import Connection
from mailflow.policy import admit_recipient, is_postmaster
from mailflow.testing import make_message, running_server, send, smtp_sink
from tests.smtp_support import relay_config
from tests.test_smtp_badinput import session

FORMS = [
    "postmaster",
    "POSTMASTER",
    "PostMaster",
    "postmaster@example.org",
    "Postmaster@EXAMPLE.NET",
]


async def deliver_each(port: int, forms: list[str]) -> list[str]:
    """One message per form, each in its own transaction; the DATA replies."""
    replies = []
    for form in forms:
        dialog = await session(port)
        try:
            assert (await dialog.command("MAIL FROM:<a@sender.test>")).startswith("250")
            rcpt = await dialog.command(f"RCPT TO:<{form}>")
            assert rcpt.startswith("250"), (form, rcpt)
            assert (await dialog.command("DATA")).startswith("354")
            await dialog.write_raw(b"Subject: to " + form.encode() + b"\r\n\r\nhello")
            replies.append(await dialog.command(b"\r\n."))
        finally:
            await dialog.close()
    return replies


async def test_every_form_reaches_the_default_mailbox_with_explicit_local_domains(make_config):
    config = make_config("local_domains: [example.org, example.net]\n")
    assert config.postmaster_mailbox == "postmaster@example.org"  # the first local domain
    async with running_server(config) as srv:
        replies = await deliver_each(srv.port, FORMS)
        assert all(r.startswith("250") for r in replies), replies
        msgs = await srv.wait_delivered("postmaster@example.org", count=len(FORMS))
        subjects = sorted(m.split(b"Subject: to ")[1].split(b"\r\n")[0].decode() for m in msgs)
        assert subjects == sorted(FORMS)
        await srv.wait_queue_empty()
        assert srv.app.spool.ids() == []  # nothing left trying to relay


async def test_postmaster_goes_to_the_configured_mailbox_and_is_never_relayed(make_config):
    async with smtp_sink() as sink:
        config = relay_config(make_config, sink.port, extra="postmaster: admin@example.org")
        async with running_server(config) as srv:
            # A trusted client (relay_networks): the bare form used to be relayed as is.
            refused = await send(
                srv.port, "a@example.org", ["postmaster", "postmaster@example.org"], make_message()
            )
            assert refused == {}
            [msg] = await srv.wait_delivered("admin@example.org")  # one copy for both forms
            await srv.wait_queue_empty()
            assert b"Subject: Test message" in msg
        assert sink.messages == []
        assert sink.handler.rcpts_asked == []


async def test_postmaster_of_a_foreign_domain_is_an_ordinary_recipient(make_config):
    async with running_server(make_config("local_domains: [example.org]\n")) as srv:
        dialog = await session(srv.port)
        await dialog.command("MAIL FROM:<a@sender.test>")
        reply = await dialog.command("RCPT TO:<postmaster@elsewhere.test>")
        assert reply.startswith("554 5.7.1"), reply  # no open relay for postmaster@ others
        await dialog.close()


async def test_with_catch_all_local_domains_each_domain_keeps_its_postmaster(make_config):
    config = make_config()  # local_domains: ["*"]
    assert config.postmaster_mailbox == "postmaster@mx.test"  # server.hostname
    async with running_server(config) as srv:
        replies = await deliver_each(srv.port, ["postmaster", "postmaster@example.com"])
        assert all(r.startswith("250") for r in replies), replies
        await srv.wait_delivered("postmaster@mx.test")
        await srv.wait_delivered("postmaster@example.com")


async def test_mailflow_check_resolves_postmaster_the_same_way(make_config):
    config = make_config("local_domains: [example.org]\npostmaster: hostmaster@example.org\n")
    app = App(config)
    await app.startup()
    try:
        ctx = await check_message(
            app, make_message(), sender="a@sender.test", recipients=["Postmaster"], ip="192.0.2.9"
        )
    finally:
        await app.shutdown()
    out = report(ctx)
    assert out["action"] == "accept"
    assert out["recipients"] == ["hostmaster@example.org"]
    assert out["route"]["hostmaster@example.org"]["kind"] == "maildir"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("postmaster", True),
        ("POSTMASTER", True),
        ("postmaster@example.org", True),
        ("postmaster@sub.example.net", True),  # matched by "*.example.net"
        ("postmaster@example.org.", True),
        ("postmaster@elsewhere.test", False),
        ("postmasters@example.org", False),
        ("bob@example.org", False),
    ],
)
def test_what_counts_as_postmaster(make_config, address, expected):
    config = make_config('local_domains: [example.org, "*.example.net"]\n')
    assert is_postmaster(config, address) is expected
    resolved, refusal = admit_recipient(config, Connection(ip="192.0.2.1"), address)
    if expected:
        assert (resolved, refusal) == ("postmaster@example.org", None)
    else:
        assert resolved == address


def test_an_undeliverable_postmaster_mailbox_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match=r"postmaster: 'root@elsewhere.test' is neither"):
        make_config("local_domains: [example.org]\npostmaster: root@elsewhere.test\n")
    with pytest.raises(ConfigError, match=r"postmaster: 'not an address' is not a mailbox"):
        make_config("postmaster: not an address\n")
    # Only patterns in local_domains and a hostname outside them: say what to set.
    with pytest.raises(ConfigError, match=r"local_domains: mail to postmaster would go to"):
        make_config('local_domains: ["*.example.net"]\n')
    # A relayed postmaster mailbox is fine when relay has a route for it.
    config = make_config(
        "local_domains: [example.org]\npostmaster: ops@elsewhere.test\nrelay: {default: mx}\n"
    )
    assert config.postmaster_mailbox == "ops@elsewhere.test"
