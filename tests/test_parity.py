"""SMTP, milter and `check` give the same answer for the same message and connection facts.

Every message goes through the three front ends, each over its real interface: an SMTP
conversation with mailflow's SMTP server on 127.0.0.1, a milter conversation (the MTA's
side spoken byte by byte over a socket) with mailflow's milter server, and
:func:`mailflow.check.check_message` with ``ip``, ``helo``, sender and recipients.
Compared per message: the action, the score, the headers added, the refused recipients
and every refusal's reply, and (SMTP and check: in milter mode the MTA delivers, so a
route has no effect there) the routes.

The messages: the corpus slice in tests/messages/corpus (and a sample of
``../shared/corpus`` when present), and hand-written ones that plugins refuse,
quarantine or discard at every stage, with refused recipients and added headers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import struct
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mailflow.app import App
from mailflow.auth import UsersFileAuthenticator
from mailflow.check import check_message, report, without_mbox_line
from mailflow.config import MilterConfig, default_config_text, parse_config
from mailflow.hookspecs import hookimpl
from mailflow.message import Connection, MessageContext
from mailflow.milter.server import MilterServer
from mailflow.normalize import normalize_newlines
from mailflow.pipeline import available_plugins
from mailflow.smtp import Handler, bound_addresses, start_servers
from mailflow.smtp.received import received_header, with_trace
from mailflow.testing import config_for, make_message
from mailflow.verdict import Action, AddHeader, RemoveRecipient, Result
from tests.smtp_support import (
    TEST_PASSWORD,
    TEST_PASSWORD_HASH,
    client_context,
    self_signed_cert,
)
from tests.test_milter_session import MTA

CORPUS_SLICE = Path(__file__).parent / "messages" / "corpus"
SHARED_CORPUS = Path(__file__).parents[2] / "shared" / "corpus"
PER_LABEL = 6  # messages per label and corpus: enough to spread the scores

HELO = "client.test"
IP = "127.0.0.1"
SENDER = "alice@example.org"

CONFIG = """
server: {hostname: mx.test}
local_domains: [example.com]
actions: {reject: 14, quarantine: 9, junk: 6, add_header: 3}
plugins:
  - name: bayes
  - name: example
    settings:
      blocked_sender_domains: [spam.test]
      refused_recipients: [gone@example.com]
      subject_keywords: {lottery: 4, prize: 2, winner: 7}
      folders: {sales@example.com: .Sales}
"""


class Stager:
    """Gives the verdict a test case sets for a stage (at RCPT: for one recipient)."""

    def __init__(self) -> None:
        self.at: dict[str, Result] = {}

    def _at(self, stage: str) -> Result | None:
        return self.at.get(stage)

    @hookimpl
    def mailflow_connect(self, connection: Any) -> Result | None:
        return self._at("connect")

    @hookimpl
    def mailflow_helo(self, connection: Any, name: str) -> Result | None:
        return self._at("helo")

    @hookimpl
    def mailflow_mail_from(self, connection: Any, sender: str, options: Any) -> Result | None:
        return self._at("mail")

    @hookimpl
    def mailflow_rcpt_to(
        self, connection: Any, sender: str, recipient: str, options: Any
    ) -> Result | None:
        return self._at(f"rcpt {recipient}")

    @hookimpl
    def mailflow_data(self, message: MessageContext) -> Result | None:
        return self._at("data")


@dataclass
class Case:
    name: str
    raw: bytes
    recipients: list[str] = field(default_factory=lambda: ["bob@example.com"])
    sender: str = SENDER
    at: dict[str, Result] = field(default_factory=dict)
    outcome: Outcome | None = None  # what SMTP answered, once run
    milter: bool = True  # False: what the MTA checks itself (a mail loop, a NUL)


@dataclass
class Outcome:
    """What one front end answered for one message (normalised for comparison)."""

    action: str
    reply: str | None = None  # the refusal that decided, if any
    refused: dict[str, str] = field(default_factory=dict)
    score: float | None = None  # only once the message reached the data stage
    headers: list[tuple[str, str]] = field(default_factory=list)
    routes: dict[str, Any] | None = None  # None: not observable (milter)


def _action_of(code: str) -> str:
    return "tempfail" if code.startswith("4") else "reject"


def _norm_header(name: str, value: str) -> tuple[str, str]:
    return name.lower(), " ".join(value.split())


def _fields(head: bytes) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for line in head.decode("utf-8", "replace").split("\r\n"):
        if line[:1] in (" ", "\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + line)
        elif ":" in line:
            name, _, value = line.partition(":")
            out.append((name, value))
    return [_norm_header(n, v) for n, v in out]


def _head(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 2]


def _added(original: bytes, final: bytes) -> list[tuple[str, str]]:
    """Fields in ``final`` that ``original`` lacks, without the front end's Received."""
    extra = Counter(_fields(_head(final))) - Counter(_fields(_head(original)))
    return sorted(f for f in extra.elements() if f[0] != "received")


