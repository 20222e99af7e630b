"""Pipeline semantics through real SMTP on loopback: verdicts, mutations, order, failures.

Each test registers small in-test plugins with ``running_server(config, extra_plugins=...)``
and lists them under ``plugins:`` so their order, ``on_error`` and ``timeout`` come from
the config, exactly as for installed plugins.
"""

from __future__ import annotations

import asyncio
import email
import json
import mailbox
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.hookspecs import hookimpl
from mailflow.message import Connection, Envelope, MessageContext, PluginRun
from mailflow.testing import SMTPDialog, make_message, running_server, send
from mailflow.verdict import (
    Action,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    RemoveHeader,
    RemoveRecipient,
    ReplaceBody,
    Result,
    Route,
    RouteKind,
    SetRoute,
)

Answer = Result | None | Callable[..., Result | None]


class Scripted:
    """A plugin that answers every stage from a script and records what it saw.

    ``script`` maps a stage (connect, helo, mail, rcpt, data) to a Result, None, or a
    function of the hook's keyword arguments; ``calls`` lists ``(stage, detail)``.
    """

    def __init__(self, calls: list[tuple[str, str]] | None = None, **script: Answer) -> None:
        self.script = script
        self.calls = calls if calls is not None else []
        self.name = ""

    def _answer(self, stage: str, detail: str, **kwargs: Any) -> Result | None:
        self.calls.append((stage, f"{self.name}:{detail}" if self.name else detail))
        answer = self.script.get(stage)
        return answer(**kwargs) if callable(answer) else answer

    @hookimpl
    def mailflow_connect(self, connection):
        return self._answer("connect", connection.ip, connection=connection)

    @hookimpl
    def mailflow_helo(self, connection, name):
        return self._answer("helo", name, name=name)

    @hookimpl
    def mailflow_mail_from(self, connection, sender):
        return self._answer("mail", sender, sender=sender)

    @hookimpl
    def mailflow_rcpt_to(self, connection, sender, recipient):
        return self._answer("rcpt", recipient, recipient=recipient)

    @hookimpl
    def mailflow_data(self, message):
        return self._answer("data", message.queue_id, message=message)


def named(**plugins: Scripted) -> dict[str, Scripted]:
    """Give each scripted plugin its name (for call logs shared between plugins)."""
    for name, plugin in plugins.items():
        plugin.name = name
    return plugins


def plugin_list(*names: str, **options: str) -> str:
    extra = "".join(f", {k}: {v}" for k, v in options.items())
    return "plugins:\n" + "".join(f"  - {{name: {n}{extra}}}\n" for n in names)


async def dialog_until(port: int, *commands: str) -> list[str]:
    """Open a raw SMTP dialog, send ``commands`` in turn, return every reply."""
    dialog, greeting = await SMTPDialog.open(port)
    replies = [greeting]
    try:
        for command in commands:
            replies.append(await dialog.command(command))
    finally:
        await dialog.close()
    return replies


def only_message(srv: Any, rcpt: str, folder: str = "") -> email.message.Message:
    [raw] = srv.delivered(rcpt, folder)
    return email.message_from_bytes(raw)


# --- verdicts at each SMTP stage ----------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (Result.reject("go away"), "554 5.7.1 go away"),
        (Result.tempfail("busy", status="4.7.0"), "421 4.7.0 busy"),
    ],
)
async def test_connect_verdict_answers_the_greeting(make_config, result, expected):
    config = make_config(plugin_list("gate"))
    async with running_server(config, extra_plugins={"gate": Scripted(connect=result)}) as srv:
        dialog, greeting = await SMTPDialog.open(srv.port)
        await dialog.close()
    assert greeting == expected


async def test_helo_reject_answers_ehlo_and_mail_is_refused_until_a_good_helo(make_config):
    def by_name(name: str) -> Result | None:
        return Result.reject("bad HELO name", 550, "5.7.1") if name == "bad.test" else None

    config = make_config(plugin_list("gate"))
    async with running_server(config, extra_plugins={"gate": Scripted(helo=by_name)}) as srv:
        replies = await dialog_until(
            srv.port, "EHLO bad.test", "MAIL FROM:<a@example.org>", "HELO good.test"
        )
    assert replies[1] == "550 5.7.1 bad HELO name"
    assert replies[2].startswith("503")  # no successful HELO yet
    assert replies[3].startswith("250")


