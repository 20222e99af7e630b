"""Durable writes (delivery/durable.py): syncfs and fsync strategies, on real files.

Failures are injected through the one seam the syncfs strategy has (the function it
calls instead of libc's ``syncfs``); everything else is the real file system.
"""

from __future__ import annotations

import asyncio
import logging
import mailbox
import os
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest

from mailflow.app import App
from mailflow.config import ConfigError, MaildirConfig, parse_config
from mailflow.delivery import durable, journal
from mailflow.delivery.durable import (
    FsyncSyncer,
    Syncer,
    SyncfsSyncer,
    load_syncfs,
    make_syncer,
)
from mailflow.delivery.maildir import MaildirDelivery
from mailflow.delivery.spool import QueueEntry, RecipientState, Spool
from mailflow.server import Server
from mailflow.testing import config_for, make_message

needs_syncfs = pytest.mark.skipif(load_syncfs() is None, reason="syncfs(2) not usable here")
METHODS = [pytest.param("syncfs", marks=needs_syncfs), "fsync"]
MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


class ScriptedSyncfs:
    """Stands in for libc's syncfs: really syncs, but fails the calls listed in ``fail``."""

    def __init__(self, fail: set[int] | Callable[[int], bool] = frozenset()) -> None:
        self.calls = 0
        self._fail = fail
        self._real = load_syncfs() or os.fsync  # fsync of the cursor where syncfs is missing
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        with self._lock:
            self.calls += 1
            call = self.calls
        failing = self._fail(call) if callable(self._fail) else call in self._fail
        if failing:
            raise OSError(5, "Input/output error (injected)")
        self._real(fd)


def _entry(i: int) -> QueueEntry:
    return QueueEntry(
        id=f"D{i:06d}",
        sender="a@example.org",
        recipients=[RecipientState(f"u{i}@example.com", {"kind": "relay"})],
        created=time.time(),
    )


def _visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _delivered(root: Path) -> list[Path]:
    return list(root.glob("*/new/*"))


# --- both methods store and deliver ---------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
async def test_concurrent_maildir_deliveries_land_in_new(tmp_path: Path, method: str) -> None:
    md = MaildirDelivery(MaildirConfig(root=tmp_path), method)  # type: ignore[arg-type]
    assert md._sync.method == method
    copies = [("a@example.com", "", ""), ("b@example.com", ".Junk", "")]
    results = await asyncio.gather(
        *(md.deliver_many_async(copies, MESSAGE + b"%d\r\n" % i) for i in range(40))
    )
    assert all(isinstance(r, Path) and r.exists() for rs in results for r in rs)
    assert len(mailbox.Maildir(tmp_path / "a@example.com", create=False)) == 40
    assert len(mailbox.Maildir(tmp_path / "b@example.com" / ".Junk", create=False)) == 40
    stored = sorted(p.read_bytes() for p in (tmp_path / "a@example.com" / "new").iterdir())
    assert stored == sorted(MESSAGE + b"%d\r\n" % i for i in range(40))
    assert _visible(tmp_path / "a@example.com" / "tmp") == []


@pytest.mark.parametrize("method", METHODS)
async def test_concurrent_spool_stores_recover(tmp_path: Path, method: str) -> None:
    spool = Spool(tmp_path, method)  # type: ignore[arg-type]
    assert spool._sync.method == method
    await asyncio.gather(*(spool.store(_entry(i), b"m%d\r\n" % i) for i in range(30)))
    recovered = Spool(tmp_path, method).recover()  # type: ignore[arg-type]
    assert [e.id for e in recovered] == [f"D{i:06d}" for i in range(30)]
    assert spool.read_message("D000029") == b"m29\r\n"
    assert not [n for n in _visible(spool.queue_dir) if n.endswith(".tmp")]


@needs_syncfs
async def test_syncfs_once_per_file_system_per_phase(tmp_path: Path) -> None:
    """A batch to several mailboxes on one file system: one syncfs for the data, one
    for the renames, not one per file or directory."""
    syncfs = ScriptedSyncfs()
    md = MaildirDelivery(MaildirConfig(root=tmp_path), SyncfsSyncer(syncfs))
    requests = [([(f"u{i % 3}@example.com", "", "")], MESSAGE) for i in range(9)]
    results = await asyncio.to_thread(md.deliver_batch, requests)
    assert all(isinstance(r, Path) for rs in results for r in rs)
    assert syncfs.calls == 2


