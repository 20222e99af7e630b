"""The dispatcher on its own: built from its real dependencies (a spool and Maildirs in
a temporary directory, a real SMTP peer on loopback), no application object, no
front end."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mailflow.config import Config
from mailflow.delivery.dispatch import Dispatcher, inline_bounds
from mailflow.delivery.maildir import MaildirDelivery
from mailflow.delivery.outcome import RefusedUpstream
from mailflow.delivery.spool import Spool, new_queue_id
from mailflow.dns import Resolver
from mailflow.message import Connection, Delivery, Envelope, MessageContext
from mailflow.metrics import Metrics
from mailflow.pipeline import default_route
from mailflow.testing import SinkBehaviour, free_port, make_message, smtp_sink
from mailflow.verdict import Route
from tests.smtp_support import relay_config


class Notified(list[tuple[str, dict[str, Any]]]):
    """Records each ``notify(hook, **kwargs)`` call."""

    async def __call__(self, hook: str, **kwargs: Any) -> None:
        self.append((hook, kwargs))


@contextlib.asynccontextmanager
async def dispatcher(config: Config) -> AsyncIterator[tuple[Dispatcher, Notified]]:
    notified = Notified()

    async def route(ctx: MessageContext) -> dict[str, Route]:
        return {r: default_route(config, r) for r in ctx.envelope.rcpt_tos}

    maildir = MaildirDelivery(config.delivery.maildir, config.storage.sync)
    spool = Spool(Path(config.queue.directory), config.storage.sync)
    built = Dispatcher(
        config,
        spool=spool,
        maildir=maildir,
        resolver=Resolver(config.dns),
        metrics=Metrics(),
        route=route,
        bounce_route=lambda rcpt: default_route(config, rcpt),
        notify=notified,
    )
    await built.start()
    try:
        yield built, notified
    finally:
        await built.stop()
        maildir.close()


def context(rcpts: list[str], sender: str = "alice@example.org") -> MessageContext:
    return MessageContext(
        make_message(subject="dispatch"),
        Envelope(sender, rcpts),
        Connection(ip="127.0.0.1", helo="client.test"),
        queue_id=new_queue_id(),
    )


async def test_local_copies_are_delivered_before_it_returns(make_config):
    async with dispatcher(make_config("local_domains: [example.org]")) as (disp, notified):
        ctx = context(["bob@example.org"])
        await disp.enqueue(ctx)
        assert ctx.delivery is Delivery.DELIVERED
        assert list((disp.maildir.folder_path("bob@example.org", "") / "new").iterdir())
        assert disp.queue.spool.ids() == []
    [(hook, kwargs)] = notified
    assert hook == "mailflow_delivered"
    assert kwargs["recipient"] == "bob@example.org" and kwargs["outcome"] == "delivered"


async def test_relayed_copies_are_handed_on_and_local_ones_delivered(make_config):
    async with smtp_sink() as sink:
        config = relay_config(make_config, sink.port)
        async with dispatcher(config) as (disp, notified):
            ctx = context(["bob@example.org", "carol@remote.test"])
            await disp.enqueue(ctx)
            assert ctx.delivery is Delivery.DELIVERED
            assert disp.queue.spool.ids() == []
            # The relay pool is the dispatcher's: the session waits there for reuse.
            assert disp.pool.opened == 1 and disp.pool._idle
    assert [m.rcpt_tos for m in sink.messages] == [["carol@remote.test"]]
    assert sorted(k["recipient"] for _, k in notified) == ["bob@example.org", "carol@remote.test"]


async def test_an_unreachable_relay_is_spooled_and_a_local_copy_still_delivered(make_config):
    config = relay_config(make_config, free_port())
    async with dispatcher(config) as (disp, _):
        ctx = context(["bob@example.org", "carol@remote.test"])
        await disp.enqueue(ctx)
        assert ctx.delivery is Delivery.DELIVERED_QUEUED
        [queue_id] = disp.queue.spool.ids()
        assert queue_id == ctx.queue_id


async def test_without_inline_attempts_everything_relayed_is_queued(make_config):
    async with smtp_sink() as sink:
        config = relay_config(make_config, sink.port, inline_timeout=0)
        assert inline_bounds(config) == {}
        async with dispatcher(config) as (disp, _):
            ctx = context(["carol@remote.test"])
            await disp.enqueue(ctx)
            assert ctx.delivery is Delivery.QUEUED
            await sink.wait_messages(1)  # the queue delivers it


async def test_a_refusal_of_every_copy_raises_and_stores_nothing(make_config):
    behaviour = SinkBehaviour(data_replies=["550 5.7.1 not here"])
    async with (
        smtp_sink(behaviour) as sink,
        dispatcher(relay_config(make_config, sink.port)) as (disp, _),
    ):
        ctx = context(["carol@remote.test"])
        with pytest.raises(RefusedUpstream) as refused:
            await disp.enqueue(ctx)
        assert refused.value.reply() == "550 5.7.1 not here"
        assert ctx.delivery is None  # the front end says what it answered
        assert disp.queue.spool.ids() == []


async def test_reconfigure_moves_relayed_mail_to_the_new_target(make_config):
    async with (
        smtp_sink() as old_sink,
        smtp_sink() as new_sink,
        dispatcher(relay_config(make_config, old_sink.port)) as (disp, _),
    ):
        first = context(["carol@remote.test"])
        await disp.enqueue(first)
        await disp.reconfigure(relay_config(make_config, new_sink.port, inline_timeout=0))
        assert disp.inline_bounds == {}
        second = context(["dave@remote.test"])
        await disp.enqueue(second)
        assert (first.delivery, second.delivery) == (Delivery.DELIVERED, Delivery.QUEUED)
        await new_sink.wait_messages(1)  # by the queue, to the new target
    assert [m.rcpt_tos for m in old_sink.messages] == [["carol@remote.test"]]
    assert [m.rcpt_tos for m in new_sink.messages] == [["dave@remote.test"]]