@pytest.mark.parametrize(
    ("result", "code"), [(Result.reject("no"), 550), (Result.tempfail("later"), 451)]
)
async def test_mail_from_verdict_answers_mail(make_config, result, code):
    config = make_config(plugin_list("gate"))
    plugin = Scripted(mail=lambda sender: result if sender.endswith("@bad.test") else None)
    async with running_server(config, extra_plugins={"gate": plugin}) as srv:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
            await send(srv.port, "x@bad.test", ["bob@example.com"], make_message())
        assert info.value.code == code
        assert not any(stage in ("rcpt", "data") for stage, _ in plugin.calls)
        # The same connection settings accept a good sender.
        assert await send(srv.port, "a@example.org", ["bob@example.com"], make_message()) == {}


async def test_rcpt_verdict_refuses_only_that_recipient(make_config):
    answers = {
        "no@example.com": Result.reject("no such user", 550, "5.1.1"),
        "later@example.com": Result.tempfail("mailbox busy", 450, "4.2.1"),
    }
    config = make_config(plugin_list("gate"))
    plugin = Scripted(rcpt=lambda recipient: answers.get(recipient))
    async with running_server(config, extra_plugins={"gate": plugin}) as srv:
        refused = await send(
            srv.port,
            "a@example.org",
            ["no@example.com", "bob@example.com", "later@example.com"],
            make_message(),
        )
        assert refused == {
            "no@example.com": (550, "5.1.1 no such user"),
            "later@example.com": (450, "4.2.1 mailbox busy"),
        }
        await srv.wait_delivered("bob@example.com")
        await srv.wait_queue_empty()
        assert not srv.mailbox("no@example.com").exists()
        assert not srv.mailbox("later@example.com").exists()


@pytest.mark.parametrize(
    ("result", "code", "text"),
    [
        (Result.reject("content refused", 554, "5.7.0"), 554, "5.7.0 content refused"),
        (Result.tempfail("try later"), 451, "4.7.1 try later"),
        (Result(Action.REJECT), 550, "5.7.1 Message rejected"),
    ],
)
async def test_data_verdict_answers_end_of_data(make_config, result, code, text):
    config = make_config(plugin_list("gate"))
    async with running_server(config, extra_plugins={"gate": Scripted(data=result)}) as srv:
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
        assert (info.value.code, info.value.message) == (code, text)
        assert srv.app.spool.ids() == []
        assert not srv.mailbox("bob@example.com").exists()


async def test_discard_answers_250_and_delivers_nothing(make_config):
    config = make_config(plugin_list("gate"))
    plugin = Scripted(data=Result.discard("silently dropped"))
    async with running_server(config, extra_plugins={"gate": plugin}) as srv:
        assert await send(srv.port, "a@example.org", ["bob@example.com"], make_message()) == {}
        # Nothing was spooled before the 250 was sent, so nothing can be delivered later.
        assert srv.app.spool.ids() == []
        assert not srv.mailbox("bob@example.com").exists()


async def test_quarantine_answers_250_and_stores_outside_the_mailboxes(make_config, tmp_path):
    config = make_config(plugin_list("gate"))
    plugin = Scripted(data=Result.quarantine("looks like phishing"))
    async with running_server(config, extra_plugins={"gate": plugin}) as srv:
        message = make_message(subject="verify your account")
        assert await send(srv.port, "a@example.org", ["bob@example.com"], message) == {}
        assert srv.app.spool.ids() == []
        assert not srv.mailbox("bob@example.com").exists()
    [stored] = (tmp_path / "quarantine").glob("*.eml")
    assert b"Subject: verify your account" in stored.read_bytes()
    meta = json.loads(stored.with_suffix(".json").read_text())
    assert meta["reason"] == "looks like phishing"
    assert meta["decided_by"] == "gate"
    assert meta["recipients"] == ["bob@example.com"]


