"""Durable writes: fsync helpers and group commit, shared by the spool and Maildir.

The promise both rely on: nobody is told "stored" before every file involved and
its directory entry are fsync'd. Group commit keeps that promise while paying the
cost once per batch: callers on any event loop hand their write to one commit
thread, which takes everything that queued up while it was busy, commits it in
one round of concurrent fsyncs, and wakes each event loop once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Generic, TypeVar

COMMIT_IDLE = 1.0  # seconds a commit thread waits for more work before it exits
FSYNC_PARALLEL = 8  # files fsync'd at once: concurrent fsyncs share journal commits

_fsync_pool: ThreadPoolExecutor | None = None
_fsync_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One small fsync pool per process, shared by every spool and Maildir."""
    global _fsync_pool
    with _fsync_pool_lock:
        if _fsync_pool is None:
            _fsync_pool = ThreadPoolExecutor(FSYNC_PARALLEL, thread_name_prefix="fsync")
        return _fsync_pool


def fsync_dir(path: str | Path) -> None:
    """Make renames and new entries in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_each(fds: Sequence[int]) -> None:
    for fd in fds:
        os.fsync(fd)


def fsync_all(fds: Sequence[int]) -> None:
    """fsync every descriptor, up to ``FSYNC_PARALLEL`` at a time; raise the first error.

    The calling thread takes one share itself, and returns only after every fsync
    has finished, so no descriptor is closed while another thread still uses it.
    """
    if len(fds) <= 1:
        _fsync_each(fds)
        return
    shares = [fds[i::FSYNC_PARALLEL] for i in range(min(FSYNC_PARALLEL, len(fds)))]
    futures = [_pool().submit(_fsync_each, share) for share in shares[1:]]
    error: BaseException | None = None
    try:
        _fsync_each(shares[0])
    except OSError as exc:
        error = exc
    finally:
        wait(futures)
    for future in futures:
        if error is None:
            error = future.exception()
    if error is not None:
        raise error


def write_files(items: Sequence[tuple[str, bytes]]) -> None:
    """Write each file via a temp name, fsync every one, then rename them into place.

    No file is renamed before all of them are on disk, so a crash leaves only temp
    files (``.<name>.tmp``), which readers ignore and recovery removes. The caller
    fsyncs the directory afterwards to make the renames durable.
    """
    opened: list[tuple[int, str, str]] = []
    try:
        for path, data in items:
            head, name = os.path.split(path)
            tmp = os.path.join(head, f".{name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            opened.append((fd, tmp, path))
            write_all(fd, data)
        fsync_all([fd for fd, _, _ in opened])
    finally:
        for fd, _, _ in opened:
            os.close(fd)
    for _, tmp, path in opened:
        os.replace(tmp, path)


def write_file(path: str | Path, data: bytes) -> None:
    """Write via a temp name, fsync, rename: the final name never holds a partial file."""
    write_files([(os.fspath(path), data)])


Request = TypeVar("Request")
Response = TypeVar("Response")
_Waiter = tuple[Any, "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class GroupCommitter(Generic[Request, Response]):
    """Batch blocking commits from any number of event loops into one thread.

    ``commit(requests)`` runs in the commit thread and returns one response per
    request, in order (an Exception instance as a response fails only that
    caller); if it raises, every caller of that batch gets the exception. The
    thread exits after ``idle`` seconds (default ``COMMIT_IDLE``) without work and
    starts again on demand.
    """

    def __init__(
        self,
        commit: Callable[[list[Request]], Sequence[Response]],
        name: str,
        idle: float | None = None,
    ) -> None:
        self._commit = commit
        self._name = name
        self._idle = idle
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._batch: list[_Waiter] = []
        self._running = False

    async def submit(self, request: Request) -> Response:
        """Returns (or raises) once ``request`` has been committed with its batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Response] = loop.create_future()
        with self._lock:
            self._batch.append((request, future, loop))
            if self._running:
                self._more.notify()
            else:
                self._running = True
                threading.Thread(target=self._drain, name=self._name, daemon=True).start()
        return await future

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._batch:
                    self._more.wait(COMMIT_IDLE if self._idle is None else self._idle)
                batch, self._batch = self._batch, []
                if not batch:
                    self._running = False
                    return
            outcome: Sequence[Any] | BaseException
            try:
                outcome = self._commit([request for request, _, _ in batch])
            except BaseException as exc:
                outcome = exc
            # One wake-up per event loop per batch, not one per caller.
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
            for i, (_, future, loop) in enumerate(batch):
                value = outcome if isinstance(outcome, BaseException) else outcome[i]
                by_loop.setdefault(loop, []).append((future, value))
            for loop, pairs in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_resolve_all, pairs)


def _resolve_all(pairs: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, value in pairs:
        if future.done():  # the caller was cancelled
            continue
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)
