"""LMTP delivery into a real Dovecot (Debian package dovecot-lmtpd) on loopback."""

from __future__ import annotations

import asyncio
import email
import os

import pytest

from mailflow.testing import free_port, make_message, running_server, send
from tests.dovecot_instance import create_instance, destroy, dovecot_available

pytestmark = pytest.mark.slow

if not dovecot_available():
    if os.environ.get("CI"):
        pytest.fail(
            "CI must run the Dovecot tests: install dovecot-lmtpd (.ci/run does)", pytrace=False
        )
    pytest.skip("needs Debian's dovecot-core and dovecot-lmtpd", allow_module_level=True)


async def _wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def dovecot():
    instance = create_instance(free_port(), {"alice": "", "bob": "*:storage=1K", "carol": ""})
    await asyncio.to_thread(instance.start)
    yield instance
    await asyncio.to_thread(destroy, instance)


def _lmtp_config(make_config, port: int):
    return make_config(f"""
        local_domains: [example.com, example.org]
        delivery:
          method: lmtp
          lmtp: {{host: 127.0.0.1, port: {port}}}
        """)


async def test_each_recipient_gets_its_own_lmtp_outcome(make_config, dovecot):
    async with running_server(_lmtp_config(make_config, dovecot.port)) as srv:
        message = make_message(subject="quarterly report", body=("x" * 70 + "\r\n") * 60)
        refused = await send(
            srv.port,
            "alice@example.org",
            ["carol@example.com", "bob@example.com", "nobody@example.com"],
            message,
        )
        assert refused == {}  # accepted and spooled; Dovecot answers per recipient later
        # carol: stored. bob: over quota (permanent). nobody: unknown user (permanent).
        await _wait_for(lambda: len(dovecot.messages("carol")) == 1, what="carol's copy")
        # One DSN for both failures goes back to the sender, also via LMTP.
        await _wait_for(lambda: len(dovecot.messages("alice")) == 1, what="the bounce")
        await srv.wait_queue_empty(timeout=20)
    assert dovecot.messages("bob") == []
    [copy] = dovecot.messages("carol")
    assert copy["Subject"] == "quarterly report"
    [bounce] = dovecot.messages("alice")
    assert bounce.get_content_type() == "multipart/report"
    report = email.message_from_bytes(bytes(bounce))
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "bob@example.com" in text and "nobody@example.com" in text
    assert "carol@example.com" not in text
    assert "Action: failed" in text


async def test_dovecot_down_defers_then_delivers(make_config):
    port = free_port()
    instance = create_instance(port, {"carol": ""})
    try:
        async with running_server(_lmtp_config(make_config, port)) as srv:
            await send(srv.port, "alice@example.org", ["carol@example.com"], make_message())
            # Nothing listens yet: the message waits in the spool, it is not lost.
            await _wait_for(
                lambda: any(r.attempts >= 1 for e in srv.app.spool.entries() for r in e.recipients),
                what="a failed attempt",
            )
            assert srv.app.spool.ids()
            await asyncio.to_thread(instance.start)
            await _wait_for(lambda: len(instance.messages("carol")) == 1, what="delivery")
            await srv.wait_queue_empty()
    finally:
        await asyncio.to_thread(destroy, instance)
