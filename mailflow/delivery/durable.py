"""Durable writes: sync strategies, fsync helpers and group commit (spool and Maildir).

The promise both rely on: nobody is told "stored" before every file involved and
its directory entry are durable. Group commit keeps that promise while paying the
cost once per batch: callers on any event loop hand their write to one commit
thread, which takes everything that queued up while it was busy, commits it, and
wakes each event loop once.

A commit has two sync phases, in this order: the files' data (written under a
temporary name), then the directory entries made by renaming them into place.
A :class:`Syncer` does both phases, in one of two ways (``storage.sync``):

* ``syncfs``: one ``syncfs(2)`` per file system per phase, on a descriptor kept
  open per file system (Linux >= 5.8 reports every writeback error on that file
  system since the descriptor's previous call). It also flushes other dirty data
  on that file system;
* ``fsync``: ``fsync(2)`` on every file (up to ``FSYNC_PARALLEL`` at once) and
  on every directory involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import sys
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Generic, TypeVar

from mailflow.config import SyncMethod

log = logging.getLogger("mailflow")

COMMIT_IDLE = 1.0  # seconds a commit thread waits for more work before it exits
# Pipelined commits: batches of at most this many callers are answered before what
# they left is finished (see GroupCommitter._drain_pipelined).
ANSWER_AT_ONCE = 1
FSYNC_PARALLEL = 8  # files fsync'd at once: concurrent fsyncs share journal commits
SYNCFS_MIN_KERNEL = (5, 8)  # first Linux whose syncfs(2) reports writeback errors

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


def _fsync_each(fds: Sequence[int]) -> dict[int, OSError]:
    errors: dict[int, OSError] = {}
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            errors[fd] = exc
    return errors


def fsync_each(fds: Sequence[int]) -> dict[int, OSError]:
    """fsync every descriptor, up to ``FSYNC_PARALLEL`` at a time; return the failures.

    The calling thread takes one share itself, and returns only after every fsync
    has finished, so no descriptor is closed while another thread still uses it.
    """
    if len(fds) <= 1:
        return _fsync_each(fds)
    shares = [fds[i::FSYNC_PARALLEL] for i in range(min(FSYNC_PARALLEL, len(fds)))]
    futures = [_pool().submit(_fsync_each, share) for share in shares[1:]]
    try:
        errors = _fsync_each(shares[0])
    finally:
        wait(futures)
    for future in futures:
        errors.update(future.result())
    return errors


def fsync_all(fds: Sequence[int]) -> None:
    """fsync every descriptor (concurrently); raise the first error."""
    errors = fsync_each(fds)
    if errors:
        raise next(iter(errors.values()))


# --- sync strategies ------------------------------------------------------------------

# A file to sync: (open descriptor, st_dev of its file system).
FileRef = tuple[int, int]
# A directory whose entries to sync: (path, st_dev). A file renamed into a directory
# shares its file system (rename(2) fails across mounts), so the file's st_dev will do.
DirRef = tuple[str, int]
# What failed: the files by descriptor, the directories by path.
_SyncErrors = tuple[dict[int, OSError], dict[str, OSError]]


class Syncer(ABC):
    """Makes a commit durable: the files' data first, then the directory entries.

    Use it in this order: :meth:`watch` each directory before writing there; take a
    :meth:`mark`; write the files under temporary names; :meth:`sync_files`;
    rename the ones that synced; :meth:`sync_dirs` for their directories; only
    then report them stored. Each sync returns what failed. Passing the mark also
    fails everything when this syncer saw a sync error since the mark was taken:
    a ``syncfs`` error cursor reports an error once, perhaps to a call made for
    someone else's files. Safe to use from several threads.
    """

    method: str

    def watch(self, directory: str) -> int:
        """Called before files are first written under ``directory``; returns its st_dev."""
        return os.stat(directory).st_dev

    def mark(self) -> int:
        """A token taken before writing; see :meth:`error_since`."""
        return 0

    def error_since(self, mark: int) -> OSError | None:
        """A sync error this syncer saw after ``mark`` was taken (fsync: never)."""
        del mark
        return None

    @abstractmethod
    def sync(self, files: Sequence[FileRef], dirs: Sequence[DirRef]) -> _SyncErrors:
        """Sync the data of ``files`` and the entries of ``dirs``; return what failed."""

    def sync_files(self, files: Sequence[FileRef], mark: int) -> dict[int, OSError]:
        """Sync these files' data; return the failed descriptors."""
        return self.sync_round(files, mark, (), mark)[0]

    def sync_dirs(self, dirs: Sequence[DirRef], mark: int) -> dict[str, OSError]:
        """Sync these directories' entries; return the failed directories."""
        return self.sync_round((), mark, dirs, mark)[1]

    def sync_round(
        self, files: Sequence[FileRef], files_mark: int, dirs: Sequence[DirRef], dirs_mark: int
    ) -> _SyncErrors:
        """One sync for the data of one commit's files and the entries of another's
        directories (each with the mark its commit took); return what failed."""
        file_errors, dir_errors = self.sync(files, dirs)
        late = self.error_since(files_mark)
        if late is not None:
            file_errors = {fd: file_errors.get(fd, late) for fd, _ in files}
        late = self.error_since(dirs_mark)
        if late is not None:
            dir_errors = {d: dir_errors.get(d, late) for d, _ in dirs}
        return file_errors, dir_errors


