"""The servers of the Postfix + milter benchmark (:mod:`benchmarks.milter_load`).

One private Postfix instance (Debian's binaries, its own config, queue and log under a
temp directory, never the system instance) with three SMTP listeners on 127.0.0.1:

* ``postfix``: no milter;
* ``postfix+mailflow``: ``smtpd_milters`` = a ``mailflow serve`` with only the milter
  front end, in its own process;
* ``postfix+rspamd``: ``smtpd_milters`` = rspamd's proxy worker in milter mode,
  scanning itself (``self_scan``), started from Debian's stock config with a private
  local config directory (no redis, no controller/normal/fuzzy workers).

Both milters resolve through :mod:`benchmarks.nx_dns` (NXDOMAIN for everything, at
once), so nothing leaves the machine and no lookup waits for a timeout.

Postfix relays everything to postfix's ``smtp-sink``. Needs root (Postfix drops to
its own user) and the postfix and rspamd packages.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from benchmarks.nx_dns import NxDns
from benchmarks.targets import (
    SMTP_SINK,
    STOP_TIMEOUT,
    Process,
    TargetError,
    _wait_listening,
    free_port,
)
from tests.postfix_instance import PostfixInstance, create_instance, destroy, postfix_available

RSPAMD = "/usr/bin/rspamd"
RSPAMD_USER = "_rspamd"
RSPAMD_CONFDIR = Path("/etc/rspamd")
RELAY_DOMAIN = "example.net"
DRAIN_TIMEOUT = 120.0  # seconds for Postfix's queue to empty between runs
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


def usable() -> str | None:
    """Why this benchmark cannot run here, or None when it can."""
    if not postfix_available():
        return "needs Debian's postfix package and root"
    if not Path(SMTP_SINK).exists():
        return f"needs {SMTP_SINK} (postfix package)"
    if not Path(RSPAMD).exists():
        return "needs rspamd (apt-get install rspamd)"
    return None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``, its live descendants and the children it has reaped
    (``cutime``/``cstime``: Postfix's master reaps its smtpd and cleanup processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    ticks = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        fields = _stat_fields(current)
        if fields:
            # proc(5) fields 14-17: utime, stime, cutime, cstime (index 11-14 here).
            total += sum(int(x) for x in fields[11:15]) / ticks
        todo += children.get(current, [])
    return total


class MailflowMilter:
    """``mailflow serve`` with the milter front end only, on a fixed loopback port."""

    name = "postfix+mailflow"

    def __init__(
        self,
        workdir: Path,
        plugins: list[dict[str, object]],
        profile: Path | None = None,
        source: Path | None = None,
        py_spy: Path | None = None,
    ) -> None:
        """``profile``: run under cProfile, stats written here at exit; ``source``: run
        ``serve`` from that source tree (another commit's worktree) instead of this one;
        ``py_spy``: sample it with py-spy, collapsed stacks written here at exit."""
        self.profile = profile
        self.py_spy = py_spy
        self.server_settings: dict[str, object] = {}  # extra keys for the server section
        self.spy: Process | None = None
        self.source = source
        self.dns_port = 0  # set by PostfixStacks: the NXDOMAIN responder
        self.dir = workdir / "mailflow"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.plugins = plugins
        self.process: Process | None = None

    def start(self) -> None:
        cfg = {
            "server": {"listen": [], "hostname": "mx.bench.test", **self.server_settings},
            "milter": {"listen": f"127.0.0.1:{self.port}", "max_connections": 1000},
            "queue": {"directory": str(self.dir / "spool")},
            "quarantine": {"directory": str(self.dir / "quarantine")},
            "log": {"level": "INFO", "format": "text"},
            "dns": {"nameservers": ["127.0.0.1"], "port": self.dns_port, "timeout": 0.2},
            "plugins": self.plugins,
        }
        path = self.dir / "mailflow.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = [sys.executable, "-m", "benchmarks.run_serve"]
        if self.profile is not None:
            argv += ["--profile", str(self.profile)]
        argv += ["--", "-c", str(path)]
        tree = [self.source.resolve()] if self.source is not None else None
        self.process = Process(argv, self.dir / "serve.log", cwd=self.dir, pythonpath=tree)
        self.process.wait_for(r"listening on \S+ \(milter\)")
        if self.py_spy is not None:
            argv = ["py-spy", "record", "--pid", str(self.process.proc.pid), "--format", "raw"]
            argv += ["--rate", "200", "--output", str(self.py_spy)]
            self.spy = Process(argv, self.dir / "py-spy.log")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self.spy is not None:
            self.spy.proc.wait(STOP_TIMEOUT)  # py-spy writes its stacks when serve exits
            self.spy.stop()


class RspamdMilter:
    """rspamd 3.x's proxy worker in milter mode on a fixed loopback port."""

    name = "postfix+rspamd"

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "rspamd"
        self.port = free_port()
        self.dns_port = 0
        self.process: Process | None = None

    def _write_config(self) -> None:
        local = self.dir / "local.d"
        override = self.dir / "override.d"
        for d in (local, override, self.dir / "db", self.dir / "run", self.dir / "log"):
            d.mkdir(parents=True, exist_ok=True)
        (override / "worker-proxy.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.port}";\n'
            "milter = yes;\ntimeout = 120s;\ncount = 1;\n"
            'upstream "local" {\n  default = yes;\n  self_scan = yes;\n}\n'
        )
        for worker in ("normal", "controller", "fuzzy"):
            (override / f"worker-{worker}.inc").write_text("enabled = false;\n")
        (local / "options.inc").write_text(
            f'dns {{\n  nameserver = ["127.0.0.1:{self.dns_port}"];\n  timeout = 0.2s;\n'
            "  retransmits = 1;\n}\n"
        )
        (local / "fuzzy_check.conf").write_text("enabled = false;\n")
        (override / "logging.inc").write_text(
            f'type = "file";\nfilename = "{self.dir}/log/rspamd.log";\nlevel = "info";\n'
        )
        for sub in ("db", "run", "log"):
            shutil.chown(self.dir / sub, RSPAMD_USER, RSPAMD_USER)

    def start(self) -> None:
        self._write_config()
        argv = [RSPAMD, "-f", "-u", RSPAMD_USER, "-g", RSPAMD_USER]
        argv += ["-c", str(RSPAMD_CONFDIR / "rspamd.conf")]
        for name, value in (
            ("CONFDIR", RSPAMD_CONFDIR),
            ("LOCAL_CONFDIR", self.dir),
            ("DBDIR", self.dir / "db"),
            ("RUNDIR", self.dir / "run"),
            ("LOGDIR", self.dir / "log"),
        ):
            argv += ["--var", f"{name}={value}"]
        self.process = Process(argv, self.dir / "stdout.log")
        try:
            _wait_listening(self.port, self.process, timeout=60)
        except TargetError as exc:
            log = (self.dir / "log" / "rspamd.log").read_text(errors="replace")[-2000:]
            raise TargetError(f"{exc}\n{log}") from exc

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class PostfixStacks:
    """One Postfix, one SMTP port per stack; ``ports`` maps stack name -> port."""

    def __init__(self, workdir: Path, mailflow: MailflowMilter) -> None:
        self.workdir = workdir
        self.mailflow = mailflow
        self.rspamd = RspamdMilter(workdir)
        self.dns = NxDns()
        self.sink_port = free_port()
        self.sink: Process | None = None
        self.instance: PostfixInstance | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> None:
        self.dns.start()
        self.mailflow.dns_port = self.rspamd.dns_port = self.dns.port
        self.mailflow.start()
        self.rspamd.start()
        argv = [SMTP_SINK, "-u", "nobody", "-c", f"127.0.0.1:{self.sink_port}", "256"]
        self.sink = Process(argv, self.workdir / "sink.log")
        _wait_listening(self.sink_port, self.sink)
        plain = free_port()
        extra = (
            f"relayhost = [127.0.0.1]:{self.sink_port}\n"
            "milter_protocol = 6\nmilter_default_action = tempfail\n"
            "smtpd_client_connection_count_limit = 0\n"
            "default_destination_concurrency_limit = 20\n"
        )
        instance = create_instance(plain, extra_main_cf=extra)
        self.instance = instance
        self.ports = {"postfix": plain}
        services = []
        for stack in (self.mailflow, self.rspamd):
            port = free_port()
            self.ports[stack.name] = port
            services.append(
                f"127.0.0.1:{port} inet n - n - - smtpd "
                f"-o smtpd_milters=inet:127.0.0.1:{stack.port}"
            )
        with open(instance.config_dir / "master.cf", "a") as f:
            f.write("\n".join(services) + "\n")
        instance.start()
        for port in self.ports.values():
            _wait_listening(port, self.sink)

    def milter_cpu(self, name: str) -> float | None:
        """CPU seconds the milter of stack ``name`` (with its child processes) has used."""
        processes = {
            self.mailflow.name: self.mailflow.process,
            self.rspamd.name: self.rspamd.process,
        }
        process = processes.get(name)
        return tree_cpu_seconds(process.proc.pid) if process is not None else None

    def postfix_cpu(self) -> float | None:
        """CPU seconds used so far by Postfix (master and every process it started)."""
        if self.instance is None:
            return None
        try:
            pid = int((self.instance.root / "spool" / "pid" / "master.pid").read_text())
        except (OSError, ValueError):
            return None
        return tree_cpu_seconds(pid)

    def queued(self) -> int:
        """Messages in Postfix's queue (a run waits for 0 before it starts)."""
        assert self.instance is not None
        spool = self.instance.root / "spool"
        total = 0
        for queue in QUEUES:
            for _dirpath, _dirs, files in os.walk(spool / queue):
                total += len(files)
        return total

    def wait_drained(self, timeout: float = DRAIN_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while self.queued():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        if self.instance is not None:
            destroy(self.instance)  # stops it and removes its directory
            self.instance = None
        if self.sink is not None:
            self.sink.stop()
        self.mailflow.stop()
        self.rspamd.stop()
        self.dns.stop()
