"""The Received trace header we prepend (RFC 5321 4.4, RFC 3848 protocol names)."""

from __future__ import annotations

import email
import email.utils

import pytest

from mailflow.testing import SMTPDialog, make_message, running_server, send
from tests.smtp_support import needs_ipv6


def first_received(msg: bytes) -> str:
    parsed = email.message_from_bytes(msg)
    return " ".join(parsed.get_all("Received")[0].split())


async def test_received_names_helo_ip_host_protocol_id_and_single_recipient(make_config):
    async with running_server(make_config()) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        await dialog.command("EHLO client.example")
        await dialog.command("MAIL FROM:<a@example.org>")
        await dialog.command("RCPT TO:<bob@example.com>")
        await dialog.command("DATA")
        await dialog.write_raw(make_message())
        reply = await dialog.command(b".")
        await dialog.close()
        queue_id = reply.rsplit(" ", 1)[1]
        [msg] = await srv.wait_delivered("bob@example.com")
    value = first_received(msg)
    head, _, date = value.rpartition("; ")
    assert head == (
        f"from client.example ([127.0.0.1]) by mx.test (mailflow) with ESMTP id {queue_id} "
        "for <bob@example.com>"
    )
    assert email.utils.parsedate_to_datetime(date) is not None


async def test_received_omits_for_with_several_recipients_and_says_smtp_after_helo(make_config):
    async with running_server(make_config()) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        await dialog.command("HELO old.example")
        await dialog.command("MAIL FROM:<a@example.org>")
        await dialog.command("RCPT TO:<bob@example.com>")
        await dialog.command("RCPT TO:<carol@example.com>")
        await dialog.command("DATA")
        await dialog.write_raw(make_message())
        assert (await dialog.command(b".")).startswith("250")
        await dialog.close()
        [msg] = await srv.wait_delivered("bob@example.com")
    value = first_received(msg)
    assert " with SMTP id " in value
    assert " for " not in value  # other recipients are not disclosed


@pytest.mark.parametrize(
    "helo", ["evil(comment)<x>;y", "tab\there", "x" * 400, "caf\u00e9.example"]
)
async def test_client_chosen_names_cannot_break_the_header(make_config, helo):
    async with running_server(make_config()) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        assert (await dialog.command(f"EHLO {helo}")).startswith("250")
        await dialog.command("MAIL FROM:<a@example.org>")
        await dialog.command("RCPT TO:<bob@example.com>")
        await dialog.command("DATA")
        await dialog.write_raw(make_message())
        assert (await dialog.command(b".")).startswith("250")
        await dialog.close()
        [msg] = await srv.wait_delivered("bob@example.com")
    value = first_received(msg)
    name = value.split(" ")[1]
    assert value.startswith("from ") and " by mx.test (mailflow) " in value
    assert not set(name) & set("();<>\t") and name.isascii() and len(name) <= 255


@needs_ipv6
async def test_ipv6_listener_delivers_and_writes_an_ipv6_literal(make_config):
    config = make_config('server: {listen: ["[::1]:0"], hostname: mx.test}')
    async with running_server(config) as srv:
        assert srv.host == "::1"
        refused = await send(srv.port, "a@example.org", ["bob@example.com"], make_message(), "::1")
        assert refused == {}
        [msg] = await srv.wait_delivered("bob@example.com")
    assert "([IPv6:::1])" in first_received(msg)  # RFC 5321 4.1.3 address literal
