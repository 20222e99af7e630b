"""The Maildir journal (delivery/journal.py): records, and recovery after a crash.

A crash that loses a rename is staged on real files: a copy delivered by the real
code is moved from ``new/`` back to ``tmp/`` and its journal left behind, as the
disk would hold them if the machine had gone down before the name sync.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import aiosmtplib
import pytest

from mailflow.app import App
from mailflow.config import MaildirConfig
from mailflow.delivery import journal
from mailflow.delivery.maildir import MaildirDelivery
from mailflow.server import Server
from mailflow.testing import config_for, make_message

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def _crashed_before_the_name_sync(root: Path, count: int = 1) -> list[Path]:
    """Deliver ``count`` copies, then put the disk in the state a crash before their
    name sync can leave: the files back in tmp/, the journal of a process that is gone.
    Returns where the copies belong in new/."""
    md = MaildirDelivery(MaildirConfig(root=root))
    copies = [(f"u{i}@example.com", "", "") for i in range(count)]
    paths = md.deliver_many(copies, MESSAGE)
    assert all(isinstance(p, Path) for p in paths)
    [slot] = (root / journal.JOURNAL_DIR).iterdir()
    shutil.copy(slot, root / journal.JOURNAL_DIR / "gone-host-1-0.0")
    md.close()  # the live slot goes; the copy stays, unlocked: a dead process's journal
    finals = [Path(p) for p in paths]  # type: ignore[arg-type]
    for final in finals:
        final.rename(final.parent.parent / "tmp" / final.name)
    return finals


def test_recovery_renames_a_complete_copy_back_into_new(tmp_path: Path) -> None:
    finals = _crashed_before_the_name_sync(tmp_path, count=3)
    done = MaildirDelivery(MaildirConfig(root=tmp_path)).recover()
    assert (done.journals, done.renamed, done.dropped) == (1, 3, 0)
    assert [f.read_bytes() for f in finals] == [MESSAGE] * 3
    assert not any((f.parent.parent / "tmp" / f.name).exists() for f in finals)
    assert list((tmp_path / journal.JOURNAL_DIR).iterdir()) == []  # replayed, removed
    # Replaying is done once: a second start finds nothing to do.
    assert MaildirDelivery(MaildirConfig(root=tmp_path)).recover().journals == 0


def test_a_copy_whose_data_did_not_reach_the_disk_is_removed_not_delivered(
    tmp_path: Path,
) -> None:
    """Data that differs from its record (the round never finished, so nobody was
    told it was delivered) is removed from tmp/, not renamed into new/."""
    [final] = _crashed_before_the_name_sync(tmp_path)
    torn = final.parent.parent / "tmp" / final.name
    torn.write_bytes(b"\0" * len(MESSAGE))  # same size, blocks never written
    done = journal.recover(tmp_path)
    assert (done.renamed, done.dropped) == (0, 1)
    assert not final.exists() and not torn.exists()


def test_copies_already_in_new_or_taken_by_a_reader_are_left_alone(tmp_path: Path) -> None:
    first, second = _crashed_before_the_name_sync(tmp_path, count=2)
    (first.parent.parent / "tmp" / first.name).rename(first)  # the rename did survive
    (second.parent.parent / "tmp" / second.name).unlink()  # stand-in: not there any more
    done = journal.recover(tmp_path)
    assert (done.journals, done.renamed, done.dropped) == (1, 0, 0)
    assert first.read_bytes() == MESSAGE and not second.exists()


def test_torn_and_foreign_lines_are_skipped(tmp_path: Path) -> None:
    [final] = _crashed_before_the_name_sync(tmp_path)
    path = tmp_path / journal.JOURNAL_DIR / "gone-host-1-0.0"
    good = path.read_bytes()
    escape = journal.record_line("../outside", "x", 1, 0).encode()
    path.write_bytes(b"0000 [garbage\n" + good[:-9] + b"\n" + escape + good + b"\0\0\0")
    assert journal.parse_line(escape) is None  # no record may point outside the root
    assert journal.parse_line(good[:-9]) is None  # torn: fails its own check
    assert journal.recover(tmp_path).renamed == 1
    assert final.read_bytes() == MESSAGE


def test_a_live_processs_journal_is_not_replayed(tmp_path: Path) -> None:
    """Another delivery (another process, or another instance here) holds its slots
    locked: recovery skips them, so it never races a commit in progress."""
    md = MaildirDelivery(MaildirConfig(root=tmp_path))
    [path] = md.deliver_many([("a@example.com", "", "")], MESSAGE)
    assert isinstance(path, Path)
    [slot] = (tmp_path / journal.JOURNAL_DIR).iterdir()
    path.rename(path.parent.parent / "tmp" / path.name)  # as if its name were not synced yet
    assert journal.recover(tmp_path).journals == 0
    assert slot.exists() and not path.exists()
    md.close()


def test_a_record_that_cannot_be_settled_keeps_its_journal(tmp_path: Path) -> None:
    [final] = _crashed_before_the_name_sync(tmp_path)
    new_dir = final.parent
    new_dir.rmdir()
    new_dir.write_bytes(b"")  # new/ is a file now: the rename cannot happen
    assert journal.recover(tmp_path).journals == 0
    assert (tmp_path / journal.JOURNAL_DIR / "gone-host-1-0.0").exists()
    new_dir.unlink()
    assert journal.recover(tmp_path).renamed == 1  # mended, the next start settles it
    assert final.read_bytes() == MESSAGE


@pytest.mark.parametrize("bad", [b"", b"\n", b"zz {}\n", b"00000000 [1,2,3,4]\n"])
def test_parse_line_refuses_what_is_not_a_record(bad: bytes) -> None:
    assert journal.parse_line(bad) is None


async def test_serve_replays_the_journal_before_it_listens(tmp_path: Path) -> None:
    """``mailflow serve`` after a crash: the copy answered before the crash is in new/
    before the first client is served, and new mail is delivered as usual."""
    config = config_for(tmp_path)
    root = Path(config.delivery.maildir.root)
    [final] = _crashed_before_the_name_sync(root)
    server = Server(App(config))
    [(host, port)] = await server.start()
    try:
        assert final.read_bytes() == MESSAGE
        await aiosmtplib.send(
            make_message(to="u0@example.com"),
            sender="a@example.org",
            recipients=["u0@example.com"],
            hostname=host,
            port=port,
            timeout=10,
        )
        assert len(list(final.parent.iterdir())) == 2
    finally:
        await server.stop()
    assert list((root / journal.JOURNAL_DIR).iterdir()) == []  # clean shutdown: no slot left


def test_a_reused_slot_replays_only_its_current_batch(tmp_path: Path) -> None:
    """A slot is overwritten in place: the records after its END line are an earlier
    batch's, whose names were synced before the slot was reused; they are not replayed."""
    md = MaildirDelivery(MaildirConfig(root=tmp_path))
    earlier = md.deliver_many([(f"u{i}@example.com", "", "") for i in range(3)], MESSAGE)
    [current] = md.deliver_many([("v@example.com", "", "")], MESSAGE)
    [slot] = (tmp_path / journal.JOURNAL_DIR).iterdir()
    assert slot.read_bytes().count(b"\n") == 5  # 1 record, END; stale: 2 records, END
    shutil.copy(slot, tmp_path / journal.JOURNAL_DIR / "gone-host-1-0.0")
    md.close()
    for final in [*earlier, current]:
        assert isinstance(final, Path)
        final.rename(final.parent.parent / "tmp" / final.name)
    assert journal.recover(tmp_path).renamed == 1
    assert isinstance(current, Path) and current.read_bytes() == MESSAGE
    assert not any(isinstance(p, Path) and p.exists() for p in earlier)


