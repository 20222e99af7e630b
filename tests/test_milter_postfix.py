"""mailflow as a milter behind a real Postfix (Debian package) on loopback.

One private Postfix instance for the module (``smtpd_milters`` pointing at a fixed
loopback port, ``milter_default_action = tempfail``); each test starts its own mailflow
milter listener on that port with the plugins it needs. Mail for ``vdomain.test`` is
delivered by Postfix into its own Maildir, which the tests read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import json
import smtplib
import subprocess
import textwrap
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from mailflow.app import App
from mailflow.config import MilterConfig
from mailflow.hookspecs import hookimpl
from mailflow.milter.server import MilterServer
from mailflow.testing import free_port, make_message, running_server, send
from mailflow.verdict import (
    AddHeader,
    AddRecipient,
    RemoveHeader,
    ReplaceBody,
    Result,
)
from tests.postfix_instance import (
    VIRTUAL_DOMAIN,
    PostfixInstance,
    create_instance,
    destroy,
    require_postfix,
)

pytestmark = [pytest.mark.postfix, pytest.mark.slow]

require_postfix()

BOB = f"bob@{VIRTUAL_DOMAIN}"


@pytest.fixture(scope="module")
def postfix() -> Iterator[tuple[PostfixInstance, int]]:
    milter_port = free_port()
    instance = create_instance(
        free_port(),
        extra_main_cf=textwrap.dedent(f"""\
            smtpd_milters = inet:127.0.0.1:{milter_port}
            non_smtpd_milters = $smtpd_milters
            milter_default_action = tempfail
            milter_protocol = 6
            milter_connect_timeout = 5s
            """),
    )
    instance.start()
    try:
        yield instance, milter_port
    finally:
        destroy(instance)


class Scripted:
    """A plugin whose end-of-message answer each test sets; remembers what it saw."""

    def __init__(self) -> None:
        self.result: Result | None = None
        self.rcpt_refuse: dict[str, Result] = {}
        self.seen: list[bytes] = []
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()

    @hookimpl
    def mailflow_rcpt_to(self, connection, sender, recipient, options):
        return self.rcpt_refuse.get(recipient)

    @hookimpl
    async def mailflow_data(self, message):
        self.seen.append(message.raw)
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        return self.result


@contextlib.asynccontextmanager
async def milter_for(
    port: int, make_config: Any, yaml_text: str = "", plugins: dict[str, Any] | None = None
) -> AsyncIterator[MilterServer]:
    app = App(make_config(yaml_text), extra_plugins=plugins)
    await app.startup()
    server = MilterServer(app, MilterConfig(listen=f"127.0.0.1:{port}"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        await app.shutdown()


def _submit(port: int, message: bytes, rcpts: list[str] | None = None) -> dict[str, Any]:
    """Send through Postfix; returns refused recipients (raises on MAIL/DATA errors)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        return client.sendmail("alice@example.org", rcpts or [BOB], message)


async def submit(instance: PostfixInstance, message: bytes, rcpts: list[str] | None = None) -> Any:
    return await asyncio.to_thread(_submit, instance.port, message, rcpts)


async def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.1)


def by_subject(instance: PostfixInstance, subject: str) -> list[email.message.Message]:
    return [m for m in instance.messages() if m["Subject"] == subject]


async def test_header_body_and_recipient_changes_reach_the_delivered_message(postfix, make_config):
    instance, port = postfix
    plugin = Scripted()
    plugin.result = Result(
        mutations=[
            AddHeader("X-Mailflow", "checked"),
            AddHeader("X-Mailflow-Long", "word " * 30, index=-1),
            RemoveHeader("X-Strip-Me"),
            ReplaceBody(b"The body was replaced.\r\n"),
            AddRecipient(f"copy@{VIRTUAL_DOMAIN}"),
        ]
    )
    original = make_message(
        subject="edits",
        to=BOB,
        extra_headers={"X-Strip-Me": "secret", "X-Folded": "first\r\n\tsecond"},
    )
    async with milter_for(port, make_config, plugins={"scripted": plugin}):
        await submit(instance, original)
        await wait_for(lambda: len(by_subject(instance, "edits")) == 2, "two copies")
    # The plugin saw the header block exactly as the client sent it (HDR_LEADSPC).
    assert plugin.seen[0].split(b"\r\n\r\n")[0] == original.split(b"\r\n\r\n")[0]
    copies = by_subject(instance, "edits")
    assert sorted(m["X-Original-To"] for m in copies) == [BOB, f"copy@{VIRTUAL_DOMAIN}"]
    for msg in copies:
        assert msg["X-Mailflow"] == "checked"
        assert " ".join(msg["X-Mailflow-Long"].split()) == " ".join(["word"] * 30)
        assert msg["X-Strip-Me"] is None
        assert msg["X-Folded"] == "first\n\tsecond"
        assert msg.get_payload() == "The body was replaced.\n"
        # AddHeader(index=0) goes to the very top, above Postfix's own Received.
        names = [k for k in msg if k not in ("Return-Path", "X-Original-To", "Delivered-To")]
        assert names[:2] == ["X-Mailflow", "Received"]
        assert names[-1] == "X-Mailflow-Long"


