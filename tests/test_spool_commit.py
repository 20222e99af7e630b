"""Spool group commit: concurrent stores are batched, and each is durable when it returns."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mailflow.delivery.spool import QueueEntry, RecipientState, Spool


def _entry(i: int) -> QueueEntry:
    return QueueEntry(
        id=f"T{i:06d}",
        sender="a@example.org",
        recipients=[RecipientState(f"u{i}@example.com", {"kind": "maildir"})],
        created=time.time(),
    )


async def test_concurrent_stores_all_land_and_recover(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    await asyncio.gather(*(spool.store(_entry(i), b"m%d\r\n" % i) for i in range(60)))
    assert len(spool.ids()) == 60
    assert not list(spool.queue_dir.glob(".*.tmp"))
    recovered = Spool(tmp_path).recover()
    assert [e.id for e in recovered] == [f"T{i:06d}" for i in range(60)]
    assert spool.read_message("T000007") == b"m7\r\n"


async def test_store_reports_failure_to_every_waiter(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.queue_dir.rmdir()
    spool.queue_dir.write_bytes(b"not a directory")
    results = await asyncio.gather(
        *(spool.store(_entry(i), b"x\r\n") for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, OSError) for r in results)


async def test_commit_thread_is_reused_then_exits(tmp_path: Path, monkeypatch) -> None:
    import mailflow.delivery.durable as durable

    monkeypatch.setattr(durable, "COMMIT_IDLE", 0.05)
    spool = Spool(tmp_path)
    for i in range(3):
        await spool.store(_entry(i), b"x\r\n")
    assert spool._committer._running  # still waiting for more work
    await asyncio.sleep(0.3)
    assert not spool._committer._running


def test_update_replaces_metadata(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    entry = _entry(1)
    spool.store_sync(entry, b"x\r\n")
    entry.recipients[0].attempts = 3
    spool.update(entry)
    assert spool.load(entry.id).recipients[0].attempts == 3


@pytest.mark.parametrize("count", [1, 2, 9])
def test_write_files_fsyncs_and_renames(tmp_path: Path, count: int) -> None:
    from mailflow.delivery.durable import write_files as _write_files

    items = [(str(tmp_path / f"f{i}"), b"%d" % i) for i in range(count)]
    _write_files(items)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"f{i}" for i in range(count))


def test_failed_fsync_renames_nothing_and_raises(tmp_path: Path, monkeypatch) -> None:
    import os
    import threading

    from mailflow.delivery import durable

    real_fsync = os.fsync
    calls = 0
    lock = threading.Lock()

    def flaky_fsync(fd: int) -> None:
        nonlocal calls
        with lock:
            calls += 1
            fail = calls == 3
        if fail:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", flaky_fsync)
    items = [(str(tmp_path / f"f{i}"), b"x") for i in range(6)]
    with pytest.raises(OSError):
        durable.write_files(items)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
