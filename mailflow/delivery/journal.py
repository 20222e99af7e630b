"""The Maildir delivery journal: copies answered before their ``new/`` entry is synced.

Maildir delivery (:mod:`mailflow.delivery.maildir`) can answer a copy once three
things are durable after one sync round: its data, written to ``tmp/<name>``; that
name in ``tmp/``; and a journal record naming it. The copy is then renamed into
``new/`` and answered (a lone message; bigger batches wait for the next round), and
the sync that makes the ``new/`` entry durable is the next round's (or, when
nothing else is waiting, a round of its own after the answer). If the
machine goes down in between, :func:`recover` replays the journal at the next start:
a file still in ``tmp/`` whose size and CRC-32 match its record is renamed into
``new/`` again.

Files, one per slot: ``<root>/.mailflow-journal/<owner>.<n>``, where ``<owner>``
names the process. A slot holds the records of one batch until the round that
synced its ``new/`` entries, then is truncated and reused. Its owner keeps an
exclusive ``flock`` on it, so :func:`recover` (in another process, or in this one
for another :class:`~mailflow.delivery.maildir.MaildirDelivery`) replays only the
journals of processes that are gone. A slot whose name sync failed is abandoned:
closed and left on disk for the next start to replay.

Record: one line per copy, ``<crc32 of the rest, 8 hex> <JSON list>``, the list
being ``[maildir, name, size, crc32 of the data]`` with ``maildir`` relative to the
root; a line ``-`` ends a slot's current records. A line torn by a crash fails its
own check and is skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import socket
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mailflow.delivery.durable import FileRef, Syncer, fsync_dir

log = logging.getLogger("mailflow")

JOURNAL_DIR = ".mailflow-journal"  # under the Maildir root; no mailbox name starts with "."
END = "-\n"  # the line after a slot's current records
_serials = itertools.count()  # Journal instances of this process


def record_line(maildir: str, name: str, size: int, data_crc: int) -> str:
    """One journal line for a copy (``maildir`` relative to the root)."""
    payload = json.dumps([maildir, name, size, data_crc], separators=(",", ":"))
    return f"{zlib.crc32(payload.encode()):08x} {payload}\n"


def parse_line(line: bytes) -> tuple[str, str, int, int] | None:
    """A record from one line, or None when the line is torn or not a record."""
    check, _, payload = line.rstrip(b"\n").partition(b" ")
    try:
        if int(check, 16) != zlib.crc32(payload):
            return None
        maildir, name, size, data_crc = json.loads(payload)
    except (ValueError, TypeError):
        return None
    if not all(isinstance(x, str) for x in (maildir, name)):
        return None
    if not all(isinstance(x, int) for x in (size, data_crc)):
        return None
    if "/" in name or name in ("", ".", "..") or os.path.isabs(maildir):
        return None
    if ".." in Path(maildir).parts:
        return None
    return maildir, name, size, data_crc


class Journal:
    """The slots of one :class:`~mailflow.delivery.maildir.MaildirDelivery` (thread-safe).

    :meth:`write` puts a batch's records into a free slot and returns its descriptor
    for the sync round; :meth:`release` frees the slot once the batch's ``new/``
    entries are synced; :meth:`abandon` leaves it for :func:`recover` instead.
    """

    def __init__(self, root: Path, syncer: Syncer) -> None:
        self.directory = root / JOURNAL_DIR
        self._syncer = syncer
        serial = next(_serials)
        host = socket.gethostname().replace("/", "_").replace(".", "_")
        self._owner = f"{host}-{os.getpid()}-{serial}"
        self._created = 0
        self._free: list[tuple[int, int]] = []  # (descriptor, st_dev) of empty slots
        self._paths: dict[int, Path] = {}  # every open slot: descriptor -> its file
        self._lock = threading.Lock()

    def write(self, lines: Iterable[str]) -> FileRef:
        """Write records into a free slot; (descriptor, st_dev).

        The records are written from the start of the slot, over its last batch,
        and end with the ``END`` line: no blocks are freed or allocated, so the sync
        writes a data block and the inode. Whatever follows ``END`` is stale. The
        records are durable once a sync round covering this descriptor returns
        without an error for it.
        """
        with self._lock:
            fd, dev = self._free.pop() if self._free else self._new_slot()
        data = memoryview(("".join(lines) + END).encode())
        try:
            offset = 0
            while offset < len(data):
                offset += os.pwrite(fd, data[offset:], offset)
        except BaseException:
            self.abandon(fd)
            raise
        return fd, dev

    def release(self, fd: int, dev: int) -> None:
        """The batch in this slot has its ``new/`` entries synced: the slot is free."""
        with self._lock:
            if fd in self._paths:
                self._free.append((fd, dev))

    def abandon(self, fd: int) -> None:
        """Keep this slot's records for :func:`recover`: close it (the lock goes with it)."""
        with self._lock:
            if self._paths.pop(fd, None) is None:
                return
        with contextlib.suppress(OSError):
            os.close(fd)

    def close(self) -> None:
        """Remove the free slots (nothing in them to replay) and close every slot.

        A slot still holding a batch whose names were not synced stays on disk for
        :func:`recover`.
        """
        with self._lock:
            for fd, _ in self._free:
                with contextlib.suppress(OSError):
                    os.unlink(self._paths[fd])
            for fd in self._paths:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._paths.clear()
            self._free.clear()

    def _new_slot(self) -> tuple[int, int]:
        """Create a slot file, locked, with its name durable before it is relied on."""
        made = not self.directory.is_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        if made:
            fsync_dir(self.directory.parent)
        path = self.directory / f"{self._owner}.{self._created}"
        self._created += 1
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fsync_dir(self.directory)
            dev = self._syncer.watch(os.fspath(self.directory))
        except BaseException:
            os.close(fd)
            raise
        self._paths[fd] = path
        return fd, dev


