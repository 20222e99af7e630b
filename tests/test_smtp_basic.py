"""End-to-end: a real SMTP conversation on loopback into Maildir."""

from __future__ import annotations

import mailbox

import aiosmtplib
import pytest

from mailflow.testing import make_message, running_server, send


async def test_message_is_delivered_to_each_recipients_maildir(make_config):
    config = make_config()
    async with running_server(config) as srv:
        refused = await send(
            srv.port,
            "alice@example.org",
            ["bob@example.com", "carol@example.net"],
            make_message(subject="greetings"),
        )
        assert refused == {}
        for rcpt in ("bob@example.com", "carol@example.net"):
            await srv.wait_delivered(rcpt)
            box = mailbox.Maildir(srv.mailbox(rcpt), create=False)
            [msg] = list(box)
            assert msg["Subject"] == "greetings"
            # Our trace header comes first and names the client and queue id.
            assert msg.get_all("Received")[0].startswith("from ")
        await srv.wait_queue_empty()


async def test_relay_is_refused_when_no_domain_is_local(make_config):
    config = make_config("local_domains: [example.com]\n")
    async with running_server(config) as srv:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as info:
            await send(srv.port, "spammer@evil.test", ["victim@elsewhere.test"], make_message())
        [err] = info.value.recipients
        assert err.code == 554
        assert "5.7.1" in err.message