def test_real_syncfs_reports_errors_as_oserror() -> None:
    func = load_syncfs()
    if func is None:
        pytest.skip("syncfs(2) not usable here")
    fd = os.open(".", os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as info:
        func(fd)  # closed descriptor: EBADF from the kernel, through ctypes' errno
    assert info.value.errno == 9


# --- pipelined group commit (Maildir) -------------------------------------------------


class RecordingSyncer(SyncfsSyncer):
    """A real syncfs syncer that notes, per sync round, what it made durable: the
    journal records in the journal directory, and the files in the ``tmp/`` and
    ``new/`` directories it was asked to sync, with their contents, all read once it
    returned."""

    def __init__(self, root: Path, syncfs: ScriptedSyncfs | None = None) -> None:
        super().__init__(syncfs or ScriptedSyncfs())
        self.root = root
        self.rounds: list[tuple[set[str], dict[str, bytes], set[str]]] = []

    def sync(self, files, dirs):  # type: ignore[no-untyped-def]
        errors = super().sync(files, dirs)
        records: set[str] = set()
        journal_dir = self.root / journal.JOURNAL_DIR
        for path in journal_dir.iterdir() if journal_dir.exists() else ():
            for line in path.read_bytes().splitlines():
                record = journal.parse_line(line)
                if record is not None:
                    records.add(record[1])
        in_tmp = {
            name: Path(d, name).read_bytes()
            for d, _ in dirs
            if d.endswith("/tmp") and d not in errors[1]
            for name in os.listdir(d)
        }
        in_new = {
            name
            for d, _ in dirs
            if d.endswith("/new") and d not in errors[1]
            for name in os.listdir(d)
        }
        self.rounds.append((records, in_tmp, in_new))
        return errors


@needs_syncfs
async def test_no_copy_is_answered_before_its_data_and_journal_record_are_synced(
    tmp_path: Path, monkeypatch
) -> None:
    """The promise, with batches overlapping: when the commit thread answers a caller,
    a finished sync round covered the copy's data under its tmp/ name and a journal
    record for it, and the copy is in new/ already; a later round syncs that name."""
    syncer = RecordingSyncer(tmp_path)
    md = MaildirDelivery(MaildirConfig(root=tmp_path), syncer)
    rounds_at_answer: dict[bytes, int] = {}  # message -> sync rounds done when answered
    answer = durable._answer

    def recording_answer(waiters, outcome):  # type: ignore[no-untyped-def]
        for (_, data), _, _ in waiters:
            rounds_at_answer[data] = len(syncer.rounds)
        answer(waiters, outcome)

    monkeypatch.setattr(durable, "_answer", recording_answer)

    async def deliver(i: int) -> tuple[bytes, Path]:
        data = MESSAGE + b"%d\r\n" % i
        [path] = await md.deliver_many_async([(f"u{i % 4}@example.com", "", "")], data)
        assert isinstance(path, Path)
        assert path.read_bytes() == data  # in new/ when answered
        return data, path

    tasks = []
    for i in range(60):  # arriving while earlier batches commit, so batches overlap
        tasks.append(asyncio.create_task(deliver(i)))
        await asyncio.sleep(0.0005)
    delivered = await asyncio.gather(*tasks)
    await asyncio.sleep(0.1)  # the last batch's names get a round of their own
    for data, path in delivered:
        before = syncer.rounds[: rounds_at_answer[data]]
        assert any(
            path.name in records and in_tmp.get(path.name) == data for records, in_tmp, _ in before
        ), path
        assert any(path.name in in_new for _, _, in_new in syncer.rounds), path


@needs_syncfs
async def test_a_lone_message_is_answered_after_one_sync_and_its_name_synced_after(
    tmp_path: Path, monkeypatch
) -> None:
    """One client, one message at a time: the answer waits for one sync round, not two;
    the round that syncs the new/ name runs at once on its own, and frees the journal."""
    syncer = RecordingSyncer(tmp_path)
    md = MaildirDelivery(MaildirConfig(root=tmp_path), syncer)
    for i in range(3):
        [path] = await md.deliver_many_async([("a@example.com", "", "")], MESSAGE)
        assert isinstance(path, Path)
        assert len(syncer.rounds) == 2 * i + 1
        for _ in range(100):
            if len(syncer.rounds) == 2 * i + 2:
                break
            await asyncio.sleep(0.01)
        assert path.name in syncer.rounds[-1][2]
    # One slot, reused: the name sync of each message freed it for the next.
    assert len(list((tmp_path / journal.JOURNAL_DIR).iterdir())) == 1
    md.close()
    assert list((tmp_path / journal.JOURNAL_DIR).iterdir()) == []


@needs_syncfs
async def test_under_load_each_round_syncs_once_for_two_batches(
    tmp_path: Path, monkeypatch
) -> None:
    """While more work is waiting, one syncfs makes one batch's names and the next
    batch's data durable: fewer calls than two per batch."""
    syncfs = ScriptedSyncfs()
    batches: list[int] = []
    step = MaildirDelivery._commit_step

    def counting_step(self, requests, carried):  # type: ignore[no-untyped-def]
        if requests:
            batches.append(len(requests))
        time.sleep(0.002)  # let the next batch gather while this one commits
        return step(self, requests, carried)

    monkeypatch.setattr(MaildirDelivery, "_commit_step", counting_step)
    md = MaildirDelivery(MaildirConfig(root=tmp_path), SyncfsSyncer(syncfs))

    async def deliver() -> None:
        [path] = await md.deliver_many_async([("a@example.com", "", "")], MESSAGE)
        assert isinstance(path, Path)

    # Messages keep arriving (one per millisecond) whether or not earlier ones are done,
    # as from many SMTP connections: there is always a next batch to overlap with.
    tasks = []
    for _ in range(120):
        tasks.append(asyncio.create_task(deliver()))
        await asyncio.sleep(0.001)
    await asyncio.gather(*tasks)
    assert sum(batches) == 120
    assert len(_delivered(tmp_path)) == 120
    assert syncfs.calls < 2 * len(batches)  # the old two-phase commit: exactly 2 per batch


async def test_each_round_answers_its_own_batch_and_finishes_the_last_one_alone(
    caplog,
) -> None:
    """GroupCommitter.pipelined: a step answers the batch it was given; what it carries
    is finished by a step of its own at once when nothing else waits. A failing step
    fails its batch; a failing step that only finished a carried batch is logged, and
    the committer goes on."""
    steps: list[tuple[list[str], object]] = []

    def step(requests: list[str], carried: object) -> tuple[object, object]:
        steps.append((list(requests), carried))
        if "boom" in requests or carried == ["late"]:
            raise RuntimeError("step failed")
        return ([f"{r} stored" for r in requests] or None), (list(requests) or None)

    committer: durable.GroupCommitter[str, str] = durable.GroupCommitter.pipelined(
        step, "test-commit", idle=0.05
    )
    assert await asyncio.wait_for(committer.submit("one"), 2) == "one stored"
    for _ in range(100):
        if len(steps) == 2:
            break
        await asyncio.sleep(0.01)
    assert steps == [(["one"], None), ([], ["one"])]
    with pytest.raises(RuntimeError, match="step failed"):
        await asyncio.wait_for(committer.submit("boom"), 2)
    with caplog.at_level(logging.ERROR, logger="mailflow"):
        assert await asyncio.wait_for(committer.submit("late"), 2) == "late stored"
        for _ in range(100):
            if "finishing a commit failed" in caplog.text:
                break
            await asyncio.sleep(0.01)
    assert "test-commit: finishing a commit failed: step failed" in caplog.text
    assert await asyncio.wait_for(committer.submit("two"), 2) == "two stored"


async def test_a_lone_caller_is_answered_at_once_a_crowd_after_the_next_round(
    monkeypatch,
) -> None:
    """One caller (one client, message after message) is answered as soon as its round
    returns; a batch of several is answered after the round that finished what it
    left, which keeps many clients in step."""
    steps: list[list[str]] = []
    answered: list[tuple[list[str], int]] = []  # who, and how many rounds had run

    def step(requests: list[str], carried: object) -> tuple[object, object]:
        steps.append(list(requests))
        if requests == ["a"]:
            time.sleep(0.1)  # b and c queue up meanwhile
        return ([f"{r} stored" for r in requests] or None), (list(requests) or None)

    answer = durable._answer

    def recording_answer(waiters, outcome):  # type: ignore[no-untyped-def]
        answered.append(([request for request, _, _ in waiters], len(steps)))
        answer(waiters, outcome)

    monkeypatch.setattr(durable, "_answer", recording_answer)
    committer: durable.GroupCommitter[str, str] = durable.GroupCommitter.pipelined(
        step, "test-commit", idle=0.05
    )
    first = asyncio.create_task(committer.submit("a"))
    await asyncio.sleep(0.03)
    more = [asyncio.create_task(committer.submit(r)) for r in ("b", "c")]
    assert await asyncio.wait_for(asyncio.gather(first, *more), 2) == [
        "a stored",
        "b stored",
        "c stored",
    ]
    assert steps == [["a"], ["b", "c"], []]
    assert answered == [(["a"], 1), (["b", "c"], 3)]


async def test_a_failed_data_sync_fails_the_copy_and_leaves_nothing(tmp_path: Path) -> None:
    md = MaildirDelivery(MaildirConfig(root=tmp_path), SyncfsSyncer(ScriptedSyncfs(fail={1})))
    [result] = await md.deliver_many_async([("a@example.com", "", "")], MESSAGE)
    assert isinstance(result, OSError) and "injected" in str(result)
    assert _delivered(tmp_path) == []
    assert _visible(tmp_path / "a@example.com" / "tmp") == []
    assert md.recover().renamed == 0  # nothing was answered: nothing to redo


@pytest.mark.parametrize("blocking", [False, True])
async def test_a_failed_name_sync_keeps_the_journal_for_the_next_start(
    tmp_path: Path, blocking: bool, caplog
) -> None:
    """The name sync comes after the answer: when it fails, the copy stays delivered
    and its journal is kept, so a restart can redo a rename the disk lost."""
    md = MaildirDelivery(MaildirConfig(root=tmp_path), SyncfsSyncer(ScriptedSyncfs(fail={2})))
    copies = [("a@example.com", "", "")]
    with caplog.at_level(logging.ERROR, logger="mailflow"):
        if blocking:
            [path] = md.deliver_many(copies, MESSAGE)
        else:
            [path] = await md.deliver_many_async(copies, MESSAGE)
            for _ in range(100):
                if "journal is kept" in caplog.text:
                    break
                await asyncio.sleep(0.01)
    assert isinstance(path, Path) and path.read_bytes() == MESSAGE
    assert "journal is kept for the next start" in caplog.text
    [kept] = (tmp_path / journal.JOURNAL_DIR).iterdir()
    # The disk lost the rename: at the next start the journal puts the copy back.
    os.rename(path, tmp_path / "a@example.com" / "tmp" / path.name)
    done = MaildirDelivery(MaildirConfig(root=tmp_path)).recover()
    assert (done.journals, done.renamed) == (1, 1)
    assert path.read_bytes() == MESSAGE
    assert not kept.exists()


# --- a failed sync reports nothing stored ---------------------------------------------


def test_maildir_data_sync_failure_fails_every_copy_and_leaves_nothing(tmp_path: Path) -> None:
    md = MaildirDelivery(MaildirConfig(root=tmp_path), SyncfsSyncer(ScriptedSyncfs(fail={1})))
    requests = [([("a@example.com", "", ""), ("b@example.com", "", "")], MESSAGE)] * 3
    results = md.deliver_batch(requests)
    assert [type(r) for rs in results for r in rs] == [OSError] * 6
    for box in ("a@example.com", "b@example.com"):
        assert _visible(tmp_path / box / "new") == []
        assert _visible(tmp_path / box / "tmp") == []


async def test_only_the_failed_batch_fails_and_the_next_one_is_stored(tmp_path: Path) -> None:
    spool = Spool(tmp_path, SyncfsSyncer(ScriptedSyncfs(fail={1})))
    with pytest.raises(OSError, match="injected"):
        await spool.store(_entry(1), b"x\r\n")
    assert _visible(spool.queue_dir) == []  # no .eml, no .json, no temp file
    await spool.store(_entry(2), b"y\r\n")
    assert [e.id for e in spool.recover()] == ["D000002"]


async def test_spool_directory_sync_failure_removes_what_it_renamed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, SyncfsSyncer(ScriptedSyncfs(fail={2})))
    with pytest.raises(OSError, match="injected"):
        await spool.store(_entry(1), b"x\r\n")
    assert _visible(spool.queue_dir) == []
    assert spool.recover() == []  # a restart must not deliver what was refused


