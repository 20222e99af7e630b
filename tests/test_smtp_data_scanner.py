"""The per-block DATA scanner and the stores behind it (mailflow.smtp.data), without sockets.

The scanner must give the same message, facts and verdict however the data is cut
into blocks (the socket decides that), and the same as a whole-message reference:
dot-stuffing undone after CRLF (RFC 5321 4.5.2), every bare CR/LF made CRLF, lines
measured after that, Received fields of the header counted.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import pytest

from mailflow.normalize import has_bare_newline, normalize_newlines
from mailflow.smtp.data import ByteBudget, DataError, DataScanner, DataStore

LIMIT = 1001  # aiosmtpd's line_length_limit


def reference(raw: bytes, size_limit: int = 0) -> tuple[bytes, DataError | None, int]:
    """The whole-message answer: (message, error, Received fields in its header)."""
    if size_limit and len(raw) > size_limit:
        return b"", DataError.TOO_BIG, 0
    data = raw[1:] if raw.startswith(b".") else raw
    data = normalize_newlines(data.replace(b"\r\n.", b"\r\n"))
    if any(len(line) + 2 > LIMIT for line in data.split(b"\r\n")):
        return b"", DataError.LINE_TOO_LONG, 0
    # A blank first line is an empty header section (RFC 5322 3.5).
    end = (b"\r\n" + data).find(b"\r\n\r\n")
    head = (b"\r\n" + data)[: end if end >= 0 else None]
    received = sum(1 for line in head.split(b"\r\n") if line[:9].lower() == b"received:")
    return data, None, received


def scan(raw: bytes, cuts: list[int], size_limit: int = 0) -> tuple[bytes, DataScanner]:
    scanner = DataScanner(LIMIT, size_limit, reject_bare_newline=False)
    out = []
    bounds = [0, *sorted(cuts), len(raw)]
    for start, end in itertools.pairwise(bounds):
        out.append(scanner.feed(raw[start:end]))
    out.append(scanner.finish())
    return b"".join(out), scanner


ATOMS = [
    b"x",
    b"word ",
    b"\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"\r\n.",
    b"\n.",
    b"\r.",
    b"\x00",
    b"Received: from a\r\n",
    b"received:",
    b"\r\n\r\n",
    b"y" * 600,
]


def random_message(rng: random.Random) -> bytes:
    body = b"".join(rng.choice(ATOMS) for _ in range(rng.randrange(0, 60)))
    # What the reader hands over ends in CRLF (the end line follows), or is empty.
    return body + b"\r\n" if body else body


def test_any_split_gives_the_whole_message_answer():
    rng = random.Random(11)
    for _ in range(3000):
        raw = random_message(rng)
        expected, error, received = reference(raw)
        cuts = [rng.randrange(0, len(raw) + 1) for _ in range(rng.randrange(0, 6))]
        if rng.random() < 0.2:
            cuts = list(range(len(raw)))  # one octet at a time
        got, scanner = scan(raw, cuts)
        assert scanner.error == error, raw
        if error is None:
            assert scanner.facts.nul == (b"\x00" in raw)
            # A message with NUL is refused: from there on nothing is kept.
            assert scanner.keep is not scanner.facts.nul
            if scanner.keep:
                assert got == expected, (raw, cuts)
            assert not has_bare_newline(got)
            assert scanner.facts.bare_newline == has_bare_newline(raw)
            assert scanner.facts.received == received, raw
            assert scanner.facts.size == len(raw)


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        (b"..a\r\n.b\r\n", b".a\r\nb\r\n"),  # the first line counts (CRLF of the DATA command)
        (b"a\n.b\r\n", b"a\r\n.b\r\n"),  # a dot after a bare LF stays: it was no line start
        (b"a\r.\r\n", b"a\r\n.\r\n"),  # after a bare CR, likewise
        (b"a\r\r\n.b\r\n", b"a\r\n\r\nb\r\n"),  # CR CR LF: the CRLF is real, the dot stuffing
    ],
)
def test_dot_stuffing_is_undone_only_after_a_crlf(raw, stored):
    for cut in range(len(raw) + 1):
        got, scanner = scan(raw, [cut])
        assert (got, scanner.error) == (stored, None), cut


def test_lf_only_lines_are_measured_as_lines():
    """Finding 5: with LF only, the whole message used to be one "line" and got 500."""
    raw = b"Subject: lf\n\n" + b"".join(b"%070d\n" % i for i in range(400)) + b"\r\n"
    got, scanner = scan(raw, [1000, 2000])
    assert scanner.error is None
    assert got == raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    long = b"Subject: lf\n\n" + b"z" * 1000 + b"\n\r\n"
    assert scan(long, [500])[1].error is DataError.LINE_TOO_LONG


def test_line_limit_is_exact_across_blocks():
    for length in (998, 999, 1000):
        raw = b"a" * length + b"\r\n"
        error = scan(raw, [length // 2, length + 1])[1].error
        assert (error is None) == (length + 2 <= LIMIT), length


def test_the_first_problem_wins_and_nothing_more_is_kept():
    scanner = DataScanner(LIMIT, 5000, reject_bare_newline=False)
    assert scanner.feed(b"ok\r\n" + b"y" * 2000) == b""
    assert scanner.error is DataError.LINE_TOO_LONG
    assert scanner.feed(b"z" * 10_000) == b""  # over the size limit too: still 500
    assert scanner.error is DataError.LINE_TOO_LONG
    big = DataScanner(LIMIT, 100, reject_bare_newline=False)
    assert big.feed(b"a\r\n" * 30) != b""
    assert big.feed(b"a\r\n" * 30) == b""
    assert big.error is DataError.TOO_BIG and not big.keep


@pytest.mark.parametrize("reject", [False, True])
def test_nul_and_rejected_bare_newlines_stop_keeping(reject):
    scanner = DataScanner(LIMIT, 0, reject_bare_newline=reject)
    assert scanner.feed(b"a\r\n") == b"a\r\n"
    kept = scanner.feed(b"b\nc\r\n")
    assert scanner.facts.bare_newline
    assert (kept == b"") is reject
    scanner.feed(b"nul\x00\r\n")
    assert scanner.facts.nul and not scanner.keep
    assert scanner.feed(b"more\r\n") == b""


def test_one_block_costs_the_same_in_a_small_and_a_large_message():
    """Each block is scanned in time of its own size: a 4x larger message of bare LF
    lines takes ~4x the time in total (linear), in as many equal blocks."""
    block = (b"x" * 70 + b"\n") * 3000  # 213 KB of bare LF: each one normalized

    def total(blocks: int) -> float:
        best = float("inf")
        for _ in range(3):
            scanner = DataScanner(LIMIT, 0, reject_bare_newline=False)
            start = time.process_time()
            for _ in range(blocks):
                scanner.feed(block)
            best = min(best, time.process_time() - start)
        return best

    small, large = total(8), total(32)
    assert large < 3 * 4 * small + 0.01, (small, large)


# --- DataStore ---------------------------------------------------------------------------------


async def test_store_keeps_small_data_in_memory_and_large_in_a_file(tmp_path):
    small = DataStore(1000, tmp_path)
    await small.add(b"a" * 600)
    await small.add(b"b" * 400)
    assert not small.on_disk and list(tmp_path.iterdir()) == []
    assert await small.take() == b"a" * 600 + b"b" * 400

    large = DataStore(1000, tmp_path)
    pieces = [bytes([65 + i % 26]) * 700 for i in range(20)]
    for piece in pieces:
        await large.add(piece)
    assert large.on_disk and large.path is not None and large.path.parent == tmp_path
    assert await large.take() == b"".join(pieces)
    assert list(tmp_path.iterdir()) == []  # read back, then deleted
    large.discard()  # idempotent


async def test_store_removes_its_file_when_cancelled_mid_write(tmp_path):
    store = DataStore(10, tmp_path)

    async def fill() -> None:
        while True:
            await store.add(b"x" * 1_000_000)

    task = asyncio.ensure_future(fill())
    while not store.on_disk:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    store.discard()  # as the session does in its finally
    async with asyncio.timeout(5):
        while list(tmp_path.iterdir()):  # the thread finishes its write, then it goes
            await asyncio.sleep(0.01)


async def test_a_storage_error_is_kept_and_the_file_goes_at_once(tmp_path, monkeypatch):
    """Disk full mid-DATA: add() does not raise (the reader must still find the end of
    the data), keeps nothing more, and the half-written file is deleted right away."""
    import errno

    import mailflow.smtp.data as smtp_data

    store = DataStore(10, tmp_path)
    await store.add(b"x" * 100)
    assert store.on_disk and len(list(tmp_path.iterdir())) == 1

    def disk_full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(smtp_data, "_write_all", disk_full)
    await store.add(b"y" * 100)
    assert isinstance(store.failed, OSError) and store.failed.errno == errno.ENOSPC
    assert not store.on_disk and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    await store.add(b"z" * 100)  # nothing more is kept, and no new file made
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):
        await store.take()


# --- ByteBudget --------------------------------------------------------------------------------


async def test_budget_serves_in_order_and_cuts_oversized_requests():
    budget = ByteBudget(100)
    assert await budget.acquire(60) == 60
    order: list[str] = []

    async def want(name: str, size: int) -> None:
        taken = await budget.acquire(size)
        order.append(name)
        await asyncio.sleep(0.01)
        budget.release(taken)

    tasks = [asyncio.ensure_future(want(n, s)) for n, s in (("big", 500), ("small", 10))]
    await asyncio.sleep(0.01)
    # The oversized one is first in line and waits for the whole budget; the small one
    # waits behind it (no overtaking: a large message is never starved).
    assert order == [] and budget.waiting == 2
    budget.release(60)
    await asyncio.gather(*tasks)
    assert order == ["big", "small"]
    assert budget.available == 100


async def test_budget_cancelled_waiter_gives_way():
    budget = ByteBudget(100)
    await budget.acquire(100)
    first = asyncio.ensure_future(budget.acquire(80))
    second = asyncio.ensure_future(budget.acquire(20))
    await asyncio.sleep(0)
    first.cancel()
    budget.release(30)
    assert await second == 20
    assert budget.available == 10 and budget.waiting == 0


# --- the shared pace of large-message data --------------------------------------------


async def test_the_bulk_pacer_shares_one_rate_among_all_connections():
    """Two connections pacing 3 x 64 KiB each at 1 MiB/s take at least 0.375 s together:
    the second one's reservations follow the first one's (lower bound only: a loaded
    machine can only make it slower)."""
    import time

    from mailflow.smtp.data import BulkPacer

    pacer = BulkPacer(1024 * 1024)
    finished: list[float] = []

    async def connection() -> None:
        for _ in range(3):
            await pacer.pace(64 * 1024)
        finished.append(time.monotonic())

    started = time.monotonic()
    await asyncio.gather(connection(), connection())
    assert max(finished) - started >= 0.37


async def test_a_zero_rate_does_not_pace():
    from mailflow.smtp.data import BulkPacer

    pacer = BulkPacer(0)
    async with asyncio.timeout(5):  # generous: only a bug sleeps here
        for _ in range(1000):
            await pacer.pace(10**9)
