"""Let tasks that reach a point close together in time go on together.

The data stage (every plugin's end-of-message hook) is the most expensive step per
message, and it runs much faster back to back than interleaved with SMTP traffic:
run alone, its code and tables stay in the CPU caches; between two sockets' worth
of protocol handling, they have been pushed out (about 270 us against 430-620 us
per message on the benchmark machine; see docs/performance.md). A :class:`RoundGate`
holds the tasks that reach it for a few turns of the event loop and then lets them
all through in one turn, so their next steps run one after the other.

A turn of an idle event loop takes microseconds, so a lone message is not held up
in any measurable way; under load a turn is one pass over the sockets that are
ready, which is when there are other messages to gather.
"""

from __future__ import annotations

import asyncio

DEFAULT_MAX_BATCH = 64


class RoundGate:
    """Holds arriving tasks for ``rounds`` turns of the event loop, then releases them all.

    The first task to arrive starts the count; every task that arrives before the
    gate opens is released with it, in arrival order, in the same turn. At most
    ``max_batch`` tasks wait: the one that fills the batch opens the gate at once.
    ``rounds`` 0 turns the gate off (``wait`` returns without suspending).

    Every waiting task has its own future, so cancelling one (a client that hangs
    up) never disturbs the others.
    """

    __slots__ = ("_waiters", "max_batch", "rounds")

    def __init__(self, rounds: int, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if rounds < 0 or max_batch < 1:
            raise ValueError("rounds must be >= 0 and max_batch >= 1")
        self.rounds = rounds
        self.max_batch = max_batch
        self._waiters: list[asyncio.Future[None]] | None = None

    async def wait(self) -> None:
        """Return in the turn in which the current batch is released."""
        if not self.rounds:
            return
        loop = asyncio.get_running_loop()
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = []
            loop.call_soon(self._count_down, waiters, self.rounds)
        waiter = loop.create_future()
        waiters.append(waiter)
        if len(waiters) >= self.max_batch:
            self._release(waiters)
        await waiter

    def _count_down(self, waiters: list[asyncio.Future[None]], rounds: int) -> None:
        if waiters is not self._waiters:
            return  # released early (a full batch)
        if rounds > 1:
            asyncio.get_running_loop().call_soon(self._count_down, waiters, rounds - 1)
        else:
            self._release(waiters)

    def _release(self, waiters: list[asyncio.Future[None]]) -> None:
        self._waiters = None
        for waiter in waiters:
            if not waiter.done():  # a cancelled waiter is already done
                waiter.set_result(None)