async def test_every_caller_of_a_failed_batch_gets_the_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path, SyncfsSyncer(ScriptedSyncfs(lambda call: True)))
    results = await asyncio.gather(
        *(spool.store(_entry(i), b"x\r\n") for i in range(8)), return_exceptions=True
    )
    assert [type(r) for r in results] == [OSError] * 8
    assert _visible(spool.queue_dir) == []


def test_an_error_taken_by_another_call_still_fails_an_earlier_mark(tmp_path: Path) -> None:
    """syncfs reports an error once: if another caller's call took it after our mark
    (it may have been our file's), our own successful call must still fail."""
    syncer = SyncfsSyncer(ScriptedSyncfs(fail={1}))
    dev = syncer.watch(str(tmp_path))
    mark = syncer.mark()
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"data")
        assert syncer.sync_dirs([(str(tmp_path), dev)], syncer.mark()) != {}  # takes it
        errors = syncer.sync_files([(fd, dev)], mark)  # this call itself succeeds
    finally:
        os.close(fd)
    assert list(errors) == [fd]
    assert "injected" in str(errors[fd])
    assert syncer.sync_files([(fd, dev)], syncer.mark()) == {}  # a later mark is clean


def test_file_system_not_watched_before_writing_is_fsynced_not_syncfsed(tmp_path: Path) -> None:
    syncfs = ScriptedSyncfs()
    syncer = SyncfsSyncer(syncfs)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"data")
        dev = os.fstat(fd).st_dev
        assert syncer.sync_files([(fd, dev)], syncer.mark()) == {}
        assert syncer.sync_dirs([(str(tmp_path), dev)], syncer.mark()) == {}
    finally:
        os.close(fd)
    assert syncfs.calls == 0  # its cursor would not cover writes made before it opened