class FsyncSyncer(Syncer):
    """``fsync(2)`` on every file (concurrently) and on every directory."""

    method = "fsync"

    def sync(self, files: Sequence[FileRef], dirs: Sequence[DirRef]) -> _SyncErrors:
        return _fsync_round(files, dirs)


_FSYNC = FsyncSyncer()  # write_file(s) without a syncer: per-file fsync


def _fsync_round(files: Sequence[FileRef], dirs: Sequence[DirRef]) -> _SyncErrors:
    """fsync every file (concurrently), then every directory; return what failed."""
    file_errors = fsync_each([fd for fd, _ in files])
    dir_errors: dict[str, OSError] = {}
    for directory, _ in dirs:
        try:
            fsync_dir(directory)
        except OSError as exc:
            dir_errors[directory] = exc
    return file_errors, dir_errors


class SyncfsSyncer(Syncer):
    """One ``syncfs(2)`` per file system per round, on a descriptor kept per ``st_dev``.

    The descriptor of a file system is opened by :meth:`watch`, before anything is
    written there, so its error cursor (Linux >= 5.8) predates every file it has
    to vouch for. Files or directories on a file system nobody watched fall back
    to ``fsync``. Calls are serialized and every error is counted before the next
    call starts, so :meth:`error_since` never misses one that another round took.
    ``syncfs`` is the seam tests use to inject failures.
    """

    method = "syncfs"

    def __init__(self, syncfs: Callable[[int], None] | None = None) -> None:
        func = syncfs or load_syncfs()
        if func is None:
            raise OSError("syncfs(2) is not available here")
        self._syncfs = func
        self._cursors: dict[int, int] = {}  # st_dev -> O_RDONLY descriptor on that fs
        self._lock = threading.Lock()  # one syncfs at a time, and the error count with it
        self._errors = 0
        self._last_error: OSError | None = None
        weakref.finalize(self, _close_all, self._cursors)

    def watch(self, directory: str) -> int:
        dev = os.stat(directory).st_dev
        if dev in self._cursors:
            return dev
        fd = os.open(directory, os.O_RDONLY)
        with self._lock:
            if dev in self._cursors or os.fstat(fd).st_dev != dev:
                os.close(fd)  # another thread was first, or it moved under us
            else:
                self._cursors[dev] = fd
        return dev

    def mark(self) -> int:
        return self._errors

    def error_since(self, mark: int) -> OSError | None:
        return self._last_error if self._errors != mark else None

    def sync(self, files: Sequence[FileRef], dirs: Sequence[DirRef]) -> _SyncErrors:
        devs: dict[int, tuple[list[int], list[str]]] = {}
        for fd, dev in files:
            devs.setdefault(dev, ([], []))[0].append(fd)
        for directory, dev in dirs:
            devs.setdefault(dev, ([], []))[1].append(directory)
        file_errors: dict[int, OSError] = {}
        dir_errors: dict[str, OSError] = {}
        for dev, (dev_fds, dev_dirs) in devs.items():
            cursor = self._cursors.get(dev)
            if cursor is None:  # not watched before the writes: the slow, exact way
                more_files, more_dirs = _fsync_round(
                    [(fd, dev) for fd in dev_fds], [(d, dev) for d in dev_dirs]
                )
                file_errors.update(more_files)
                dir_errors.update(more_dirs)
                continue
            try:
                self._counted_syncfs(cursor)
            except OSError as exc:
                file_errors.update(dict.fromkeys(dev_fds, exc))
                dir_errors.update(dict.fromkeys(dev_dirs, exc))
        return file_errors, dir_errors

    def _counted_syncfs(self, cursor: int) -> None:
        with self._lock:
            try:
                self._syncfs(cursor)
            except OSError as exc:
                self._last_error = exc
                self._errors += 1
                raise


