"""Local delivery into Maildir (and Maildir++ subfolders such as ``.Junk``).

Each copy is written to ``tmp/``, synced, renamed into ``new/`` and ``new/`` synced,
so a delivered message survives a crash (maildir(5) delivery protocol). How files and
directories are synced (one ``syncfs`` per file system, or ``fsync`` per file and
directory) is the :class:`~mailflow.delivery.durable.Syncer`'s business.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import time
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
# Where a copy goes: (its Maildir, the mailbox Maildir above it for a folder, else "").
_Target = tuple[str, str]
_TARGETS_MAX = 4096  # resolved (recipient, folder, mailbox) kept; then start afresh
# Results of a batch: per request, per copy, the delivered path or what stopped it.
_Results = list[list[Path | Exception]]
# new/ directories of a batch: path -> (st_dev, the (request, copy) renamed into it).
_NewDirs = dict[str, tuple[int, list[tuple[int, int]]]]
# A batch renamed into new/ whose names are not synced yet: its results, its new/
# directories, and the sync mark taken before it was written.
_Carried = tuple[_Results, _NewDirs, int]


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
        event loop is woken once per batch. The batches overlap by one phase
        (:meth:`_commit_step`): while more work keeps coming, the sync that makes
        one batch's ``new/`` entries durable also makes the next batch's data
        durable. The promise is the same: no result before the file and its
        ``new/`` directory are synced.
        """
        return await self._committer.submit((copies, data))

    def deliver_batch(self, requests: Sequence[_Request]) -> _Results:
        """Deliver several messages, each to its copies (blocking): one sync round.

        Every copy is written to ``tmp/``; their data is synced (one ``syncfs`` per
        file system, or concurrent fsyncs); only the copies that synced are renamed
        into ``new/``, and then the ``new/`` directories are synced. A crash before
        the renames leaves only files in ``tmp/``, which maildir readers ignore. A
        copy whose data sync failed is removed from ``tmp/`` and gets the error; a
        failed directory sync fails the copies renamed into it. Quotas count the
        copies of the same batch.

        These are the two phases of :meth:`_commit_step`, run one after the other.
        """
        if not requests:
            return []
        _, carried = self._commit_step(list(requests), None)
        results, _ = self._commit_step([], carried)
        assert results is not None  # the second phase finishes what the first carried
        return results

    def _commit_step(
        self, requests: list[_Request], carried: _Carried | None
    ) -> tuple[_Results | None, _Carried | None]:
        """One round of the pipelined group commit (see ``GroupCommitter.pipelined``).

        Writes ``requests``' copies to ``tmp/``; one sync round then covers their
        data and the ``new/`` entries of ``carried``, the batch renamed in the
        previous round, whose results are returned. The copies whose data synced
        are renamed into ``new/``; their results come with the next round.
        """
        mark = self._sync.mark()
        results, staged = self._stage(requests) if requests else ([], [])
        dirs, dirs_mark = (_dir_refs(carried[1]), carried[2]) if carried else ([], mark)
        try:
            file_errors, dir_errors = self._sync.sync_round(
                _file_refs(staged), mark, dirs, dirs_mark
            )
        finally:
            _close(staged)
        done = None
        if carried is not None:
            done, carried_dirs, _ = carried
            _fail_dirs(carried_dirs, dir_errors, done)
        if not requests:
            return done, None
        return done, (results, self._rename_all(staged, results, file_errors), mark)

    def _stage(self, requests: Sequence[_Request]) -> tuple[_Results, list[_Staged]]:
        """Write every copy to ``tmp/``; a copy that cannot be written gets its error.

        The commit thread holds the GIL while it runs Python code, so the per-copy
        work is kept small: targets are resolved once and remembered, paths are
        plain strings, and the file system comes from the Maildir's cache rather
        than an ``fstat`` per file.
        """
        results: _Results = [[] for _ in requests]
        staged: list[_Staged] = []
        pending: dict[str, int] = {}  # mailbox -> bytes staged in this batch (quota)
        quota = self.config.quota
        targets = self._targets
        try:
            for i, (copies, data) in enumerate(requests):
                tail = f".{_HOST},S={len(data)}"
                row = results[i]
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
            _close(staged)
            for staged_copy in staged:
                with contextlib.suppress(OSError):
                    os.unlink(staged_copy[3])
            raise
        return results, staged

    def _target(self, copy: tuple[str, str, str]) -> _Target:
        """Resolve and check where a copy goes (raises MailboxError); remembered."""
        recipient, folder, mailbox = copy
        base = os.fspath(self.folder_path(recipient, folder, mailbox))
        parent = os.fspath(self.mailbox_path(recipient, mailbox)) if folder else ""
        if len(self._targets) >= _TARGETS_MAX:
            self._targets.clear()
        self._targets[copy] = target = (base, parent)
        return target

    def _rename_all(
        self, staged: list[_Staged], results: _Results, errors: dict[int, OSError]
    ) -> _NewDirs:
        """Rename the synced copies into ``new/``; remove the others from ``tmp/``.

        ``errors`` are the failed data syncs, by descriptor (already closed: the
        numbers only identify the copies). Returns each ``new/`` directory with its
        file system and the copies renamed into it.
        """
        new_dirs: _NewDirs = {}
        for i, j, fd, tmp, final, new_dir, dev in staged:
            error = errors.get(fd) if errors else None
            if error is not None:  # not on disk for sure: not delivered (spooled or retried)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                results[i][j] = error
                continue
            try:
                self._rename(tmp, final)
            except OSError as exc:
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
        base, parent = target
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


def _close(staged: list[_Staged]) -> None:
    """Close the copies' descriptors (once; the numbers still name the copies' errors)."""
    for s in staged:
        os.close(s[2])


def _fail_dirs(
    new_dirs: _NewDirs,
    failed: dict[str, OSError],
    results: _Results,
) -> None:
    """The copies renamed into a directory whose sync failed are not delivered."""
    for new_dir, error in failed.items():  # the renames may not survive a crash
        for i, j in new_dirs[new_dir][1]:
            results[i][j] = error


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