async def test_after_a_quarantine_the_later_plugins_still_annotate_the_copy(make_config, tmp_path):
    """DMARC p=quarantine, say, decides early in the chain: the plugins after it still
    run and their headers (Authentication-Results...) are on the stored copy; a later
    accept or quarantine changes nothing."""
    calls: list[tuple[str, str]] = []
    seen: list[Action] = []

    def annotate(message: MessageContext) -> Result:
        seen.append(message.action)
        return Result(mutations=[AddHeader("X-Later", "annotated")])

    plugins = named(
        gate=Scripted(calls, data=Result.quarantine("dmarc=fail")),
        later=Scripted(calls, data=annotate),
        allow=Scripted(calls, data=Result.accept("allow-listed")),
        again=Scripted(calls, data=Result.quarantine("second opinion")),
    )
    config = make_config(plugin_list("gate", "later", "allow", "again"))
    async with running_server(config, extra_plugins=plugins) as srv:
        assert await send(srv.port, "a@example.org", ["bob@example.com"], make_message()) == {}
        assert not srv.mailbox("bob@example.com").exists()
    ran = [detail.split(":")[0] for stage, detail in calls if stage == "data"]
    assert ran == ["gate", "later", "allow", "again"]
    assert seen == [Action.QUARANTINE]
    [stored] = (tmp_path / "quarantine").glob("*.eml")
    assert b"X-Later: annotated" in stored.read_bytes()
    meta = json.loads(stored.with_suffix(".json").read_text())
    assert (meta["reason"], meta["decided_by"]) == ("dmarc=fail", "gate")


async def test_a_later_reject_replaces_a_quarantine(make_config, tmp_path):
    plugins = named(
        gate=Scripted(data=Result.quarantine("suspicious")),
        av=Scripted(data=Result.reject("Virus found", 554, "5.7.1")),
    )
    config = make_config(plugin_list("gate", "av"))
    async with running_server(config, extra_plugins=plugins) as srv:
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
        assert (refused.value.code, refused.value.message) == (554, "5.7.1 Virus found")
    assert list((tmp_path / "quarantine").glob("*.eml")) == []


async def test_accept_stops_the_chain(make_config):
    calls: list[tuple[str, str]] = []
    plugins = named(
        first=Scripted(calls, data=Result.accept("allow-listed")),
        second=Scripted(calls, data=Result.reject("never reached")),
    )
    config = make_config(plugin_list("first", "second"))
    async with running_server(config, extra_plugins=plugins) as srv:
        assert await send(srv.port, "a@example.org", ["bob@example.com"], make_message()) == {}
        await srv.wait_delivered("bob@example.com")
    data_calls = [detail.split(":")[0] for stage, detail in calls if stage == "data"]
    assert data_calls == ["first"]


@pytest.mark.parametrize(
    ("score", "expect"),
    [(12.0, "reject"), (6.0, "quarantine"), (3.0, "junk"), (1.5, "flag"), (0.5, "inbox")],
)
async def test_score_thresholds_map_the_total_to_an_action(make_config, tmp_path, score, expect):
    config = make_config(
        "actions: {reject: 10, quarantine: 5, junk: 2, add_header: 1}\n"
        + plugin_list("half1", "half2")
    )
    half = Result(score=score / 2)  # two plugins: the total counts, not each one
    plugins = {"half1": Scripted(data=half), "half2": Scripted(data=half)}
    async with running_server(config, extra_plugins=plugins) as srv:
        if expect == "reject":
            with pytest.raises(aiosmtplib.SMTPDataError) as info:
                await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
            assert info.value.code == 550
            return
        assert await send(srv.port, "a@example.org", ["bob@example.com"], make_message()) == {}
        if expect == "quarantine":
            assert list((tmp_path / "quarantine").glob("*.eml"))
            assert not srv.mailbox("bob@example.com").exists()
            return
        folder = ".Junk" if expect == "junk" else ""
        await srv.wait_delivered("bob@example.com", folder=folder)
        msg = only_message(srv, "bob@example.com", folder)
        assert (msg["X-Spam-Flag"] == "YES") is (expect != "inbox")


# --- mutations ----------------------------------------------------------------------------


