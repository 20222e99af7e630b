"""Looking inside archives (zip, tar, gzip, bzip2, xz), nested, within fixed budgets.

Nothing is ever extracted to disk and nothing is decompressed without a byte cap:
zip members are read through ``ZipFile.open(...).read(n)`` with ``n`` at most what is
left of the budget, gzip/bzip2/xz through their decompressor objects with
``max_length``; tar members through ``extractfile(...).read(n)``. What one message may
cost is bounded by :class:`Limits`, shared by all its attachments:

* ``max_depth``: archives inside archives (the attachment itself is depth 1);
* ``max_members``: members looked at, over all archives of the message;
* ``max_expanded``: decompressed bytes produced, over all archives;
* ``max_ratio``: a member whose declared size is more than this many times its
  compressed size is not decompressed (a bomb), and neither is one whose output
  passes the ratio while it is read.

A zip's central directory is counted from its end record before ``zipfile`` reads it
(so a directory of a million entries is refused, not loaded). Each limit hit is
recorded in :attr:`Budget.hits` and becomes an ``ARCHIVE_BOMB`` finding; a member or
archive that does not parse becomes ``ARCHIVE_MALFORMED``; an encrypted member
``ARCHIVE_ENCRYPTED``; 7z, rar and cab are recognised but not opened
(``ARCHIVE_UNINSPECTED``).
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

from mailflow.api import mime

HEAD = 64 * 1024  # bytes of a member read to tell its type (ISO 9660 needs 32 KiB+)
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_CD_ENTRY = 46  # bytes of a central directory entry with an empty name


@dataclass(frozen=True)
class Limits:
    max_depth: int = 4
    max_members: int = 1000
    max_expanded: int = 32 * 1024 * 1024
    max_ratio: int = 200


@dataclass
class Member:
    """One file found inside an archive: its path (``outer.zip/inner.zip/a.exe``),
    name, detected type, and sizes."""

    path: str
    name: str
    real: mime.FileType
    size: int
    depth: int
    encrypted: bool = False


@dataclass
class Budget:
    """What the archives of one message have used so far, and the limits hit."""

    limits: Limits
    members: int = 0
    expanded: int = 0
    max_depth_seen: int = 0
    hits: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    encrypted: list[str] = field(default_factory=list)
    uninspected: list[str] = field(default_factory=list)
    found: list[Member] = field(default_factory=list)

    def hit(self, what: str) -> None:
        if len(self.hits) < 20:
            self.hits.append(what)

    @property
    def left(self) -> int:
        return max(0, self.limits.max_expanded - self.expanded)

    def counters(self) -> dict[str, Any]:
        return {
            "members": self.members,
            "expanded_bytes": self.expanded,
            "max_depth": self.max_depth_seen,
            "limits_hit": list(self.hits),
        }


class _Stop(Exception):
    """A budget ran out: stop inspecting this message's archives."""


def inspect(data: bytes, real: mime.FileType, path: str, budget: Budget, depth: int = 1) -> None:
    """Look inside ``data`` (an archive of type ``real``, found at ``path``), adding
    what is inside to ``budget.found``. Never raises."""
    try:
        _inspect(data, real, path, budget, depth)
    except _Stop:
        pass
    except Exception as exc:  # hostile input: any parser error is a finding, not a crash
        _malformed(budget, path, exc)


def _malformed(budget: Budget, path: str, exc: BaseException) -> None:
    if len(budget.malformed) < 20:
        budget.malformed.append(f"{path}: {type(exc).__name__}: {str(exc)[:120]}")


def _inspect(data: bytes, real: mime.FileType, path: str, budget: Budget, depth: int) -> None:
    if depth > budget.limits.max_depth:
        budget.hit(f"max_depth {budget.limits.max_depth} at {path}")
        raise _Stop
    budget.max_depth_seen = max(budget.max_depth_seen, depth)
    kind = real.mime
    if kind == "application/zip" or (real.kind == "office" and data.startswith(b"PK")):
        _zip(data, path, budget, depth)
    elif kind == "application/x-tar":
        _tar(data, path, budget, depth)
    elif kind in ("application/gzip", "application/x-bzip2", "application/x-xz"):
        _stream(data, kind, path, budget, depth)
    elif real.kind == "archive":
        budget.uninspected.append(f"{path} ({kind})")
    elif zip_inside(data, real):
        _zip(data, path, budget, depth)


