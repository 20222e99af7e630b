"""Reply latency of an ordinary client while hostile clients attack the server.

    python -m benchmarks.hostile_mix                      # every attack, 8 s each
    python -m benchmarks.hostile_mix --attacks folded-header,html --seconds 5 --json

Starts ``mailflow serve`` (the embedded default's plugins, plus ``rules`` with
``rules/content-policy.yaml`` and a rule whose pattern backtracks catastrophically in
Python's ``re``, plus AUTH over STARTTLS) in a subprocess on 127.0.0.1. A **probe**
client in this process sends small messages one after another, each on a new
connection, and times every reply (greeting, EHLO, MAIL, RCPT, DATA, end of data,
QUIT). First alone (the baseline), then while each attack runs in its own subprocess
(so generating hostile traffic does not slow the probe down in this process).

The aim (issue 11): no attack moves the probe's p99 reply latency past 100 ms. The
table also shows what the attacker got (replies, when it was cut off) and the peak
resident memory of the server and its worker processes during the attack.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.report import machine
from benchmarks.targets import REPO, Process

MB = 1024 * 1024
PROBE_PAUSE = 0.01  # seconds between two probe messages
ATTACK_WARMUP = 0.5  # seconds an attack runs before the probe's window opens
ATTACK_LIMIT = 120.0  # seconds past its duration after which an attacker is killed
USER, PASSWORD = "alice", "correct horse battery staple"
CATASTROPHIC_RULE = """\
rules:
  - name: catastrophic
    when: {body: {matches: '(a+)+$'}}
    then: {score: 1}
"""
LOCAL = "example.com"


# --- hostile messages -------------------------------------------------------------------


def _message(headers: list[str], body: bytes, content_type: str = "text/plain") -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return (
        f"From: attacker@example.org\r\nTo: victim@{LOCAL}\r\nSubject: hello\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n{head}\r\n"
    ).encode() + body


def folded_header(lines: int) -> bytes:
    """One header field folded into ``lines`` continuation lines (finding 1)."""
    fold = b"X-Folded: start\r\n" + b" x\r\n" * lines
    return fold + _message([], b"hello\r\n")


def html_body(size: int) -> bytes:
    """text/html of unclosed ``<a `` (finding 2), in lines of 300 bytes."""
    line = b"<a " * 100 + b"\r\n"
    return _message([], line * (size // len(line)), "text/html; charset=utf-8")


def from_list(count: int) -> bytes:
    """A From header with ``count`` addresses, ten to a line (finding 2)."""
    addresses = [f"user{i}@example.org" for i in range(count)]
    lines = [", ".join(addresses[i : i + 10]) for i in range(0, count, 10)]
    value = ",\r\n ".join(lines)
    return f"From: {value}\r\nTo: victim@{LOCAL}\r\nSubject: list\r\n\r\nhi\r\n".encode()


def catastrophic_body() -> bytes:
    """What ``(a+)+$`` needs ~2**30 steps to reject in Python's ``re`` (finding 3)."""
    return _message([], b"a" * 30 + b"!\r\n")


def bad_content_type() -> bytes:
    """An 8-bit byte (not UTF-8) in Content-Type (finding 4) on an obvious spam."""
    spam = b"WIN A FREE PRIZE NOW!!! Click here to claim your lottery money $$$\r\n" * 20
    message = _message([], spam, "text/plain; charset=utf-8; x=BYTE")
    return message.replace(b"BYTE", b"\xe9")


