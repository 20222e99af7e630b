"""Bounces: RFC 3464 DSNs built by dsn.py and sent by the queue, read back with `email`."""

from __future__ import annotations

import contextlib
import email
import email.policy
from collections.abc import AsyncIterator
from email.message import EmailMessage
from typing import Any

from mailflow.delivery.dsn import build_dsn, original_header, status_for
from mailflow.delivery.spool import BOUNCED, EXPIRED, QueueEntry, RecipientState
from mailflow.testing import Sink, SinkBehaviour, make_message, running_server, send, smtp_sink
from tests.smtp_support import relay_config

LOCAL_SENDER = "alice@example.org"


@contextlib.asynccontextmanager
async def relaying(make_config, behaviour: SinkBehaviour) -> AsyncIterator[tuple[Sink, Any]]:
    """A sink upstream and a mailflow server relaying to it through the spool.

    Spool first (``inline_timeout: 0``): with the inline attempt, a message the
    upstream refuses for every recipient is refused to the client and never bounced
    (tests/test_relay_inline.py), and these tests are about the bounces.
    """
    async with (
        smtp_sink(behaviour) as sink,
        running_server(relay_config(make_config, sink.port, inline_timeout="0")) as srv,
    ):
        yield sink, srv


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def report_parts(dsn: EmailMessage) -> tuple[str, list, str]:
    """(human text, delivery-status blocks, returned headers) of a multipart/report."""
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    human, status, headers = dsn.get_payload()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    return human.get_content(), status.get_payload(), headers.get_payload()


def rcpt(address: str, reply: str, status: str = BOUNCED) -> RecipientState:
    code = int(reply[:3])
    return RecipientState(address, {"kind": "relay"}, status, 1, 0.0, reply, code)


# --- the message itself ------------------------------------------------------------------------


def test_dsn_is_a_well_formed_delivery_status_report():
    original = make_message(subject="quarterly numbers", body="secret body text\r\n")
    entry = QueueEntry("Q123", LOCAL_SENDER, [], created=1_700_000_000.0, helo="client.test")
    failed = [rcpt("bob@remote.test", "550 5.1.1 <bob@remote.test>: no such user")]
    dsn = parse(build_dsn(entry, failed, original, reporting_mta="mx.test"))

    assert dsn["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.test"
    assert dsn["To"].addresses[0].addr_spec == LOCAL_SENDER
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn["Date"].datetime is not None
    assert dsn["Message-ID"].endswith("@mx.test>")
    human, blocks, headers = report_parts(dsn)
    assert "bob@remote.test" in human and "no such user" in human
    per_message, per_rcpt = blocks
    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert per_message["Received-From-MTA"] == "dns; client.test"
    assert "2023" in per_message["Arrival-Date"]
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@remote.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert per_rcpt["Last-Attempt-Date"]
    # Headers are returned, the body is not.
    assert "Subject: quarterly numbers" in headers
    assert "secret body text" not in dsn.as_string()


def test_one_block_per_failed_recipient_with_expiry_as_4_4_7():
    entry = QueueEntry("Q1", LOCAL_SENDER, [], created=1_700_000_000.0)
    failed = [
        rcpt("a@remote.test", "554 rejected for policy reasons"),
        rcpt("b@remote.test", "451 4.3.0 try again later", status=EXPIRED),
    ]
    dsn = parse(build_dsn(entry, failed, make_message(), reporting_mta="mx.test"))
    _, blocks, _ = report_parts(dsn)
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; a@remote.test",
        "rfc822; b@remote.test",
    ]
    assert [b["Status"] for b in blocks[1:]] == ["5.0.0", "4.4.7"]


def test_status_ignores_an_enhanced_code_of_the_wrong_class():
    assert status_for(rcpt("a@x.test", "550 4.1.1 confused server")) == "5.0.0"
    assert status_for(rcpt("a@x.test", "552 5.2.2 mailbox full")) == "5.2.2"


def test_non_ascii_replies_and_headers_do_not_break_the_report():
    original = "Subject: café\r\nFrom: a@example.org\r\n\r\nbody\r\n".encode()
    entry = QueueEntry("Q1", LOCAL_SENDER, [], created=1_700_000_000.0)
    failed = [rcpt("b@remote.test", "550 5.1.1 unbekannt: Müller\r\n")]
    raw = build_dsn(entry, failed, original, reporting_mta="mx.test", bounce_from="postmaster")
    dsn = parse(raw)
    _, blocks, headers = report_parts(dsn)
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 unbekannt: M?ller"
    assert "Subject:" in headers
    assert dsn["From"].addresses[0].addr_spec == "postmaster@mx.test"


