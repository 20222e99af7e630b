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
each, and only those still present, so the file never outgrows the mailbox.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

from mailflow_plugins.bayes import JUNK_FOLDER
from mailflow_plugins.bayes.features import Hasher
from mailflow_plugins.bayes.model import HAM, SPAM, Model, now
from mailflow_plugins.bayes.training import featurize

LABELS = {"ham": HAM, "spam": SPAM}
# No leading dot: in a Maildir++ root a dot name is a folder to IMAP servers.
STATE_FILE = "mailflow-learned"
STATE_HEADER = "# mailflow learn --maildir: messages seen at the last run (folder unique-name)"
HEAD_BYTES = 64 * 1024  # read this much to find the status header; more if needed


@contextlib.contextmanager
def model_lock(path: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of model file ``path`` (created next to it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
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
    """A Maildir file name without its info (``:2,FLAGS``): the same while flags change."""
    return name.split(":", 1)[0]


@dataclass
class Feedback:
    """What one scan of a Maildir found among the messages not seen before."""

    root: Path
    spam: list[bytes] = field(default_factory=list)  # moved into .Junk by the user
    ham: list[bytes] = field(default_factory=list)  # moved out of .Junk by the user
    skipped: int = 0  # new, but where mailflow put them: nothing to learn
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


def _read(path: Path, status_header: str) -> tuple[bytes, bool | None] | None:
    """The message and its status; None when it is gone (moved meanwhile)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(HEAD_BYTES)
            if len(raw) == HEAD_BYTES and b"\n\n" not in raw and b"\r\n\r\n" not in raw:
                raw += fh.read()  # a header block longer than HEAD_BYTES
            status = spam_status(raw, status_header)
            return raw, status
    except FileNotFoundError:
        return None


def _read_rest(path: Path, head: bytes) -> bytes | None:
    if len(head) < HEAD_BYTES:
        return head
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def check_maildir(root: Path) -> str | None:
    """Why ``root`` is not a Maildir, or None."""
    if not root.is_dir():
        return f"{root}: no such directory"
    if not (root / "cur").is_dir() and not (root / "new").is_dir():
        return f"{root}: not a Maildir (no cur/ or new/)"
    return None


def scan_maildir(root: Path, status_header: str, seen: set[str]) -> Feedback:
    """The user's feedback in Maildir ``root`` among the messages not in ``seen``."""
    found = Feedback(root)
    for folder, junk in ((root, False), (root / JUNK_FOLDER, True)):
        prefix = "junk" if junk else "inbox"
        for ident, path in _messages(folder):
            key = f"{prefix} {ident}"
            if key in seen:
                found.present.add(key)
                continue
            read = _read(path, status_header)
            if read is None:
                continue  # moved while we looked: seen in its new place next time
            head, status = read
            # In .Junk without our Yes: moved in. In the inbox with our Yes: moved out.
            signal = (junk and status is not True) or (not junk and status is True)
            raw = _read_rest(path, head) if signal else head
            if raw is None:
                continue
            found.present.add(key)
            if not signal:
                found.skipped += 1
            elif not raw.strip():
                found.skipped += 1  # an empty file: nothing to learn from
            elif junk:
                found.spam.append(raw)
            else:
                found.ham.append(raw)
    return found


def read_state(root: Path) -> set[str]:
    try:
        text = (root / STATE_FILE).read_text("utf-8")
    except FileNotFoundError:
        return set()
    return {line for line in text.splitlines() if line and not line.startswith("#")}


def write_state(root: Path, keys: Iterable[str]) -> None:
    """Replace the state file atomically (temp file, rename)."""
    text = "\n".join([STATE_HEADER, *sorted(keys)]) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / STATE_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