def lf_only(size: int) -> bytes:
    """A message with bare LF line ends only (finding 5)."""
    return _message([], b"plain line of text\r\n" * (size // 20)).replace(b"\r\n", b"\n")


def big_attachment(size: int) -> bytes:
    """A multipart message with one base64 attachment of about ``size`` bytes."""
    data = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    body = (
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="data.bin"\r\n\r\n' + data + b"--b--\r\n"
    )
    return _message([], body, 'multipart/mixed; boundary="b"')


def big_bare_lf(size: int) -> bytes:
    return lf_only(size)


# --- a small SMTP client ----------------------------------------------------------------


class Client:
    """One SMTP connection, one command at a time, each reply timed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.latencies: list[float] = []

    @classmethod
    async def open(cls, port: int) -> tuple[Client, str]:
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        client = cls(reader, writer)
        greeting = await client.reply()
        client.latencies.append(time.perf_counter() - started)
        return client, greeting

    async def reply(self) -> str:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    async def command(self, data: bytes) -> str:
        started = time.perf_counter()
        self.writer.write(data)
        await self.writer.drain()
        answer = await self.reply()
        self.latencies.append(time.perf_counter() - started)
        return answer

    async def send_message(self, message: bytes, sender: str, rcpt: str) -> str:
        await self.command(f"MAIL FROM:<{sender}>\r\n".encode())
        await self.command(f"RCPT TO:<{rcpt}>\r\n".encode())
        await self.command(b"DATA\r\n")
        stuffed = message.replace(b"\n.", b"\n..")
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"  # only CRLF "." CRLF ends the data (RFC 5321 4.5.2)
        return await self.command(stuffed + b".\r\n")

    def close(self) -> None:
        self.writer.close()


# --- the probe --------------------------------------------------------------------------


# The probe's replies in the order a transaction gets them.
STEPS = ("greeting", "ehlo", "mail", "rcpt", "data", "end of data", "quit")


@dataclass
class ProbeResult:
    replies: int = 0
    messages: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    by_step: dict[str, list[float]] = field(default_factory=dict)

    def step_p99_ms(self) -> dict[str, float]:
        """p99 of each kind of reply, to tell a busy event loop (every kind slow)
        from slow filtering or storage of the probe's own message ("end of data")."""
        out = {}
        for step, values in self.by_step.items():
            ordered = sorted(values)
            out[step] = round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1)
        return out

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def probe(port: int, until: Callable[[], bool]) -> ProbeResult:
    """Small messages, each on a new connection, until ``until()`` says stop."""
    result = ProbeResult()
    message = _message([], b"Hi Bob,\r\ncan we meet tomorrow at ten?\r\nAnna\r\n")
    while not until():
        client: Client | None = None
        try:
            client, _ = await Client.open(port)
            await client.command(b"EHLO probe.example\r\n")
            reply = await client.send_message(message, "anna@example.org", f"bob@{LOCAL}")
            await client.command(b"QUIT\r\n")
            result.messages += reply.startswith("250")
        except (ConnectionError, OSError):
            result.errors += 1
        finally:
            if client is not None:
                result.latencies.extend(client.latencies)
                for step, value in zip(STEPS, client.latencies, strict=False):
                    result.by_step.setdefault(step, []).append(value)
                client.close()
        await asyncio.sleep(PROBE_PAUSE)
    result.replies = len(result.latencies)
    return result


# --- attacks (each runs in a subprocess: --attacker NAME) --------------------------------


Attack = Callable[[int, float], Awaitable[dict[str, Any]]]


async def _repeat_message(port: int, seconds: float, message: bytes) -> dict[str, Any]:
    """Send ``message`` again and again on one connection for ``seconds``."""
    replies: list[str] = []
    times: list[float] = []
    deadline = time.monotonic() + seconds
    client, _ = await Client.open(port)
    await client.command(b"EHLO attacker.example\r\n")
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            reply = await client.send_message(message, "attacker@example.org", f"victim@{LOCAL}")
        except ConnectionError:
            replies.append("closed")
            break
        times.append(time.perf_counter() - started)
        replies.append(reply.split(" ", 1)[0])
        await client.command(b"RSET\r\n")
    client.close()
    return {
        "sent": len(times),
        "replies": sorted(set(replies)),
        "size_bytes": len(message),
        "slowest_s": round(max(times), 3) if times else None,
    }


def _repeat(build: Callable[[], bytes]) -> Attack:
    async def attack(port: int, seconds: float) -> dict[str, Any]:
        return await _repeat_message(port, seconds, build())

    return attack


async def _parallel(count: int, build: Callable[[], bytes], port: int, seconds: float) -> Any:
    message = build()
    results = await asyncio.gather(
        *(_repeat_message(port, seconds, message) for _ in range(count)), return_exceptions=True
    )
    return [r if isinstance(r, dict) else repr(r) for r in results]


async def auth_guessing(port: int, seconds: float) -> dict[str, Any]:
    """10 connections guessing passwords with AUTH PLAIN over STARTTLS (finding 7)."""
    import aiosmtplib

    counts: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    async def guesser(n: int) -> None:
        guess = 0
        while time.monotonic() < deadline:
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, start_tls=True, validate_certs=False, timeout=30
            )
            try:
                await smtp.connect()
                while time.monotonic() < deadline:
                    guess += 1
                    try:
                        await smtp.login(USER, f"guess-{n}-{guess}")
                        counts["accepted"] = counts.get("accepted", 0) + 1
                    except aiosmtplib.SMTPAuthenticationError as exc:
                        key = str(exc.code)
                        counts[key] = counts.get(key, 0) + 1
            except (aiosmtplib.SMTPException, OSError) as exc:
                key = getattr(exc, "code", None) or type(exc).__name__
                counts[str(key)] = counts.get(str(key), 0) + 1
            finally:
                smtp.close()

    await asyncio.gather(*(guesser(n) for n in range(10)))
    return {"answers": counts}