async def test_header_and_body_mutations_reach_the_maildir_copy(make_config):
    seen: dict[str, Any] = {}

    def observe(message: MessageContext) -> None:
        # Mutations are applied before the next plugin runs.
        seen["subject"] = message.header("Subject")
        seen["body"] = message.body

    plugins = {
        "editor": Scripted(
            data=Result(
                mutations=[
                    AddHeader("X-Top", "first"),
                    AddHeader("X-Bottom", "last", index=-1),
                    ChangeHeader("Subject", "[ext] hello"),
                    ChangeHeader("X-Twice", None, occurrence=2),
                    RemoveHeader("X-Remove-Me"),
                    ReplaceBody(b"replaced body\r\n"),
                ]
            )
        ),
        "observer": Scripted(data=observe),
    }
    config = make_config(plugin_list("editor", "observer"))
    message = make_message(
        subject="hello",
        extra_headers={"X-Remove-Me": "secret", "X-Twice": "one"},
        body="original body\r\n",
    ).replace(b"X-Twice: one\r\n", b"X-Twice: one\r\nX-Twice: two\r\nx-remove-me: again\r\n")
    async with running_server(config, extra_plugins=plugins) as srv:
        await send(srv.port, "a@example.org", ["bob@example.com"], message)
        await srv.wait_delivered("bob@example.com")
        raw = srv.delivered("bob@example.com")[0]
    msg = email.message_from_bytes(raw)
    assert raw.startswith(b"X-Top: first\r\n")  # index 0 prepends, even before Received
    assert msg["Subject"] == "[ext] hello"
    assert msg.get_all("X-Twice") == ["one"]
    assert msg.get_all("X-Remove-Me") is None
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.endswith(b"X-Bottom: last")
    assert body == b"replaced body\r\n"
    assert seen == {"subject": "[ext] hello", "body": b"replaced body\r\n"}


async def test_envelope_mutations_and_routes(make_config):
    seen: dict[str, Any] = {}

    def observe(message: MessageContext) -> None:
        seen["sender"] = message.envelope.mail_from
        seen["rcpts"] = list(message.envelope.rcpt_tos)

    plugins = {
        "editor": Scripted(
            # At MAIL and RCPT: envelope changes are kept and applied when data arrives.
            mail=Result(mutations=[ChangeSender("bounces@example.org")]),
            rcpt=lambda recipient: (
                Result(mutations=[AddRecipient("archive@example.com")])
                if recipient == "bob@example.com"
                else None
            ),
            data=Result(
                mutations=[
                    AddRecipient("carol@example.com"),
                    RemoveRecipient("DAVE@example.com"),
                    SetRoute(Route(RouteKind.MAILDIR, folder=".Work"), "bob@example.com"),
                    SetRoute(Route(RouteKind.MAILDIR, mailbox="team"), "carol@example.com"),
                ]
            ),
        ),
        "observer": Scripted(data=observe),
    }
    config = make_config(plugin_list("editor", "observer"))
    async with running_server(config, extra_plugins=plugins) as srv:
        await send(
            srv.port, "a@example.org", ["bob@example.com", "dave@example.com"], make_message()
        )
        await srv.wait_delivered("bob@example.com", folder=".Work")
        await srv.wait_delivered("team")
        await srv.wait_delivered("archive@example.com")
        await srv.wait_queue_empty()
        assert srv.delivered("bob@example.com") == []  # filed into .Work, not INBOX
        assert not srv.mailbox("carol@example.com").exists()  # went to the "team" mailbox
        assert not srv.mailbox("dave@example.com").exists()  # removed
        work = mailbox.Maildir(srv.mailbox("bob@example.com"), create=False).get_folder("Work")
        assert len(work) == 1
    assert seen == {
        "sender": "bounces@example.org",
        "rcpts": ["bob@example.com", "archive@example.com", "carol@example.com"],
    }


# --- order, async hooks and failures --------------------------------------------------------


async def test_hooks_run_in_config_order_at_every_stage(make_config):
    calls: list[tuple[str, str]] = []
    plugins = named(a=Scripted(calls), b=Scripted(calls), c=Scripted(calls))
    config = make_config(plugin_list("c", "a", "b"))
    async with running_server(config, extra_plugins=plugins) as srv:
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
        assert srv.app.pipeline.plugins_for("mailflow_data") == ["c", "a", "b"]
    by_stage: dict[str, list[str]] = {}
    for stage, detail in calls:
        by_stage.setdefault(stage, []).append(detail.split(":")[0])
    assert by_stage == {
        stage: ["c", "a", "b"] for stage in ("connect", "helo", "mail", "rcpt", "data")
    }


