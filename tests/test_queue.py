"""The queue manager on a real on-disk spool, with in-process transports that script
their answers (the network transports are covered in test_relay/test_lmtp)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from mailflow.delivery.outcome import Outcome
from mailflow.delivery.queue import FLUSH_TRIGGER, QueueManager
from mailflow.delivery.spool import (
    BOUNCED,
    QueueEntry,
    RecipientState,
    Spool,
    new_queue_id,
)
from mailflow.verdict import Route, RouteKind

RELAY = Route(RouteKind.RELAY, target="up")


class Scripted:
    """A transport answering from a per-recipient list of replies (last one repeats)."""

    def __init__(self, replies: dict[str, list[str]] | None = None, default: str = "250 ok"):
        self.replies = replies or {}
        self.default = default
        self.calls: list[list[str]] = []
        self.raise_next = 0

    async def __call__(
        self, entry: QueueEntry, message: bytes, rcpts: list[RecipientState], route: Route
    ) -> dict[str, Outcome]:
        self.calls.append([r.address for r in rcpts])
        if self.raise_next:
            self.raise_next -= 1
            raise RuntimeError("transport bug")
        out = {}
        for r in rcpts:
            script = self.replies.get(r.address, [self.default])
            text = script[min(r.attempts, len(script) - 1)]
            out[r.address] = Outcome(int(text[:3]), text[4:])
        return out


@contextlib.asynccontextmanager
async def queue(
    make_config,
    transport: Scripted,
    yaml: str = "",
    build_bounce: Callable[..., bytes] | None = None,
) -> AsyncIterator[QueueManager]:
    config = make_config(yaml)
    spool = Spool(config.queue.directory)
    qm = QueueManager(
        config,
        spool,
        {RouteKind.RELAY: transport, RouteKind.MAILDIR: Scripted()},
        build_bounce=build_bounce,
    )
    await qm.start()
    try:
        yield qm
    finally:
        await qm.stop()


async def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_only_recipients_still_pending_are_retried(make_config):
    transport = Scripted({"b@remote.test": ["451 4.3.0 later", "250 ok"]})
    async with queue(make_config, transport) as qm:
        routes = {"a@remote.test": RELAY, "b@remote.test": RELAY}
        await qm.enqueue("s@example.org", routes, b"Subject: x\r\n\r\nx\r\n")
        await wait_for(lambda: not qm.spool.ids())
    assert transport.calls == [["a@remote.test", "b@remote.test"], ["b@remote.test"]]


async def test_messages_in_the_spool_are_resumed_at_start(make_config):
    config = make_config()
    spool = Spool(config.queue.directory)
    entry = QueueEntry(
        new_queue_id(),
        "s@example.org",
        [RecipientState("a@remote.test", RELAY.as_dict(), attempts=2)],
        created=time.time(),
    )
    spool.store_sync(entry, b"Subject: old\r\n\r\nx\r\n")
    transport = Scripted()
    async with queue(make_config, transport) as qm:
        await wait_for(lambda: not qm.spool.ids())
    assert transport.calls == [["a@remote.test"]]


async def test_a_raising_transport_defers_and_loses_nothing(make_config):
    transport = Scripted()
    transport.raise_next = 1
    async with queue(make_config, transport) as qm:
        await qm.enqueue("s@example.org", {"a@remote.test": RELAY}, b"x\r\n")
        await wait_for(lambda: len(transport.calls) == 2)
        await wait_for(lambda: not qm.spool.ids())


async def test_a_route_without_transport_is_deferred_not_bounced(make_config):
    bounces: list[bytes] = []
    async with queue(make_config, Scripted(), build_bounce=lambda *a: bounces.append(a)) as qm:
        entry = await qm.enqueue("s@example.org", {"a@x.test": Route(RouteKind.LMTP)}, b"x\r\n")
        await wait_for(lambda: qm.spool.load(entry.id).recipients[0].attempts >= 1)
        [r] = qm.spool.load(entry.id).recipients
    assert r.status == "pending" and r.last_reply.startswith("451 4.3.5")
    assert bounces == []


async def test_retries_never_sleep_past_the_lifetime(make_config, tmp_path):
    yaml = f"""
    queue: {{directory: {tmp_path / "spool"}, scan_interval: 0.05,
             retry_schedule: [3600], lifetime: 1}}
    """
    transport = Scripted(default="451 4.4.1 unreachable")
    async with queue(make_config, transport, yaml, build_bounce=lambda *a: b"dsn\r\n") as qm:
        entry = await qm.enqueue("", {"a@remote.test": RELAY}, b"x\r\n")
        # An hourly schedule, but the lifetime is one second: the second (and last)
        # try happens when the lifetime ends, and then the recipient expires.
        await wait_for(lambda: not qm.spool.ids(), timeout=5)
    assert len(transport.calls) == 2
    assert entry.recipients[0].status == "expired"


async def test_a_dsn_builder_bug_does_not_keep_the_message_for_ever(make_config):
    def broken(*args: object) -> bytes:
        raise ValueError("bad DSN")

    transport = Scripted(default="550 5.1.1 no")
    async with queue(make_config, transport, build_bounce=broken) as qm:
        entry = await qm.enqueue("s@example.org", {"a@remote.test": RELAY}, b"x\r\n")
        await wait_for(lambda: not qm.spool.ids())
    assert entry.recipients[0].status == BOUNCED
    assert len(transport.calls) == 1


async def test_flush_trigger_retries_now_despite_a_long_backoff(make_config, tmp_path):
    yaml = f"""
    queue: {{directory: {tmp_path / "spool"}, scan_interval: 0.05, retry_schedule: [3600]}}
    """
    transport = Scripted({"a@remote.test": ["451 4.3.0 later", "250 ok"]})
    async with queue(make_config, transport, yaml) as qm:
        await qm.enqueue("s@example.org", {"a@remote.test": RELAY}, b"x\r\n")
        await wait_for(lambda: len(transport.calls) == 1)
        await asyncio.sleep(0.2)
        assert len(transport.calls) == 1  # waiting for its hour
        (qm.spool.root / FLUSH_TRIGGER).touch()  # what `mailflow queue flush` does
        await wait_for(lambda: not qm.spool.ids())
    assert len(transport.calls) == 2


async def test_deleting_during_an_attempt_is_not_undone(make_config):
    gate = asyncio.Event()

    class Slow(Scripted):
        async def __call__(self, entry, message, rcpts, route):  # type: ignore[override]
            await gate.wait()
            return await super().__call__(entry, message, rcpts, route)

    transport = Slow(default="451 4.3.0 later")
    async with queue(make_config, transport) as qm:
        entry = await qm.enqueue("s@example.org", {"a@remote.test": RELAY}, b"x\r\n")
        await asyncio.sleep(0.1)
        qm.spool.remove(entry.id)  # what `mailflow queue delete` does meanwhile
        gate.set()
        await wait_for(lambda: transport.calls)
        await asyncio.sleep(0.2)
        assert qm.spool.ids() == []
        assert not qm.spool.meta_path(entry.id).exists()
        assert entry.id not in {e.id for e in qm.entries()}


async def test_discard_route_finishes_without_a_transport(make_config):
    async with queue(make_config, Scripted()) as qm:
        entry = await qm.enqueue("s@example.org", {"a@x.test": Route(RouteKind.DISCARD)}, b"x")
        await wait_for(lambda: not qm.spool.ids())
    assert entry.recipients[0].status == "discarded"


async def test_metadata_without_its_message_is_dropped_not_retried(make_config):
    transport = Scripted(default="451 4.3.0 later")
    async with queue(make_config, transport) as qm:
        entry = await qm.enqueue("s@example.org", {"a@remote.test": RELAY}, b"x\r\n")
        await wait_for(lambda: transport.calls)
        qm.spool.message_path(entry.id).unlink()  # only the .json is left
        qm.flush()
        await wait_for(lambda: not qm.spool.ids())
    assert len(transport.calls) == 1


# --- the first attempt from memory, batched removal ------------------------------------------


async def test_first_attempt_uses_the_bytes_given_and_retries_read_the_spool(
    make_config, monkeypatch
):
    transport = Scripted({"a@remote.test": ["451 4.3.0 later", "250 ok"]})
    seen: list[bytes] = []

    class Recording(Scripted):
        async def __call__(self, entry, message, rcpts, route):  # type: ignore[override]
            seen.append(message)
            return await transport(entry, message, rcpts, route)

    reads: list[str] = []
    async with queue(make_config, Recording()) as qm:
        read = qm.spool.read_message
        monkeypatch.setattr(qm.spool, "read_message", lambda i: reads.append(i) or read(i))
        entry = await qm.enqueue("s@example.org", {"a@remote.test": RELAY}, b"Subject: m\r\n\r\n")
        await wait_for(lambda: not qm.spool.ids())
    assert seen == [b"Subject: m\r\n\r\n"] * 2
    assert reads == [entry.id]  # the retry only: the first attempt had the bytes
    assert qm._first == {} and qm._first_bytes == 0


async def test_first_attempts_beyond_the_memory_bound_read_the_spool(make_config, monkeypatch):
    from mailflow.delivery import queue as queue_module

    monkeypatch.setattr(queue_module, "FIRST_ATTEMPT_MEMORY", 10)
    transport = Scripted()
    async with queue(make_config, transport) as qm:
        reads: list[str] = []
        read = qm.spool.read_message
        monkeypatch.setattr(qm.spool, "read_message", lambda i: reads.append(i) or read(i))
        small = await qm.enqueue("s@example.org", {"a@remote.test": RELAY}, b"tiny\r\n")
        large = await qm.enqueue("s@example.org", {"a@remote.test": RELAY}, b"x" * 100)
        await wait_for(lambda: not qm.spool.ids())
    assert reads == [large.id]
    assert small.id not in reads


async def test_spool_files_stay_until_the_upstream_has_answered(make_config):
    gate = asyncio.Event()

    class Held(Scripted):
        async def __call__(self, entry, message, rcpts, route):  # type: ignore[override]
            await gate.wait()
            return await super().__call__(entry, message, rcpts, route)

    async with queue(make_config, Held()) as qm:
        entry = await qm.enqueue("s@example.org", {"a@remote.test": RELAY}, b"x\r\n")
        await asyncio.sleep(0.1)
        # Stored and being delivered: both files are there until the 250.
        assert qm.spool.message_path(entry.id).exists()
        assert qm.spool.meta_path(entry.id).exists()
        gate.set()
        # Removed in a thread, the metadata first (spool.remove): wait for both.
        message = qm.spool.message_path(entry.id)
        await wait_for(lambda: not qm.spool.ids() and not message.exists())


async def test_a_message_awaiting_removal_is_not_picked_up_again_by_a_flush(
    make_config, monkeypatch
):
    import threading

    release = threading.Event()
    transport = Scripted()
    async with queue(make_config, transport) as qm:
        remove_all = qm._remove_all

        def slow_remove(ids: list[str]) -> None:
            release.wait(5)
            remove_all(ids)

        monkeypatch.setattr(qm, "_remove_all", slow_remove)
        await qm.enqueue("s@example.org", {"a@remote.test": RELAY}, b"x\r\n")
        await wait_for(lambda: transport.calls)
        (qm.spool.root / FLUSH_TRIGGER).touch()  # reloads the spool while files remain
        await wait_for(lambda: not (qm.spool.root / FLUSH_TRIGGER).exists())
        await asyncio.sleep(0.2)
        release.set()
        await wait_for(lambda: not qm.spool.ids())
    assert transport.calls == [["a@remote.test"]]  # delivered once, not twice


async def test_one_log_line_per_result_not_per_recipient(make_config, caplog):
    transport = Scripted({"c@remote.test": ["550 5.1.1 no such user"]})
    routes = {f"{n}@remote.test": RELAY for n in "abc"}
    with caplog.at_level("INFO", logger="mailflow.queue"):
        async with queue(make_config, transport) as qm:
            await qm.enqueue("", routes, b"x\r\n")
            await wait_for(lambda: not qm.spool.ids())
    lines = [r.getMessage() for r in caplog.records if "status=" in r.getMessage()]
    assert len(lines) == 2
    assert "to=<a@remote.test>,<b@remote.test> route=relay status=delivered" in lines[0]
    assert "to=<c@remote.test> route=relay status=bounced" in lines[1]


async def test_a_stop_during_the_first_attempt_leaves_the_message_spooled(make_config, monkeypatch):
    from mailflow.delivery import queue as queue_module

    monkeypatch.setattr(queue_module, "STOP_GRACE", 0.1)
    gate = asyncio.Event()

    class Never(Scripted):
        async def __call__(self, entry, message, rcpts, route):  # type: ignore[override]
            await gate.wait()
            return await super().__call__(entry, message, rcpts, route)

    async with queue(make_config, Never()) as qm:
        entry = await qm.enqueue("s@example.org", {"a@remote.test": RELAY}, b"x\r\n")
        await asyncio.sleep(0.05)
    spool = qm.spool
    assert spool.ids() == [entry.id]
    assert spool.load(entry.id).recipients[0].status == "pending"