async def slow_data(port: int, seconds: float) -> dict[str, Any]:
    """20 connections sending message data at one byte per second (finding 8)."""

    async def trickle() -> str:
        client, _ = await Client.open(port)
        await client.command(b"EHLO slow.example\r\n")
        await client.command(b"MAIL FROM:<slow@example.org>\r\n")
        await client.command(f"RCPT TO:<victim@{LOCAL}>\r\n".encode())
        await client.command(b"DATA\r\n")
        started = time.monotonic()
        try:
            while time.monotonic() - started < seconds:
                client.writer.write(b"x")
                await client.writer.drain()
                try:
                    async with asyncio.timeout(1):
                        line = await client.reader.readline()
                    if line:
                        return f"{line[:3].decode()} after {time.monotonic() - started:.1f}s"
                    return f"closed after {time.monotonic() - started:.1f}s"
                except TimeoutError:
                    pass
        except (ConnectionError, OSError):
            return f"closed after {time.monotonic() - started:.1f}s"
        finally:
            client.close()
        return f"still open after {seconds:.0f}s"

    outcomes = await asyncio.gather(*(trickle() for _ in range(20)))
    return {"outcomes": sorted(set(outcomes))}


async def noop_keepalive(port: int, seconds: float) -> dict[str, Any]:
    """10 idle connections that send NOOP every second to stay open (finding 8)."""

    async def idle() -> str:
        client, _ = await Client.open(port)
        started = time.monotonic()
        try:
            while time.monotonic() - started < seconds:
                reply = await client.command(b"NOOP\r\n")
                if not reply.startswith("250"):
                    return f"{reply[:3]} after {time.monotonic() - started:.1f}s"
                await asyncio.sleep(1)
        except (ConnectionError, OSError):
            return f"closed after {time.monotonic() - started:.1f}s"
        finally:
            client.close()
        return f"still open after {seconds:.0f}s"

    outcomes = await asyncio.gather(*(idle() for _ in range(10)))
    return {"outcomes": sorted(set(outcomes))}


async def big_messages(port: int, seconds: float) -> Any:
    """8 connections each sending 24 MB messages (a base64 attachment; just under the
    25 MiB max_message_size, over the example policy's 20 MB: refused after filtering)."""
    return await _parallel(8, lambda: big_attachment(24 * MB), port, seconds)


