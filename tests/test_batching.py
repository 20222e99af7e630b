"""RoundGate, and the data stage running a batch of messages back to back."""

from __future__ import annotations

import asyncio

import pytest

from mailflow.app import App
from mailflow.batching import RoundGate
from mailflow.config import ConfigError
from mailflow.hookspecs import hookimpl
from mailflow.message import Connection, Envelope, MessageContext
from mailflow.testing import make_message


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


async def pass_gate(gate: RoundGate, name: str, turns: Turns, log: list[tuple[str, int]]) -> None:
    log.append((f"arrive {name}", turns.count))
    await gate.wait()
    log.append((f"pass {name}", turns.count))


async def test_tasks_arriving_in_one_turn_pass_together_after_the_rounds_in_arrival_order():
    gate = RoundGate(rounds=3)
    turns = Turns()
    log: list[tuple[str, int]] = []
    tasks = [asyncio.create_task(pass_gate(gate, name, turns, log)) for name in "abc"]
    await asyncio.gather(*tasks)
    turns.stop()
    arrived = {event for event, _ in log[:3]}
    assert arrived == {"arrive a", "arrive b", "arrive c"}
    passed = log[3:]
    assert [event for event, _ in passed] == ["pass a", "pass b", "pass c"]
    assert len({turn for _, turn in passed}) == 1  # all in the same turn
    assert passed[0][1] - log[0][1] >= 3  # held for the rounds


async def test_a_task_arriving_after_the_release_waits_for_the_next_batch():
    gate = RoundGate(rounds=2)
    turns = Turns()
    log: list[tuple[str, int]] = []
    first = asyncio.create_task(pass_gate(gate, "first", turns, log))
    await first
    second = asyncio.create_task(pass_gate(gate, "second", turns, log))
    await second
    turns.stop()
    events = [event for event, _ in log]
    assert events == ["arrive first", "pass first", "arrive second", "pass second"]
    assert log[3][1] - log[2][1] >= 2


async def test_the_task_that_fills_the_batch_opens_the_gate_at_once():
    gate = RoundGate(rounds=1000, max_batch=3)
    turns = Turns()
    log: list[tuple[str, int]] = []
    tasks = [asyncio.create_task(pass_gate(gate, name, turns, log)) for name in "abc"]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    turns.stop()
    assert max(turn for _, turn in log) < 10  # not the 1000 rounds
    # The next arrival starts a new batch, with its own count down.
    gate.rounds = 1
    await asyncio.wait_for(gate.wait(), 5)


async def test_rounds_zero_never_suspends():
    gate = RoundGate(rounds=0)
    coro = gate.wait()
    with pytest.raises(StopIteration):
        coro.send(None)


async def test_cancelling_one_waiter_releases_the_others_normally():
    gate = RoundGate(rounds=3)
    turns = Turns()
    log: list[tuple[str, int]] = []
    a, b, c = (asyncio.create_task(pass_gate(gate, name, turns, log)) for name in "abc")
    await asyncio.sleep(0)  # all three are waiting now
    b.cancel()
    await asyncio.gather(a, c)
    turns.stop()
    assert b.cancelled()
    assert [event for event, _ in log if event.startswith("pass")] == ["pass a", "pass c"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        RoundGate(rounds=-1)
    with pytest.raises(ValueError):
        RoundGate(rounds=1, max_batch=0)


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
    async def one(name: str) -> None:
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
