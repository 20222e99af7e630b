"""MaildirDelivery.deliver_many: several copies of one message in one call."""

from __future__ import annotations

import mailbox
from pathlib import Path

from mailflow.config import MaildirConfig
from mailflow.delivery.maildir import MailboxError, MaildirDelivery, QuotaExceeded

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


def test_every_copy_lands_in_new(tmp_path: Path) -> None:
    md = MaildirDelivery(MaildirConfig(root=tmp_path))
    copies = [("a@example.com", "", ""), ("b@example.com", ".Junk", ""), ("a@example.com", "", "")]
    results = md.deliver_many(copies, MESSAGE)
    assert all(isinstance(r, Path) and r.exists() for r in results)
    assert len(mailbox.Maildir(tmp_path / "a@example.com", create=False)) == 2
    junk = mailbox.Maildir(tmp_path / "b@example.com" / ".Junk", create=False)
    assert [m.get("Subject") for m in junk] == ["hi"]


def test_one_bad_copy_does_not_stop_the_others(tmp_path: Path) -> None:
    md = MaildirDelivery(MaildirConfig(root=tmp_path, quota=10))
    results = md.deliver_many([("a@example.com", "", ""), ("b@example.com", "..x", "")], b"x")
    assert isinstance(results[0], Path)
    assert isinstance(results[1], MailboxError)
    over = md.deliver_many([("a@example.com", "", "")], MESSAGE)
    assert isinstance(over[0], QuotaExceeded)


def test_maildir_removed_while_running_is_made_again(tmp_path: Path) -> None:
    import shutil

    md = MaildirDelivery(MaildirConfig(root=tmp_path))
    md.deliver("a@example.com", MESSAGE)
    shutil.rmtree(tmp_path / "a@example.com")
    assert md.deliver("a@example.com", MESSAGE).exists()
    shutil.rmtree(tmp_path / "a@example.com" / "new")
    assert md.deliver("a@example.com", MESSAGE).exists()


def test_names_sort_in_delivery_order_within_a_second(tmp_path: Path, monkeypatch) -> None:
    import mailflow.delivery.maildir as maildir_module

    times = iter([1_700_000_000.098765, 1_700_000_000.123456])
    monkeypatch.setattr(maildir_module.time, "time", lambda: next(times, 1_700_000_001.0))
    md = MaildirDelivery(MaildirConfig(root=tmp_path))
    first = md.deliver("a@example.com", b"1\r\n")
    second = md.deliver("a@example.com", b"2\r\n")
    assert sorted([second.name, first.name]) == [first.name, second.name]


def test_a_batch_of_messages_shares_one_fsync_round(tmp_path: Path) -> None:
    md = MaildirDelivery(MaildirConfig(root=tmp_path, quota=len(MESSAGE) * 2))
    one = [("a@example.com", "", "")]
    results = md.deliver_batch([(one, MESSAGE), (one, MESSAGE), (one, MESSAGE)])
    # The quota counts the copies staged earlier in the same batch.
    assert [type(r[0]) for r in results] == [type(tmp_path), type(tmp_path), QuotaExceeded]
    assert len(mailbox.Maildir(tmp_path / "a@example.com", create=False)) == 2
    assert list((tmp_path / "a@example.com" / "tmp").iterdir()) == []


def test_async_callers_get_their_own_results(tmp_path: Path) -> None:
    import asyncio

    md = MaildirDelivery(MaildirConfig(root=tmp_path))

    async def main() -> list[list[Path | Exception]]:
        calls = [
            md.deliver_many_async([(f"u{i}@example.com", "", "")], MESSAGE + b"%d\r\n" % i)
            for i in range(20)
        ]
        return await asyncio.gather(*calls, md.deliver_many_async([("x@y", "..bad", "")], b"x"))

    *good, bad = asyncio.run(main())
    for i, [path] in enumerate(good):
        assert isinstance(path, Path)
        assert path.read_bytes().endswith(b"%d\r\n" % i)
        assert path.parent.name == "new"
    assert isinstance(bad[0], MailboxError)


def test_a_removed_folder_and_its_mailbox_are_made_again(tmp_path: Path) -> None:
    import shutil

    md = MaildirDelivery(MaildirConfig(root=tmp_path))
    junk = [("a@example.com", ".Junk", "")]
    assert isinstance(md.deliver_many(junk, MESSAGE)[0], Path)
    shutil.rmtree(tmp_path / "a@example.com")  # resolved targets are remembered
    [again] = md.deliver_many(junk, MESSAGE)
    assert isinstance(again, Path) and again.exists()
    assert again.parent == tmp_path / "a@example.com" / ".Junk" / "new"
    for sub in ("tmp", "new", "cur"):  # the mailbox above the folder too
        assert (tmp_path / "a@example.com" / sub).is_dir()


def test_a_bad_folder_fails_every_time_and_the_quota_counts_only_delivered_copies(
    tmp_path: Path,
) -> None:
    md = MaildirDelivery(MaildirConfig(root=tmp_path, quota=len(MESSAGE) * 2))
    bad = ("a@example.com", "..x", "")
    good = ("a@example.com", "", "")
    results = md.deliver_batch([([bad, good], MESSAGE), ([bad, good], MESSAGE)])
    assert [[type(r) for r in row] for row in results] == [
        [MailboxError, type(tmp_path)],
        [MailboxError, type(tmp_path)],
    ]
    assert md.usage("a@example.com") == len(MESSAGE) * 2
    over = md.deliver_many([good], MESSAGE)
    assert isinstance(over[0], QuotaExceeded)


def test_copies_are_named_and_placed_like_before(tmp_path: Path) -> None:
    md = MaildirDelivery(MaildirConfig(root=tmp_path))
    copies = [("a@example.com", "", ""), ("a@example.com", "", "shared"), ("b@example.com", "", "")]
    results = md.deliver_many(copies, MESSAGE)
    paths = [r for r in results if isinstance(r, Path)]
    assert [p.parent for p in paths] == [
        tmp_path / "a@example.com" / "new",
        tmp_path / "shared" / "new",
        tmp_path / "b@example.com" / "new",
    ]
    assert len({p.name for p in paths}) == 3
    assert all(p.name.endswith(f",S={len(MESSAGE)}") for p in paths)
    assert all(p.read_bytes() == MESSAGE for p in paths)
    for d in ("a@example.com", "shared", "b@example.com"):
        assert list((tmp_path / d / "tmp").iterdir()) == []
