"""RoundGate, and the data stage running a batch of messages back to back."""

from __future__ import annotations

import asyncio

import pytest

from mailflow.app import App
from mailflow.batching import DataBatch
from mailflow.config import ConfigError
from mailflow.hookspecs import hookimpl
from mailflow.message import Connection, Envelope, MessageContext
from mailflow.testing import SMTPDialog, make_message, running_server, send


class Turns:
    """Counts turns of the event loop: a callback that re-schedules itself every turn."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def arrive(batch: DataBatch, name: str, turns: Turns, log: list[tuple[str, int]]) -> bool:
    log.append((f"arrive {name}", turns.count))
    batched = await batch.gather()
    log.append((f"pass {name}", turns.count))
    return batched


def passes(log: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(event, turn) for event, turn in log if event.startswith("pass")]


async def test_a_message_nobody_is_about_to_join_does_not_wait():
    batch = DataBatch(rounds=3)
    coro = batch.gather()
    with pytest.raises(StopIteration) as done:
        coro.send(None)  # finished in its first step: never suspended
    assert done.value.value is False


async def test_rounds_zero_never_waits_even_with_messages_arriving():
    batch = DataBatch(rounds=0)
    with batch.receiving_data():
        coro = batch.gather()
        with pytest.raises(StopIteration):
            coro.send(None)


async def test_messages_wait_for_those_still_arriving_and_pass_together_in_order():
    batch = DataBatch(rounds=1000)
    turns = Turns()
    log: list[tuple[str, int]] = []

    async def receive_then_arrive(name: str, receive_turns: int) -> bool:
        with batch.receiving_data():
            for _ in range(receive_turns):
                await asyncio.sleep(0)
        return await arrive(batch, name, turns, log)

    results = await asyncio.wait_for(
        asyncio.gather(receive_then_arrive("a", 1), receive_then_arrive("b", 3)), 5
    )
    turns.stop()
    assert results == [True, True]
    assert [event for event, _ in log] == ["arrive a", "arrive b", "pass a", "pass b"]
    (_, a_passed), (_, b_passed) = passes(log)
    assert a_passed == b_passed  # released in the same turn
    assert a_passed - log[0][1] < 10  # as soon as nobody was arriving, not after 1000 turns


async def test_a_message_that_never_arrives_holds_the_batch_for_at_most_the_rounds():
    batch = DataBatch(rounds=4)
    turns = Turns()
    log: list[tuple[str, int]] = []
    with batch.receiving_data():  # a client that stalls in the middle of its data
        batched = await asyncio.wait_for(arrive(batch, "a", turns, log), 5)
    turns.stop()
    assert batched is False  # alone in its batch
    (_, arrived), (_, passed) = log
    assert 4 <= passed - arrived < 10


async def test_the_message_that_fills_the_batch_opens_it_at_once():
    batch = DataBatch(rounds=1000, max_batch=3)
    turns = Turns()
    log: list[tuple[str, int]] = []
    with batch.receiving_data():  # someone is always arriving: only max_batch opens it
        tasks = [asyncio.create_task(arrive(batch, name, turns, log)) for name in "abc"]
        assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == [True, True, True]
    turns.stop()
    assert max(turn for _, turn in log) < 10


async def test_cancelling_one_waiting_message_releases_the_others_normally():
    batch = DataBatch(rounds=3)
    turns = Turns()
    log: list[tuple[str, int]] = []
    with batch.receiving_data():
        a, b, c = (asyncio.create_task(arrive(batch, name, turns, log)) for name in "abc")
        await asyncio.sleep(0)  # all three are waiting now
        b.cancel()
        await asyncio.gather(a, c)
    turns.stop()
    assert b.cancelled()
    assert [event for event, _ in passes(log)] == ["pass a", "pass c"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        DataBatch(rounds=-1)
    with pytest.raises(ValueError):
        DataBatch(rounds=1, max_batch=0)


def test_config_refuses_negative_batch_rounds(make_config):
    with pytest.raises(ConfigError, match="data_batch_rounds"):
        make_config("server:\n  data_batch_rounds: -1\n")


# --- the data stage ------------------------------------------------------------------------


class Recorder:
    """A data hook that logs which message it saw; a message named 'slow' waits for ``go``."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.go = asyncio.Event()

    @hookimpl
    async def mailflow_data(self, message: MessageContext) -> None:
        name = message.envelope.mail_from.partition("@")[0]
        if name == "slow":
            await self.go.wait()
        self.log.append(f"hook {name}")


