"""Sessions kept open between deliveries, per destination, and closed after a while idle.

Used by ``SMTPPool`` (one list per destination), for the relay's sessions and for
the LMTP transport's. The most recently used session is taken first; a session that is no
longer clean (closed, or the server sent something unasked) is never handed out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
S = TypeVar("S")


class IdleSessions(Generic[K, S]):
    """Up to ``size`` idle sessions per key, each kept for at most ``idle`` seconds.

    ``clean(session)`` says whether a session may be used again; ``quit(session)``
    ends one politely. It runs as a task, and :meth:`aclose` waits for those tasks.
    One timer serves every idle session.
    """

    def __init__(
        self,
        size: int,
        idle: float,
        clean: Callable[[S], bool],
        quit: Callable[[S], Coroutine[Any, Any, None]],
    ) -> None:
        self.size = size
        self.idle = idle
        self._clean = clean
        self._quit = quit
        self._idle: dict[K, list[tuple[S, float]]] = {}  # (session, idle since)
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def __bool__(self) -> bool:
        """Whether any session is idle here."""
        return any(self._idle.values())

    def take(self, key: K) -> S | None:
        """The most recently used idle session for ``key`` that is still clean, if any."""
        idle = self._idle.get(key)
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                session, since = idle.pop()
                if self._clean(session) and now - since < self.idle:
                    return session
                self.close(session)
        return None

    def give(self, key: K, session: S) -> None:
        """Keep ``session`` for reuse, or close it when it is not clean or there is no room."""
        idle = self._idle.setdefault(key, [])
        if not self._clean(session) or len(idle) >= self.size or self.idle <= 0:
            self.close(session)
            return
        loop = asyncio.get_running_loop()
        idle.append((session, loop.time()))
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.idle, self._sweep)

    def close(self, session: S) -> None:
        """End ``session`` politely, in the background."""
        task = asyncio.get_running_loop().create_task(self._quit(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _sweep(self) -> None:
        """Close the sessions idle for ``idle`` seconds; come back for the next one."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_due: float | None = None
        for key, idle in list(self._idle.items()):
            keep = []
            for session, since in idle:
                if now - since >= self.idle or not self._clean(session):
                    self.close(session)
                else:
                    keep.append((session, since))
                    due = since + self.idle
                    next_due = due if next_due is None else min(next_due, due)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if next_due is not None:
            self._sweeper = loop.call_at(next_due, self._sweep)

    async def aclose(self, timeout: float) -> None:
        """Close every idle session and wait (at most ``timeout``) for the closing ones."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for session, _ in idle:
                self.close(session)
        self._idle.clear()
        if self._closing:
            await asyncio.wait(self._closing, timeout=timeout)
