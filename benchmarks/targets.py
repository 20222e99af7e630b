"""The servers a benchmark run talks to, each in its own subprocess.

* ``bare``: :mod:`benchmarks.discard_server`, aiosmtpd accepting and discarding;
* ``maildir``: ``mailflow serve`` delivering to a Maildir in a temp directory;
* ``relay``: ``mailflow serve`` relaying everything to a local sink (postfix's
  ``smtp-sink`` when usable, else a discard server);

and a ``+plugins`` variant of the two mailflow targets with a plugin chain enabled.
Every process listens on 127.0.0.1 only and is stopped by the harness.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import yaml

START_TIMEOUT = 30.0  # seconds for a server to print its port
STOP_TIMEOUT = 15.0  # seconds for a server to exit after SIGTERM
POLL = 0.02  # seconds between file-system polls
LOG_LAG = 0.2  # seconds for mailflow's log writer (50 ms poll) to catch up before counting
SMTP_SINK = "/usr/sbin/smtp-sink"
SINK_BACKLOG = 256
REPO = Path(__file__).resolve().parent.parent
RELAY_DOMAIN = "example.net"  # messages to the relay target go here; never local
LOCAL_DOMAIN = "example.com"  # messages to the maildir target go here


class TargetError(Exception):
    """A server could not be started or misbehaved."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (for tools that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A child process whose output goes to a file we can poll (never a pipe that fills)."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        cwd: Path | None = None,
        pythonpath: list[Path] | None = None,
    ) -> None:
        """``pythonpath``: where the child imports from first (default: this repository)."""
        self.log_path = log_path
        self.argv = argv
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        first = [str(p) for p in pythonpath or [REPO]]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*first, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, env=env
        )

    def output(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait until the output matches ``pattern``; raise if the process dies first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.output())
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(POLL)
        self.stop()
        tail = self.output()[-2000:]
        raise TargetError(f"{self.argv[:3]}... did not print {pattern!r}:\n{tail}")

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL as a last resort; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._log.close()
        return self.proc.returncode


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all threads (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # Fields 14 and 15 of proc(5) (utime, stime); index 11/12 after the ")" split.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Target:
    """A server under test: started once, loaded several times, then stopped."""

    name = "target"
    port = 0
    process: Process | None = None

    def cpu(self) -> float | None:
        """CPU seconds the server process has used so far."""
        return cpu_seconds(self.process.proc.pid) if self.process is not None else None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def addressing(self, index: int) -> tuple[str, list[str]]:
        return "alice@example.org", [f"user{index % 16}@{LOCAL_DOMAIN}"]

    def queued(self) -> int:
        """Messages accepted but not yet delivered (0 for servers without a queue)."""
        return 0

    def delivered(self) -> int | None:
        """Messages delivered so far, by the target's own account (None: not counted)."""
        return None


class BareTarget(Target):
    """aiosmtpd, accept and discard: the baseline."""

    name = "bare aiosmtpd"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process: Process | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "benchmarks.discard_server", "--port", "0"]
        self.process = Process(argv, self.workdir / "bare.log")
        self.port = int(self.process.wait_for(r"listening (\d+)").group(1))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class Sink:
    """The upstream the relay target delivers to; ``received()`` is read after stopping."""

    def __init__(self, workdir: Path, prefer_postfix: bool = True) -> None:
        self.workdir = workdir
        self.kind = "smtp-sink" if prefer_postfix and smtp_sink_usable() else "aiosmtpd discard"
        self.process: Process | None = None
        self.port = 0

    def start(self) -> None:
        if self.kind == "smtp-sink":
            self.port = free_port()
            argv = [SMTP_SINK]
            if os.geteuid() == 0:
                argv += ["-u", "nobody"]  # smtp-sink refuses to run as root otherwise
            argv += ["-c", f"127.0.0.1:{self.port}", str(SINK_BACKLOG)]
            self.process = Process(argv, self.workdir / "sink.log")
            _wait_listening(self.port, self.process)
        else:
            argv = [sys.executable, "-m", "benchmarks.discard_server", "--port", "0"]
            self.process = Process(argv, self.workdir / "sink.log")
            self.port = int(self.process.wait_for(r"listening (\d+)").group(1))

    def stop(self) -> int | None:
        """Stop and return the total messages received (None if unknown)."""
        if self.process is None:
            return None
        self.process.stop()
        text = self.process.output()
        # smtp-sink -c prints "sess=.. quit=.. mesg=N" at the end of each session.
        counts = re.findall(r"mesg=(\d+)|messages (\d+)", text)
        if not counts:
            return None
        return max(int(a or b) for a, b in counts)


def source_label(tree: Path) -> str:
    """A short name for a source tree: its git commit, else its folder's name."""
    try:
        out = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or tree.name
    except (OSError, subprocess.SubprocessError):
        return tree.name


def smtp_sink_usable() -> bool:
    return Path(SMTP_SINK).exists() and os.access(SMTP_SINK, os.X_OK)