class AsyncPlugin:
    """Coroutine hooks are awaited, and may yield to the loop while they wait."""

    @hookimpl
    async def mailflow_rcpt_to(self, recipient):
        await asyncio.sleep(0)
        return Result.reject("async no") if recipient.startswith("no@") else None

    @hookimpl
    async def mailflow_data(self, message):
        await asyncio.sleep(0)
        return Result(mutations=[AddHeader("X-Async", "yes")], details={"looked": True})


async def test_async_hooks_are_awaited(make_config):
    config = make_config(plugin_list("async"))
    async with running_server(config, extra_plugins={"async": AsyncPlugin()}) as srv:
        refused = await send(
            srv.port, "a@example.org", ["no@example.com", "bob@example.com"], make_message()
        )
        assert refused == {"no@example.com": (550, "5.7.1 async no")}
        await srv.wait_delivered("bob@example.com")
        assert only_message(srv, "bob@example.com")["X-Async"] == "yes"


def explode(**_: Any) -> None:
    raise RuntimeError("plugin bug")


async def hang(**_: Any) -> None:
    await asyncio.Event().wait()  # never set: only the plugin timeout ends this


async def explode_after_waiting(**_: Any) -> None:
    await asyncio.sleep(0.01)  # suspends first: the error comes from a resumed coroutine
    raise RuntimeError("plugin bug after a wait")


class Failing(Scripted):
    """Like Scripted, but data may be a coroutine function (to hang)."""

    @hookimpl
    async def mailflow_data(self, message):
        answer = self.script["data"]
        value = answer(message=message)
        return await value if asyncio.iscoroutine(value) else value


@pytest.mark.parametrize(
    "failure", [explode, hang, explode_after_waiting], ids=["raises", "times-out", "raises-later"]
)
async def test_failing_plugin_tempfails_and_the_server_keeps_serving(make_config, caplog, failure):
    config = make_config(plugin_list("flaky", on_error="tempfail", timeout="0.05s"))
    async with running_server(config, extra_plugins={"flaky": Failing(data=failure)}) as srv:
        for _ in range(2):  # a second message on a new connection: still served
            with pytest.raises(aiosmtplib.SMTPDataError) as info:
                await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
            assert info.value.code == 451
        assert not srv.mailbox("bob@example.com").exists()
    logged = [r.getMessage() for r in caplog.records if r.name == "mailflow.pipeline"]
    assert any(m.startswith("plugin flaky ") and "(on_error=tempfail)" in m for m in logged)


@pytest.mark.parametrize(
    "failure", [explode, hang, explode_after_waiting], ids=["raises", "times-out", "raises-later"]
)
async def test_failing_plugin_with_on_error_continue_lets_mail_through(make_config, failure):
    calls: list[tuple[str, str]] = []
    plugins = named(
        flaky=Failing(calls, data=failure),
        after=Scripted(calls, data=Result(mutations=[AddHeader("X-After", "ran")])),
    )
    config = make_config(
        "plugins:\n  - {name: flaky, on_error: continue, timeout: 50ms}\n  - {name: after}\n"
    )
    async with running_server(config, extra_plugins=plugins) as srv:
        assert await send(srv.port, "a@example.org", ["bob@example.com"], make_message()) == {}
        await srv.wait_delivered("bob@example.com")
        assert only_message(srv, "bob@example.com")["X-After"] == "ran"


async def test_failing_connect_hook_tempfails_the_greeting(make_config):
    config = make_config(plugin_list("flaky", on_error="tempfail"))
    async with running_server(config, extra_plugins={"flaky": Scripted(connect=explode)}) as srv:
        dialog, greeting = await SMTPDialog.open(srv.port)
        await dialog.close()
    assert greeting.startswith("421 4.3.0 ")


@pytest.mark.parametrize(
    "failure", [explode, hang, explode_after_waiting], ids=["raises", "times-out", "raises-later"]
)
async def test_failing_data_hook_quarantines_by_default(make_config, failure):
    """on_error defaults to quarantine: neither delivered as if clean nor deferred."""
    plugins = named(
        flaky=Failing(data=failure),
        after=Scripted(data=Result(mutations=[AddHeader("X-After", "ran")])),
    )
    config = make_config("plugins:\n  - {name: flaky, timeout: 50ms}\n  - {name: after}\n")
    async with running_server(config, extra_plugins=plugins) as srv:
        assert await send(srv.port, "a@example.org", ["bob@example.com"], make_message()) == {}
        assert not srv.mailbox("bob@example.com").exists()
        [stored] = list((srv.app.config.quarantine.directory).glob("*.eml"))
    held = email.message_from_bytes(stored.read_bytes())
    assert held["X-After"] == "ran"  # the later plugins still ran on the held copy
    meta = json.loads(stored.with_suffix(".json").read_text())
    assert meta["reason"].startswith("plugin flaky failed: ")