def context(sender: str) -> MessageContext:
    return MessageContext(
        make_message(),
        Envelope(f"{sender}@example.org", ["bob@example.com"]),
        Connection(ip="127.0.0.1", port=40000),
    )


async def run_all(app: App, names: str, log: list[str]) -> None:
    """Messages whose data arrives at the same time (as the SMTP front end counts it)."""

    async def one(name: str) -> None:
        with app.pipeline.batch.receiving_data():
            await asyncio.sleep(0)  # the data arrives in the next turn
        await app.pipeline.run_data(context(name))
        log.append(f"done {name}")

    await asyncio.gather(*(one(name) for name in names.split()))


@pytest.mark.parametrize(
    ("rounds", "expected"),
    [
        (3, ["hook m1", "hook m2", "hook m3", "done m1", "done m2", "done m3"]),
        (0, ["hook m1", "done m1", "hook m2", "done m2", "hook m3", "done m3"]),
    ],
)
async def test_a_batch_runs_its_hooks_back_to_back_before_any_message_goes_on(
    make_config, rounds, expected
):
    log: list[str] = []
    config = make_config(
        f"server:\n  data_batch_rounds: {rounds}\nplugins:\n  - {{name: recorder}}\n"
    )
    app = App(config, extra_plugins={"recorder": Recorder(log)})
    await run_all(app, "m1 m2 m3", log)
    assert log == expected


async def test_a_message_whose_hook_waits_leaves_the_batch_without_holding_it_up(make_config):
    log: list[str] = []
    recorder = Recorder(log)
    config = make_config("plugins:\n  - {name: recorder}\n")
    app = App(config, extra_plugins={"recorder": recorder})

    async def release_slow_when_fast_is_done() -> None:
        while "done fast" not in log:
            await asyncio.sleep(0.001)
        recorder.go.set()

    releaser = asyncio.create_task(release_slow_when_fast_is_done())
    await asyncio.wait_for(run_all(app, "slow fast", log), 5)
    await releaser
    assert log == ["hook fast", "done fast", "hook slow", "done slow"]


async def test_the_smtp_front_end_counts_a_message_only_while_its_data_arrives(make_config):
    async with running_server(make_config()) as srv:
        batch = srv.app.pipeline.batch

        async def start_data() -> SMTPDialog:
            dialog, _ = await SMTPDialog.open(srv.port)
            for command in ("EHLO client.test", "MAIL FROM:<a@example.org>", "RCPT TO:<b@x.test>"):
                assert (await dialog.command(command)).startswith("250")
            assert (await dialog.command("DATA")).startswith("354")
            return dialog

        dialog = await start_data()
        assert batch.receiving == 1
        await dialog.write_raw(b"Subject: counted\r\n\r\nhello\r\n.\r\n")
        assert (await dialog.read_reply()).startswith("250")
        assert batch.receiving == 0
        await dialog.close()

        hung_up = await start_data()
        await hung_up.write_raw(b"Subject: never finished\r\n\r\nhal")
        await hung_up.close()
        async with asyncio.timeout(5):
            while batch.receiving:
                await asyncio.sleep(0.01)
        assert await send(srv.port, "a@example.org", ["b@x.test"], make_message()) == {}
        await srv.wait_delivered("b@x.test")