def _wait_listening(port: int, process: Process, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise TargetError(f"{process.argv[0]} exited: {process.output()[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(POLL)
    raise TargetError(f"{process.argv[0]} did not listen on {port}")


class MailflowTarget(Target):
    """``mailflow serve`` with a generated config, in a subprocess."""

    def __init__(
        self,
        workdir: Path,
        mode: str,
        plugins: list[dict[str, object]] | None = None,
        sink: Sink | None = None,
        profile: Path | None = None,
        py_spy: Path | None = None,
        what_ifs: list[str] | None = None,
        log_level: str = "INFO",
        relay_pool: int = 8,
        source: Path | None = None,
    ) -> None:
        """``source``: run ``serve`` from that source tree (a git worktree of another
        commit, say) instead of this repository, to compare the two in one run."""
        if mode not in ("maildir", "relay"):
            raise ValueError(f"unknown mailflow mode {mode!r}")
        if mode == "relay" and sink is None:
            raise ValueError("the relay target needs a sink")
        self.mode = mode
        self.plugins = plugins or []
        self.sink = sink
        self.profile = profile
        self.py_spy = py_spy
        self.what_ifs = what_ifs or []
        self.log_level = log_level
        self.relay_pool = relay_pool  # idle upstream sessions kept; = queue.workers (8)
        self.source = source
        self.spy: Process | None = None
        suffix = ("+plugins" if self.plugins else "") + "".join(f" [{w}]" for w in self.what_ifs)
        label = source_label(source) if source is not None else ""
        self.name = f"mailflow {mode}{suffix}" + (f" @{label}" if label else "")
        slug = f"mailflow-{mode}{'-plugins' if self.plugins else ''}"
        self.dir = workdir / "-".join([slug, *self.what_ifs, *([label] if label else [])])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spool = self.dir / "spool" / "queue"
        self.mail = self.dir / "mail"
        self.process: Process | None = None
        self.sink_received: int | None = None

    def config(self) -> dict[str, object]:
        cfg: dict[str, object] = {
            "server": {
                "listen": ["127.0.0.1:0"],
                "hostname": "mx.bench.test",
                "max_connections": 1000,
            },
            "delivery": {"method": "maildir", "maildir": {"root": str(self.mail)}},
            "queue": {
                "directory": str(self.dir / "spool"),
                "scan_interval": 0.1,
                "retry_schedule": [1],
            },
            "quarantine": {"directory": str(self.dir / "quarantine")},
            "log": {"level": self.log_level, "format": "text"},
            # No lookups leave the machine: a closed local port fails them at once.
            "dns": {"nameservers": ["127.0.0.1"], "port": free_port(), "timeout": 0.2},
            "plugins": self.plugins,
        }
        if self.mode == "maildir":
            cfg["local_domains"] = [LOCAL_DOMAIN]
        else:
            assert self.sink is not None
            cfg["local_domains"] = ["local.invalid"]
            cfg["relay_networks"] = ["127.0.0.0/8"]
            cfg["relay"] = {
                "default": "sink",
                "pool_size": self.relay_pool,
                "targets": {"sink": {"host": "127.0.0.1", "port": self.sink.port, "tls": "none"}},
            }
        return cfg

    def start(self) -> None:
        if self.sink is not None:
            self.sink.start()
        config_path = self.dir / "mailflow.yaml"
        config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        argv = [sys.executable, "-m", "benchmarks.run_serve"]
        if self.profile is not None:
            argv += ["--profile", str(self.profile)]
        for name in self.what_ifs:
            argv += ["--what-if", name]
        argv += ["--", "-c", str(config_path)]
        self.process = Process(
            argv, self.dir / "serve.log", cwd=self.dir, pythonpath=self._pythonpath()
        )
        match = self.process.wait_for(r"listening on [^\s]+:(\d+) \(SMTP\)")
        self.port = int(match.group(1))
        if self.py_spy is not None:
            # Sampling ends when serve exits; py-spy then writes collapsed stacks.
            argv = ["py-spy", "record", "--pid", str(self.process.proc.pid), "--format", "raw"]
            argv += ["--rate", "200", "--output", str(self.py_spy)]
            argv += os.environ.get("BENCH_PY_SPY_FLAGS", "").split()
            self.spy = Process(argv, self.dir / "py-spy.log")

    def _pythonpath(self) -> list[Path] | None:
        """For a ``source`` tree: that tree, and its ``plugins/`` as ``mailflow_plugins``
        (the editable install maps that name to this repository's folder otherwise)."""
        if self.source is None:
            return None
        shim = self.dir / "pythonpath"
        shim.mkdir(exist_ok=True)
        link = shim / "mailflow_plugins"
        if not link.is_symlink():
            link.symlink_to(self.source.resolve() / "plugins", target_is_directory=True)
        return [self.source.resolve(), shim]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self.spy is not None:
            try:
                self.spy.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.spy.proc.send_signal(signal.SIGINT)
            self.spy.stop()
        if self.sink is not None:
            self.sink_received = self.sink.stop()

    def addressing(self, index: int) -> tuple[str, list[str]]:
        domain = LOCAL_DOMAIN if self.mode == "maildir" else RELAY_DOMAIN
        return "alice@example.org", [f"user{index % 16}@{domain}"]

    def queued(self) -> int:
        try:
            with os.scandir(self.spool) as it:
                return sum(1 for e in it if e.name.endswith(".json") and not e.name.startswith("."))
        except FileNotFoundError:
            return 0

    def delivered(self) -> int | None:
        if self.mode == "maildir":
            return sum(len(os.listdir(p)) for p in self.mail.glob("*/new"))
        if self.process is None:
            return None
        # The relay sink only reports at session end; count mailflow's own records.
        if self.log_level != "INFO":
            return None  # delivery lines are logged at INFO only
        # mailflow's log writer thread writes records up to 50 ms late (mailflow/cli.py).
        time.sleep(LOG_LAG)
        return self.process.output().count("route=relay status=delivered")

    def output(self) -> str:
        return self.process.output() if self.process is not None else ""
