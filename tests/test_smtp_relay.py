"""Relay control at RCPT: no open relay (RFC 5321 3.6.2, 7.1), as a matrix over real SMTP."""

from __future__ import annotations

import pytest

from mailflow.app import App
from mailflow.message import Connection
from mailflow.policy import relay_refusal
from mailflow.smtp import Handler
from mailflow.testing import SMTPDialog, make_message, running_server, send
from tests.smtp_support import needs_ipv6

UPSTREAM = "targets: {upstream: {host: 127.0.0.1, port: 9, tls: none}}"


def relay_yaml(networks: list[str], listen: str = "127.0.0.1:0", default: str = "upstream") -> str:
    return f"""
        server: {{listen: ["{listen}"], hostname: mx.test}}
        local_domains: [example.com, "*.example.net"]
        relay_networks: {networks}
        relay: {{default: {default}, {UPSTREAM}}}
        """


async def rcpt_replies(port: int, recipients: list[str], host: str = "127.0.0.1") -> list[str]:
    dialog, _ = await SMTPDialog.open(port, host)
    try:
        assert (await dialog.command("EHLO client.test")).startswith("250")
        assert (await dialog.command("MAIL FROM:<sender@example.org>")).startswith("250")
        return [(await dialog.command(f"RCPT TO:<{r}>"))[:9] for r in recipients]
    finally:
        await dialog.close()


LOCAL, SUB, REMOTE, POSTMASTER = (
    "bob@example.com",
    "x@mail.example.net",
    "someone@elsewhere.test",
    "Postmaster",
)
OK, DENIED = "250 2.1.5", "554 5.7.1"


@pytest.mark.parametrize(
    ("networks", "expected"),
    [
        # Anyone may send to local domains and to postmaster (RFC 5321 4.5.1) ...
        ([], [OK, OK, DENIED, OK]),
        # ... but only listed networks may relay elsewhere.
        (["10.0.0.0/8", "192.168.0.0/16"], [OK, OK, DENIED, OK]),
        (["::1/128"], [OK, OK, DENIED, OK]),
        (["127.0.0.0/8"], [OK, OK, OK, OK]),
        (["127.0.0.1/32"], [OK, OK, OK, OK]),
    ],
)
async def test_relay_matrix_ipv4_client(make_config, networks, expected):
    async with running_server(make_config(relay_yaml(networks))) as srv:
        assert await rcpt_replies(srv.port, [LOCAL, SUB, REMOTE, POSTMASTER]) == expected


@needs_ipv6
@pytest.mark.parametrize(
    ("networks", "expected"),
    [
        ([], [OK, OK, DENIED, OK]),
        (["127.0.0.0/8"], [OK, OK, DENIED, OK]),
        (["::1/128"], [OK, OK, OK, OK]),
        (["::/0"], [OK, OK, OK, OK]),
    ],
)
async def test_relay_matrix_ipv6_client(make_config, networks, expected):
    config = make_config(relay_yaml(networks, listen="[::1]:0"))
    async with running_server(config) as srv:
        assert srv.host == "::1"
        assert await rcpt_replies(srv.port, [LOCAL, SUB, REMOTE, POSTMASTER], "::1") == expected


@pytest.mark.parametrize(
    ("ip", "networks", "allowed"),
    [
        # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d (RFC 4291 2.5.5.2).
        ("::ffff:127.0.0.1", ["127.0.0.0/8"], True),
        ("::ffff:10.1.2.3", ["127.0.0.0/8"], False),
        ("::ffff:10.1.2.3", ["10.0.0.0/8"], True),
        ("10.1.2.3", ["10.0.0.0/8"], True),
        ("2001:db8::5", ["2001:db8::/32"], True),
        ("2001:db9::5", ["2001:db8::/32"], False),
        ("not-an-ip", ["0.0.0.0/0"], False),
    ],
)
def test_relay_networks_match_mapped_and_plain_addresses(make_config, ip, networks, allowed):
    handler = Handler(App(make_config(f"relay_networks: {networks}")), enqueue=None)
    assert handler.new_connection(ip, 1234).relay_allowed is allowed


async def test_relay_allowed_client_without_a_route_gets_550(make_config):
    config = make_config(f"""
        server: {{listen: ["127.0.0.1:0"], hostname: mx.test}}
        local_domains: [example.com]
        relay_networks: [127.0.0.0/8]
        relay: {{default: none, routes: {{routed.test: upstream}}, {UPSTREAM}}}
        """)
    async with running_server(config) as srv:
        replies = await rcpt_replies(srv.port, [REMOTE, "a@routed.test", LOCAL])
    assert replies == ["550 5.1.2", OK, OK]


async def test_denied_relay_leaves_the_rest_of_the_transaction_working(make_config):
    async with running_server(make_config(relay_yaml([]))) as srv:
        refused = await send(srv.port, "a@example.org", [REMOTE, LOCAL], make_message())
        assert refused[REMOTE][0] == 554
        await srv.wait_delivered(LOCAL)
        assert srv.delivered(REMOTE) == []


@pytest.mark.parametrize(
    ("rcpt", "trusted", "expected"),
    [
        ("a@example.com", False, None),
        ("a@x.example.net", False, None),
        ("POSTMASTER", False, None),
        ("postmaster@elsewhere.test", False, 554),  # only bare postmaster is special
        ("a@elsewhere.test", False, 554),
        ("a@elsewhere.test", True, 550),  # relay.default none, no route
        ("a@routed.test", True, None),
        ("a@ROUTED.test", True, None),
    ],
)
def test_relay_refusal_is_a_pure_decision(make_config, rcpt, trusted, expected):
    config = make_config(f"""
        local_domains: [example.com, "*.example.net"]
        relay: {{default: none, routes: {{routed.test: upstream}}, {UPSTREAM}}}
        """)
    conn = Connection(ip="192.0.2.1", relay_allowed=trusted)
    reply = relay_refusal(config, conn, rcpt)
    assert (reply.code if reply else None) == expected