ATTACKS: dict[str, Attack] = {
    "folded-header-1.2MB": _repeat(lambda: folded_header(300_000)),
    "folded-header-2.4MB": _repeat(lambda: folded_header(600_000)),
    "html-308KB": _repeat(lambda: html_body(308 * 1024)),
    # 19 MB: rules/content-policy.yaml refuses messages over 20 MB (after filtering).
    "html-19MB": _repeat(lambda: html_body(19 * MB)),
    "from-20k-addresses": _repeat(lambda: from_list(20_000)),
    "regex-backtracking": _repeat(catastrophic_body),
    "8bit-content-type": _repeat(bad_content_type),
    "lf-only-27KB": _repeat(lambda: lf_only(27 * 1024)),
    "bare-lf-19MB": _repeat(lambda: big_bare_lf(19 * MB)),
    "auth-guessing": auth_guessing,
    "slow-data": slow_data,
    "noop-keepalive": noop_keepalive,
    "8x24MB": big_messages,
}


# --- the server -------------------------------------------------------------------------


def write_tls(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (STARTTLS before AUTH)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.hostile.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def server_config(directory: Path, sync: str = "auto") -> dict[str, Any]:
    from argon2 import PasswordHasher

    cert, key = write_tls(directory)
    users = directory / "users"
    users.write_text(f"{USER}:{PasswordHasher().hash(PASSWORD)}\n")
    hostile_rules = directory / "hostile-rules.yaml"
    hostile_rules.write_text(CATASTROPHIC_RULE)
    default = yaml.safe_load((REPO / "mailflow" / "default.yaml").read_text())
    plugins = [*default["plugins"]]
    plugins.append(
        {
            "name": "rules",
            "settings": {
                "files": [str(REPO / "rules" / "content-policy.yaml"), str(hostile_rules)]
            },
        }
    )
    return {
        **default,
        "server": {
            "listen": ["127.0.0.1:0"],
            "hostname": "mx.hostile.test",
            "tls": {"cert": str(cert), "key": str(key)},
            "auth": {"users_file": str(users)},
        },
        "local_domains": [LOCAL],
        "delivery": {"method": "maildir", "maildir": {"root": str(directory / "mail")}},
        "queue": {"directory": str(directory / "spool")},
        "quarantine": {"directory": str(directory / "quarantine")},
        "dns": {"nameservers": ["127.0.0.1"], "port": 9, "timeout": 0.2},
        "log": {"level": "WARNING"},
        "storage": {"sync": sync},
        "plugins": plugins,
    }


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and its children, in bytes (Linux /proc)."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


async def sample_rss(pid: int, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, tree_rss(pid))
        try:
            async with asyncio.timeout(0.1):
                await stop.wait()
        except TimeoutError:
            pass
    return peak


@dataclass
class Row:
    attack: str
    probe_replies: int
    probe_messages: int
    probe_errors: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    peak_rss_mb: float
    attacker: Any
    step_p99_ms: dict[str, float] = field(default_factory=dict)


def row_for(name: str, result: ProbeResult, rss: int, attacker: Any) -> Row:
    def ms(value: float | None) -> float | None:
        return round(value * 1000, 1) if value is not None else None

    return Row(
        name,
        result.replies,
        result.messages,
        result.errors,
        ms(result.percentile(0.50)),
        ms(result.percentile(0.99)),
        ms(max(result.latencies)) if result.latencies else None,
        round(rss / MB, 1),
        attacker,
        result.step_p99_ms(),
    )


async def measure(port: int, pid: int, name: str | None, seconds: float) -> Row:
    """The probe's replies while attack ``name`` runs (None: alone, for ``seconds``).

    The attack runs for ``seconds`` and the probe until the attacker has its last
    answer (at most ATTACK_LIMIT seconds more), so a stall the attack causes late,
    when its last message is being filtered, is measured too.
    """
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, stop))
    outcome: Any = None
    if name is None:
        deadline = time.monotonic() + seconds
        result = await probe(port, lambda: time.monotonic() > deadline)
    else:
        attacker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.hostile_mix",
            "--attacker",
            name,
            "--port",
            str(port),
            "--seconds",
            str(seconds),
            stdout=asyncio.subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        limit = time.monotonic() + seconds + ATTACK_LIMIT
        await asyncio.sleep(ATTACK_WARMUP)
        result = await probe(
            port, lambda: attacker.returncode is not None or time.monotonic() > limit
        )
        if attacker.returncode is None:
            attacker.kill()
            outcome = f"still running after {seconds + ATTACK_LIMIT:.0f}s: killed"
        out, _ = await attacker.communicate()
        if outcome is None:
            try:
                outcome = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                outcome = f"attacker exited {attacker.returncode}"
    stop.set()
    rss = await sampler
    return row_for(name or "(none: baseline)", result, rss, outcome)


