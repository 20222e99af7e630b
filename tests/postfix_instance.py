"""A private, throw-away Postfix instance on 127.0.0.1 for integration tests.

It uses Debian's postfix package binaries with its own config directory, queue
and Maildir under a temp dir (never the system's /etc/postfix instance), listens
on one loopback port, relays through ``relayhost`` and delivers the virtual
domain ``vdomain.test`` into ``<dir>/vmail/<mailbox>/``.
"""

from __future__ import annotations

import mailbox
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MASTER_CF = "/etc/postfix/master.cf"
NOBODY_UID = 65534
VIRTUAL_DOMAIN = "vdomain.test"
# Services of Debian's master.cf that need extra software; a test instance has none.
_OPTIONAL_SERVICES = {"maildrop", "uucp", "ifmail", "bsmtp", "scalemail-backend", "mailman"}


def postfix_available() -> bool:
    return shutil.which("postfix") is not None and Path(MASTER_CF).exists() and os.geteuid() == 0


def require_postfix() -> None:
    """Module-level gate: skip without Postfix, but fail under CI, where it must run."""
    import pytest

    if postfix_available():
        return
    if os.environ.get("CI"):
        pytest.fail(
            "CI must run the Postfix tests: install the postfix package (.ci/run does)",
            pytrace=False,
        )
    pytest.skip("needs Debian's postfix package and root", allow_module_level=True)


def _master_cf(port: int) -> str:
    """Debian's master.cf with the smtpd on ``port``, no chroot, optional services dropped."""
    out: list[str] = []
    skipping = False
    for line in Path(MASTER_CF).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0] in " \t":
            if not skipping:
                out.append(line)
            continue
        fields = line.split()
        skipping = fields[0] in _OPTIONAL_SERVICES
        if skipping:
            continue
        if fields[0] == "smtp" and fields[1] == "inet":
            fields[0] = f"127.0.0.1:{port}"
        if len(fields) >= 8 and fields[1] in ("unix", "inet", "fifo", "pass", "unix-dgram"):
            fields[4] = "n"  # no chroot: the queue dir has no copies of /etc files
        out.append(" ".join(fields))
    return "\n".join(out) + "\n"


@dataclass
class PostfixInstance:
    root: Path
    port: int

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    def maildir(self, mailbox_name: str = "box") -> Path:
        return self.root / "vmail" / mailbox_name

    def messages(self, mailbox_name: str = "box") -> list[mailbox.MaildirMessage]:
        path = self.maildir(mailbox_name)
        if not (path / "new").exists():
            return []
        return list(mailbox.Maildir(path, create=False))

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def start(self) -> None:
        result = self._postfix("start")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if (self.root / "data" / "master.lock").exists() and "daemon started" in self.log():
                return
            time.sleep(0.1)
        raise RuntimeError(f"postfix did not start: {result.stderr}\n{self.log()}")

    def stop(self) -> None:
        self._postfix("stop")


def create_instance(port: int, relayhost: str = "", extra_main_cf: str = "") -> PostfixInstance:
    """Write config and directories for an instance listening on 127.0.0.1:``port``."""
    # Postfix daemons run as user postfix and must traverse the path: not under pytest's
    # 0700 tmp dirs.
    root = Path(tempfile.mkdtemp(prefix="mailflow-postfix-"))
    root.chmod(0o755)
    for sub in ("etc", "spool", "data", "vmail"):
        (root / sub).mkdir()
    shutil.chown(root / "data", "postfix")
    os.chown(root / "vmail", NOBODY_UID, NOBODY_UID)
    main_cf = f"""\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.test
mydomain = postfix.test
myorigin = postfix.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = {relayhost}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = {VIRTUAL_DOMAIN}
virtual_mailbox_base = {root}/vmail
virtual_mailbox_maps = static:box/
virtual_uid_maps = static:{NOBODY_UID}
virtual_gid_maps = static:{NOBODY_UID}
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
smtp_tls_security_level = none
smtpd_tls_security_level = none
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtp_connect_timeout = 5s
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
{extra_main_cf}
"""
    (root / "etc" / "main.cf").write_text(main_cf)
    (root / "etc" / "master.cf").write_text(_master_cf(port))
    return PostfixInstance(root, port)


def destroy(instance: PostfixInstance) -> None:
    instance.stop()
    shutil.rmtree(instance.root, ignore_errors=True)