async def test_failing_connect_hook_quarantines_the_message_by_default(make_config):
    """Before DATA there is nothing to hold: the failure quarantines the message later."""
    config = make_config(plugin_list("flaky"))
    async with running_server(config, extra_plugins={"flaky": Scripted(connect=explode)}) as srv:
        assert await send(srv.port, "a@example.org", ["bob@example.com"], make_message()) == {}
        assert not srv.mailbox("bob@example.com").exists()
        [stored] = list((srv.app.config.quarantine.directory).glob("*.eml"))
    meta = json.loads(stored.with_suffix(".json").read_text())
    assert meta["reason"] == "plugin flaky failed at connect: raised RuntimeError('plugin bug')"


# --- what `check --json` records ------------------------------------------------------------


async def test_check_records_each_plugins_result_and_time(make_config):
    plugins = named(
        scorer=Scripted(data=Result(score=2.5, reason="suspicious", details={"rule": "R1"})),
        quiet=Scripted(),
        flaky=Failing(data=explode),
    )
    config = make_config(
        "plugins:\n  - {name: scorer}\n  - {name: quiet}\n  - {name: flaky, on_error: continue}\n"
    )
    app = App(config, extra_plugins=plugins)
    ctx = await check_message(app, make_message(), recipients=["bob@example.com"])
    out = report(ctx)
    assert out["action"] == "accept"
    assert out["score"] == 2.5
    scorer = out["plugins"]["scorer"]
    assert scorer["score"] == 2.5
    assert scorer["reason"] == "suspicious"
    assert scorer["rule"] == "R1"
    assert out["plugins"]["flaky"]["error"].startswith("raised RuntimeError")
    for name in ("scorer", "quiet", "flaky"):
        assert isinstance(out["plugins"][name]["time_ms"], float)
        assert out["plugins"][name]["time_ms"] >= 0
    json.dumps(out)  # the whole report is JSON-serialisable


def test_unknown_hook_name_fails_at_start_up(make_config):
    class Misspelt:
        @hookimpl
        def mailflow_rcpt(self, recipient):  # the real hook is mailflow_rcpt_to
            return None

    from pluggy import PluginValidationError

    config = make_config(plugin_list("typo"))
    with pytest.raises(PluginValidationError, match="mailflow_rcpt"):
        App(config, extra_plugins={"typo": Misspelt()})


def test_plugin_results_are_kept_on_the_message_context(make_config, tmp_path: Path):
    config = make_config(plugin_list("gate"))
    app = App(config, extra_plugins={"gate": Scripted(data=Result(score=1.0))})
    ctx = asyncio.run(check_message(app, make_message(), recipients=["bob@example.com"]))
    [run] = [r for r in ctx.runs if r.stage == "data"]
    assert run.plugin == "gate"
    assert ctx.result_of("gate") is run.result
    assert ctx.score == 1.0


def test_a_plugin_that_cannot_start_is_a_config_error_naming_its_entry(make_config):
    from pydantic import BaseModel, ConfigDict

    from mailflow.config import ConfigError

    class NeedsFile:
        class Settings(BaseModel):
            model_config = ConfigDict(extra="forbid")
            path: str = "/nonexistent/mailflow-test-file"

        def __init__(self, settings: NeedsFile.Settings) -> None:
            with open(settings.path):  # raises FileNotFoundError
                pass

    config = make_config("plugins:\n  - {name: quiet}\n  - {name: needs_file}\n")
    with pytest.raises(ConfigError) as info:
        App(config, available_plugins={"quiet": Scripted, "needs_file": NeedsFile})
    [issue] = info.value.issues
    assert issue.path == "plugins[1]"
    assert issue.message.startswith("plugin 'needs_file' failed to initialise: [Errno 2]")


