"""Learning from users: updating a model file safely, and reading a Maildir's Junk folder.

Several writers may update one model file: ``mailflow quarantine release`` and
``delete --spam`` (through the ``mailflow_learn`` hook), ``mailflow learn`` from cron.
Each takes an exclusive lock (``flock`` on ``.<model name>.lock`` next to it) around
load, learn and save, so no update is lost to another's; the save itself is atomic,
so the server, which reads without the lock, sees the old file or the new one.

The Junk-folder scan (``mailflow learn --maildir ROOT``) looks for the messages a
user moved, which are the only ones that tell something the model did not already
say. The plugin's status header (``X-Spam-Status: Yes, ...`` at ``spam_threshold``,
where the default ``actions.junk`` files mail into ``.Junk``) records the verdict at
delivery; the folder a message is in now records the user's:

============== ================= ===============================================
folder          status header     meaning
============== ================= ===============================================
``.Junk``       ``Yes``           filed there by mailflow (or agreed): skipped
``.Junk``       ``No`` or none    the user moved it in: learned as **spam**
inbox           ``Yes``           the user moved it out of ``.Junk``: **ham**
inbox           ``No`` or none    delivered there and left there: skipped
============== ================= ===============================================

Only messages not seen at the previous run are looked at. A message's identity is
its folder plus its Maildir unique name without the ``:2,flags`` info (``new/`` ->
``cur/`` and flag changes keep it; a move to another folder is a new identity there).
The identities present at a run are written to ``ROOT/mailflow-learned``: one line
each, the file name's bytes percent-encoded (any byte, a newline too, round-trips),
and only those still present, so the file never outgrows the mailbox.

A Maildir belongs to a user and ``learn --maildir`` often runs as root: a message
is opened without following symbolic links and without blocking, and read only if
it is a regular file of at most MAX_MESSAGE_BYTES; anything else, or a file that
cannot be read, is skipped with a warning (and looked at again next run).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import sys
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

import numpy as np
from mailflow_plugins.bayes import JUNK_FOLDER
from mailflow_plugins.bayes.features import Hasher
from mailflow_plugins.bayes.model import HAM, SPAM, Model, now
from mailflow_plugins.bayes.training import featurize

LABELS = {"ham": HAM, "spam": SPAM}
# No leading dot: in a Maildir++ root a dot name is a folder to IMAP servers.
STATE_FILE = "mailflow-learned"
STATE_HEADER = "# mailflow learn --maildir: messages seen at the last run (folder unique-name)"
HEAD_BYTES = 64 * 1024  # read this much to find the status header; more if needed
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # larger files in a Maildir are not learned from


@contextlib.contextmanager
def model_lock(path: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of model file ``path`` (created next to it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Read-only is enough for flock, so a lock file another user created (cron as
    # root, the quarantine commands as the mailflow user) locks for everyone.
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def learn_messages(
    path: str | Path, messages: Sequence[bytes], labels: Sequence[int], start_from: str | Path
) -> Model:
    """Teach model file ``path`` these messages and save it (atomically, under its lock).

    When ``path`` does not exist yet, learning starts from the model in ``start_from``
    (the one the plugin scores with until then).
    """
    path = Path(path)
    with model_lock(path):
        model = Model.load(path if path.exists() else start_from)
        rows = featurize(messages, Hasher(model.n_features, model.seed))
        model.learn(rows, labels)
        model.info = {**model.info, "updated": now()}
        model.save(path)
    return model


# --- the Junk folder ----------------------------------------------------------------------


def identity(name: str) -> str:
    """A Maildir file name without its info (``:2,FLAGS``): the same while flags change,
    percent-encoded so that any file name (undecodable bytes, a newline) is one safe
    line of the state file."""
    return urllib.parse.quote(os.fsencode(name.split(":", 1)[0]), safe="")


def warn(message: str) -> None:
    print(f"mailflow: {message}", file=sys.stderr)


@dataclass
class Feedback:
    """What one scan of a Maildir found among the messages not seen before.

    The messages are kept as feature rows (hashed as they are read), not as bytes,
    so a large Junk folder costs a few KB per message, not its size.
    """

    root: Path
    spam: list[np.ndarray] = field(default_factory=list)  # moved into .Junk by the user
    ham: list[np.ndarray] = field(default_factory=list)  # moved out of .Junk by the user
    skipped: int = 0  # new, but where mailflow put them: nothing to learn
    unreadable: int = 0  # not a regular file, too large, or could not be read: next run
    present: set[str] = field(default_factory=set)  # identities to remember

    @property
    def new(self) -> int:
        return len(self.spam) + len(self.ham) + self.skipped


def _messages(folder: Path) -> Iterator[tuple[str, Path]]:
    """(identity, path) of the messages in ``folder``'s cur/ and new/."""
    for sub in ("cur", "new"):
        try:
            entries = list(os.scandir(folder / sub))
        except FileNotFoundError:
            continue
        except OSError as exc:
            warn(f"{folder / sub}: cannot list it ({exc.strerror}); skipped")
            continue
        for entry in entries:
            if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                yield identity(entry.name), Path(entry.path)