async def test_reject_at_rcpt_gives_the_client_the_plugin_text(postfix, make_config):
    instance, port = postfix
    plugin = Scripted()
    plugin.rcpt_refuse[f"nobody@{VIRTUAL_DOMAIN}"] = Result.reject(
        "no mailbox by that name", status="5.1.1"
    )
    async with milter_for(port, make_config, plugins={"scripted": plugin}):
        message = make_message(subject="partly refused", to=BOB)
        refused = await submit(instance, message, [f"nobody@{VIRTUAL_DOMAIN}", BOB])
        await wait_for(lambda: by_subject(instance, "partly refused"), "delivery")
    code, text = refused[f"nobody@{VIRTUAL_DOMAIN}"]
    assert (code, text) == (550, b"5.1.1 no mailbox by that name")
    [msg] = by_subject(instance, "partly refused")
    assert msg["X-Original-To"] == BOB


@pytest.mark.parametrize(
    ("result", "code", "text"),
    [
        (Result.reject("content refused by policy"), 550, b"5.7.1 content refused by policy"),
        (Result.tempfail("scanner busy"), 451, b"4.7.1 scanner busy"),
        (Result.reject("100% spam", code=554), 554, b"5.7.1 100% spam"),
    ],
)
async def test_end_of_data_reject_and_tempfail(postfix, make_config, result, code, text):
    instance, port = postfix
    plugin = Scripted()
    plugin.result = result
    async with milter_for(port, make_config, plugins={"scripted": plugin}):
        with pytest.raises(smtplib.SMTPDataError) as info:
            await submit(instance, make_message(subject=f"refused {code}", to=BOB))
    assert (info.value.smtp_code, info.value.smtp_error) == (code, text)
    assert by_subject(instance, f"refused {code}") == []


async def test_discard_answers_250_and_delivers_nothing(postfix, make_config):
    instance, port = postfix
    plugin = Scripted()
    plugin.result = Result.discard("dropped")
    async with milter_for(port, make_config, plugins={"scripted": plugin}):
        assert await submit(instance, make_message(subject="discard me", to=BOB)) == {}
        plugin.result = None
        await submit(instance, make_message(subject="after the discard", to=BOB))
        await wait_for(lambda: by_subject(instance, "after the discard"), "second delivery")
    assert by_subject(instance, "discard me") == []
    assert "milter triggers DISCARD action" in instance.log()