class Gate:
    """Holds messages whose Subject is "slow" until released: an awaited lookup stand-in."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    @hookimpl
    async def mailflow_data(self, message):
        if message.header("Subject") == "slow":
            self.entered.set()
            await self.release.wait()
        return Result(mutations=[AddHeader("X-Gate", "passed")])


async def test_an_awaiting_hook_does_not_hold_up_other_connections(make_config):
    gate = Gate()
    config = make_config(plugin_list("gate"))
    async with running_server(config, extra_plugins={"gate": gate}) as srv:
        slow = asyncio.create_task(
            send(srv.port, "a@example.org", ["slow@example.com"], make_message(subject="slow"))
        )
        await gate.entered.wait()
        # While the first message waits inside the plugin, a second one goes all the way.
        assert await send(srv.port, "a@example.org", ["fast@example.com"], make_message()) == {}
        await srv.wait_delivered("fast@example.com")
        assert not slow.done()
        gate.release.set()
        assert await slow == {}
        await srv.wait_delivered("slow@example.com")
        assert only_message(srv, "slow@example.com")["X-Gate"] == "passed"


async def test_a_discard_route_drops_only_that_recipient(make_config):
    def route(recipient: str) -> Route | None:
        return Route(RouteKind.DISCARD) if recipient.startswith("noreply@") else None

    class Router:
        @hookimpl
        def mailflow_route(self, recipient):
            return route(recipient)

    config = make_config(plugin_list("router"))
    async with running_server(config, extra_plugins={"router": Router()}) as srv:
        rcpts = ["noreply@example.com", "bob@example.com"]
        assert await send(srv.port, "a@example.org", rcpts, make_message()) == {}
        await srv.wait_delivered("bob@example.com")
        await srv.wait_queue_empty()
        assert not srv.mailbox("noreply@example.com").exists()


@pytest.mark.parametrize(
    ("result", "action", "code"),
    [
        (Result.accept(), "accept", None),
        (Result.reject("no", 554, "5.7.0"), "reject", 554),
        (Result.tempfail("later"), "tempfail", 451),
        (Result.discard("dup"), "discard", 250),
        (Result.quarantine("odd"), "quarantine", 250),
    ],
)
async def test_check_reports_each_data_verdict_as_smtp_would_answer(
    make_config, result, action, code
):
    app = App(make_config(plugin_list("gate")), extra_plugins={"gate": Scripted(data=result)})
    out = report(await check_message(app, make_message(), recipients=["bob@example.com"]))
    assert out["action"] == action
    assert (out["smtp_reply"] or {}).get("code") == code
    assert out["decided_by"] == "gate"  # accept is a decision too: it ended the chain


class Lifecycle:
    """Records the informational hooks."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []
        self.delivered = asyncio.Event()

    @hookimpl
    async def mailflow_startup(self, app):
        self.events.append(("startup", app.config.server.hostname))

    @hookimpl
    def mailflow_delivered(self, queue_id, recipient, route, outcome, detail):
        self.events.append(("delivered", recipient, route.kind.value, outcome))
        self.delivered.set()

    @hookimpl
    def mailflow_shutdown(self, app):
        self.events.append(("shutdown",))


async def test_startup_delivered_and_shutdown_hooks(make_config):
    plugin = Lifecycle()
    async with running_server(
        make_config(plugin_list("life")), extra_plugins={"life": plugin}
    ) as srv:
        assert plugin.events == [("startup", "mx.test")]
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
        await plugin.delivered.wait()
    assert plugin.events == [
        ("startup", "mx.test"),
        ("delivered", "bob@example.com", "maildir", "delivered"),
        ("shutdown",),
    ]


def test_a_failing_startup_hook_aborts_start_up_with_the_plugin_named(make_config):
    class Broken:
        @hookimpl
        def mailflow_startup(self, app):
            raise RuntimeError("model file missing")

    config = make_config(plugin_list("quiet", "broken"))
    app = App(config, extra_plugins={"quiet": Scripted(), "broken": Broken()})
    with pytest.raises(RuntimeError, match="model file missing") as info:
        asyncio.run(app.startup())
    assert info.value.__notes__ == ["while starting plugin 'broken'"]


def envelope_editor() -> Scripted:
    """At bob's RCPT: drop dave (a later recipient), add an archive copy; change the sender."""
    return Scripted(
        mail=Result(mutations=[ChangeSender("bounces@example.org")]),
        rcpt=lambda recipient: (
            Result(
                mutations=[RemoveRecipient("dave@example.com"), AddRecipient("archive@example.com")]
            )
            if recipient == "bob@example.com"
            else None
        ),
    )


