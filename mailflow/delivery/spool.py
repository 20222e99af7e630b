"""The durable on-disk spool: a message is synced here before the client sees 250.

Layout under ``queue.directory``::

    queue/<id>.eml    the message bytes as accepted (after filtering), never rewritten
    queue/<id>.json   envelope and per-recipient delivery state, replaced atomically

A message exists once its ``.json`` is in ``queue/`` (renamed after the ``.eml``).
Stores are group-committed: concurrent stores are batched, and each batch is synced
in two phases (the files' data, then the renames into ``queue/``) by the spool's
:class:`~mailflow.delivery.durable.Syncer` (``storage.sync``) before anyone is told
it is stored. State updates are rarer and come from several threads: they fsync
their one file and the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mailflow.config import SyncMethod
from mailflow.delivery.durable import (
    GroupCommitter,
    StagedFile,
    Syncer,
    close_all,
    discard,
    fsync_dir,
    make_syncer,
    stage_files,
    write_file,
)
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
    """Sortable, unique: 13 hex digits of microsecond time + 8 random hex digits.

    The random part only has to tell apart ids made in the same microsecond, so it
    comes from ``random`` (reseeded in every forked child) rather than the kernel:
    one ``getrandom`` system call less per message. Queue ids are not secrets.
    """
    return f"{int(time.time() * 1_000_000):013X}{random.getrandbits(32):08X}"


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


def _file_refs(staged: list[StagedFile]) -> list[tuple[int, int]]:
    return [(f.fd, f.dev) for f in staged]


_ENTRY_FIELDS = tuple(f.name for f in fields(QueueEntry))
_RECIPIENT_FIELDS = tuple(f.name for f in fields(RecipientState))


class Spool:
    """Durable message store with group commit."""

    def __init__(self, directory: Path, sync: SyncMethod | Syncer = "auto") -> None:
        self.root = Path(directory)
        self.queue_dir = self.root / "queue"
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self._dir = os.fspath(self.queue_dir)
        # storage.sync; a Syncer is used as given (tests inject failing ones).
        self._sync = sync if isinstance(sync, Syncer) else make_syncer(sync)
        self._sync.watch(self._dir)
        self._committer: GroupCommitter[tuple[QueueEntry, bytes], None] = GroupCommitter(
            self._commit_batch, "spool-commit"
        )

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
        """Store durably; returns only once message and metadata are synced.

        Concurrent callers are group-committed (:class:`GroupCommitter`): one thread
        writes every file of a batch, syncs their data, renames them into place,
        syncs the directory, and wakes the callers.
        """
        await self._committer.submit((entry, message))

    def _commit_batch(self, items: list[tuple[QueueEntry, bytes]]) -> list[None]:
        self._commit(items)
        return [None] * len(items)

    def _commit(self, items: list[tuple[QueueEntry, bytes]]) -> None:
        """Write, sync, rename, sync the directory (blocking); on any error nothing is stored."""
        mark = self._sync.mark()
        staged = stage_files(self._files(items))
        try:
            errors = self._sync.sync_files(_file_refs(staged), mark)
        finally:
            close_all(staged)
        self._publish(staged, errors)
        self._check_dir(staged, self._sync.sync_dirs(self._dir_refs(staged), mark))

    def _files(self, items: list[tuple[QueueEntry, bytes]]) -> list[tuple[str, bytes]]:
        """Every message file, then every metadata file: renamed in that order, so
        recover() after a crash finds no .json without its .eml (and drops the
        reverse)."""
        d = self._dir
        files = [(os.path.join(d, f"{e.id}.eml"), msg) for e, msg in items]
        files += [(os.path.join(d, f"{e.id}.json"), e.to_json()) for e, _ in items]
        return files

    def _dir_refs(self, staged: list[StagedFile]) -> list[tuple[str, int]]:
        return [(self._dir, staged[0].dev)] if staged else []

    @staticmethod
    def _publish(staged: list[StagedFile], errors: dict[int, OSError]) -> None:
        """Rename the synced temp files into place; if any sync failed, none of them."""
        if errors:
            discard(staged)
            raise next(iter(errors.values()))
        for f in staged:
            os.replace(f.tmp, f.path)

    @staticmethod
    def _check_dir(staged: list[StagedFile], failed: dict[str, OSError]) -> None:
        """If the directory sync failed, remove the renamed files again and raise.

        The callers are told it failed, so a later restart must not deliver them
        too; .json files go first, so no .json is ever left without its .eml.
        """
        if not failed:
            return
        for f in reversed(staged):
            with contextlib.suppress(OSError):
                os.unlink(f.path)
        raise next(iter(failed.values()))

    def update(self, entry: QueueEntry) -> None:
        """Persist new delivery state (atomic replace; file and directory fsync'd).

        One file, from several queue workers at once: an fsync of that file and of
        the directory costs less than a ``syncfs`` of the whole file system each.
        """
        write_file(self.meta_path(entry.id), entry.to_json())
        fsync_dir(self._dir)

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