# --- the three front ends -----------------------------------------------------------------


class SMTPFrontEnd:
    """mailflow's SMTP server; stored messages are captured where the queue takes them."""

    def __init__(self, app: App, caplog: pytest.LogCaptureFixture) -> None:
        self.app = app
        self.caplog = caplog
        self.stored: dict[str, MessageContext] = {}
        self.port = 0

    async def enqueue(self, ctx: MessageContext) -> str:
        self.stored[ctx.queue_id] = ctx
        return ctx.queue_id

    def authenticator(self) -> object | None:
        return None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        handler = Handler(self.app, self.enqueue)
        servers = await start_servers(self.app, handler, self.authenticator())
        self.port = bound_addresses(servers)[0][1]
        try:
            yield
        finally:
            for server in servers:
                server.close()
                await server.wait_closed()

    async def run(self, case: Case) -> Outcome:
        reader, writer = await asyncio.open_connection(IP, self.port)
        try:
            return await self._session(case, reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _session(
        self, case: Case, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Outcome:
        async def reply() -> str:
            async with asyncio.timeout(20):
                while True:
                    line = (await reader.readline()).decode().rstrip("\r\n")
                    if line[3:4] != "-":
                        return line

        async def command(line: str) -> str:
            writer.write(line.encode() + b"\r\n")
            return await reply()

        for answer in (await reply(), await command(f"EHLO {HELO}")):
            if not answer.startswith("2"):
                return Outcome(_action_of(answer), answer)
        answer = await command(f"MAIL FROM:<{case.sender}>")
        if not answer.startswith("2"):
            return Outcome(_action_of(answer), answer)
        refused = {}
        for rcpt in case.recipients:
            answer = await command(f"RCPT TO:<{rcpt}>")
            if not answer.startswith("2"):
                refused[rcpt] = answer
        if len(refused) == len(case.recipients):
            return Outcome(_action_of(answer), answer, refused)
        assert (await command("DATA")).startswith("354")
        stuffed = re.sub(rb"(?m)^\.", b"..", case.raw)
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        self.caplog.clear()
        writer.write(stuffed + b".\r\n")
        answer = await reply()
        await command("QUIT")
        await asyncio.sleep(0)  # the message's log line is written after the reply
        if not answer.startswith("2") and not _logged(self.caplog):
            return Outcome(_action_of(answer), answer, refused)  # refused before the plugins
        logged = _log_line(self.caplog)
        action, score = logged["action"], float(logged["score"])
        if not answer.startswith("2"):
            return Outcome(_action_of(answer), answer, refused, score)
        queue_id = answer.rsplit(" ", 1)[-1]
        headers: list[tuple[str, str]] = []
        routes: dict[str, Any] = {}
        if action == "quarantine":
            stored = (Path(self.app.config.quarantine.directory) / f"{queue_id}.eml").read_bytes()
            headers = _added(case.raw, stored)
        elif action == "accept":
            ctx = self.stored[queue_id]
            headers = _added(case.raw, ctx.raw)
            routes = {r: route.as_dict() for r, route in ctx.routes.items()}
        return Outcome(action, None, refused, score, headers, routes)


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailflow.message"]


def _log_line(caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    lines = _logged(caplog)
    assert lines, "no message log line"
    return dict(re.findall(r"\b(action|score)=(\S+)", lines[-1]))


class MilterFrontEnd:
    """mailflow's milter server, spoken to as an MTA would over a real socket."""

    def __init__(self, app: App, caplog: pytest.LogCaptureFixture) -> None:
        self.app = app
        self.caplog = caplog
        self.server = MilterServer(app, MilterConfig(listen=f"{IP}:0"))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        await self.server.start()
        try:
            yield
        finally:
            await self.server.stop()

    async def run(self, case: Case) -> Outcome:
        mta = await MTA.open(self.server.port)
        try:
            return await self._session(case, mta)
        finally:
            await mta.close()

    async def _session(self, case: Case, mta: MTA) -> Outcome:
        def refusal(packets: list[tuple[bytes, bytes]]) -> str | None:
            code, data = packets[-1]
            return data.rstrip(b"\0").decode() if code == b"y" else None

        await mta.negotiate()
        await mta.send(b"D", b"Cj\0mx.test\0")
        info = b"client.test\x004" + struct.pack("!H", 40000) + IP.encode() + b"\0"
        for packets in (
            await mta.ask(b"C", info),
            await mta.ask(b"H", HELO.encode() + b"\0"),
            await mta.ask(b"M", f"<{case.sender}>\0".encode()),
        ):
            refused_with = refusal(packets)
            if refused_with is not None:
                return Outcome(_action_of(refused_with), refused_with)
        refused = {}
        for rcpt in case.recipients:
            refused_with = refusal(await mta.ask(b"R", f"<{rcpt}>\0".encode()))
            if refused_with is not None:
                refused[rcpt] = refused_with
        if len(refused) == len(case.recipients):
            last = refused[case.recipients[-1]]
            return Outcome(_action_of(last), last, refused)
        await mta.ask(b"T")  # answered (docs/milter.md, "Round trips")
        # The MTA's own Received field comes first, as from Postfix (mailflow's SMTP
        # front end and `check` add theirs too: the plugins see one in every case).
        accepted = [r for r in case.recipients if r not in refused]
        conn = Connection(ip=IP, helo=HELO)
        trace = received_header(conn, "mta.test", "ESMTP", accepted, "4XyZ1abc")
        head, _, body = with_trace(case.raw, trace).partition(b"\r\n\r\n")
        for line in re.split(rb"\r\n(?![ \t])", head):
            name, _, value = line.partition(b":")
            await mta.send(b"L", name + b"\0" + value + b"\0")
        await mta.send(b"N")
        for at in range(0, len(body), 60000):
            await mta.send(b"B", body[at : at + 60000])
        self.caplog.clear()
        packets = await mta.ask(b"E")
        await asyncio.sleep(0)
        score = float(_log_line(self.caplog)["score"])
        final, data = packets[-1]
        if final == b"y":
            text = data.rstrip(b"\0").decode()
            return Outcome(_action_of(text), text, refused, score)
        if final == b"d":
            return Outcome("discard", None, refused, score)
        action = "quarantine" if any(code == b"q" for code, _ in packets) else "accept"
        headers = []
        for code, data in packets:
            if code == b"h":
                name, value = data.split(b"\0")[:2]
            elif code == b"i":
                name, value = data[4:].split(b"\0")[:2]
            else:
                continue
            headers.append(_norm_header(name.decode(), value.decode("utf-8", "replace")))
        return Outcome(action, None, refused, score, sorted(headers), None)


async def check_front_end(app: App, case: Case, user: str = "") -> Outcome:
    ctx = await check_message(
        app,
        case.raw,
        sender=case.sender,
        recipients=case.recipients,
        ip=IP,
        helo=HELO,
        authenticated_user=user,
    )
    out = report(ctx)
    refused = out.get("refused_recipients", {})
    action = out["action"]
    reply = out["smtp_reply"]
    refused_early = any(
        run.stage in ("connect", "helo", "mail")
        and run.result is not None
        and run.result.action.value
        in ("reject", "tempfail", *(("discard",) if run.stage == "connect" else ()))
        for run in ctx.runs
    )
    reached_data = not refused_early and set(refused) != set(case.recipients)
    text = None
    if action in ("reject", "tempfail") and reply is not None:
        text = f"{reply['code']} {reply['status']} {reply['text']}"
    before_plugins = action == "reject" and not any(run.stage == "data" for run in ctx.runs)
    if not reached_data or before_plugins:
        return Outcome(action, text, refused)
    headers = sorted(_norm_header(n, v) for n, v in out["headers_added"])
    if action not in ("accept", "quarantine"):
        return Outcome(action, text, refused, round(out["score"], 2))
    routes = out["route"] if action == "accept" else {}
    return Outcome(action, None, refused, round(out["score"], 2), headers, routes)


# --- the messages ---------------------------------------------------------------------------


def _corpus(directory: Path, per_label: int, prefix: str) -> list[Case]:
    cases = []
    for label in ("ham", "spam"):
        files = sorted(p for p in (directory / label).iterdir() if p.is_file())[:per_label]
        for path in files:
            # As a client would send it: without the mbox "From " line.
            raw = without_mbox_line(normalize_newlines(path.read_bytes()))
            cases.append(Case(f"{prefix}/{label}/{path.name}", raw))
    return cases


def _hand_written() -> list[Case]:
    msg = make_message
    two = ["bob@example.com", "sales@example.com"]
    return [
        Case("plain", msg()),
        Case("keywords add headers", msg(subject="lottery prize")),
        Case("over the reject threshold", msg(subject="lottery winner winner prize")),
        Case("over the quarantine threshold", msg(subject="lottery winner")),
        Case("folder route and two recipients", msg(to="sales@example.com"), two),
        Case("refused recipient", msg(), ["gone@example.com", "bob@example.com"]),
        Case("every recipient refused", msg(), ["gone@example.com"]),
        Case("sender refused at MAIL", msg(sender="x@spam.test"), sender="x@spam.test"),
        Case("connect reject", msg(), at={"connect": Result.reject("listed")}),
        Case("connect tempfail", msg(), at={"connect": Result.tempfail("busy")}),
        Case("connect discard", msg(), at={"connect": Result.discard("quiet")}),
        Case("helo reject", msg(), at={"helo": Result.reject("bad name")}),
        Case("mail tempfail, default reply", msg(), at={"mail": Result(Action.TEMPFAIL)}),
        Case("mail discard", msg(), at={"mail": Result.discard("drop it")}),
        Case("mail quarantine", msg(subject="prize"), at={"mail": Result.quarantine("hold")}),
        Case(
            "rcpt discard and tempfail",
            msg(),
            ["a@example.com", "b@example.com", "bob@example.com"],
            at={
                "rcpt a@example.com": Result.discard("secret"),
                "rcpt b@example.com": Result.tempfail("later", 450, "4.2.1"),
            },
        ),
        Case(
            "rcpt quarantine",
            msg(),
            ["q@example.com", "bob@example.com"],
            at={"rcpt q@example.com": Result.quarantine("held for q")},
        ),
        Case("data reject", msg(), at={"data": Result.reject("no thanks", 554, "5.7.0")}),
        Case("data reject wrong class", msg(), at={"data": Result.reject("odd", 250, "2.0.0")}),
        Case("data tempfail", msg(), at={"data": Result.tempfail("try later")}),
        Case(
            "a mail loop",
            b"Received: from a by b; Tue, 8 Dec 2026 00:00:00 +0000\r\n" * 50 + msg(),
            milter=False,
        ),
        Case("a NUL in the body", msg(body="x\x00y\r\n"), milter=False),
        Case(
            "data reject, a line break in the reason",
            msg(),
            at={"data": Result.reject("no\r\n250 2.0.0 Ok: queued as FAKE")},
        ),
        Case(
            "rcpt reject, a line break in the reply",
            msg(),
            ["a@example.com", "bob@example.com"],
            at={"rcpt a@example.com": Result.reject("gone\r\n250 2.1.5 Ok", 550, "5.1.1")},
        ),
        Case("data discard", msg(), at={"data": Result.discard("dup")}),
        Case(
            "data removes every recipient",
            msg(),
            at={"data": Result(mutations=[RemoveRecipient("bob@example.com")])},
        ),
        Case(
            "data header and quarantine",
            msg(),
            at={"data": Result(Action.QUARANTINE, reason="q", mutations=[AddHeader("X-Q", "1")])},
        ),
    ]


# --- the test -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def front_ends(
    tmp_path: Path, stager: Stager, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[dict[str, Callable[[Case], Any]]]:
    apps = []
    for name in ("smtp", "milter", "check"):
        app = App(config_for(tmp_path / name, CONFIG), extra_plugins={"stager": stager})
        await app.startup()
        apps.append(app)
    smtp, milter = SMTPFrontEnd(apps[0], caplog), MilterFrontEnd(apps[1], caplog)
    try:
        async with smtp.running(), milter.running():
            yield {
                "smtp": smtp.run,
                "milter": milter.run,
                "check": lambda case: check_front_end(apps[2], case),
            }
    finally:
        for app in apps:
            await app.shutdown()


def divergences(outcomes: dict[str, Outcome]) -> list[str]:
    """How the front ends' outcomes differ (routes only where observable)."""
    smtp = outcomes["smtp"]
    out = []
    for name, other in outcomes.items():
        if name == "smtp":
            continue
        for key in ("action", "reply", "refused", "score", "headers", "routes"):
            mine, theirs = getattr(smtp, key), getattr(other, key)
            if key == "routes" and theirs is None:
                continue
            if mine != theirs:
                out.append(f"{key}: smtp {mine!r} != {name} {theirs!r}")
    return out


async def parity(tmp_path: Path, caplog: pytest.LogCaptureFixture, cases: list[Case]) -> None:
    if "example" not in available_plugins():
        pytest.fail("run `pip install ./examples/mailflow-example` first", pytrace=False)
    caplog.set_level(logging.INFO, logger="mailflow.message")
    stager = Stager()
    report_lines = []
    async with front_ends(tmp_path, stager, caplog) as runners:
        for case in cases:
            stager.at = case.at
            outcomes = {
                name: await run(case)
                for name, run in runners.items()
                if case.milter or name != "milter"
            }
            report_lines += [f"{case.name}: {d}" for d in divergences(outcomes)]
            case.outcome = outcomes["smtp"]
    assert not report_lines, "front ends diverge:\n" + "\n".join(report_lines)


async def test_hand_written_messages(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cases = _hand_written()
    await parity(tmp_path, caplog, cases)
    # The cases reach every outcome (a parity test of accepts only would prove little).
    actions = {case.outcome.action for case in cases if case.outcome is not None}
    assert actions == {"accept", "reject", "tempfail", "discard", "quarantine"}
    assert any(c.outcome and c.outcome.refused and c.outcome.action == "accept" for c in cases)
    assert any(c.outcome and c.outcome.headers for c in cases)


async def test_corpus_slice(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cases = _corpus(CORPUS_SLICE, PER_LABEL, "slice")
    await parity(tmp_path, caplog, cases)
    scores = {case.outcome.score for case in cases if case.outcome is not None}
    assert len(scores) > 1  # the model scores them: a score of 0 everywhere proves nothing


async def test_shared_corpus(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    if not SHARED_CORPUS.is_dir():
        pytest.skip(f"no shared corpus at {SHARED_CORPUS} (tests/messages/corpus is the slice)")
    await parity(tmp_path, caplog, _corpus(SHARED_CORPUS, PER_LABEL, "shared"))


# --- an authenticated client ----------------------------------------------------------------


class FactsReporter:
    """Shows the connection facts a plugin sees, as a header: an authenticated client
    that ``check --auth`` models differently from ``serve`` shows up as a difference."""

    @hookimpl
    def mailflow_data(self, message: MessageContext) -> Result:
        conn = message.connection
        facts = f"user={conn.authenticated_user} tls={conn.tls} trusted={conn.trusted}"
        return Result(mutations=[AddHeader("X-Facts", facts)])


class AuthSMTPFrontEnd(SMTPFrontEnd):
    """The SMTP front end with a client that says STARTTLS and AUTH PLAIN first."""

    def __init__(
        self, app: App, caplog: pytest.LogCaptureFixture, cert: Path, user: str, password: str
    ) -> None:
        super().__init__(app, caplog)
        self.cert = cert
        self.login = (user, password)

    def authenticator(self) -> object | None:
        auth = self.app.config.server.auth
        assert auth is not None
        return UsersFileAuthenticator(auth.users_file)

    async def run(self, case: Case) -> Outcome:
        reader, writer = await asyncio.open_connection(IP, self.port)
        try:

            async def reply() -> str:
                async with asyncio.timeout(20):
                    while True:
                        line = (await reader.readline()).decode().rstrip("\r\n")
                        if line[3:4] != "-":
                            return line

            async def command(line: str) -> str:
                writer.write(line.encode() + b"\r\n")
                return await reply()

            assert (await reply()).startswith("220")
            assert (await command(f"EHLO {HELO}")).startswith("250")
            assert (await command("STARTTLS")).startswith("220")
            await writer.start_tls(client_context(self.cert), server_hostname="mx.test")
            assert (await command(f"EHLO {HELO}")).startswith("250")
            user, password = self.login
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            answer = await command(f"AUTH PLAIN {token}")
            assert answer.startswith("235"), answer
            # The session goes on as SMTPFrontEnd's (its EHLO keeps the authentication).
            return await self._session(case, _Replay(reader, b"220 mx.test\r\n"), writer)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Replay:
    """A stream reader that first gives ``first`` (a greeting already consumed)."""

    def __init__(self, reader: asyncio.StreamReader, first: bytes) -> None:
        self.reader = reader
        self.first: bytes | None = first

    async def readline(self) -> bytes:
        if self.first is not None:
            line, self.first = self.first, None
            return line
        return await self.reader.readline()


async def test_an_authenticated_client_and_check_auth_agree(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """SMTP AUTH over STARTTLS (a users file and a certificate made here) against
    ``check_message(authenticated_user=...)``: the same relay decisions, verdicts, score,
    headers (among them the connection facts a plugin reads) and routes."""
    if "example" not in available_plugins():
        pytest.fail("run `pip install ./examples/mailflow-example` first", pytrace=False)
    cert, key = self_signed_cert(tmp_path)
    users = tmp_path / "users"
    users.write_text(f"alice:{TEST_PASSWORD_HASH}\n")
    config = (
        CONFIG
        + f"""
server:
  hostname: mx.test
  tls: {{cert: {cert}, key: {key}}}
  auth: {{users_file: {users}, failure_delay: 0}}
relay: {{default: mx}}
"""
    )
    caplog.set_level(logging.INFO, logger="mailflow.message")
    stager = Stager()
    plugins = {"stager": stager, "facts": FactsReporter()}
    apps = [
        App(config_for(tmp_path / name, config), extra_plugins=plugins)
        for name in ("smtp", "check")
    ]
    for app in apps:
        await app.startup()
    smtp = AuthSMTPFrontEnd(apps[0], caplog, cert, "alice", TEST_PASSWORD)
    two = ["bob@example.com", "carol@elsewhere.test"]  # the second only relayed when trusted
    cases = [
        Case("authenticated, relayed", make_message(), two),
        Case("authenticated, keywords", make_message(subject="lottery prize"), two),
        Case("authenticated, rcpt tempfail", make_message(), two,
             at={"rcpt bob@example.com": Result.tempfail("later")}),
        Case("authenticated, data reject", make_message(), two,
             at={"data": Result.reject("no thanks")}),
    ]  # fmt: skip
    lines = []
    try:
        async with smtp.running():
            for case in cases:
                stager.at = case.at
                outcomes = {
                    "smtp": await smtp.run(case),
                    "check": await check_front_end(apps[1], case, "alice"),
                }
                lines += [f"{case.name}: {d}" for d in divergences(outcomes)]
                case.outcome = outcomes["smtp"]
    finally:
        for app in apps:
            await app.shutdown()
    assert not lines, "front ends diverge:\n" + "\n".join(lines)
    first = cases[0].outcome
    assert first is not None and first.action == "accept"
    assert set(first.routes or {}) == set(two)  # carol@elsewhere.test was relayed
    assert ("x-facts", "user=alice tls=True trusted=True") in first.headers


# --- the `mailflow check --json` command ----------------------------------------------------


def _outcome_of_report(out: dict[str, Any]) -> Outcome:
    """A ``check --json`` object of a message that reached the data stage, as an Outcome."""
    action, reply = out["action"], out["smtp_reply"]
    refused = out.get("refused_recipients", {})
    score = round(out["score"], 2)
    if action in ("reject", "tempfail"):
        text = f"{reply['code']} {reply['status']} {reply['text']}"
        return Outcome(action, text, refused, score)
    headers = sorted(_norm_header(n, v) for n, v in out["headers_added"])
    routes = out["route"] if action == "accept" else {}
    return Outcome(action, None, refused, score, headers, routes)


async def test_the_check_command_with_the_embedded_config_agrees_with_smtp(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """`mailflow check --json` as a user runs it (a subprocess, no config file: the
    embedded default config) against mailflow's SMTP server with that same config."""
    text = default_config_text()
    text = text.replace("127.0.0.1:2525", "127.0.0.1:0")
    text = text.replace("./mail", str(tmp_path / "mail")).replace(
        "./spool", str(tmp_path / "spool")
    )
    app = App(parse_config(text))
    await app.startup()
    caplog.set_level(logging.INFO, logger="mailflow.message")
    smtp = SMTPFrontEnd(app, caplog)
    spam = sorted((CORPUS_SLICE / "spam").iterdir())[0]
    cases = [
        Case("plain", make_message(subject="lunch on friday?")),
        Case("corpus spam", without_mbox_line(normalize_newlines(spam.read_bytes()))),
    ]
    files = []
    for n, case in enumerate(cases):
        files.append(tmp_path / f"{n}.eml")
        files[-1].write_bytes(case.raw)
    try:
        async with smtp.running():
            smtp_outcomes = [await smtp.run(case) for case in cases]
    finally:
        await app.shutdown()
    cwd = tmp_path / "elsewhere"  # no ./mailflow.yaml here
    cwd.mkdir()
    args = ["check", "--json", "--ip", IP, "--helo", HELO, "--from", SENDER]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from mailflow.cli import main; main()",
        *args,
        "--to",
        "bob@example.com",
        *map(str, files),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    reports = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["file"] for r in reports] == list(map(str, files)), err.decode()
    lines = []
    for case, mine, theirs in zip(cases, smtp_outcomes, reports, strict=True):
        outcomes = {"smtp": mine, "check --json": _outcome_of_report(theirs)}
        lines += [f"{case.name}: {d}" for d in divergences(outcomes)]
    assert not lines, "front ends diverge:\n" + "\n".join(lines)
    assert {o.action for o in smtp_outcomes} == {"accept"}
    assert len({o.score for o in smtp_outcomes}) == 2  # bayes scored them


# --- the client's reverse name ------------------------------------------------------------------


class ReverseNameReporter:
    """Shows the client's PTR name as a plugin gets it (``server.reverse_dns``)."""

    @hookimpl
    async def mailflow_data(self, message: MessageContext) -> Result:
        name = await message.connection.resolve_reverse_name()
        return Result(mutations=[AddHeader("X-PTR", str(name))])


async def test_check_looks_up_the_reverse_name_as_serve_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """With ``server.reverse_dns``, a plugin asking for the client's PTR name gets the
    same answer in ``check`` (``--ip``) as in ``serve`` (a loopback DNS server)."""
    from mailflow.testing_dns import dns_server

    caplog.set_level(logging.INFO, logger="mailflow.message")
    async with dns_server({"1.0.0.127.in-addr.arpa": [("PTR", "client.test.")]}) as dns:
        config = f"server: {{reverse_dns: true}}\n{dns.config_yaml()}"
        plugins = {"ptr": ReverseNameReporter()}
        apps = [
            App(config_for(tmp_path / name, config), extra_plugins=plugins)
            for name in ("smtp", "check")
        ]
        for app in apps:
            await app.startup()
        smtp = SMTPFrontEnd(apps[0], caplog)
        case = Case("reverse name", make_message())
        try:
            async with smtp.running():
                outcomes = {
                    "smtp": await smtp.run(case),
                    "check": await check_front_end(apps[1], case),
                }
        finally:
            for app in apps:
                await app.shutdown()
    assert ("x-ptr", "client.test") in outcomes["smtp"].headers
    assert not divergences(outcomes)
