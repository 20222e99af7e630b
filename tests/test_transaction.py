"""The sans-IO transaction model (mailflow.transaction) and the stage -> reply table.

The front ends' agreement is tests/test_parity.py; here the model's own rules, driven
directly with a real App and pipeline.
"""

from __future__ import annotations

from typing import Any

import pytest

from mailflow.app import App
from mailflow.hookspecs import hookimpl
from mailflow.message import Connection
from mailflow.testing import make_message
from mailflow.transaction import Transaction
from mailflow.verdict import (
    Action,
    AddHeader,
    RemoveRecipient,
    Result,
    SMTPReply,
    Stage,
    refusal_reply,
)


@pytest.mark.parametrize(
    ("stage", "action", "reply", "reason", "expected"),
    [
        (Stage.DATA, Action.REJECT, None, "", "550 5.7.1 Message rejected"),
        (Stage.RCPT, Action.REJECT, None, "", "550 5.7.1 Recipient rejected"),
        (Stage.MAIL, Action.TEMPFAIL, None, "", "451 4.7.1 Sender deferred, try again later"),
        (Stage.RCPT, Action.REJECT, None, "no such user", "550 5.7.1 no such user"),
        (Stage.DATA, Action.REJECT, SMTPReply(554, "go", "5.7.0"), "x", "554 5.7.0 go"),
        # A reply whose class does not fit the verdict keeps only its text.
        (Stage.DATA, Action.REJECT, SMTPReply(250, "fine", "2.0.0"), "", "550 5.7.1 fine"),
        (Stage.DATA, Action.TEMPFAIL, SMTPReply(550, "no", "5.7.1"), "", "451 4.7.1 no"),
        # At connect: 554 or 421 whatever the plugin said.
        (Stage.CONNECT, Action.REJECT, SMTPReply(550, "listed", "5.7.1"), "", "554 5.7.1 listed"),
        (Stage.CONNECT, Action.TEMPFAIL, None, "busy", "421 4.7.1 busy"),
    ],
)
def test_refusal_reply(stage, action, reply, reason, expected):
    assert str(refusal_reply(stage, action, reply, reason)) == expected


class Plugin:
    """Answers what the test sets per stage; counts data hook calls."""

    def __init__(self) -> None:
        self.at: dict[str, Result] = {}
        self.data_calls = 0

    @hookimpl
    def mailflow_connect(self, connection: Any) -> Result | None:
        return self.at.get("connect")

    @hookimpl
    def mailflow_mail_from(self, connection: Any, sender: str, options: Any) -> Result | None:
        return self.at.get(f"mail {sender}")

    @hookimpl
    def mailflow_rcpt_to(self, connection: Any, sender: str, recipient: str, options: Any):
        return self.at.get(f"rcpt {recipient}")

    @hookimpl
    def mailflow_data(self, message: Any) -> Result | None:
        self.data_calls += 1
        return self.at.get("data")


@pytest.fixture
async def model(make_config):
    plugin = Plugin()
    app = App(make_config("local_domains: [example.com]"), extra_plugins={"p": plugin})
    await app.startup()
    tx = Transaction(app.pipeline, app.config, Connection(ip="192.0.2.1"))
    tx.plugin = plugin  # type: ignore[attr-defined]
    yield tx
    await app.shutdown()


async def test_discard_at_connect_refuses_without_the_reason(model):
    model.plugin.at["connect"] = Result.discard("internal note")
    decision = await model.connect()
    assert decision.refused and str(decision.reply) == "554 5.7.1 Connection refused"


async def test_a_refused_mail_leaves_nothing_for_the_next(model):
    model.plugin.at["mail bad@example.org"] = Result(Action.REJECT, score=5)
    assert (await model.mail("bad@example.org", [])).refused
    assert not (await model.mail("good@example.org", [])).refused
    assert (await model.rcpt("bob@example.com", [])).action is Action.CONTINUE
    ctx = model.message(make_message(), "Q1")
    assert ctx.score == 0  # the refused MAIL's score went with it
    assert (await model.data(ctx)).action is Action.ACCEPT


async def test_discard_at_mail_discards_the_message_without_data_hooks(model):
    model.plugin.at["mail a@example.org"] = Result.discard("drop")
    assert (await model.mail("a@example.org", [])).action is Action.CONTINUE
    await model.rcpt("bob@example.com", [])
    ctx = model.message(make_message(), "Q2")
    decision = await model.data(ctx)
    assert (decision.action, str(decision.reply)) == (Action.DISCARD, "250 2.0.0 Ok: Q2 discarded")
    assert model.plugin.data_calls == 0


async def test_quarantine_at_rcpt_quarantines_after_the_data_hooks(model):
    model.plugin.at["rcpt q@example.com"] = Result.quarantine("held")
    model.plugin.at["data"] = Result(mutations=[AddHeader("X-Seen", "1")])
    await model.mail("a@example.org", [])
    await model.rcpt("q@example.com", [])
    ctx = model.message(make_message(), "Q3")
    decision = await model.data(ctx)
    assert (decision.action, decision.reason, decision.reply) == (Action.QUARANTINE, "held", None)
    assert ("X-Seen", "1") in ctx.headers_added  # the data hooks still ran


async def test_refused_recipients_relay_control_and_reset(model):
    model.plugin.at["rcpt gone@example.com"] = Result.reject("gone", 550, "5.1.1")
    await model.mail("a@example.org", [])
    assert str((await model.rcpt("gone@example.com", [])).reply) == "550 5.1.1 gone"
    relay = await model.rcpt("x@elsewhere.test", [])  # untrusted client, not local
    assert relay.refused and relay.reply is not None and relay.reply.code == 554
    assert not (await model.rcpt("bob@example.com", [])).refused
    assert model.message(b"\r\n", "Q4").refused_recipients == {
        "gone@example.com": "550 5.1.1 gone",
        "x@elsewhere.test": str(relay.reply),
    }
    model.reset()
    assert model.tx.recipients == [] and model.tx.refused == {}


async def test_every_recipient_removed_at_data_is_a_discard(model):
    model.plugin.at["data"] = Result(mutations=[RemoveRecipient("bob@example.com")])
    await model.mail("a@example.org", [])
    await model.rcpt("bob@example.com", [])
    ctx = model.message(make_message(), "Q5")
    decision = await model.data(ctx)
    assert (decision.action, decision.reason) == (Action.DISCARD, "no recipients left")
