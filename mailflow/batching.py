"""Run the data stage over the messages that arrive close together, back to back.

The data stage (every plugin's end-of-message hook) is the most expensive step per
message, and it runs much faster back to back than interleaved with SMTP traffic:
run alone, its code and tables stay in the CPU caches; between two sockets' worth
of protocol handling, they have been pushed out (about 270 us against 430-620 us
per message on the benchmark machine; see docs/performance.md).

So a message that reaches the data stage while other messages' data is still being
received waits for them, for at most a few turns of the event loop, and then the
whole batch goes through the plugins one message after the other. A message that
nobody else is about to join (a lone client, ``mailflow check``) does not wait
at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

DEFAULT_MAX_BATCH = 64

_Waiters = list[asyncio.Future[None]]


class DataBatch:
    """Gathers messages for the data stage; one per pipeline.

    Front ends wrap the receiving of each message's data in :meth:`receiving_data`,
    so the batch knows who is about to arrive. :meth:`gather` then holds a message
    while others are still arriving: until they have all arrived, ``rounds`` turns of
    the event loop have passed, or ``max_batch`` messages wait. :meth:`regroup`,
    after the stage, holds each message of a batch until the end of the turn in which
    the batch ran, so that no message goes on to storage (other code, other caches)
    before the batch's hooks have all run. ``rounds`` 0 turns batching off.

    Every waiting message has its own future, so cancelling one (a client that hangs
    up) never disturbs the others.
    """

    __slots__ = ("_gathering", "_regrouping", "max_batch", "receiving", "rounds")

    def __init__(self, rounds: int, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if rounds < 0 or max_batch < 1:
            raise ValueError("rounds must be >= 0 and max_batch >= 1")
        self.rounds = rounds
        self.max_batch = max_batch
        self.receiving = 0  # messages whose data is being received right now
        self._gathering: _Waiters | None = None
        self._regrouping: _Waiters | None = None

    def begin_receiving(self) -> None:
        """A message's data has started to arrive (pair with :meth:`end_receiving`)."""
        self.receiving += 1

    def end_receiving(self) -> None:
        """That message's data has all arrived, or it never will."""
        self.receiving -= 1

    @contextlib.contextmanager
    def receiving_data(self) -> Iterator[None]:
        """Count a message as arriving while its data is being received."""
        self.begin_receiving()
        try:
            yield
        finally:
            self.end_receiving()

    async def gather(self) -> bool:
        """Wait for the messages still arriving; True if this message ran in a batch of several."""
        waiters = self._gathering
        if waiters is None:
            if not self.rounds or not self.receiving:
                return False  # nobody else is about to arrive
            waiters = self._gathering = []
            asyncio.get_running_loop().call_soon(self._count_down, waiters, self.rounds)
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        if len(waiters) >= self.max_batch:
            self._gathering = None
            _release(waiters)
        await waiter
        return len(waiters) > 1

    def _count_down(self, waiters: _Waiters, rounds: int) -> None:
        if waiters is not self._gathering:
            return  # released early (a full batch)
        if rounds > 1 and self.receiving:
            asyncio.get_running_loop().call_soon(self._count_down, waiters, rounds - 1)
        else:
            self._gathering = None
            _release(waiters)

    async def regroup(self) -> None:
        """Wait until the end of this turn of the event loop."""
        loop = asyncio.get_running_loop()
        waiters = self._regrouping
        if waiters is None:
            waiters = self._regrouping = []
            loop.call_soon(self._release_regrouped, waiters)
        waiter = loop.create_future()
        waiters.append(waiter)
        await waiter

    def _release_regrouped(self, waiters: _Waiters) -> None:
        self._regrouping = None
        _release(waiters)


def _release(waiters: _Waiters) -> None:
    for waiter in waiters:
        if not waiter.done():  # a cancelled waiter is already done
            waiter.set_result(None)
