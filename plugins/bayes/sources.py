"""Read training mail from what admins have: .eml directories, Maildirs, mbox files.

Each source yields raw message bytes. A directory with ``cur/`` or ``new/`` is a
Maildir (both subdirectories are read, ``tmp/`` never is); any other directory is
read recursively, one message per file; a file that starts with an mbox ``From ``
line is split as an mbox (so single messages saved with that line, as in the
SpamAssassin corpus, also work); any other file is one message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

MBOX_MAGIC = b"From "
_MBOX_SEP = re.compile(rb"\r?\n\r?\nFrom ")
_MBOX_QUOTED = re.compile(rb"(^|\n)>(>*From )")


class SourceError(Exception):
    """A training path that does not exist or cannot be read."""


def is_maildir(path: Path) -> bool:
    return path.is_dir() and ((path / "cur").is_dir() or (path / "new").is_dir())


def is_mbox(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(len(MBOX_MAGIC)) == MBOX_MAGIC
    except OSError:
        return False


def message_files(path: Path) -> Iterator[Path]:
    """Files holding one message each under ``path`` (sorted, hidden files skipped)."""
    if is_maildir(path):
        for sub in ("cur", "new"):
            folder = path / sub
            if folder.is_dir():
                yield from sorted(p for p in folder.iterdir() if p.is_file())
        return
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue  # dot files; Maildir++ subfolders are listed explicitly instead
        if child.is_dir():
            yield from message_files(child)
        elif child.is_file():
            yield child


def iter_messages(path: str | Path) -> Iterator[bytes]:
    """Raw bytes of every message found at ``path``."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{p}: no such file or directory")
    if p.is_dir():
        for f in message_files(p):
            if is_mbox(f):
                yield from _mbox(f)
            else:
                yield f.read_bytes()
    elif is_mbox(p):
        yield from _mbox(p)
    else:
        yield p.read_bytes()


def split_mbox(data: bytes) -> list[bytes]:
    """Messages of an mbox: each starts at a ``From `` line at the top or after a blank line.

    Read-only and lenient on purpose: ``mailbox.mbox`` opens files for writing and
    locks them, which training on someone's archive must never do.
    """
    messages = []
    starts = [0] if data.startswith(MBOX_MAGIC) else []
    starts += [m.end() - len(MBOX_MAGIC) for m in _MBOX_SEP.finditer(data)]
    for begin, end in zip(starts, [*starts[1:], len(data)], strict=True):
        line_end = data.find(b"\n", begin)
        if line_end < 0:
            continue
        body = data[line_end + 1 : end]
        # Undo mboxrd quoting of body lines that began with "From ".
        messages.append(_MBOX_QUOTED.sub(rb"\1\2", body))
    return messages


def _mbox(path: Path) -> Iterator[bytes]:
    yield from split_mbox(path.read_bytes())


def count_messages(paths: list[str]) -> int:
    """How many messages ``paths`` hold, for the progress bar (mbox files are counted)."""
    total = 0
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise SourceError(f"{p}: no such file or directory")
        files = list(message_files(p)) if p.is_dir() else [p]
        for f in files:
            total += len(split_mbox(f.read_bytes())) if is_mbox(f) else 1
    return total
