"""The durable on-disk spool: a message is fsync'd here before the client sees 250.

Layout under ``queue.directory``::

    queue/<id>.eml    the message bytes as accepted (after filtering), never rewritten
    queue/<id>.json   envelope and per-recipient delivery state, replaced atomically

A message exists once its ``.json`` is in ``queue/`` (written after the ``.eml``).
Writes are group-committed: concurrent stores are batched so one directory fsync
covers all files of the batch, while each file still gets its own fsync before
anyone is told it is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mailflow.verdict import Route, RouteKind

PENDING = "pending"
DELIVERED = "delivered"
BOUNCED = "bounced"
EXPIRED = "expired"
DISCARDED = "discarded"
FINAL_STATES = {DELIVERED, BOUNCED, EXPIRED, DISCARDED}


_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")


class BadQueueId(ValueError):
    """A queue id that is not one we could have made (e.g. '../x' from the CLI)."""


def check_queue_id(queue_id: str) -> str:
    """Return ``queue_id`` if it is a plain id; never let one name a path outside the spool."""
    if not _QUEUE_ID.fullmatch(queue_id):
        raise BadQueueId(f"not a queue id: {queue_id!r}")
    return queue_id


def new_queue_id() -> str:
    """Sortable, unique: 12 hex digits of microsecond time + 8 random hex digits."""
    return f"{int(time.time() * 1_000_000):013X}{secrets.token_hex(4).upper()}"


@dataclass(slots=True)
class RecipientState:
    address: str
    route: dict[str, str]
    status: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    final_code: int = 0  # SMTP code of the final answer (for DSN Status/Diagnostic-Code)

    @property
    def route_obj(self) -> Route:
        r = self.route
        return Route(
            RouteKind(r["kind"]), r.get("target", ""), r.get("folder", ""), r.get("mailbox", "")
        )


@dataclass(slots=True)
class QueueEntry:
    id: str
    sender: str
    recipients: list[RecipientState]
    created: float
    size: int = 0
    client_ip: str = ""
    helo: str = ""
    is_bounce: bool = False  # a DSN we generated: never bounce a bounce
    extra: dict[str, Any] = field(default_factory=dict)

    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status == PENDING]

    @property
    def done(self) -> bool:
        return not self.pending()

    @property
    def next_attempt(self) -> float:
        times = [r.next_attempt for r in self.pending()]
        return min(times) if times else float("inf")

    def to_json(self) -> bytes:
        # What dataclasses.asdict gives, without its deep copies (4x faster; this runs
        # for every message stored and every state update).
        obj = {name: getattr(self, name) for name in _ENTRY_FIELDS}
        obj["recipients"] = [
            {name: getattr(r, name) for name in _RECIPIENT_FIELDS} for r in self.recipients
        ]
        return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> QueueEntry:
        obj = json.loads(data)
        obj["recipients"] = [RecipientState(**r) for r in obj["recipients"]]
        return cls(**obj)


COMMIT_IDLE = 1.0  # seconds the commit thread waits for more work before it exits
FSYNC_PARALLEL = 8  # files fsync'd at once: concurrent fsyncs share journal commits

_fsync_pool: ThreadPoolExecutor | None = None
_fsync_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One small fsync pool per process, shared by every spool."""
    global _fsync_pool
    with _fsync_pool_lock:
        if _fsync_pool is None:
            _fsync_pool = ThreadPoolExecutor(FSYNC_PARALLEL, thread_name_prefix="spool-fsync")
        return _fsync_pool


_ENTRY_FIELDS = tuple(f.name for f in fields(QueueEntry))
_RECIPIENT_FIELDS = tuple(f.name for f in fields(RecipientState))


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_file(path: str | Path, data: bytes) -> None:
    """Write via a temp name, fsync, rename: the final name never holds a partial file."""
    _write_files([(os.fspath(path), data)])