def zip_inside(data: bytes, real: mime.FileType) -> bool:
    """A zip behind a prefix (a self-extractor stub, junk): no magic at the start, but
    an end record near the end, which is all unzip, 7-Zip and Windows look for."""
    if real.kind != "unknown":
        return False
    at = data.rfind(_EOCD, max(0, len(data) - 65557))
    if at < 0 or at + 22 > len(data):
        return False
    # The central directory ends where the end record starts: checked, so that four
    # stray bytes in some binary file do not make it a broken zip.
    size = struct.unpack_from("<I", data, at + 12)[0]
    return 0 < size <= at and data.startswith(b"PK\x01\x02", at - size)


def _count(budget: Budget, path: str) -> None:
    budget.members += 1
    if budget.members > budget.limits.max_members:
        budget.hit(f"max_members {budget.limits.max_members} at {path}")
        raise _Stop


def _charge(budget: Budget, produced: int, path: str) -> None:
    budget.expanded += produced
    if budget.expanded > budget.limits.max_expanded:
        budget.hit(f"max_expanded {budget.limits.max_expanded} bytes at {path}")
        raise _Stop


def _zip_entries(data: bytes) -> int:
    """The number of entries the zip's end record declares (-1: no end record).

    zipfile reads the central directory by its declared size, not by the count: a
    count of 1 over a directory of 100,000 entries would load them all. So the
    larger of the count and what the size can hold (46 bytes an entry at least)."""
    at = data.rfind(_EOCD, max(0, len(data) - 65557))
    if at < 0 or at + 22 > len(data):
        return -1
    total, size = struct.unpack_from("<HI", data, at + 10)
    if total == 0xFFFF or size == 0xFFFFFFFF:  # zip64: the real figures are elsewhere
        loc = data.rfind(_ZIP64_LOCATOR, max(0, at - 20), at)
        if loc >= 0 and loc + 20 <= len(data):
            offset = struct.unpack_from("<Q", data, loc + 8)[0]
            if offset + 48 <= len(data) and data.startswith(b"PK\x06\x06", offset):
                total, size = struct.unpack_from("<QQ", data, offset + 32)
                return int(max(total, size // _CD_ENTRY))
        return 1 << 62
    return int(max(total, size // _CD_ENTRY))


def _zip(data: bytes, path: str, budget: Budget, depth: int) -> None:
    declared = _zip_entries(data)
    if declared < 0:
        raise zipfile.BadZipFile("no end of central directory record")
    if budget.members + declared > budget.limits.max_members:
        budget.hit(f"max_members {budget.limits.max_members} at {path} ({declared} entries)")
        raise _Stop
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            member_path = f"{path}/{info.filename}"
            _count(budget, member_path)
            # Encrypted by the central directory or by the local header: unzip tools
            # differ in which one they believe, so either is enough.
            local = info.header_offset
            encrypted = bool(info.flag_bits & 0x1) or (
                data.startswith(b"PK\x03\x04", local) and bool(data[local + 6] & 0x1)
            )
            if encrypted:
                budget.encrypted.append(member_path)
                real = mime.detect(b"", info.filename)
                budget.found.append(
                    Member(member_path, info.filename, real, info.file_size, depth, True)
                )
                continue
            ratio = info.file_size / max(1, info.compress_size)
            if ratio > budget.limits.max_ratio and info.file_size > 1024 * 1024:
                budget.hit(f"max_ratio {budget.limits.max_ratio} at {member_path}")
                raise _Stop
            before = len(budget.found)
            try:
                with archive.open(info) as stream:
                    # A wrong CRC-32 does not stop 7-Zip or WinRAR extracting the
                    # member (they warn): what it holds is judged all the same.
                    if hasattr(stream, "_expected_crc"):
                        stream._expected_crc = None
                    _member(stream, info.filename, info.compress_size, member_path, budget, depth)
            except _Stop:
                raise
            except Exception as exc:
                _malformed(budget, member_path, exc)
                # Unreadable here (Deflate64, a broken stream) need not be unreadable
                # for the recipient's unzip: the member is still judged by its name.
                if not any(m.path == member_path for m in budget.found[before:]):
                    named = mime.detect(b"", info.filename)
                    budget.found.append(
                        Member(member_path, info.filename, named, info.file_size, depth)
                    )


def _tar(data: bytes, path: str, budget: Budget, depth: int) -> None:
    # ignore_zeros: past a broken header (or an end marker) read on, block by block,
    # as GNU tar does ("Skipping to next header"): tarfile would otherwise stop there
    # silently, and the members after it would go unseen. Linear in the data.
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", ignore_zeros=True) as archive:
        while True:
            info = archive.next()
            if info is None:
                break
            kept = getattr(archive, "members", None)
            if isinstance(kept, list):
                kept.clear()  # keep no list of members (memory stays bounded)
            if not info.isfile():
                continue
            member_path = f"{path}/{info.name}"
            _count(budget, member_path)
            stream = archive.extractfile(info)
            if stream is None:
                continue
            _member(stream, info.name, info.size, member_path, budget, depth)


def _cap(budget: Budget, compressed: int) -> int:
    """How much to decompress: what the budget and the ratio allow, plus one byte
    to tell that there was more."""
    return min(budget.left, budget.limits.max_ratio * max(compressed, 1024)) + 1


def _capped(budget: Budget, produced: int, cap: int, path: str) -> None:
    """Stop when decompression filled the cap. Called after :func:`_charge`, which
    stops first when the cap was the budget, so a full cap here is the ratio."""
    if produced >= cap:
        budget.hit(f"max_ratio {budget.limits.max_ratio} at {path}")
        raise _Stop


def _decompressor(kind: str) -> Any:
    if kind == "application/gzip":
        return zlib.decompressobj(wbits=47)  # gzip or zlib header
    if kind == "application/x-bzip2":
        return bz2.BZ2Decompressor()
    return lzma.LZMADecompressor()


MAX_STREAMS = 16  # concatenated gzip/bzip2/xz streams in one file (gunzip reads all)


def _concatenated(data: bytes, kind: str, cap: int, path: str, budget: Budget) -> bytes:
    """Decompress ``data``, stream after stream as gunzip, bunzip2 and xz do (a
    .tar.gz may be several gzip members end to end), at most ``cap`` bytes out and
    :data:`MAX_STREAMS` streams: each next stream starts from a copy of what is left
    (``unused_data``), so their number is bounded, and more of them is a finding."""
    decompressor = _decompressor(kind)
    out = decompressor.decompress(data, cap)
    streams = 1
    while decompressor.eof and len(out) < cap:
        rest = decompressor.unused_data
        if not rest.strip(b"\0"):
            break  # zero padding after the last stream, as gunzip ignores
        if streams >= MAX_STREAMS:
            budget.hit(f"more than {MAX_STREAMS} concatenated streams at {path}")
            raise _Stop
        decompressor = _decompressor(kind)
        try:
            out += decompressor.decompress(rest, cap - len(out))
        except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error):
            break  # trailing garbage: gunzip warns and keeps what came before
        streams += 1
    return out


def _stream(data: bytes, kind: str, path: str, budget: Budget, depth: int) -> None:
    """One compressed stream: decompress at most what the budget allows (+1 byte to
    know it was more), then look at what came out as a member."""
    _count(budget, path)
    cap = _cap(budget, len(data))
    out = _concatenated(data, kind, cap, path, budget)
    _charge(budget, len(out), path)
    _capped(budget, len(out), cap, path)
    name = path.rsplit("/", 1)[-1]
    for suffix in (".gz", ".tgz", ".bz2", ".tbz", ".xz", ".txz"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)] + (".tar" if suffix.startswith(".t") else "")
            break
    inner = mime.detect(out, name)
    budget.found.append(Member(f"{path}/{name}", name, inner, len(out), depth))
    if inner.kind == "archive" or (inner.kind == "office" and inner.mime != "application/x-msi"):
        _inspect(out, inner, f"{path}/{name}", budget, depth + 1)


def _member(
    stream: Any, name: str, compressed: int, member_path: str, budget: Budget, depth: int
) -> None:
    """Read a member's head (its type); an archive or Office document is read whole,
    within the budget, and looked into."""
    head = stream.read(min(HEAD, budget.left + 1))
    _charge(budget, len(head), member_path)
    real = mime.detect(head, name)
    nested = (
        real.kind == "archive"
        or real.kind == "office"
        or zip_inside(head, real)
        or (real.kind == "unknown" and mime.extension(name) == "zip")
    )
    data = head
    if nested and len(head) == HEAD:
        cap = _cap(budget, compressed)
        rest = stream.read(cap)
        _charge(budget, len(rest), member_path)
        _capped(budget, len(rest), cap, member_path)
        data = head + rest
        real = mime.detect(data, name)
    budget.found.append(Member(member_path, name, real, len(data), depth))
    if (
        real.kind == "archive"
        or (real.kind == "office" and data.startswith(b"PK"))
        or zip_inside(data, real)
    ):
        _inspect(data, real, member_path, budget, depth + 1)
