"""The relay's SMTP client (delivery/smtp_client.py) and pool against real peers on loopback:
a scripted raw SMTP server (to see exactly what arrives, and in how many writes), aiosmtpd
sinks that offer PIPELINING, and mailflow relaying end to end."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from mailflow.delivery.outcome import Outcome
from mailflow.delivery.smtp_client import (
    SessionClosed,
    SMTPSession,
    parse_reply,
    safe_address,
)
from mailflow.delivery.smtp_pool import Destination, SessionError, SMTPPool
from mailflow.testing import _CountingSMTP, make_message, running_server, send, smtp_sink
from tests.smtp_support import relay_config

SENDER = "alice@example.org"  # local: bounces land in its Maildir


# --- a scripted raw SMTP server ---------------------------------------------------------------


@dataclass
class RawServer:
    """Answers SMTP line by line; records each chunk read and each command line.

    ``reply(command)`` returns the reply for a command (``None``: the default), and
    ``after_data`` is consumed one per message (then repeats its last item);
    ``"close"`` closes the connection instead of answering.
    """

    ehlo: list[str] = field(default_factory=lambda: ["raw.test", "PIPELINING", "8BITMIME"])
    reply: Callable[[str], str | None] = lambda command: None
    after_data: list[str] = field(default_factory=lambda: ["250 2.0.0 queued"])
    greeting: str = "220 raw.test ESMTP"
    close_after: set[str] = field(default_factory=set)  # verbs answered, then hung up on
    chunks: list[bytes] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def _default(self, command: str) -> str:
        verb = command.split(" ", 1)[0].upper()
        if verb in ("EHLO", "LHLO"):
            lines = self.ehlo
            return "\r\n".join(
                f"250{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)
            )
        if verb == "DATA":
            return "354 go ahead"
        if verb == "QUIT":
            return "221 bye"
        return "250 ok"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        buffer = b""
        in_data = False
        try:
            writer.write(self.greeting.encode() + b"\r\n")
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                self.chunks.append(chunk)
                buffer += chunk
                while True:
                    if in_data:
                        end = buffer.find(b"\r\n.\r\n")
                        if end < 0 and buffer.startswith(b".\r\n"):
                            end, body, buffer = 0, b"", buffer[3:]
                        elif end < 0:
                            break
                        else:
                            body, buffer = buffer[: end + 2], buffer[end + 5 :]
                        self.messages.append(body)
                        index = min(len(self.messages), len(self.after_data)) - 1
                        answer = self.after_data[index]
                        command = ""
                        in_data = False
                    else:
                        line, sep, rest = buffer.partition(b"\r\n")
                        if not sep:
                            break
                        buffer = rest
                        command = line.decode()
                        self.commands.append(command)
                        answer = self.reply(command) or self._default(command)
                        in_data = answer.startswith("354")
                    if answer == "close":
                        writer.close()
                        return
                    writer.write(answer.encode() + b"\r\n")
                    if command.upper() == "QUIT" or command.upper() in self.close_after:
                        writer.close()
                        return
        finally:
            writer.close()

    def verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in self.commands]


@contextlib.asynccontextmanager
async def raw_server(**kwargs: Any) -> AsyncIterator[RawServer]:
    raw = RawServer(**kwargs)
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    raw.port = server.sockets[0].getsockname()[1]
    try:
        yield raw
    finally:
        server.close()
        for writer in raw.writers:
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


def dest(port: int, **kwargs: Any) -> Destination:
    return Destination(host="127.0.0.1", port=port, tls="none", timeout=5, **kwargs)


async def pooled_send(pool: SMTPPool, port: int, rcpts: list[str], message: bytes, **kw: Any):
    return await pool.send(dest(port, **kw), SENDER, rcpts, message)


# --- the pipelined transaction ----------------------------------------------------------------


async def test_pipelined_transaction_is_two_writes_and_a_refused_rcpt_only_fails_itself():
    def reply(command: str) -> str | None:
        return "550 5.1.1 no such user" if "nobody@" in command else None

    async with raw_server(reply=reply) as raw:
        pool = SMTPPool("relay.test")
        msg = make_message(body="hello\r\n.dot line\r\n")
        outcomes = await pooled_send(
            pool, raw.port, ["a@remote.test", "nobody@remote.test", "b@remote.test"], msg
        )
        await pool.aclose()
    assert outcomes["a@remote.test"] == Outcome(250, "2.0.0 queued")
    assert outcomes["b@remote.test"] == Outcome(250, "2.0.0 queued")
    assert outcomes["nobody@remote.test"] == Outcome(550, "5.1.1 no such user")
    # The commands of the transaction arrived in one write (RFC 2920), the message
    # with its terminator in the next.
    [group] = [c for c in raw.chunks if c.startswith(b"MAIL FROM")]
    assert group == (
        b"MAIL FROM:<alice@example.org>\r\n"
        b"RCPT TO:<a@remote.test>\r\n"
        b"RCPT TO:<nobody@remote.test>\r\n"
        b"RCPT TO:<b@remote.test>\r\n"
        b"DATA\r\n"
    )
    assert raw.messages == [msg.replace(b"\r\n.dot", b"\r\n..dot")]


async def test_without_pipelining_commands_go_one_by_one_and_no_data_without_a_recipient():
    def reply(command: str) -> str | None:
        return "550 5.1.1 no such user" if command.startswith("RCPT") else None

    async with raw_server(ehlo=["raw.test", "8BITMIME"], reply=reply) as raw:
        pool = SMTPPool("relay.test")
        outcomes = await pooled_send(pool, raw.port, ["x@remote.test"], b"Subject: x\r\n\r\n")
        # The session is reused; the open transaction is reset first (RFC 5321 4.1.1.5).
        await pooled_send(pool, raw.port, ["y@remote.test"], b"Subject: y\r\n\r\n")
        await pool.aclose()
    assert outcomes == {"x@remote.test": Outcome(550, "5.1.1 no such user")}
    assert raw.verbs() == ["EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "QUIT"]
    assert all(c.count(b"\r\n") == 1 for c in raw.chunks)  # one command per write
    assert raw.connections == 1


async def test_a_refused_mail_from_applies_to_every_recipient():
    def reply(command: str) -> str | None:
        if command.startswith("MAIL"):
            return "553 5.7.1 sender rejected"
        if command.startswith(("RCPT", "DATA")):
            return "503 5.5.1 need MAIL first"
        return None

    async with raw_server(reply=reply) as raw:
        pool = SMTPPool("relay.test")
        outcomes = await pooled_send(pool, raw.port, ["a@r.test", "b@r.test"], b"x\r\n")
        await pool.aclose()
    assert outcomes == dict.fromkeys(
        ["a@r.test", "b@r.test"], Outcome(553, "5.7.1 sender rejected")
    )
    assert raw.messages == []


async def test_a_session_reused_after_a_clean_transaction_sends_no_rset():
    async with raw_server() as raw:
        pool = SMTPPool("relay.test")
        for i in range(3):
            await pooled_send(pool, raw.port, ["a@r.test"], f"Subject: {i}\r\n\r\n".encode())
        await pool.aclose()
    assert raw.connections == 1 and pool.opened == 1
    assert "RSET" not in raw.verbs()
    assert len(raw.messages) == 3


async def test_a_refused_data_is_followed_by_rset_on_the_reused_session():
    def reply(command: str) -> str | None:
        first_data = command == "DATA" and raw.commands.count("DATA") == 1
        return "451 4.3.0 try later" if first_data else None

    async with raw_server(reply=lambda c: reply(c)) as raw:
        pool = SMTPPool("relay.test")
        first = await pooled_send(pool, raw.port, ["a@r.test"], b"x\r\n")
        second = await pooled_send(pool, raw.port, ["a@r.test"], b"y\r\n")
        await pool.aclose()
    assert first == {"a@r.test": Outcome(451, "4.3.0 try later")}
    assert second == {"a@r.test": Outcome(250, "2.0.0 queued")}
    assert raw.verbs()[:6] == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL"]
    # The RSET went in the same write as the next transaction.
    assert any(c.startswith(b"RSET\r\nMAIL FROM") for c in raw.chunks)


async def test_a_2xx_reply_to_data_never_counts_as_delivered():
    async with raw_server(reply=lambda c: "250 ok, whatever" if c == "DATA" else None) as raw:
        pool = SMTPPool("relay.test")
        outcomes = await pooled_send(pool, raw.port, ["a@r.test"], b"x\r\n")
        await pool.aclose()
    assert outcomes["a@r.test"].temporary
    assert raw.messages == []


async def test_421_on_a_reused_session_is_retried_at_once_on_a_fresh_one():
    state = {"closing": False}

    def reply(command: str) -> str | None:
        if state["closing"] and command.startswith("MAIL"):
            state["closing"] = False
            return "421 4.4.2 idle too long, closing"
        return None

    async with raw_server(reply=reply) as raw:
        pool = SMTPPool("relay.test")
        await pooled_send(pool, raw.port, ["a@r.test"], b"one\r\n")
        state["closing"] = True
        outcomes = await pooled_send(pool, raw.port, ["a@r.test"], b"two\r\n")
        await pool.aclose()
    assert outcomes == {"a@r.test": Outcome(250, "2.0.0 queued")}
    assert raw.connections == 2
    assert raw.messages == [b"one\r\n", b"two\r\n"]


async def test_421_on_a_fresh_session_is_a_temporary_failure():
    async with raw_server(
        reply=lambda c: "421 4.3.2 shutting down" if c[:4] == "MAIL" else None
    ) as raw:
        pool = SMTPPool("relay.test")
        with pytest.raises(SessionError) as info:
            await pooled_send(pool, raw.port, ["a@r.test"], b"x\r\n")
        await pool.aclose()
    assert info.value.outcome == Outcome(421, "4.3.2 shutting down")


async def test_connection_lost_after_the_message_is_not_resent_at_once():
    async with raw_server(after_data=["250 2.0.0 ok", "close"]) as raw:
        pool = SMTPPool("relay.test")
        await pooled_send(pool, raw.port, ["a@r.test"], b"one\r\n")
        with pytest.raises(SessionError) as info:
            await pooled_send(pool, raw.port, ["a@r.test"], b"two\r\n")
        await pool.aclose()
    # The message may have arrived: retried later by the queue, not on a new session now.
    assert info.value.outcome.code == 451 and "after DATA" in info.value.outcome.text
    assert raw.connections == 1


async def test_a_rcpt_refusal_is_kept_when_the_connection_is_lost_after_data():
    """The server refused b at RCPT, then hung up after the message: b keeps its 550
    (it will bounce), only a is left to retry."""
    async with raw_server(
        reply=lambda c: "550 5.1.1 no such user" if "b@r.test" in c else None,
        after_data=["close"],
    ) as raw:
        pool = SMTPPool("relay.test")
        with pytest.raises(SessionError) as info:
            await pooled_send(pool, raw.port, ["a@r.test", "b@r.test"], b"x\r\n")
        await pool.aclose()
    assert info.value.answered == {"b@r.test": Outcome(550, "5.1.1 no such user")}
    outcomes = info.value.outcomes(["a@r.test", "b@r.test"])
    assert outcomes["a@r.test"].code == 451 and "after DATA" in outcomes["a@r.test"].text
    assert outcomes["b@r.test"] == Outcome(550, "5.1.1 no such user")


async def test_a_large_message_arrives_whole():
    line = b"x" * 998 + b"\r\n"
    msg = b"Subject: big\r\n\r\n" + line * 4000 + b".leading dot\r\n"  # ~4 MB
    async with raw_server() as raw:
        pool = SMTPPool("relay.test")
        outcomes = await pooled_send(pool, raw.port, ["a@r.test"], msg)
        await pool.aclose()
    assert outcomes["a@r.test"].ok
    assert raw.messages == [msg.replace(b"\r\n.leading", b"\r\n..leading")]


async def test_size_and_8bitmime_are_declared_when_offered():
    ehlo = ["raw.test", "PIPELINING", "SIZE 1000000", "8BITMIME"]
    async with raw_server(ehlo=ehlo) as raw:
        pool = SMTPPool("relay.test")
        msg = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
        await pooled_send(pool, raw.port, ["a@r.test"], msg)
        await pool.aclose()
    [mail] = [c for c in raw.commands if c.startswith("MAIL")]
    assert mail == f"MAIL FROM:<{SENDER}> SIZE={len(msg)} BODY=8BITMIME"


async def test_non_ascii_envelope_needs_smtputf8():
    async with raw_server() as raw:
        pool = SMTPPool("relay.test")
        outcomes = await pooled_send(pool, raw.port, ["j\u00fcrgen@r.test"], b"x\r\n")
        await pool.aclose()
    assert outcomes["j\u00fcrgen@r.test"].code == 553
    assert "5.6.7" in outcomes["j\u00fcrgen@r.test"].text
    assert "MAIL" not in raw.verbs()
    async with raw_server(ehlo=["raw.test", "PIPELINING", "SMTPUTF8"]) as raw:
        pool = SMTPPool("relay.test")
        outcomes = await pooled_send(pool, raw.port, ["j\u00fcrgen@r.test"], b"x\r\n")
        await pool.aclose()
    assert outcomes["j\u00fcrgen@r.test"].ok
    assert raw.commands[1] == f"MAIL FROM:<{SENDER}> SMTPUTF8"
    assert raw.commands[2] == "RCPT TO:<j\u00fcrgen@r.test>"


async def test_ehlo_refused_falls_back_to_helo():
    async with raw_server(
        reply=lambda c: "502 5.5.1 what?" if c.startswith("EHLO") else None
    ) as raw:
        pool = SMTPPool("relay.test")
        outcomes = await pooled_send(pool, raw.port, ["a@r.test"], b"x\r\n")
        await pool.aclose()
    assert outcomes["a@r.test"].ok
    assert raw.verbs()[:3] == ["EHLO", "HELO", "MAIL"]


async def test_a_bad_greeting_is_a_temporary_failure():
    async with raw_server(greeting="554 5.3.2 go away") as raw:
        pool = SMTPPool("relay.test")
        with pytest.raises(SessionError) as info:
            await pooled_send(pool, raw.port, ["a@r.test"], b"x\r\n")
        await pool.aclose()
    assert info.value.outcome.code == 451 and "4.4.2" in info.value.outcome.text
    assert "554 5.3.2 go away" in info.value.outcome.text


async def test_garbage_instead_of_a_reply_closes_the_session():
    async with raw_server(greeting="HTTP/1.1 400 Bad Request") as raw:
        pool = SMTPPool("relay.test")
        with pytest.raises(SessionError) as info:
            await pooled_send(pool, raw.port, ["a@r.test"], b"x\r\n")
        await pool.aclose()
    assert "4.4.1" in info.value.outcome.text


async def test_a_server_that_never_finishes_its_reply_times_out():
    async with raw_server(reply=lambda c: "250-still thinking" if c[:4] == "MAIL" else None) as raw:
        pool = SMTPPool("relay.test")
        with pytest.raises(SessionError) as info:
            await pool.send(
                Destination("127.0.0.1", raw.port, tls="none", timeout=0.3), SENDER, ["a@r"], b"x"
            )
        await pool.aclose()
    assert info.value.outcome.temporary


async def test_auth_login_and_cram_md5_on_a_session():
    seen: list[str] = []

    async def check(mechanisms: str, script: Callable[[str], str | None]) -> None:
        async with raw_server(ehlo=["raw.test", f"AUTH {mechanisms}"], reply=script) as raw:
            session, greeting = await SMTPSession.connect("127.0.0.1", raw.port, 5)
            assert greeting.code == 220
            await session.hello("relay.test")
            await session.login("user", "s3cret")
            await session.quit(1)
            seen.extend(raw.commands)

    def login(command: str) -> str | None:
        if command == "AUTH LOGIN":
            return "334 VXNlcm5hbWU6"
        if command == base64.b64encode(b"user").decode():
            return "334 UGFzc3dvcmQ6"
        if command == base64.b64encode(b"s3cret").decode():
            return "235 2.7.0 ok"
        return None

    await check("LOGIN", login)
    challenge = b"<1.2@raw.test>"

    def cram(command: str) -> str | None:
        if command == "AUTH CRAM-MD5":
            return "334 " + base64.b64encode(challenge).decode()
        digest = hmac.new(b"s3cret", challenge, hashlib.md5).hexdigest()
        if command == base64.b64encode(f"user {digest}".encode()).decode():
            return "235 2.7.0 ok"
        return None

    await check("CRAM-MD5", cram)
    assert seen.count("QUIT") == 2


async def test_starttls_reply_with_injected_data_is_not_trusted():
    # RFC 3207 / CVE-2011-0411: anything after the 220 came before the handshake.
    async with raw_server(
        ehlo=["raw.test", "STARTTLS"],
        reply=lambda c: "220 go ahead\r\n250 injected" if c == "STARTTLS" else None,
    ) as raw:
        pool = SMTPPool("relay.test")
        with pytest.raises(SessionError) as info:
            await pool.send(
                Destination("127.0.0.1", raw.port, tls="required", timeout=5), SENDER, ["a@r"], b"x"
            )
        await pool.aclose()
    assert "4.7.5" in info.value.outcome.text


def ready_for_tls(command: str) -> str | None:
    return "220 2.0.0 ready to start TLS" if command == "STARTTLS" else None


async def test_opportunistic_tls_after_a_failed_handshake_goes_on_in_clear_text():
    async with raw_server(
        ehlo=["raw.test", "PIPELINING", "STARTTLS"], reply=ready_for_tls, close_after={"STARTTLS"}
    ) as raw:
        pool = SMTPPool("relay.test")
        outcomes = await pool.send(
            Destination("127.0.0.1", raw.port, tls="opportunistic", timeout=5),
            SENDER,
            ["a@r.test"],
            b"x\r\n",
        )
        await pool.aclose()
    assert outcomes["a@r.test"].ok
    assert raw.connections == 2
    assert raw.verbs() == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


async def test_opportunistic_tls_refused_goes_on_in_clear_text_on_the_same_connection():
    def refuse(command: str) -> str | None:
        return "454 4.7.0 TLS not available" if command == "STARTTLS" else None

    async with raw_server(ehlo=["raw.test", "PIPELINING", "STARTTLS"], reply=refuse) as raw:
        pool = SMTPPool("relay.test")
        outcomes = await pool.send(
            Destination("127.0.0.1", raw.port, tls="opportunistic", timeout=5),
            SENDER,
            ["a@r.test"],
            b"x\r\n",
        )
        await pool.aclose()
    assert outcomes["a@r.test"].ok
    assert raw.connections == 1
    assert raw.verbs() == ["EHLO", "STARTTLS", "MAIL", "RCPT", "DATA", "QUIT"]


async def test_required_tls_after_a_failed_handshake_defers():
    async with raw_server(
        ehlo=["raw.test", "STARTTLS"], reply=ready_for_tls, close_after={"STARTTLS"}
    ) as raw:
        pool = SMTPPool("relay.test")
        with pytest.raises(SessionError) as info:
            await pool.send(
                Destination("127.0.0.1", raw.port, tls="required", timeout=5), SENDER, ["a@r"], b"x"
            )
        await pool.aclose()
    assert "4.7.5" in info.value.outcome.text
    assert raw.connections == 1 and raw.messages == []


# --- helpers ----------------------------------------------------------------------------------


def test_parse_reply_multi_line_and_partial() -> None:
    buffer = b"250-first\r\n250-SIZE 10\r\n250 last\r\n354 go"
    reply, end = parse_reply(buffer, 0)  # type: ignore[misc]
    assert reply.code == 250 and reply.lines == ["first", "SIZE 10", "last"]
    assert parse_reply(buffer, end) is None  # no CRLF yet
    with pytest.raises(SessionClosed):
        parse_reply(b"hello\r\n", 0)


def test_safe_address() -> None:
    assert safe_address("a@b.test") and safe_address("") and safe_address('"a b"@c.test')
    assert not safe_address("a@b.test> SIZE=1") and not safe_address("a b@c.test")


# --- end to end: mailflow relaying to an aiosmtpd sink that offers PIPELINING ----------------


class PipeliningSMTP(_CountingSMTP):
    """The test sink, also announcing PIPELINING (aiosmtpd reads pipelined input fine)."""

    async def push(self, status: str) -> None:
        if status == "250 HELP":
            await super().push("250-PIPELINING")
        await super().push(status)


async def test_relay_with_pipelining_rejected_rcpt_bounces_only_that_recipient(make_config):
    from mailflow.testing import SinkBehaviour

    behaviour = SinkBehaviour(rcpt_replies={"nobody@remote.test": "550 5.1.1 no such user"})
    async with (
        smtp_sink(behaviour, smtp_class=PipeliningSMTP) as sink,
        running_server(relay_config(make_config, sink.port)) as srv,
    ):
        refused = await send(
            srv.port, SENDER, ["bob@remote.test", "nobody@remote.test"], make_message()
        )
        assert refused == {}
        [got] = await sink.wait_messages(1)
        [bounce] = await srv.wait_delivered(SENDER)
        await srv.wait_queue_empty()
    assert got.rcpt_tos == ["bob@remote.test"]
    assert b"Final-Recipient: rfc822; nobody@remote.test" in bounce
    assert b"bob@remote.test" not in bounce.split(b"Final-Recipient")[1]


async def test_relay_with_pipelining_4xx_then_success_on_the_same_connection(make_config):
    from mailflow.testing import SinkBehaviour

    behaviour = SinkBehaviour(data_replies=["451 4.3.0 busy, try later", None])
    async with (
        smtp_sink(behaviour, smtp_class=PipeliningSMTP) as sink,
        running_server(relay_config(make_config, sink.port)) as srv,
    ):
        await send(srv.port, SENDER, ["bob@remote.test"], make_message(subject="again"))
        [got] = await sink.wait_messages(1)
        await srv.wait_queue_empty()
    assert sink.handler.transactions == 2
    assert sink.handler.connections == 1
    assert b"Subject: again" in got.data


async def test_relay_with_pipelining_5xx_bounces(make_config):
    from mailflow.testing import SinkBehaviour

    behaviour = SinkBehaviour(data_replies=["554 5.7.1 content rejected"])
    async with (
        smtp_sink(behaviour, smtp_class=PipeliningSMTP) as sink,
        # Through the spool: inline, a refusal of every recipient goes to the client.
        running_server(relay_config(make_config, sink.port, inline_timeout="0")) as srv,
    ):
        await send(srv.port, SENDER, ["bob@remote.test"], make_message())
        [bounce] = await srv.wait_delivered(SENDER)
        await srv.wait_queue_empty()
    assert sink.messages == []
    assert b"Status: 5.7.1" in bounce
    assert b"content rejected" in bounce


async def test_relay_with_pipelining_many_messages_share_a_few_connections(make_config):
    async with (
        smtp_sink(smtp_class=PipeliningSMTP) as sink,
        running_server(relay_config(make_config, sink.port)) as srv,
    ):
        msgs = [make_message(subject=f"m{i}") for i in range(20)]
        await asyncio.gather(*(send(srv.port, SENDER, ["bob@remote.test"], m) for m in msgs))
        await sink.wait_messages(20)
        await srv.wait_queue_empty()
    subjects = {m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages}
    assert subjects == {f"m{i}".encode() for i in range(20)}
    assert sink.handler.connections <= srv.app.config.queue.workers


async def test_relay_with_pipelining_over_tls_with_auth(make_config, tmp_path):
    from tests.test_relay import _authenticator, server_tls

    ctx, _ = server_tls(tmp_path)
    kwargs = {"tls_context": ctx, "authenticator": _authenticator, "auth_require_tls": True}
    async with smtp_sink(factory_kwargs=kwargs, smtp_class=PipeliningSMTP) as sink:
        target = "tls: required, username: relayuser, password: s3cret"
        config = make_config(
            f"""
            local_domains: [example.org]
            relay_networks: ["127.0.0.0/8"]
            relay:
              default: up
              targets:
                up: {{host: 127.0.0.1, port: {sink.port}, timeout: 5, {target}}}
            """
        )
        async with running_server(config) as srv:
            for i in range(3):
                await send(srv.port, SENDER, ["bob@remote.test"], make_message(subject=f"s{i}"))
            await sink.wait_messages(3)
            await srv.wait_queue_empty()
    assert all(m.tls and m.auth_user == "relayuser" for m in sink.messages)
    assert sink.handler.connections == 1


# --- reply timeouts -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def timed_server() -> AsyncIterator[int]:
    """Greets at once; answers NOOP at once, SLOW after 0.2 s and NEVER not at all."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(b"220 timed.test\r\n")
        while line := await reader.readline():
            if line.startswith(b"SLOW"):
                await asyncio.sleep(0.2)
            elif line.startswith(b"NEVER"):
                continue
            writer.write(b"250 ok\r\n")

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


async def test_each_reply_gets_the_whole_timeout_from_when_it_is_awaited():
    async with timed_server() as port:
        session, _ = await SMTPSession.connect("127.0.0.1", port, 0.3)
        assert (await session.command("NOOP")).code == 250
        await asyncio.sleep(0.2)
        # 0.4 s after the first wait began, but only 0.2 s into this one: no timeout.
        assert (await session.command("SLOW")).code == 250
        session.close()


async def test_a_shorter_timeout_after_a_longer_one_fires_on_time():
    async with timed_server() as port:
        session, _ = await SMTPSession.connect("127.0.0.1", port, 30)
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(session.command("NEVER", timeout=0.2), 10)
        assert asyncio.get_running_loop().time() - started < 5  # not the session's 30 s
        assert not session.is_open  # out of step: never reused
        session.close()