def _close_all(cursors: dict[int, int]) -> None:
    for fd in cursors.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    cursors.clear()


def _kernel_reports_syncfs_errors(release: str) -> bool:
    """True for Linux >= 5.8, whose syncfs(2) returns writeback errors (not just 0)."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= SYNCFS_MIN_KERNEL


@cache
def load_syncfs() -> Callable[[int], None] | None:
    """libc's ``syncfs`` as a function raising ``OSError``, or None where unusable."""
    if not sys.platform.startswith("linux") or not _kernel_reports_syncfs_errors(
        os.uname().release
    ):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if func(fd) != 0:  # ctypes releases the GIL around the call
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs: {os.strerror(errno)}")

    return syncfs


def make_syncer(method: SyncMethod = "auto") -> Syncer:
    """The strategy for ``storage.sync``: ``auto`` is syncfs where usable, else fsync."""
    if method == "fsync":
        return FsyncSyncer()
    if load_syncfs() is None:
        if method == "syncfs":
            log.warning("storage.sync: syncfs is not usable here (needs Linux >= 5.8); using fsync")
        return FsyncSyncer()
    return SyncfsSyncer()


# --- writing files --------------------------------------------------------------------


@dataclass(slots=True)
class StagedFile:
    """A file written under a temporary name, still open, not yet synced or renamed."""

    fd: int
    tmp: str
    path: str
    dev: int