async def test_server_answers_451_and_stores_nothing_when_every_sync_fails(
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path)
    app = App(config)
    app.maildir = MaildirDelivery(
        config.delivery.maildir, SyncfsSyncer(ScriptedSyncfs(lambda call: True))
    )
    app._spool = Spool(config.queue.directory, SyncfsSyncer(ScriptedSyncfs(lambda call: True)))
    server = Server(app)
    [(host, port)] = (await server.start())[:1]
    try:
        with pytest.raises(aiosmtplib.SMTPResponseException) as info:
            await aiosmtplib.send(
                make_message(),
                sender="a@example.org",
                recipients=["u@example.com"],
                hostname=host,
                port=port,
            )
    finally:
        await server.stop()
    assert info.value.code == 451
    assert _delivered(Path(config.delivery.maildir.root)) == []
    assert _visible(Path(config.queue.directory) / "queue") == []


# --- choosing the method --------------------------------------------------------------


def test_fallback_to_fsync_where_syncfs_is_unusable(monkeypatch, caplog) -> None:
    monkeypatch.setattr(durable, "load_syncfs", lambda: None)
    assert isinstance(make_syncer("auto"), FsyncSyncer)
    with caplog.at_level(logging.WARNING, logger="mailflow"):
        chosen = make_syncer("syncfs")
    assert isinstance(chosen, FsyncSyncer)
    assert "syncfs is not usable here" in caplog.text
    with pytest.raises(OSError):
        SyncfsSyncer()