def _queue(instance: PostfixInstance) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["postqueue", "-c", str(instance.config_dir), "-j"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def test_quarantine_puts_the_message_on_hold(postfix, make_config):
    # Postfix's queue listing and log show the hold; the reason is not asserted on.
    instance, port = postfix
    plugin = Scripted()
    plugin.result = Result.quarantine("suspicious attachment")
    async with milter_for(port, make_config, plugins={"scripted": plugin}):
        assert await submit(instance, make_message(subject="hold me", to=BOB)) == {}
    held = [e for e in _queue(instance) if e["queue_name"] == "hold"]
    assert len(held) == 1
    assert [r["address"] for r in held[0]["recipients"]] == [BOB]
    assert "milter triggers HOLD action" in instance.log()
    assert by_subject(instance, "hold me") == []


async def test_rules_plugin_works_unchanged_through_the_milter(postfix, make_config, tmp_path):
    instance, port = postfix
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        textwrap.dedent("""\
            rules:
              - name: no-pills
                when: {subject: {contains: pills}}
                then: {action: reject, message: "We do not want pills", code: 554}
              - name: tag-invoices
                when: {subject: {contains: invoice}}
                then:
                  add_headers: {X-Department: accounting}
                  remove_headers: [X-Internal]
            """)
    )
    config = f"plugins: [{{name: rules, settings: {{files: ['{rules}']}}}}]"
    async with milter_for(port, make_config, config):
        with pytest.raises(smtplib.SMTPDataError) as info:
            await submit(instance, make_message(subject="cheap pills", to=BOB))
        await submit(
            instance,
            make_message(subject="invoice 42", to=BOB, extra_headers={"X-Internal": "x"}),
        )
        await wait_for(lambda: by_subject(instance, "invoice 42"), "tagged delivery")
    assert (info.value.smtp_code, info.value.smtp_error) == (554, b"5.7.1 We do not want pills")
    [msg] = by_subject(instance, "invoice 42")
    assert msg["X-Department"] == "accounting"
    assert msg["X-Internal"] is None


async def test_milter_down_or_dying_makes_postfix_apply_tempfail(postfix, make_config):
    instance, port = postfix
    # Nothing listens on the milter port.
    with pytest.raises(smtplib.SMTPException) as info:
        await submit(instance, make_message(subject="milter down", to=BOB))
    assert _code_of(info.value) // 100 == 4
    # The milter dies while a message is being filtered.
    plugin = Scripted()
    plugin.hold = asyncio.Event()
    async with milter_for(port, make_config, plugins={"scripted": plugin}) as server:
        sending = asyncio.ensure_future(submit(instance, make_message(subject="mid-crash", to=BOB)))
        await asyncio.wait_for(plugin.entered.wait(), 30)
        await server.stop()  # drops the conversation mid-message
        with pytest.raises(smtplib.SMTPDataError) as info2:
            await sending
        plugin.hold.set()
    assert info2.value.smtp_code // 100 == 4
    assert by_subject(instance, "milter down") == by_subject(instance, "mid-crash") == []


def _code_of(exc: smtplib.SMTPException) -> int:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return next(iter(exc.recipients.values()))[0]
    return int(getattr(exc, "smtp_code", 0))


class Policy:
    """One decision, whichever front end asks: reject "lottery", tag everything else."""

    @hookimpl
    def mailflow_data(self, message):
        if "lottery" in message.header("Subject"):
            return Result.reject("lottery mail is not accepted", status="5.7.0")
        return Result(mutations=[AddHeader("X-Policy", "passed")])


async def test_same_plugin_same_decision_via_smtp_and_via_milter(postfix, make_config):
    instance, port = postfix
    # SMTP front end.
    async with running_server(make_config(), extra_plugins={"policy": Policy()}) as srv:
        import aiosmtplib

        with pytest.raises(aiosmtplib.SMTPResponseException) as smtp_info:
            await send(srv.port, "alice@example.org", [BOB], make_message(subject="lottery win"))
        await send(srv.port, "alice@example.org", [BOB], make_message(subject="hello smtp"))
        [smtp_raw] = await srv.wait_delivered(BOB)
    # Milter front end, behind Postfix.
    async with milter_for(port, make_config, plugins={"policy": Policy()}):
        with pytest.raises(smtplib.SMTPDataError) as milter_info:
            await submit(instance, make_message(subject="lottery win", to=BOB))
        await submit(instance, make_message(subject="hello milter", to=BOB))
        await wait_for(lambda: by_subject(instance, "hello milter"), "milter delivery")
    smtp_reply = (smtp_info.value.code, smtp_info.value.message)
    milter_reply = (milter_info.value.smtp_code, milter_info.value.smtp_error.decode())
    assert smtp_reply == milter_reply == (550, "5.7.0 lottery mail is not accepted")
    assert email.message_from_bytes(smtp_raw)["X-Policy"] == "passed"
    assert by_subject(instance, "hello milter")[0]["X-Policy"] == "passed"


