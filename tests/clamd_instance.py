"""A private clamd from Debian's clamav-daemon package, with a signature database we write.

There is no internet for freshclam, and ClamAV has no built-in EICAR detection (1.4.6
answers ``stream: OK`` for EICAR with a database that lacks it), so the database is
one ``.ndb`` file with two body signatures (``Name:TargetType:Offset:HexSignature``,
target 0 = any file, offset * = anywhere): the EICAR test string, and a test pattern
that the tests only ever send deflated inside a zip, so finding it shows clamd
unpacked the archive (from the base64-encoded MIME part) itself.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# The EICAR anti-malware test file (eicar.org), split so that this source file itself
# is not what a scanner on a developer's machine flags.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
ZIP_PATTERN = b"MAILFLOW-CLAMAV-" + b"TEST-PATTERN-7f3a91"
EICAR_NAME = "Mailflow.Test.EICAR.UNOFFICIAL"  # clamd adds .UNOFFICIAL to local signatures
ZIP_NAME = "Mailflow.Test.ZipPattern.UNOFFICIAL"
STREAM_MAX = 1024 * 1024  # StreamMaxLength of the test clamd (1M)
START_TIMEOUT = 120.0  # loading two signatures takes ~2 s; a busy CI machine may be slower


def clamd_binary() -> str | None:
    return shutil.which("clamd") or next(
        (p for p in ("/usr/sbin/clamd", "/usr/local/sbin/clamd") if Path(p).exists()), None
    )


@dataclass
class Clamd:
    socket_path: Path
    tcp_port: int
    directory: Path

    @property
    def tcp_address(self) -> str:
        return f"127.0.0.1:{self.tcp_port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2.0)
            s.connect(str(path))
            s.sendall(b"zPING\0")
            return s.recv(64).rstrip(b"\0") == b"PONG"
    except OSError:
        return False


@contextlib.contextmanager
def running_clamd(
    directory: Path, stream_max: int = STREAM_MAX, cache: bool = True
) -> Iterator[Clamd]:
    binary = clamd_binary()
    if binary is None:
        raise FileNotFoundError("clamd")
    db = directory / "db"
    db.mkdir(parents=True)
    (db / "mailflow-test.ndb").write_text(
        f"Mailflow.Test.EICAR:0:*:{EICAR.hex()}\nMailflow.Test.ZipPattern:0:*:{ZIP_PATTERN.hex()}\n"
    )
    sock = directory / "clamd.sock"
    port = _free_port()
    conf = directory / "clamd.conf"
    # No User: clamd stays the user who started it; logs and pid under the temp dir only.
    conf.write_text(
        f"Foreground yes\nLocalSocket {sock}\nTCPSocket {port}\nTCPAddr 127.0.0.1\n"
        f"DatabaseDirectory {db}\nLogFile {directory / 'clamd.log'}\nLogTime yes\n"
        f"PidFile {directory / 'clamd.pid'}\nStreamMaxLength {stream_max}\n"
        "ScanMail yes\nScanArchive yes\nMaxThreads 4\n"
        # clamd remembers the hashes of clean files: off for benchmarks that repeat input.
        f"DisableCache {'no' if cache else 'yes'}\n"
    )
    out = (directory / "clamd.out").open("wb")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(sock):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"clamd exited ({proc.returncode}): {(directory / 'clamd.out').read_text()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"clamd did not answer PING in {START_TIMEOUT:g}s")
            time.sleep(0.1)
        yield Clamd(sock, port, directory)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()