def spam_status(raw_head: bytes, status_header: str) -> bool | None:
    """True / False when the status header says Yes / No; None without one."""
    value = BytesHeaderParser(policy=compat32).parsebytes(raw_head).get(status_header)
    if value is None:
        return None
    verdict = str(value).split(",", 1)[0].strip().lower()
    return {"yes": True, "no": False}.get(verdict)


class Unreadable(Exception):
    """A Maildir entry that is not a regular file, too large, or cannot be read."""


def _read(path: Path, status_header: str) -> tuple[bytes, bool | None, int] | None:
    """The message's head (or all of it), its status, and its size; None when it is
    gone (moved meanwhile). Raises Unreadable for what must not or cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symbolic link (ELOOP), no permission, ...
        raise Unreadable(exc.strerror or str(exc)) from None
    with open(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise Unreadable("not a regular file")
        if info.st_size > MAX_MESSAGE_BYTES:
            raise Unreadable(f"larger than {MAX_MESSAGE_BYTES} bytes")
        try:
            raw = fh.read(HEAD_BYTES)
            if len(raw) == HEAD_BYTES and b"\n\n" not in raw and b"\r\n\r\n" not in raw:
                raw += fh.read(MAX_MESSAGE_BYTES)  # a header block longer than HEAD_BYTES
        except OSError as exc:
            raise Unreadable(exc.strerror or str(exc)) from None
    return raw, spam_status(raw, status_header), info.st_size


def _read_rest(path: Path, head: bytes, size: int) -> bytes | None:
    """The whole message, given what ``_read`` got of it."""
    return head if len(head) >= size else _whole(path)


def _whole(path: Path) -> bytes | None:
    """All of a message (already checked to be a regular file of a bounded size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Unreadable(exc.strerror or str(exc)) from None
    with open(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MESSAGE_BYTES:
            raise Unreadable("changed while it was read")
        try:
            return fh.read(MAX_MESSAGE_BYTES + 1)[:MAX_MESSAGE_BYTES]
        except OSError as exc:
            raise Unreadable(exc.strerror or str(exc)) from None


def check_maildir(root: Path) -> str | None:
    """Why ``root`` is not a Maildir, or None."""
    if not root.is_dir():
        return f"{root}: no such directory"
    if not (root / "cur").is_dir() and not (root / "new").is_dir():
        return f"{root}: not a Maildir (no cur/ or new/)"
    return None


def scan_maildir(root: Path, status_header: str, seen: set[str], hasher: Hasher) -> Feedback:
    """The user's feedback in Maildir ``root`` among the messages not in ``seen``,
    hashed into feature rows with ``hasher`` as it is read."""
    found = Feedback(root)
    for folder, junk in ((root, False), (root / JUNK_FOLDER, True)):
        prefix = "junk" if junk else "inbox"
        for ident, path in _messages(folder):
            key = f"{prefix} {ident}"
            if key in seen:
                found.present.add(key)
                continue
            try:
                read = _read(path, status_header)
                if read is None:
                    continue  # moved while we looked: seen in its new place next time
                head, status, size = read
                # In .Junk without our Yes: moved in. In the inbox with our Yes: moved out.
                signal = (junk and status is not True) or (not junk and status is True)
                raw = _read_rest(path, head, size) if signal else head
            except Unreadable as exc:
                warn(f"{path}: not learned from ({exc}); tried again next run")
                found.unreadable += 1
                continue
            if raw is None:
                continue
            found.present.add(key)
            if not signal:
                found.skipped += 1
            elif not raw.strip():
                found.skipped += 1  # an empty file: nothing to learn from
            else:
                (found.spam if junk else found.ham).extend(featurize([raw], hasher))
    return found


def read_state(root: Path) -> set[str]:
    """The identities seen at the last run (an unreadable or damaged file: a warning,
    and the lines that can be read; what is lost is looked at again, once)."""
    try:
        text = (root / STATE_FILE).read_bytes().decode("ascii", errors="replace")
    except FileNotFoundError:
        return set()
    except OSError as exc:
        warn(f"{root / STATE_FILE}: cannot read it ({exc.strerror}); every message is new")
        return set()
    return {line for line in text.splitlines() if line and not line.startswith("#")}


def write_state(root: Path, keys: Iterable[str]) -> None:
    """Replace the state file atomically (temp file, rename)."""
    text = "\n".join([STATE_HEADER, *sorted(keys)]) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:  # identities are percent-encoded
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / STATE_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