async def test_local_submission_is_filtered_via_non_smtpd_milters(postfix, make_config):
    """Postfix's sendmail command -> pickup -> cleanup calls the milter too."""
    instance, port = postfix
    plugin = Scripted()
    plugin.result = Result(mutations=[AddHeader("X-Local-Filter", "ran")])
    async with milter_for(port, make_config, plugins={"scripted": plugin}):
        done = await asyncio.to_thread(
            subprocess.run,
            ["sendmail", "-C", str(instance.config_dir), "-f", "alice@example.org", BOB],
            input=make_message(subject="local submission", to=BOB),
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        await wait_for(lambda: by_subject(instance, "local submission"), "local delivery")
    [msg] = by_subject(instance, "local submission")
    assert msg["X-Local-Filter"] == "ran"
    assert "(Postfix, from userid" in msg["Received"]  # really came through pickup


class ConnectGate:
    def __init__(self, result: Result) -> None:
        self.result = result

    @hookimpl
    def mailflow_connect(self, connection):
        return self.result


def _greeting_or_mail_reply(port: int) -> tuple[int, bytes]:
    """What a client gets first that is not a 2xx: the greeting or the MAIL reply."""
    try:
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    except smtplib.SMTPConnectError as exc:
        return exc.smtp_code, exc.smtp_error
    try:
        client.ehlo("client.test")
        return client.mail("alice@example.org")
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()


async def test_connect_stage_verdicts_through_postfix(postfix, make_config):
    """Postfix refuses the session itself, with its own text (seen with 3.7: a 554
    greeting "not accepting connections"), so only the reply class is asserted."""
    instance, port = postfix
    gate = ConnectGate(Result.reject("your network is blocked"))
    async with milter_for(port, make_config, plugins={"gate": gate}):
        code, _ = await asyncio.to_thread(_greeting_or_mail_reply, instance.port)
        assert code == 554
        gate.result = Result.tempfail("too busy right now")
        code, _ = await asyncio.to_thread(_greeting_or_mail_reply, instance.port)
        assert code // 100 == 4
        gate.result = None
        assert await asyncio.to_thread(_greeting_or_mail_reply, instance.port) == (250, b"2.1.0 Ok")


class WireRecorder:
    """A loopback relay between Postfix and the milter that keeps each chunk Postfix's
    writes arrive in (one read each) and the milter's packets, unchanged."""

    def __init__(self, milter_port: int) -> None:
        self.milter_port = milter_port
        self.from_mta: list[bytes] = []
        self.from_milter = bytearray()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.milter_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: Any) -> None:
            while data := await src.read(1 << 20):
                keep(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(
            pump(reader, up_writer, self.from_mta.append),
            pump(up_reader, writer, self.from_milter.extend),
            return_exceptions=True,
        )


async def test_no_write_of_postfix_waits_unanswered(postfix, make_config):
    """Every chunk Postfix sends ends in a command that mailflow answers, so an answer
    always carries the ACK its next write waits for (Nagle): no 40 ms delayed-ACK stall
    (docs/milter.md, "Round trips"). With SMFIP_NR_DATA agreed, DATA ended a chunk."""
    from mailflow.milter import protocol as p

    instance, port = postfix
    async with milter_for(free_port(), make_config) as server:
        recorder = WireRecorder(server.port)
        relay = await asyncio.start_server(recorder.serve, "127.0.0.1", port)
        try:
            for n in range(2):  # the second message follows an SMFIC_ABORT on one connection
                await submit(instance, make_message(subject=f"wire {n}", to=BOB))
        finally:
            relay.close()
            await relay.wait_closed()
    [answer] = p.Decoder().feed(bytes(recorder.from_milter[:17]))
    agreed = p.decode_optneg(answer.data).protocol
    assert not agreed & p.SMFIP_NR_DATA
    decoder = p.Decoder()
    silent = {p.SMFIC_MACRO, p.SMFIC_ABORT, p.SMFIC_QUIT, p.SMFIC_QUIT_NC}
    ends = []
    for chunk in recorder.from_mta:
        commands = decoder.feed(chunk)
        if commands and not decoder.pending:  # the chunk ended on a packet boundary
            ends.append(commands[-1].code)
    assert p.SMFIC_DATA in ends and p.SMFIC_BODYEOB in ends
    for code in ends:
        flag = p.NO_REPLY_FLAG.get(code, 0)
        answered = code not in silent and not agreed & flag
        assert answered or code in (p.SMFIC_QUIT, p.SMFIC_ABORT), p.COMMAND_NAMES[code]