def test_fsync_when_configured_even_where_syncfs_works(tmp_path: Path) -> None:
    assert isinstance(make_syncer("fsync"), FsyncSyncer)
    expected = FsyncSyncer if load_syncfs() is None else SyncfsSyncer
    assert isinstance(make_syncer("auto"), expected)
    assert isinstance(Spool(tmp_path, "fsync")._sync, FsyncSyncer)


@pytest.mark.parametrize(
    ("release", "usable"),
    [
        ("5.4.0-150-generic", False),
        ("5.7.19", False),
        ("5.8.0", True),
        ("6.18.44-fc", True),
        ("10.0", True),
        ("weird", False),
    ],
)
def test_syncfs_needs_a_kernel_that_reports_writeback_errors(release: str, usable: bool) -> None:
    assert durable._kernel_reports_syncfs_errors(release) is usable


def test_app_passes_storage_sync_to_maildir_and_spool(tmp_path: Path) -> None:
    app = App(config_for(tmp_path, "storage: {sync: fsync}\n"))
    assert isinstance(app.maildir._sync, FsyncSyncer)
    assert isinstance(app.spool._sync, FsyncSyncer)


# --- config ---------------------------------------------------------------------------


def _issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "mailflow.yaml")
    return [str(issue) for issue in info.value.issues]


@pytest.mark.parametrize("method", ["auto", "syncfs", "fsync"])
def test_storage_sync_accepts_the_three_methods(method: str) -> None:
    assert parse_config(f"storage:\n  sync: {method}\n", "m.yaml").storage.sync == method


def test_storage_sync_defaults_to_auto() -> None:
    assert parse_config("", "m.yaml").storage.sync == "auto"
    assert parse_config("storage:\n", "m.yaml").storage.sync == "auto"


def test_storage_sync_bad_value_and_unknown_key_name_file_line_and_key() -> None:
    [bad] = _issues("server: {}\nstorage:\n  sync: sometimes\n")
    assert bad.startswith("mailflow.yaml:3: storage.sync: ")
    assert "'auto', 'syncfs' or 'fsync'" in bad
    [unknown] = _issues("storage:\n  snyc: fsync\n")
    assert unknown == "mailflow.yaml:2: storage.snyc: unknown key (did you mean 'sync'?)"


def test_syncer_is_abstract() -> None:
    with pytest.raises(TypeError):
        Syncer()  # type: ignore[abstract]
