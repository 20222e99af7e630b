"""STARTTLS on the SMTP front end (RFC 3207), with a real handshake on loopback."""

from __future__ import annotations

import asyncio
import ssl

import aiosmtplib
import pytest

from mailflow.testing import SMTPDialog, make_message, running_server, send
from tests.smtp_support import Recorder, client_context, self_signed_cert


def tls_yaml(tls_files, require: bool = False, extra: str = "") -> str:
    cert, key = tls_files
    return f"""
        server:
          listen: ["127.0.0.1:0"]
          hostname: mx.test
          tls: {{cert: {cert}, key: {key}, require: {str(require).lower()}}}
          {extra}
        """


def tls_client(port: int, cert) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, tls_context=client_context(cert)
    )


async def test_starttls_is_advertised_and_every_stage_sees_tls(make_config, tls_files):
    rec = Recorder()
    async with running_server(make_config(tls_yaml(tls_files)), extra_plugins={"rec": rec}) as srv:
        client = tls_client(srv.port, tls_files[0])
        async with client:
            await client.ehlo()
            assert client.supports_extension("starttls")
            await client.starttls()
            errors, _ = await client.sendmail("a@example.org", ["bob@example.com"], make_message())
            assert errors == {}
        [msg] = await srv.wait_delivered("bob@example.com")
        # A TLS session is counted once and released once.
        async with asyncio.timeout(5):
            while srv.server.handler.active:
                await asyncio.sleep(0.01)
    for stage in ("mail", "rcpt", "data"):
        [seen] = rec.stages[stage]
        assert seen.tls is True, stage
        assert seen.tls_version.startswith("TLSv1."), stage
    # RFC 3848: "ESMTPS" names an ESMTP session protected by STARTTLS.
    assert b"with ESMTPS id" in msg.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")


async def test_plain_session_is_recorded_as_not_tls(make_config, tls_files):
    rec = Recorder()
    async with running_server(make_config(tls_yaml(tls_files)), extra_plugins={"rec": rec}) as srv:
        assert await send(srv.port, "a@example.org", ["bob@example.com"], make_message()) == {}
        [msg] = await srv.wait_delivered("bob@example.com")
    assert [s.tls for s in rec.stages["data"]] == [False]
    assert rec.stages["data"][0].tls_version == ""
    assert b"with ESMTP id" in msg.replace(b"\r\n\t", b" ")


async def test_required_tls_refuses_mail_before_starttls(make_config, tls_files):
    config = make_config(tls_yaml(tls_files, require=True))
    async with running_server(config) as srv:
        dialog, greeting = await SMTPDialog.open(srv.port)
        assert greeting.startswith("220")
        assert (await dialog.command("EHLO client.test")).startswith("250")
        reply = await dialog.command("MAIL FROM:<a@example.org>")
        assert reply.startswith("530"), reply
        await dialog.close()
        # The same client succeeds once it has done STARTTLS.
        client = tls_client(srv.port, tls_files[0])
        async with client:
            await client.starttls()
            errors, _ = await client.sendmail("a@example.org", ["bob@example.com"], make_message())
        assert errors == {}
        await srv.wait_delivered("bob@example.com")


async def test_helo_is_forgotten_after_starttls(make_config, tls_files):
    # RFC 3207 4.2: the client must EHLO again; what it said before TLS is discarded.
    async with running_server(make_config(tls_yaml(tls_files))) as srv:
        client = tls_client(srv.port, tls_files[0])
        async with client:
            await client.ehlo(hostname="before.test")
            await client.starttls()
            code, message = await client.execute_command(b"MAIL", b"FROM:<a@example.org>")
            assert code == 503, message
            await client.ehlo(hostname="after.test")
            errors, _ = await client.sendmail("a@example.org", ["bob@example.com"], make_message())
            assert errors == {}
        [msg] = await srv.wait_delivered("bob@example.com")
    assert b"from after.test" in msg


async def test_failed_handshake_does_not_hurt_the_server(make_config, tls_files):
    async with running_server(make_config(tls_yaml(tls_files))) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        await dialog.command("EHLO client.test")
        assert (await dialog.command("STARTTLS")).startswith("220")
        await dialog.write_raw(b"this is not a TLS ClientHello\r\n" * 4)
        assert await dialog.reader.read() == b""  # the server hangs up
        await dialog.close()
        assert await send(srv.port, "a@example.org", ["bob@example.com"], make_message()) == {}
        await srv.wait_delivered("bob@example.com")
        await srv.wait_queue_empty()
        assert srv.server.handler.active == 0


async def test_untrusted_client_context_fails_cleanly(make_config, tls_files, tmp_path):
    other_cert, _ = self_signed_cert(tmp_path, "other.test")
    async with running_server(make_config(tls_yaml(tls_files))) as srv:
        client = tls_client(srv.port, other_cert)
        async with client:
            with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError, ConnectionError)):
                await client.starttls()
        assert await send(srv.port, "a@example.org", ["bob@example.com"], make_message()) == {}


async def test_commands_injected_before_the_handshake_are_discarded(make_config, tls_files):
    # RFC 3207 4.2 / CVE-2011-0411: plaintext sent after STARTTLS must not be run
    # as if it had arrived over TLS.
    async with running_server(make_config(tls_yaml(tls_files))) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        await dialog.command("EHLO client.test")
        await dialog.write_raw(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert (await dialog.read_reply()).startswith("220")
        await dialog.writer.start_tls(client_context(tls_files[0]))
        assert (await dialog.command("EHLO client.test")).startswith("250")
        # Had the injected MAIL run, this would be "503 nested MAIL".
        assert (await dialog.command("MAIL FROM:<a@example.org>")).startswith("250")
        await dialog.close()


async def test_no_auth_is_offered_without_an_authenticator(make_config, tls_files):
    async with running_server(make_config(tls_yaml(tls_files))) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        await dialog.command("EHLO client.test")
        await dialog.command("STARTTLS")
        await dialog.writer.start_tls(client_context(tls_files[0]))
        assert "AUTH" not in await dialog.command("EHLO client.test")
        assert (await dialog.command("AUTH PLAIN AGFAYg==")).startswith("504")
        await dialog.close()


async def test_data_timer_is_rearmed_by_chunks_arriving_over_tls(make_config, tls_files):
    config = make_config(
        tls_yaml(tls_files, extra="command_timeout: 0.4\n          data_timeout: 0.4")
    )
    async with running_server(config) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        await dialog.command("EHLO client.test")
        await dialog.command("STARTTLS")
        await dialog.writer.start_tls(client_context(tls_files[0]))
        await dialog.command("EHLO client.test")
        await dialog.command("MAIL FROM:<a@example.org>")
        await dialog.command("RCPT TO:<bob@example.com>")
        assert (await dialog.command("DATA")).startswith("354")
        await dialog.write_raw(b"Subject: slow over TLS\r\n\r\n")
        for i in range(8):
            await asyncio.sleep(0.1)
            await dialog.write_raw(b"line %d\r\n" % i)
        assert (await dialog.command(".")).startswith("250")
        # Then silence: the command timer closes the session with a 421.
        assert (await dialog.read_reply(timeout=5)).startswith("421 4.4.2")
        await dialog.close()
        [msg] = await srv.wait_delivered("bob@example.com")
        assert b"line 7\r\n" in msg
