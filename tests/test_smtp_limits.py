"""Limits on the SMTP front end: size, recipients, connections, timeouts, a failing spool."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from mailflow.config import ConfigError
from mailflow.testing import SMTPDialog, make_message, running_server, send

RCPT = "bob@example.com"


def server_yaml(**settings: object) -> str:
    extra = "".join(f", {k}: {v}" for k, v in settings.items())
    return f'server: {{listen: ["127.0.0.1:0"], hostname: mx.test{extra}}}\n'


async def open_session(port: int) -> SMTPDialog:
    dialog, greeting = await SMTPDialog.open(port)
    assert greeting.startswith("220"), greeting
    assert (await dialog.command("EHLO client.test")).startswith("250")
    return dialog


async def wait_for(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# --- SIZE (RFC 1870) ---------------------------------------------------------------------------


async def test_size_is_advertised_and_enforced(make_config):
    async with running_server(make_config(server_yaml(max_message_size=2000))) as srv:
        dialog = await open_session(srv.port)
        assert "250-SIZE 2000" in await dialog.command("EHLO client.test")
        # RFC 1870 6.1: a declared size over the limit is refused at MAIL ...
        assert (await dialog.command("MAIL FROM:<a@example.org> SIZE=5000")).startswith("552")
        # ... and an undeclared one at the end of DATA, after reading it all.
        assert (await dialog.command("MAIL FROM:<a@example.org>")).startswith("250")
        assert (await dialog.command(f"RCPT TO:<{RCPT}>")).startswith("250")
        assert (await dialog.command("DATA")).startswith("354")
        body = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
        await dialog.write_raw(body * 40)
        assert (await dialog.command(".")).startswith("552")
        # The session goes on: a message under the limit is accepted.
        assert (await dialog.command("MAIL FROM:<a@example.org>")).startswith("250")
        assert (await dialog.command(f"RCPT TO:<{RCPT}>")).startswith("250")
        assert (await dialog.command("DATA")).startswith("354")
        await dialog.write_raw(b"Subject: small\r\n\r\nhi\r\n")
        assert (await dialog.command(".")).startswith("250")
        await dialog.close()
        [msg] = await srv.wait_delivered(RCPT)
        assert b"Subject: small" in msg


# --- recipients --------------------------------------------------------------------------------


async def test_too_many_recipients_get_452_and_the_rest_is_delivered(make_config):
    rcpts = [f"u{i}@example.com" for i in range(5)]
    async with running_server(make_config(server_yaml(max_recipients=3))) as srv:
        refused = await send(srv.port, "a@example.org", rcpts, make_message())
        # RFC 5321 4.5.3.1.10: 452 for too many recipients; the client retries later.
        assert {r: code for r, (code, _) in refused.items()} == {rcpts[3]: 452, rcpts[4]: 452}
        assert all("4.5.3" in text for _, text in refused.values())
        for r in rcpts[:3]:
            await srv.wait_delivered(r)


# --- connections -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "refusal", "count"),
    [
        ("max_connections", "421 4.7.0 Too many connections, try", lambda h: h.active),
        (
            "max_connections_per_ip",
            "421 4.7.0 Too many connections from your address",
            lambda h: h.active_by_ip["127.0.0.1"],
        ),
    ],
)
async def test_a_connection_beyond_the_limit_gets_421_and_the_count_recovers(
    make_config, setting, refusal, count
):
    async with running_server(make_config(server_yaml(**{setting: 2}))) as srv:
        handler = srv.server.handler
        first, second = await open_session(srv.port), await open_session(srv.port)
        dialog, greeting = await SMTPDialog.open(srv.port)
        assert greeting.startswith(refusal), greeting
        assert await dialog.reader.read() == b""
        await dialog.close()
        await first.close()
        await wait_for(lambda: count(handler) == 1)
        third = await open_session(srv.port)  # room again
        for d in (second, third):
            await d.close()
        await wait_for(lambda: handler.active == 0)
        # Many short connections, some cut off abruptly, leave no residue in the counts.
        for _ in range(10):
            d, _ = await SMTPDialog.open(srv.port)
            d.writer.transport.abort()
        await wait_for(lambda: handler.active == 0)
        assert handler.active_by_ip == {}  # no entry left behind per past client
        assert await send(srv.port, "a@example.org", [RCPT], make_message()) == {}


@pytest.mark.parametrize(
    ("extra", "may_relay"),
    [
        ('relay_networks: ["127.0.0.0/8"]\n', True),  # an MTA in front
        ("", False),  # an exemption only: a load balancer, a monitoring host
    ],
)
async def test_exempt_networks_are_not_held_to_the_per_address_limit(make_config, extra, may_relay):
    settings = {"max_connections_per_ip": 1}
    if not extra:
        settings["max_connections_per_ip_exempt"] = '["127.0.0.0/8"]'
    config = make_config(server_yaml(**settings) + extra + "local_domains: [example.com]\n")
    async with running_server(config) as srv:
        sessions = [await open_session(srv.port) for _ in range(3)]
        first = sessions[0]
        assert (await first.command("MAIL FROM:<a@example.org>")).startswith("250")
        reply = await first.command("RCPT TO:<someone@elsewhere.test>")
        # Allowed to relay, it gets past the relay check (to "no route": none is set up).
        assert reply.startswith("550 5.1.2" if may_relay else "554 5.7.1"), reply
        for d in sessions:
            await d.close()


def test_a_bad_exempt_network_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match=r"max_connections_per_ip_exempt.*not a network"):
        make_config(server_yaml(max_connections_per_ip_exempt='["10.0.0.300/8"]'))


# --- timeouts (RFC 5321 4.5.3.2) ---------------------------------------------------------------


async def test_idle_client_is_told_421_and_disconnected(make_config):
    async with running_server(make_config(server_yaml(command_timeout=0.3))) as srv:
        dialog = await open_session(srv.port)
        reply = await dialog.read_reply(timeout=5)
        assert reply.startswith("421 4.4.2"), reply
        assert await dialog.reader.read() == b""
        await dialog.close()
        await wait_for(lambda: srv.server.handler.active == 0)


async def test_a_talking_client_keeps_its_session_until_it_goes_quiet(make_config):
    # The idle timer is moved, not re-created, per command: when it fires while the
    # client is still talking it must wait for the new deadline, then cut off.
    async with running_server(make_config(server_yaml(command_timeout=0.3))) as srv:
        dialog = await open_session(srv.port)
        loop = asyncio.get_running_loop()
        for _ in range(8):  # 0.8 s of commands, each within the 0.3 s timeout
            await asyncio.sleep(0.1)
            assert (await dialog.command("NOOP")).startswith("250")
        quiet_since = loop.time()
        reply = await dialog.read_reply(timeout=5)
        assert reply.startswith("421 4.4.2"), reply
        assert 0.2 <= loop.time() - quiet_since < 2.0
        await dialog.close()


async def test_stalled_data_times_out_and_nothing_is_stored(make_config):
    config = make_config(server_yaml(command_timeout=30, data_timeout=0.3))
    async with running_server(config) as srv:
        dialog = await open_session(srv.port)
        await dialog.command("MAIL FROM:<a@example.org>")
        await dialog.command(f"RCPT TO:<{RCPT}>")
        assert (await dialog.command("DATA")).startswith("354")
        await dialog.write_raw(b"Subject: half\r\n\r\nand then nothing")
        reply = await dialog.read_reply(timeout=5)
        assert reply.startswith("421 4.4.2"), reply
        assert "data" in reply
        await dialog.close()
        assert srv.app.spool.ids() == []
        assert srv.delivered(RCPT) == []


async def test_slow_but_steady_data_is_not_cut_off(make_config):
    # Both timers are shorter than the whole transfer; each chunk re-arms the data timer.
    config = make_config(server_yaml(command_timeout=0.4, data_timeout=0.4))
    async with running_server(config) as srv:
        dialog = await open_session(srv.port)
        await dialog.command("MAIL FROM:<a@example.org>")
        await dialog.command(f"RCPT TO:<{RCPT}>")
        assert (await dialog.command("DATA")).startswith("354")
        await dialog.write_raw(b"Subject: slow\r\n\r\n")
        for i in range(8):
            await asyncio.sleep(0.1)
            await dialog.write_raw(b"line %d\r\n" % i)
        assert (await dialog.command(".")).startswith("250")
        await dialog.close()
        [msg] = await srv.wait_delivered(RCPT)
        assert b"line 7\r\n" in msg


# --- the spool failing -------------------------------------------------------------------------


async def test_spool_failure_answers_451_never_250(make_config):
    async with running_server(make_config()) as srv:
        queue_dir = srv.app.spool.queue_dir
        # Root ignores permissions, so break the directory itself: a file in its place.
        aside = queue_dir.with_name("queue.aside")
        queue_dir.rename(aside)
        queue_dir.write_bytes(b"not a directory")
        # Local copies are delivered before the 250 and spooled only if that fails:
        # break the Maildir root as well, so the copy has to take the (broken) spool.
        mail_root = srv.app.maildir.root
        mail_aside = mail_root.with_name(mail_root.name + ".aside")
        if mail_root.exists():
            mail_root.rename(mail_aside)
        mail_root.write_bytes(b"not a directory")
        try:
            with pytest.raises(aiosmtplib.SMTPDataError) as info:
                await send(srv.port, "a@example.org", [RCPT], make_message())
            assert info.value.code == 451
            assert "4.3.0" in info.value.message
        finally:
            queue_dir.unlink()
            aside.rename(queue_dir)
            mail_root.unlink()
            if mail_aside.exists():
                mail_aside.rename(mail_root)
        assert srv.delivered(RCPT) == []
        # Once the spool works again, so does mail.
        assert await send(srv.port, "a@example.org", [RCPT], make_message()) == {}
        await srv.wait_delivered(RCPT)
