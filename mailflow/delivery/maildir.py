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


class MaildirDelivery:
    def __init__(self, config: MaildirConfig) -> None:
        self.config = config
        self.root = Path(config.root)
        self._ready: set[str] = set()  # Maildirs known to have tmp/, new/ and cur/

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
        results: list[Path | Exception] = []
        new_dirs: dict[str, list[int]] = {}  # new/ directory -> indexes of its copies
        for recipient, folder, mailbox in copies:
            try:
                path = self._write_copy(recipient, data, folder, mailbox)
            except (QuotaExceeded, MailboxError, OSError) as exc:
                results.append(exc)
                continue
            new_dirs.setdefault(os.path.dirname(path), []).append(len(results))
            results.append(Path(path))
        for new_dir, indexes in new_dirs.items():
            try:
                _fsync_dir(new_dir)
            except OSError as exc:  # the renames may not survive a crash: not delivered
                for i in indexes:
                    results[i] = exc
        return results

    def _write_copy(self, recipient: str, data: bytes, folder: str, mailbox: str) -> str:
        """Write one copy to ``tmp/``, fsync it, rename it into ``new/``; return its path."""
        self.check_quota(recipient, len(data), mailbox)
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
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        final = os.path.join(base, "new", unique)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:  # new/ vanished under us: recreate it, try once more
            self._ready.discard(base)
            self._ensure(target)
            os.rename(tmp, final)
        return final

    def _ensure(self, path: Path) -> str:
        """``path`` as a string, creating tmp/new/cur the first time this process sees it.

        Remembering the Maildirs already made saves three mkdir calls per delivery.
        """
        key = os.fspath(path)
        if key not in self._ready:
            ensure_maildir(path)
            self._ready.add(key)
        return key


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
