"""Integration with a real Postfix (Debian package) on loopback.

* Postfix as the front end, relaying to mailflow (its ``relayhost``): mail sent to
  Postfix ends up in mailflow's Maildir with Postfix's trace header.
* mailflow as the front end, relaying to Postfix as the upstream MTA: mail arrives
  in Postfix's virtual Maildir, and an SMTP smuggling payload stays one message.
"""

from __future__ import annotations

import asyncio
import email
import smtplib

import pytest

from mailflow.testing import SMTPDialog, free_port, make_message, running_server, send
from tests.postfix_instance import (
    VIRTUAL_DOMAIN,
    PostfixInstance,
    create_instance,
    destroy,
    require_postfix,
)

pytestmark = [pytest.mark.postfix, pytest.mark.slow]

require_postfix()


async def _wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def _start(instance: PostfixInstance) -> None:
    await asyncio.to_thread(instance.start)


async def test_postfix_front_end_relays_into_mailflow(make_config):
    config = make_config()  # embedded-default behaviour: accept any recipient into Maildir
    async with running_server(config) as srv:
        instance = create_instance(free_port(), relayhost=f"[127.0.0.1]:{srv.port}")
        try:
            await _start(instance)

            def submit() -> None:
                with smtplib.SMTP("127.0.0.1", instance.port, timeout=30) as client:
                    client.sendmail(
                        "alice@example.org",
                        ["bob@example.com"],
                        make_message(subject="via postfix"),
                    )

            await asyncio.to_thread(submit)
            [raw] = await srv.wait_delivered("bob@example.com", timeout=30)
        finally:
            await asyncio.to_thread(destroy, instance)
    msg = email.message_from_bytes(raw)
    assert msg["Subject"] == "via postfix"
    # Our Received header names Postfix's HELO; Postfix's own trace header follows.
    received = [" ".join(r.split()) for r in msg.get_all("Received")]
    assert received[0].startswith("from postfix.test") and "(mailflow)" in received[0]
    assert any("by postfix.test (Postfix)" in r for r in received[1:])


def _relay_config(make_config, postfix_port: int):
    return make_config(f"""
        local_domains: [example.com]
        relay_networks: ["127.0.0.0/8"]
        relay:
          default: upstream
          targets:
            upstream: {{host: 127.0.0.1, port: {postfix_port}, tls: none}}
        """)


async def test_mailflow_relays_to_postfix_upstream(make_config):
    instance = create_instance(free_port())
    try:
        await _start(instance)
        async with running_server(_relay_config(make_config, instance.port)) as srv:
            refused = await send(
                srv.port,
                "alice@example.org",
                [f"carol@{VIRTUAL_DOMAIN}"],
                make_message(subject="to postfix", to=f"carol@{VIRTUAL_DOMAIN}"),
            )
            assert refused == {}
            await _wait_for(lambda: len(instance.messages()) == 1, what="postfix delivery")
            await srv.wait_queue_empty(timeout=30)
        [msg] = instance.messages()
        assert msg["Subject"] == "to postfix"
        assert any("(mailflow)" in r for r in msg.get_all("Received"))
        assert f"to=<carol@{VIRTUAL_DOMAIN}>" in instance.log()
    finally:
        await asyncio.to_thread(destroy, instance)


async def test_smuggled_message_stays_one_message_through_postfix(make_config):
    """A bare-LF end-of-data followed by a second transaction must not split downstream."""
    instance = create_instance(free_port())
    try:
        await _start(instance)
        async with running_server(_relay_config(make_config, instance.port)) as srv:
            dialog, greeting = await SMTPDialog.open(srv.port)
            assert greeting.startswith("220")
            assert (await dialog.command("EHLO client.test")).startswith("250")
            assert (await dialog.command("MAIL FROM:<alice@example.org>")).startswith("250")
            assert (await dialog.command(f"RCPT TO:<carol@{VIRTUAL_DOMAIN}>")).startswith("250")
            assert (await dialog.command("DATA")).startswith("354")
            smuggled = (
                b"From: alice@example.org\r\nSubject: outer\r\n\r\nfirst part\n.\r\n"
                b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<dave@"
                + VIRTUAL_DOMAIN.encode()
                + b">\r\nDATA\r\nSubject: smuggled\r\n\r\nsecond\r\n"
            )
            await dialog.write_raw(smuggled + b".\r\n")
            reply = await dialog.read_reply()
            await dialog.close()
            assert reply.startswith("250"), reply
            await _wait_for(lambda: len(instance.messages()) >= 1, what="postfix delivery")
            await srv.wait_queue_empty(timeout=30)
            await asyncio.sleep(1.0)  # give a (wrongly) split second message time to show up
        messages = instance.messages()
        assert len(messages) == 1, [m["Subject"] for m in messages]
        body = messages[0].get_payload()
        assert messages[0]["Subject"] == "outer"
        assert "MAIL FROM:<evil@example.org>" in body
        assert "smuggled" in body
        assert f"to=<dave@{VIRTUAL_DOMAIN}>" not in instance.log()
    finally:
        await asyncio.to_thread(destroy, instance)