def _write_files(items: list[tuple[str, bytes]]) -> None:
    """Write each file via a temp name, fsync every one, then rename them into place.

    The fsyncs of a batch run concurrently (the file system folds them into fewer
    journal commits); no file is renamed before all of them are on disk, so a crash
    leaves only temp files, which :meth:`Spool.recover` removes. The caller fsyncs
    the directory afterwards to make the renames durable.
    """
    opened: list[tuple[int, str, str]] = []
    try:
        for path, data in items:
            head, name = os.path.split(path)
            tmp = os.path.join(head, f".{name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            opened.append((fd, tmp, path))
            _write_all(fd, data)
        _fsync_all([fd for fd, _, _ in opened])
    finally:
        for fd, _, _ in opened:
            os.close(fd)
    for _, tmp, path in opened:
        os.replace(tmp, path)


def _fsync_each(fds: list[int]) -> None:
    for fd in fds:
        os.fsync(fd)


def _fsync_all(fds: list[int]) -> None:
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


_Waiter = tuple[QueueEntry, bytes, asyncio.Future[None], asyncio.AbstractEventLoop]


class Spool:
    """Durable message store with group commit."""

    def __init__(self, directory: Path) -> None:
        self.root = Path(directory)
        self.queue_dir = self.root / "queue"
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self._dir = os.fspath(self.queue_dir)
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._batch: list[_Waiter] = []
        self._committing = False

    # --- paths ----------------------------------------------------------------------------

    def message_path(self, queue_id: str) -> Path:
        return self.queue_dir / f"{check_queue_id(queue_id)}.eml"

    def meta_path(self, queue_id: str) -> Path:
        return self.queue_dir / f"{check_queue_id(queue_id)}.json"

    # --- writing --------------------------------------------------------------------------

    def store_sync(self, entry: QueueEntry, message: bytes) -> None:
        """Store one message durably (blocking)."""
        self._commit([(entry, message)])

    async def store(self, entry: QueueEntry, message: bytes) -> None:
        """Store durably; returns only once message and metadata are fsync'd.

        Concurrent callers are batched: one long-lived commit thread takes
        everything that queued up while it was busy, fsyncs every file of the
        batch, then fsyncs the directory once and wakes all their callers.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._batch.append((entry, message, future, loop))
            if self._committing:
                self._more.notify()
            else:
                self._committing = True
                threading.Thread(target=self._drain, name="spool-commit", daemon=True).start()
        await future

    def _drain(self) -> None:
        """The commit thread: runs while there is work, exits after ``COMMIT_IDLE``."""
        while True:
            with self._lock:
                if not self._batch:
                    self._more.wait(COMMIT_IDLE)
                batch, self._batch = self._batch, []
                if not batch:
                    self._committing = False
                    return
            error: BaseException | None = None
            try:
                self._commit([(entry, msg) for entry, msg, _, _ in batch])
            except BaseException as exc:
                error = exc
            # One wake-up per event loop per batch, not one per message.
            by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
            for _, _, future, loop in batch:
                by_loop.setdefault(loop, []).append(future)
            for loop, futures in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_resolve_all, futures, error)

    def _commit(self, items: list[tuple[QueueEntry, bytes]]) -> None:
        d = self._dir
        # One round of fsyncs for the whole batch. Renames go messages first, and
        # recover() drops a .json without its .eml (and vice versa) after a crash.
        files = [(os.path.join(d, f"{e.id}.eml"), msg) for e, msg in items]
        files += [(os.path.join(d, f"{e.id}.json"), e.to_json()) for e, _ in items]
        _write_files(files)
        _fsync_dir(d)

    def update(self, entry: QueueEntry) -> None:
        """Persist new delivery state (atomic replace; file and directory fsync'd)."""
        _write_file(self.meta_path(entry.id), entry.to_json())
        _fsync_dir(self._dir)

    def remove(self, queue_id: str) -> None:
        for path in (self.meta_path(queue_id), self.message_path(queue_id)):
            path.unlink(missing_ok=True)

    # --- reading --------------------------------------------------------------------------

    def read_message(self, queue_id: str) -> bytes:
        return self.message_path(queue_id).read_bytes()

    def load(self, queue_id: str) -> QueueEntry:
        return QueueEntry.from_json(self.meta_path(queue_id).read_bytes())

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.queue_dir.glob("*.json") if not p.name.startswith("."))

    def entries(self) -> Iterator[QueueEntry]:
        for queue_id in self.ids():
            try:
                yield self.load(queue_id)
            except (OSError, ValueError, TypeError, KeyError):
                continue

    def recover(self) -> list[QueueEntry]:
        """After a crash: drop half-written files, return every stored entry.

        An ``.eml`` without ``.json`` was never acknowledged (the metadata is written
        second), so it is removed; temp files likewise.
        """
        for tmp in self.queue_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        metas = {p.stem for p in self.queue_dir.glob("*.json")}
        for eml in self.queue_dir.glob("*.eml"):
            if eml.stem not in metas:
                eml.unlink(missing_ok=True)
        entries = []
        for queue_id in sorted(metas):
            if not self.message_path(queue_id).exists():
                self.meta_path(queue_id).unlink(missing_ok=True)
                continue
            try:
                entries.append(self.load(queue_id))
            except (OSError, ValueError, TypeError, KeyError):
                # Corrupt metadata: keep the files for the admin, do not deliver blindly.
                os.replace(
                    self.meta_path(queue_id), self.meta_path(queue_id).with_suffix(".corrupt")
                )
        return entries


def _resolve_all(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():  # the caller was cancelled
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