async def run(
    names: list[str], seconds: float, sync: str = "auto"
) -> tuple[list[Row], dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="mailflow-hostile-") as tmp:
        directory = Path(tmp)
        config_path = directory / "mailflow.yaml"
        config = server_config(directory, sync)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        serve = Process(
            [sys.executable, "-m", "benchmarks.run_serve", "--", "-c", str(config_path)],
            directory / "serve.log",
            cwd=directory,
        )
        try:
            match = serve.wait_for(r"listening on [^\s]+:(\d+) \(SMTP\)", timeout=120)
            port = int(match.group(1))
            await asyncio.sleep(1)  # the worker processes finish starting
            rows = [await measure(port, serve.proc.pid, None, seconds)]
            for name in names:
                rows.append(await measure(port, serve.proc.pid, name, seconds))
                await asyncio.sleep(1)  # queue and workers settle between attacks
        finally:
            serve.stop()
    return rows, machine()


def print_rows(rows: list[Row], info: dict[str, Any]) -> None:
    print(json.dumps(info))
    head = f"{'attack':22s} {'replies':>7s} {'msgs':>5s} {'err':>4s} "
    head += f"{'p50 ms':>7s} {'p99 ms':>7s} {'max ms':>8s} {'RSS MB':>7s}  attacker"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.attack:22s} {r.probe_replies:7d} {r.probe_messages:5d} {r.probe_errors:4d} "
            f"{r.p50_ms!s:>7s} {r.p99_ms!s:>7s} {r.max_ms!s:>8s} {r.peak_rss_mb:7.1f}  "
            f"{json.dumps(r.attacker)[:160]}"
        )
    print("\np99 ms per kind of probe reply:")
    print(f"{'attack':22s} " + " ".join(f"{step:>11s}" for step in STEPS))
    for r in rows:
        cells = " ".join(f"{r.step_p99_ms.get(step, '-')!s:>11s}" for step in STEPS)
        print(f"{r.attack:22s} {cells}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="all", help=f"comma-separated: {', '.join(ATTACKS)}")
    parser.add_argument("--seconds", type=float, default=8.0, help="probe window per attack")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument(
        "--sync", default="auto", choices=["auto", "syncfs", "fsync"], help="storage.sync"
    )
    parser.add_argument("--attacker", help=argparse.SUPPRESS)  # internal: run one attack
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attacker:
        outcome = asyncio.run(ATTACKS[args.attacker](args.port, args.seconds))
        print(json.dumps(outcome, default=str))
        return
    names = list(ATTACKS) if args.attacks == "all" else args.attacks.split(",")
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attacks {unknown}; choose from {', '.join(ATTACKS)}")
    rows, info = asyncio.run(run(names, args.seconds, args.sync))
    if args.json:
        print(json.dumps({"machine": info, "rows": [asdict(r) for r in rows]}, default=str))
    else:
        print_rows(rows, info)
    if any(r.p99_ms is None or r.p99_ms > 100 for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