@dataclass
class Recovered:
    """What :func:`recover` did."""

    journals: int = 0  # journal files replayed (and removed)
    renamed: int = 0  # copies found complete in tmp/ and renamed into new/ again
    dropped: int = 0  # copies in tmp/ whose data did not match (never answered): removed


def recover(root: Path) -> Recovered:
    """Replay the journals left by processes that are gone (see the module docstring).

    Each record is settled: already in ``new/`` (or taken by a reader since), nothing
    to do; in ``tmp/`` with the recorded size and CRC-32, renamed into ``new/``;
    in ``tmp/`` and different, removed (its round never finished, so nobody was told
    it was delivered). The ``new/`` directories touched are synced before a
    journal is removed.
    """
    done = Recovered()
    directory = root / JOURNAL_DIR
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return done
    for journal_name in names:
        path = directory / journal_name
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive and owns it
            lines = path.read_bytes().splitlines(keepends=True)
            touched: set[str] = set()
            settled = True
            for line in lines:
                if line == END.encode():
                    break  # the rest is an earlier batch's, already settled
                record = parse_line(line)
                if record is not None:
                    settled = _settle(root, record, touched, done) and settled
            for new_dir in sorted(touched):
                fsync_dir(new_dir)
            if not settled:  # kept, to be replayed again at the next start
                log.error("maildir journal: %s kept: not every copy in it could be settled", path)
                continue
            os.unlink(path)
            done.journals += 1
        finally:
            os.close(fd)
    if done.journals:
        fsync_dir(directory)
    return done


def _settle(
    root: Path, record: tuple[str, str, int, int], touched: set[str], done: Recovered
) -> bool:
    """Settle one record (see :func:`recover`); False when an error left it unsettled."""
    maildir, name, size, data_crc = record
    base = root / maildir
    tmp, final = base / "tmp" / name, base / "new" / name
    try:
        if final.exists() or not tmp.exists():
            return True
        data = tmp.read_bytes()
        if len(data) != size or zlib.crc32(data) != data_crc:
            tmp.unlink()
            done.dropped += 1
            return True
        final.parent.mkdir(exist_ok=True)
        os.rename(tmp, final)
    except OSError as exc:
        log.error("maildir journal: cannot settle %s: %s", tmp, exc)
        return False
    touched.add(os.fspath(final.parent))
    done.renamed += 1
    return True
