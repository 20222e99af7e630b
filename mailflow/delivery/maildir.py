"""Local delivery into Maildir (and Maildir++ subfolders such as ``.Junk``).

Each copy is written to ``tmp/``, fsync'd, renamed into ``new/`` and the directory
fsync'd, so a delivered message survives a crash (maildir(5) delivery protocol).
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

from mailflow.config import MaildirConfig
from mailflow.delivery.durable import GroupCommitter, fsync_all, fsync_dir

_counter = itertools.count()
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
_UNSAFE = re.compile(r"[^a-z0-9._+@=-]")
_FOLDER = re.compile(r"^\.[A-Za-z0-9_+-][A-Za-z0-9._+-]*$")


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


class MaildirDelivery:
    def __init__(self, config: MaildirConfig) -> None:
        self.config = config
        self.root = Path(config.root)
        self._ready: set[str] = set()  # Maildirs known to have tmp/, new/ and cur/
        # Group commit for deliver_many_async: concurrent messages share one fsync round.
        self._committer: GroupCommitter[_Request, list[Path | Exception]] = GroupCommitter(
            self.deliver_batch, "maildir-commit"
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

        maildir(5): write to ``tmp/``, fsync, rename into ``new/``, fsync ``new/``;
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
        ``tmp/``, fsync'd and renamed into ``new/``; then every ``new/`` directory
        involved is fsync'd once, and only then does this return. The result for a
        copy is its path, or the exception that stopped it (quota, bad folder name,
        I/O error); one failed copy does not stop the others.
        """
        return self.deliver_batch([(copies, data)])[0]

    async def deliver_many_async(
        self, copies: Sequence[tuple[str, str, str]], data: bytes
    ) -> list[Path | Exception]:
        """:meth:`deliver_many` from the event loop, with group commit.

        Calls made while the commit thread is busy are delivered together by
        :meth:`deliver_batch`: their files are fsync'd in one concurrent round and
        each ``new/`` directory once per batch, and each event loop is woken once
        per batch. The promise is the same: no result before the file and its
        ``new/`` directory are fsync'd.
        """
        return await self._committer.submit((copies, data))

    def deliver_batch(
        self, requests: Sequence[tuple[Sequence[tuple[str, str, str]], bytes]]
    ) -> list[list[Path | Exception]]:
        """Deliver several messages, each to its copies (blocking): one fsync round.

        Every copy is written to ``tmp/``; all are fsync'd (concurrently, so the
        file system can fold them into fewer journal commits); only then are they
        renamed into ``new/``, and each ``new/`` directory is fsync'd once. A crash
        before the renames leaves only files in ``tmp/``, which maildir readers
        ignore. Quotas count the copies of the same batch.
        """
        results: list[list[Path | Exception]] = [[] for _ in requests]
        staged: list[tuple[int, int, int, str, str, str]] = []  # req, copy, fd, tmp, final, target
        pending: dict[str, int] = {}  # mailbox -> bytes staged in this batch (quota)
        try:
            for i, (copies, data) in enumerate(requests):
                for recipient, folder, mailbox in copies:
                    try:
                        key = os.fspath(self.mailbox_path(recipient, mailbox))
                        self.check_quota(recipient, len(data) + pending.get(key, 0), mailbox)
                        fd, tmp, final = self._write_tmp(recipient, data, folder, mailbox)
                    except (QuotaExceeded, MailboxError, OSError) as exc:
                        results[i].append(exc)
                        continue
                    pending[key] = pending.get(key, 0) + len(data)
                    staged.append((i, len(results[i]), fd, tmp, final, folder))
                    results[i].append(_STAGED)
            error: OSError | None = None
            try:
                fsync_all([fd for _, _, fd, _, _, _ in staged])
            except OSError as exc:
                error = exc
        finally:
            for _, _, fd, _, _, _ in staged:
                os.close(fd)
        new_dirs: dict[str, list[tuple[int, int]]] = {}
        for i, j, _, tmp, final, _ in staged:
            if error is None:
                try:
                    self._rename(tmp, final)
                except OSError as exc:
                    results[i][j] = exc
                    continue
                new_dirs.setdefault(os.path.dirname(final), []).append((i, j))
                results[i][j] = Path(final)
            else:  # not on disk for sure: not delivered (the caller spools or retries it)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                results[i][j] = error
        for new_dir, where in new_dirs.items():
            try:
                fsync_dir(new_dir)
            except OSError as exc:  # the renames may not survive a crash: not delivered
                for i, j in where:
                    results[i][j] = exc
        return results

    def _write_tmp(
        self, recipient: str, data: bytes, folder: str, mailbox: str
    ) -> tuple[int, str, str]:
        """Write one copy to ``tmp/`` (not yet fsync'd); return (fd, tmp path, final path)."""
        target = self.folder_path(recipient, folder, mailbox)
        if folder:
            self._ensure(self.mailbox_path(recipient, mailbox))
        base = self._ensure(target)
        now = time.time()
        # Microseconds zero-padded, so names made in the same second sort in time order.
        unique = (
            f"{int(now)}.M{int((now % 1) * 1_000_000):06d}P{os.getpid()}"
            f"Q{next(_counter)}.{_HOST},S={len(data)}"
        )
        tmp = os.path.join(base, "tmp", unique)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:  # removed since we last looked: create it again
            self._ready.discard(base)
            base = self._ensure(target)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd, tmp, os.path.join(base, "new", unique)

    def _rename(self, tmp: str, final: str) -> None:
        try:
            os.rename(tmp, final)
        except FileNotFoundError:  # new/ vanished under us: recreate it, try once more
            base = os.path.dirname(os.path.dirname(final))
            self._ready.discard(base)
            ensure_maildir(Path(base))
            self._ready.add(base)
            os.rename(tmp, final)

    def _ensure(self, path: Path) -> str:
        """``path`` as a string, creating tmp/new/cur the first time this process sees it.

        Remembering the Maildirs already made saves three mkdir calls per delivery.
        """
        key = os.fspath(path)
        if key not in self._ready:
            ensure_maildir(path)
            self._ready.add(key)
        return key


_STAGED = OSError("staged, not yet renamed")  # placeholder inside deliver_batch only


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