async def test_check_and_smtp_apply_early_mutations_the_same_way(make_config):
    seen: dict[str, Any] = {}

    def observe(message: MessageContext) -> None:
        seen["smtp"] = (message.envelope.mail_from, list(message.envelope.rcpt_tos))

    config = make_config(plugin_list("editor", "observer"))
    rcpts = ["bob@example.com", "dave@example.com"]
    plugins = {"editor": envelope_editor(), "observer": Scripted(data=observe)}
    async with running_server(config, extra_plugins=plugins) as srv:
        await send(srv.port, "a@example.org", rcpts, make_message())
        await srv.wait_delivered("archive@example.com")
    app = App(config, extra_plugins={"editor": envelope_editor(), "observer": Scripted()})
    out = report(await check_message(app, make_message(), recipients=rcpts))
    assert seen["smtp"] == ("bounces@example.org", ["bob@example.com", "archive@example.com"])
    assert (out["sender"], out["recipients"]) == seen["smtp"]


def test_result_of_skips_stages_where_the_plugin_had_no_opinion():
    from mailflow.message import Connection, Envelope, MessageContext, PluginRun
    from mailflow.verdict import Result

    ctx = MessageContext(b"Subject: x\r\n\r\n", Envelope(), Connection(ip="127.0.0.1"))
    said = Result(details={"result": "pass"})
    ctx.record(PluginRun("spf", "mail", said, 0.1))
    ctx.record(PluginRun("spf", "rcpt", None, 0.1))
    assert ctx.result_of("spf") is said
    assert ctx.result_of("other") is None


def test_every_hook_has_a_docstring_and_a_section_in_docs_plugins_md():
    from mailflow import hookspecs

    doc = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()
    for name in hookspecs.hook_names():
        spec = getattr(hookspecs, name)
        assert spec.__doc__ and len(spec.__doc__.split()) >= 15, name
        assert f"\n### {name}\n" in doc, f"docs/plugins.md has no section for {name}"


def test_split_of_a_message_without_headers_keeps_the_whole_body():
    from mailflow.message import Connection, Envelope, MessageContext

    ctx = MessageContext(b"\r\nfirst\r\n\r\nsecond\r\n", Envelope(), Connection(ip="127.0.0.1"))
    assert ctx.split() == (b"", b"first\r\n\r\nsecond\r\n")
    ctx = MessageContext(b"A: 1\r\n\r\nbody\r\n", Envelope(), Connection(ip="127.0.0.1"))
    assert ctx.split() == (b"A: 1\r\n", b"body\r\n")


@pytest.mark.parametrize(
    "raw", [b"\r\nbody\r\n", b"A: 1\r\n\r\nbody\r\n", b"A: 1\r\nB: 2", b"A: 1\r\n", b""]
)
def test_head_is_the_first_part_of_split(raw):
    from mailflow.message import Connection, Envelope, MessageContext

    ctx = MessageContext(raw, Envelope(), Connection(ip="127.0.0.1"))
    assert ctx.head == ctx.split()[0]


def test_the_log_summary_has_the_plugin_report_fields():
    """msglog's lean per-plugin summary agrees with plugin_report on what it shows."""
    from mailflow.msglog import plugin_summary

    envelope = Envelope("a@example.org", ["b@example.com"])
    ctx = MessageContext(make_message(), envelope, Connection("192.0.2.1"))
    ctx.record(PluginRun("p", "mail", Result(score=2.0), 1.0))
    ctx.record(PluginRun("p", "rcpt", None, 0.5, error="timed out"))
    ctx.record(PluginRun("p", "data", Result.reject("no"), 0.25))
    ctx.record(PluginRun("q", "data", None, 0.1, error="raised RuntimeError()"))
    fields = ("action", "score", "time_ms", "error")
    expected = {
        name: {k: v for k, v in entry.items() if k in fields}
        for name, entry in ctx.plugin_report().items()
    }
    assert plugin_summary(ctx) == expected
    assert expected["p"] == {"time_ms": 1.75, "action": "reject", "score": 2.0}
    assert expected["q"]["error"] == "raised RuntimeError()"