def test_original_header_stops_at_the_blank_line_and_uses_crlf():
    assert original_header(b"A: 1\nB: 2\n\nbody\n") == b"A: 1\r\nB: 2\r\n"
    assert original_header(b"A: 1\r\n\r\n") == b"A: 1\r\n"


# --- the queue sending bounces -----------------------------------------------------------------


async def test_permanent_failure_bounces_to_the_local_sender(make_config):
    behaviour = SinkBehaviour(rcpt_replies={"bob@remote.test": "550 5.1.1 no such user here"})
    async with relaying(make_config, behaviour) as (sink, srv):
        msg = make_message(subject="to two people")
        assert (
            await send(srv.port, LOCAL_SENDER, ["bob@remote.test", "carol@remote.test"], msg) == {}
        )
        [bounce] = await srv.wait_delivered(LOCAL_SENDER)
        await srv.wait_queue_empty()
    # The recipient that worked got its copy; only the failed one is reported.
    assert [m.rcpt_tos for m in sink.messages] == [["carol@remote.test"]]
    dsn = parse(bounce)
    _, blocks, headers = report_parts(dsn)
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; bob@remote.test"]
    assert blocks[1]["Status"] == "5.1.1"
    assert "no such user here" in blocks[1]["Diagnostic-Code"]
    assert "Subject: to two people" in headers


async def test_bounce_to_a_remote_sender_has_a_null_envelope_sender(make_config):
    behaviour = SinkBehaviour(rcpt_replies={"bob@remote.test": "550 5.7.1 go away"})
    async with relaying(make_config, behaviour) as (sink, srv):
        await send(srv.port, "dave@remote.test", ["bob@remote.test"], make_message())
        [bounce] = await sink.wait_messages(1)
        await srv.wait_queue_empty()
    assert bounce.mail_from == "<>"  # how aiosmtpd records MAIL FROM:<>
    assert bounce.rcpt_tos == ["dave@remote.test"]
    assert parse(bounce.data).get_content_type() == "multipart/report"


async def test_null_sender_is_never_bounced(make_config, tmp_path):
    behaviour = SinkBehaviour(rcpt_replies={"bob@remote.test": "550 5.1.1 no such user"})
    async with relaying(make_config, behaviour) as (sink, srv):
        await send(srv.port, "", ["bob@remote.test"], make_message())
        await srv.wait_queue_empty()
    assert sink.messages == []
    assert not (tmp_path / "mail").exists() or not any((tmp_path / "mail").iterdir())


async def test_a_failing_bounce_is_not_bounced_again(make_config):
    # Everything is refused, including the bounce to the (remote) sender.
    behaviour = SinkBehaviour(
        rcpt_replies={
            "bob@remote.test": "550 5.1.1 no such user",
            "dave@remote.test": "550 5.1.1 no such sender either",
        }
    )
    async with relaying(make_config, behaviour) as (sink, srv):
        await send(srv.port, "dave@remote.test", ["bob@remote.test"], make_message())
        await srv.wait_queue_empty()
        assert not srv.app.spool.ids()
    assert sink.messages == []


async def test_expiry_after_the_queue_lifetime_bounces_with_4_4_7(make_config, tmp_path):
    behaviour = SinkBehaviour(data_replies=["451 4.3.0 not today"])
    async with smtp_sink(behaviour) as sink:
        config = relay_config(
            make_config,
            sink.port,
            extra=f"""
        queue:
          directory: {tmp_path / "spool"}
          scan_interval: 0.05
          retry_schedule: [0.2]
          lifetime: 1
        """,
        )
        async with running_server(config) as srv:
            await send(srv.port, LOCAL_SENDER, ["bob@remote.test"], make_message())
            [bounce] = await srv.wait_delivered(LOCAL_SENDER)
            await srv.wait_queue_empty()
    assert sink.handler.transactions >= 2  # it was retried until the lifetime ran out
    _, blocks, _ = report_parts(parse(bounce))
    assert blocks[1]["Status"] == "4.4.7"
    assert blocks[1]["Action"] == "failed"
    assert "not today" in blocks[1]["Diagnostic-Code"]