def stage_files(items: Sequence[tuple[str, bytes]]) -> list[StagedFile]:
    """Write each ``(path, data)`` to ``.<name>.tmp`` beside it; nothing synced yet.

    On an error every temp file made so far is closed and removed.
    """
    staged: list[StagedFile] = []
    try:
        for path, data in items:
            head, name = os.path.split(path)
            tmp = os.path.join(head, f".{name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            staged.append(StagedFile(fd, tmp, path, 0))
            write_all(fd, data)
            staged[-1].dev = os.fstat(fd).st_dev
    except BaseException:
        discard(staged)
        raise
    return staged


def close_all(staged: Sequence[StagedFile]) -> None:
    """Close the descriptors still open (synced or not, the temp files stay)."""
    for f in staged:
        if f.fd >= 0:
            os.close(f.fd)
            f.fd = -1


def discard(staged: Sequence[StagedFile]) -> None:
    """Close and remove the temp files: they were never stored."""
    close_all(staged)
    for f in staged:
        with contextlib.suppress(OSError):
            os.unlink(f.tmp)


def write_files(items: Sequence[tuple[str, bytes]], syncer: Syncer | None = None) -> None:
    """Write each file via a temp name, sync them all, then rename them into place.

    No file is renamed before all of them are on disk, so a crash leaves only temp
    files (``.<name>.tmp``), which readers ignore and recovery removes; if the sync
    fails they are removed and the error raised. The caller syncs the directories
    afterwards to make the renames durable. ``syncer`` defaults to per-file fsync.
    """
    syncer = syncer or _FSYNC
    mark = syncer.mark()
    staged = stage_files(items)
    try:
        errors = syncer.sync_files([(f.fd, f.dev) for f in staged], mark)
    except BaseException:
        discard(staged)
        raise
    if errors:
        discard(staged)
        raise next(iter(errors.values()))
    close_all(staged)
    for f in staged:
        os.replace(f.tmp, f.path)


def write_file(path: str | Path, data: bytes) -> None:
    """Write via a temp name, fsync, rename: the final name never holds a partial file."""
    write_files([(os.fspath(path), data)])


Request = TypeVar("Request")
Response = TypeVar("Response")
Carry = TypeVar("Carry")
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
        self._quiet = threading.Condition(self._lock)  # notified when nothing is left to do
        self._batch: list[_Waiter] = []
        self._running = False
        self._working = False  # a batch, or what one left, is being committed
        self._step: Callable[[list[Request], Any], tuple[Any, Any]] | None = None

    @classmethod
    def pipelined(
        cls,
        step: Callable[
            [list[Request], Carry | None], tuple[Sequence[Response] | None, Carry | None]
        ],
        name: str,
        idle: float | None = None,
    ) -> GroupCommitter[Request, Response]:
        """A committer whose commits overlap by one phase (see :meth:`_drain_pipelined`).

        ``step(requests, carried)`` runs in the commit thread. It commits ``requests``
        (possibly none) far enough to answer them and, in the same sync, finishes
        ``carried``, what the previous step left to do; it returns the responses for
        ``requests`` (None when there were none) and what the next step must finish
        (None when nothing is left). If ``step`` raises, its batch fails, and what it
        carried is dropped: a step must leave nothing it answered for in a state a
        crash could lose (Maildir keeps a journal for that).
        """

        def unused(requests: list[Request]) -> Sequence[Response]:
            raise AssertionError("a pipelined committer commits through its step")

        committer = cls(unused, name, idle)
        committer._step = step
        return committer

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

    def wait_quiet(self, timeout: float) -> bool:
        """Block until nothing is waiting or being committed; False on timeout."""
        with self._lock:
            return self._quiet.wait_for(lambda: not self._batch and not self._working, timeout)

    def _drain(self) -> None:
        if self._step is not None:
            self._drain_pipelined(self._step)
            return
        while True:
            with self._lock:
                if not self._batch:
                    self._working = False
                    self._quiet.notify_all()
                    self._more.wait(COMMIT_IDLE if self._idle is None else self._idle)
                batch, self._batch = self._batch, []
                if not batch:
                    self._running = False
                    return
                self._working = True
            outcome: Sequence[Any] | BaseException
            try:
                outcome = self._commit([request for request, _, _ in batch])
            except BaseException as exc:
                outcome = exc
            _answer(batch, outcome)

    def _drain_pipelined(self, step: Callable[[list[Request], Any], tuple[Any, Any]]) -> None:
        """Each round commits its own batch and finishes what the one before left.

        While work keeps coming, each round syncs once: this batch's data and the
        previous batch's names. When no new work is waiting, what the last batch
        left is finished by a round of its own at once.

        When it is answered: a batch of at most ``ANSWER_AT_ONCE`` callers (one
        client sending message after message) as soon as its round returns, before
        what it left is finished. A bigger batch (many clients at once) after the
        next round: that keeps those clients in step, so their next messages
        arrive together and share the next rounds (and the data stage's batches,
        ``mailflow.batching``); answering them earlier spread them out and cost
        more CPU per message than it saved.
        """
        carried: Any = None
        held: tuple[list[_Waiter], Any] | None = None  # answered after the next round
        while True:
            with self._lock:
                if not self._batch and carried is None:
                    self._working = False
                    self._quiet.notify_all()
                    self._more.wait(COMMIT_IDLE if self._idle is None else self._idle)
                batch, self._batch = self._batch, []
                if not batch and carried is None:
                    self._running = False
                    return
                self._working = True
            try:
                done, carried = step([request for request, _, _ in batch], carried)
            except BaseException as exc:
                carried = None
                if batch:
                    _answer(batch, exc)
                if not batch or held is not None:
                    log.error("%s: finishing a commit failed: %s", self._name, exc)
                done = None
            if held is not None:  # answered by its own round; what it left is done
                _answer(*held)
                held = None
            if done is None:
                continue
            if len(batch) <= ANSWER_AT_ONCE or carried is None:
                _answer(batch, done)
            else:
                held = (batch, done)


def _answer(waiters: list[_Waiter], outcome: Sequence[Any] | BaseException) -> None:
    """Resolve each waiter's future with its response (or everyone's exception),
    waking each event loop once, not once per caller."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
    for i, (_, future, loop) in enumerate(waiters):
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
