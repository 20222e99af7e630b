"""Local delivery into Maildir (and Maildir++ subfolders such as ``.Junk``).

Each copy is written to ``tmp/``, synced, renamed into ``new/`` and ``new/`` synced,
so a delivered message survives a crash (maildir(5) delivery protocol). How files and
directories are synced (one ``syncfs`` per file system, or ``fsync`` per file and
directory) is the :class:`~mailflow.delivery.durable.Syncer`'s business. A lone
message is answered once its data, its ``tmp/`` name and a journal record are synced
and it is renamed; the ``new/`` sync follows with the next round, and the journal
(:mod:`mailflow.delivery.journal`) stands for the copy until then.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import socket
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from mailflow.config import MaildirConfig, SyncMethod
from mailflow.delivery.durable import (
    DirRef,
    FileRef,
    GroupCommitter,
    Syncer,
    make_syncer,
    write_all,
)
from mailflow.delivery.journal import JOURNAL_DIR, Journal, Recovered, record_line
from mailflow.delivery.journal import recover as recover_journals

log = logging.getLogger("mailflow")

_counter = itertools.count()
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
_UNSAFE = re.compile(r"[^a-z0-9._+@=-]")
_FOLDER = re.compile(r"^\.[A-Za-z0-9_+-][A-Za-z0-9._+-]*$")
# The pid in file names, kept rather than asked for per copy (a system call, which
# the commit thread pays for with a GIL hand-off); a forked child takes its own.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


class QuotaExceeded(Exception):
    """The mailbox is over its configured quota."""


class MailboxError(Exception):
    """The mailbox name or folder is unusable."""


def safe_mailbox_name(recipient: str) -> str:
    """A file-system-safe, lower-case directory name for a recipient address.

    Path separators and other unsafe characters are replaced so no address can
    escape the Maildir root ("../../etc" becomes "_.._etc" -> "_.._etc").
    """
    name = _UNSAFE.sub("_", recipient.strip().lower())
    name = name.lstrip(".") or "_"
    return name[:255]


# (copies as (recipient, folder, mailbox), message bytes): one message's local delivery.
_Request = tuple[Sequence[tuple[str, str, str]], bytes]
# A copy written to tmp/, open, not yet synced: (request index, copy index, descriptor,
# name in tmp/, name in new/, the new/ directory, st_dev of its file system).
_Staged = tuple[int, int, int, str, str, str, int]
# Where a copy goes: (its Maildir, the mailbox Maildir above it for a folder, else "",
# its Maildir relative to the root, for the journal).
_Target = tuple[str, str, str]
_TARGETS_MAX = 4096  # resolved (recipient, folder, mailbox) kept; then start afresh
CLOSE_WAIT = 5.0  # seconds close() waits for commits under way
# Results of a batch: per request, per copy, the delivered path or what stopped it.
_Results = list[list[Path | Exception]]
# new/ directories of a batch: path -> (st_dev, the (request, copy) renamed into it).
_NewDirs = dict[str, tuple[int, list[tuple[int, int]]]]
# A batch answered and renamed into new/ whose names are not synced yet: its new/
# directories, the sync mark taken before it was written, and its journal slot.
_Carried = tuple[_NewDirs, int, FileRef]


class MaildirDelivery:
    def __init__(self, config: MaildirConfig, sync: SyncMethod | Syncer = "auto") -> None:
        self.config = config
        self.root = Path(config.root)
        # Maildirs known to have tmp/, new/ and cur/ -> st_dev of their file system.
        self._ready: dict[str, int] = {}
        # (recipient, folder, mailbox) -> its Maildir, checked: saves building paths per copy.
        self._targets: dict[tuple[str, str, str], _Target] = {}
        # storage.sync; a Syncer is used as given (tests inject failing ones).
        self._sync = sync if isinstance(sync, Syncer) else make_syncer(sync)
        # Copies answered before their new/ entries are synced (mailflow.delivery.journal).
        self._journal = Journal(self.root, self._sync)
        # Group commit for deliver_many_async: concurrent messages share sync rounds,
        # and under load one batch's name sync is the next batch's data sync.
        self._committer: GroupCommitter[_Request, list[Path | Exception]] = (
            GroupCommitter.pipelined(self._commit_step, "maildir-commit")
        )

    def mailbox_path(self, recipient: str, mailbox: str = "") -> Path:
        local, _, domain = recipient.rpartition("@")
        name = self.config.layout.format(
            recipient=safe_mailbox_name(recipient),
            local=safe_mailbox_name(local or recipient),
            domain=safe_mailbox_name(domain or "localhost"),
        )
        if mailbox:
            name = safe_mailbox_name(mailbox)
        return self.root / name

    def folder_path(self, recipient: str, folder: str = "", mailbox: str = "") -> Path:
        base = self.mailbox_path(recipient, mailbox)
        if not folder:
            return base
        if not _FOLDER.match(folder) or ".." in folder:
            raise MailboxError(f"invalid Maildir++ folder name {folder!r}")
        return base / folder

    def usage(self, recipient: str, mailbox: str = "") -> int:
        """Bytes stored in the mailbox (all folders), from the S= size in file names."""
        total = 0
        base = self.mailbox_path(recipient, mailbox)
        dirs = [base] + [p for p in base.glob(".*") if p.is_dir()] if base.exists() else []
        for d in dirs:
            for sub in ("new", "cur"):
                try:
                    with os.scandir(d / sub) as it:
                        for e in it:
                            total += _size_from_name(e.name, e)
                except FileNotFoundError:
                    continue
        return total

    def check_quota(self, recipient: str, size: int, mailbox: str = "") -> None:
        quota = self.config.quota
        if quota is not None and self.usage(recipient, mailbox) + size > quota:
            raise QuotaExceeded(f"mailbox of {recipient} is over its quota of {quota} bytes")

    def deliver(self, recipient: str, data: bytes, folder: str = "", mailbox: str = "") -> Path:
        """Deliver one copy (blocking: call via ``asyncio.to_thread``). Returns the new path.

        maildir(5): write to ``tmp/``, sync, rename into ``new/``, sync ``new/``;
        only then is the copy reported delivered.
        """
        [result] = self.deliver_many([(recipient, folder, mailbox)], data)
        if isinstance(result, BaseException):
            raise result
        return result

    def deliver_many(
        self, copies: Sequence[tuple[str, str, str]], data: bytes
    ) -> list[Path | Exception]:
        """Deliver one message to several mailboxes in one call (blocking; one thread hop).

        ``copies`` are ``(recipient, folder, mailbox)``. Each file is written to
        ``tmp/``, synced and renamed into ``new/``; then every ``new/`` directory
        involved is synced, and only then does this return. The result for a
        copy is its path, or the exception that stopped it (quota, bad folder name,
        I/O error); one failed copy does not stop the others.
        """
        return self.deliver_batch([(copies, data)])[0]

    async def deliver_many_async(
        self, copies: Sequence[tuple[str, str, str]], data: bytes
    ) -> list[Path | Exception]:
        """:meth:`deliver_many` from the event loop, with group commit.

        Calls made while the commit thread is busy are delivered together, and each
        event loop is woken once per batch. A batch's first sync round
        (:meth:`_commit_step`) makes its data, ``tmp/`` names and journal records
        durable, and its copies are renamed into ``new/``; the next round, which
        under load is also the next batch's first, makes those ``new/`` entries
        durable. A lone message is answered after the first round (a crash before
        the second is mended from the journal at the next start, :meth:`recover`),
        a bigger batch after the second (``GroupCommitter._drain_pipelined``).
        """
        return await self._committer.submit((copies, data))

    def deliver_batch(self, requests: Sequence[_Request]) -> _Results:
        """Deliver several messages, each to its copies (blocking): two sync rounds.

        Every copy is written to ``tmp/`` and recorded in the journal; one sync round
        covers their data, their ``tmp/`` names and the records (one ``syncfs`` per
        file system, or concurrent fsyncs); only the copies that synced are renamed
        into ``new/``, and a second round syncs the ``new/`` directories. A crash
        before the renames leaves only files in ``tmp/``, which maildir readers ignore
        (and :meth:`recover` finishes when they were answered). A copy whose sync
        failed is removed from ``tmp/`` and gets the error. Quotas count the copies of
        the same batch.

        These are the rounds of :meth:`_commit_step`, run one after the other.
        """
        if not requests:
            return []
        results, carried = self._commit_step(list(requests), None)
        if carried is not None:
            self._commit_step([], carried)
        assert results is not None  # a step with requests answers them
        return results

    def recover(self) -> Recovered:
        """Finish what a crash interrupted: replay the journals of processes that are gone.

        Called at start-up, before anything is delivered (``mailflow serve``).
        """
        try:
            done = recover_journals(self.root)
        except OSError as exc:
            where = self.root / JOURNAL_DIR
            raise RuntimeError(f"cannot replay the Maildir journal {where}: {exc}") from exc
        if done.journals:
            log.info(
                "maildir: replayed %d journal(s) under %s: %d cop%s renamed into new/, "
                "%d unfinished removed from tmp/",
                done.journals,
                self.root,
                done.renamed,
                "y" if done.renamed == 1 else "ies",
                done.dropped,
            )
        return done

    def close(self, timeout: float = CLOSE_WAIT) -> None:
        """At shutdown: let the last names be synced, then remove the empty journal slots.

        A slot still in use after ``timeout`` seconds stays on disk for :meth:`recover`.
        """
        self._committer.wait_quiet(timeout)
        self._journal.close()

    def _commit_step(
        self, requests: list[_Request], carried: _Carried | None
    ) -> tuple[_Results | None, _Carried | None]:
        """One round of the pipelined group commit (see ``GroupCommitter.pipelined``).

        Writes ``requests``' copies to ``tmp/`` and their journal records. One sync
        round then covers their data, ``tmp/`` names and records, and the ``new/``
        entries of ``carried``, the batch the previous round renamed (whose journal
        slot it frees). The copies that synced are renamed into ``new/`` and their
        results returned; their names are left for the next round to sync.
        """
        mark = self._sync.mark()
        results, staged, records = self._stage(requests) if requests else ([], [], [])
        files = _file_refs(staged)
        slot: FileRef | None = None
        failed_all: OSError | None = None  # the journal could not vouch for this batch
        try:
            if staged:
                try:
                    slot = self._journal.write(records)
                    files.append(slot)
                except OSError as exc:
                    failed_all = exc
            # A copy is found again by its tmp/ name: that entry is synced with its data.
            dirs = _tmp_dir_refs(staged)
            if carried is not None:
                dirs += _dir_refs(carried[0])
            file_errors, dir_errors = self._sync.sync_round(
                files, mark, dirs, carried[1] if carried else mark
            )
        except BaseException:
            _discard(staged)
            raise
        _close(staged)
        if carried is not None:
            self._settle(carried, dir_errors)
        if not requests:
            return None, None
        if slot is not None:
            failed_all = file_errors.get(slot[0])
        new_dirs = self._rename_all(staged, results, file_errors, dir_errors, failed_all)
        if slot is None:
            return results, None
        if not new_dirs:  # nothing renamed: nothing for the slot to stand for
            self._journal.release(*slot)
            return results, None
        return results, (new_dirs, mark, slot)

    def _settle(self, carried: _Carried, dir_errors: dict[str, OSError]) -> None:
        """After the round that synced a batch's ``new/`` entries: free its journal slot.

        If that sync failed, the copies were answered already and their renames may
        not survive a crash: the slot is kept on disk for the next start to replay.
        """
        new_dirs, _, (fd, dev) = carried
        failed = [d for d in new_dirs if d in dir_errors]
        if not failed:
            self._journal.release(fd, dev)
            return
        log.error(
            "maildir: syncing %s failed (%s); its journal is kept for the next start",
            ", ".join(failed),
            dir_errors[failed[0]],
        )
        self._journal.abandon(fd)

    def _stage(self, requests: Sequence[_Request]) -> tuple[_Results, list[_Staged], list[str]]:
        """Write every copy to ``tmp/``; a copy that cannot be written gets its error.

        Returns the results so far, the staged copies and their journal records.
        The commit thread holds the GIL while it runs Python code, so the per-copy
        work is kept small: targets are resolved once and remembered, paths are
        plain strings, and the file system comes from the Maildir's cache rather
        than an ``fstat`` per file.
        """
        results: _Results = [[] for _ in requests]
        staged: list[_Staged] = []
        records: list[str] = []
        pending: dict[str, int] = {}  # mailbox -> bytes staged in this batch (quota)
        quota = self.config.quota
        targets = self._targets
        try:
            for i, (copies, data) in enumerate(requests):
                tail = f".{_HOST},S={len(data)}"
                row = results[i]
                data_crc = -1
                for copy in copies:
                    try:
                        target = targets.get(copy) or self._target(copy)
                        if quota is not None:
                            recipient, _, mailbox = copy
                            key = os.fspath(self.mailbox_path(recipient, mailbox))
                            self.check_quota(recipient, len(data) + pending.get(key, 0), mailbox)
                        now = time.time()
                        # Microseconds zero-padded: names of the same second sort in time order.
                        unique = (
                            f"{int(now)}.M{int((now % 1) * 1_000_000):06d}P{_pid}"
                            f"Q{next(_counter)}{tail}"
                        )
                        fd, base, dev = self._write_tmp(target, unique, data)
                    except (QuotaExceeded, MailboxError, OSError) as exc:
                        row.append(exc)
                        continue
                    if quota is not None:
                        pending[key] = pending.get(key, 0) + len(data)
                    if data_crc < 0:
                        data_crc = zlib.crc32(data)
                    records.append(record_line(target[2], unique, len(data), data_crc))
                    new_dir = base + "/new"
                    staged.append(
                        (
                            i,
                            len(row),
                            fd,
                            f"{base}/tmp/{unique}",
                            f"{new_dir}/{unique}",
                            new_dir,
                            dev,
                        )
                    )
                    row.append(_STAGED)
        except BaseException:
            _discard(staged)
            raise
        return results, staged, records

    def _target(self, copy: tuple[str, str, str]) -> _Target:
        """Resolve and check where a copy goes (raises MailboxError); remembered."""
        recipient, folder, mailbox = copy
        base = os.fspath(self.folder_path(recipient, folder, mailbox))
        parent = os.fspath(self.mailbox_path(recipient, mailbox)) if folder else ""
        if len(self._targets) >= _TARGETS_MAX:
            self._targets.clear()
        # Relative to the root for the journal (once per target: targets are remembered).
        self._targets[copy] = target = (base, parent, os.path.relpath(base, self.root))
        return target

    def _rename_all(
        self,
        staged: list[_Staged],
        results: _Results,
        errors: dict[int, OSError],
        dir_errors: dict[str, OSError],
        failed_all: OSError | None,
    ) -> _NewDirs:
        """Rename the synced copies into ``new/``; remove the others from ``tmp/``.

        A copy did not sync when ``failed_all`` is set (its journal record), when its
        descriptor is in ``errors`` (its data; the descriptors are closed already,
        the numbers only identify the copies) or its ``tmp/`` directory is in
        ``dir_errors``. Returns each ``new/`` directory with its file system and the
        copies renamed into it.
        """
        new_dirs: _NewDirs = {}
        for i, j, fd, tmp, final, new_dir, dev in staged:
            error = failed_all
            if error is None and errors:
                error = errors.get(fd)
            if error is None and dir_errors:
                error = dir_errors.get(new_dir[:-3] + "tmp")
            if error is not None:  # not on disk for sure: not delivered (spooled or retried)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                results[i][j] = error
                continue
            try:
                self._rename(tmp, final)
            except OSError as exc:  # not delivered: not to be found again by recovery
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                results[i][j] = exc
                continue
            entry = new_dirs.get(new_dir)
            if entry is None:
                new_dirs[new_dir] = entry = (dev, [])
            entry[1].append((i, j))
            results[i][j] = Path(final)
        return new_dirs

    def _write_tmp(self, target: _Target, unique: str, data: bytes) -> tuple[int, str, int]:
        """Write one copy to ``tmp/unique`` (open, not yet synced): (fd, Maildir, st_dev)."""
        base, parent, _ = target
        dev = self._ready.get(base)
        if dev is None:
            if parent:
                self._ensure(parent)
            dev = self._ensure(base)
        tmp = f"{base}/tmp/{unique}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:  # removed since we last looked: create it again
            self._ready.pop(base, None)
            if parent:
                self._ready.pop(parent, None)
                self._ensure(parent)
            dev = self._ensure(base)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, data)
            # The file system the file is really on (one fstat, ~1 us): a Maildir
            # mounted elsewhere since it was remembered must not be synced as the
            # old one (an unknown file system gets an fsync of its own).
            dev = os.fstat(fd).st_dev
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd, base, dev

    def _rename(self, tmp: str, final: str) -> None:
        try:
            os.rename(tmp, final)
        except FileNotFoundError:  # new/ vanished under us: recreate it, try once more
            base = os.path.dirname(os.path.dirname(final))
            self._ready.pop(base, None)
            self._ensure(Path(base))
            os.rename(tmp, final)

    def _ensure(self, path: str | Path) -> int:
        """Create tmp/new/cur the first time this process sees ``path``; its st_dev.

        Remembering the Maildirs already made saves three mkdir calls per delivery.
        """
        key = os.fspath(path)
        dev = self._ready.get(key)
        if dev is None:
            ensure_maildir(Path(key))
            dev = self._sync.watch(os.path.join(key, "tmp"))
            self._ready[key] = dev
        return dev


_STAGED = OSError("staged, not yet renamed")  # placeholder between staging and renaming


def _file_refs(staged: list[_Staged]) -> list[FileRef]:
    return [(s[2], s[6]) for s in staged]


def _dir_refs(new_dirs: _NewDirs) -> list[DirRef]:
    return [(d, dev) for d, (dev, _) in new_dirs.items()]


def _tmp_dir_refs(staged: list[_Staged]) -> list[DirRef]:
    return list({s[5][:-3] + "tmp": s[6] for s in staged}.items())


def _close(staged: list[_Staged]) -> None:
    """Close the copies' descriptors (once; the numbers still name the copies' errors)."""
    for s in staged:
        os.close(s[2])


def _discard(staged: list[_Staged]) -> None:
    """Close the copies and remove them from ``tmp/``: they were never delivered."""
    _close(staged)
    for s in staged:
        with contextlib.suppress(OSError):
            os.unlink(s[3])


def ensure_maildir(path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)


def _size_from_name(name: str, entry: os.DirEntry[str]) -> int:
    marker = name.find(",S=")
    if marker >= 0:
        digits = ""
        for ch in name[marker + 3 :]:
            if not ch.isdigit():
                break
            digits += ch
        if digits:
            return int(digits)
    try:
        return entry.stat().st_size
    except OSError:
        return 0