def test_without_a_usable_journal_nothing_is_answered_delivered(tmp_path: Path) -> None:
    """A journal that cannot be written fails the copies (they are spooled and retried
    by the caller), and start-up refuses to go on without replaying it."""
    (tmp_path / journal.JOURNAL_DIR).write_bytes(b"")  # a file where the directory goes
    md = MaildirDelivery(MaildirConfig(root=tmp_path))
    [result] = md.deliver_many([("a@example.com", "", "")], MESSAGE)
    assert isinstance(result, OSError)
    assert list((tmp_path / "a@example.com" / "new").iterdir()) == []
    assert list((tmp_path / "a@example.com" / "tmp").iterdir()) == []
    with pytest.raises(RuntimeError, match="cannot replay the Maildir journal"):
        md.recover()


@pytest.mark.parametrize("root", [".", "./", "mail", "mail/"])
def test_records_name_the_maildir_whatever_the_roots_spelling(tmp_path, monkeypatch, root):
    """The root as an admin may write it (``root: .`` or ``./mail/``): a record names
    the Maildir relative to it, so recovery finds the copy."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mail").mkdir()
    md = MaildirDelivery(MaildirConfig(root=Path(root)))
    [final] = md.deliver_many([("a@example.com", ".Junk", "")], MESSAGE)
    assert isinstance(final, Path)
    [slot] = (Path(root) / journal.JOURNAL_DIR).iterdir()
    shutil.copy(slot, slot.with_name("gone-host-1-0.0"))
    md.close()
    final.rename(final.parent.parent / "tmp" / final.name)
    assert journal.recover(Path(root)).renamed == 1
    assert final.read_bytes() == MESSAGE
