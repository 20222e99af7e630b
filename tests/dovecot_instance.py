"""A private, throw-away Dovecot LMTP server on 127.0.0.1 for integration tests.

Users come from a passwd-file so each test can give a user a quota or leave a
name unknown; mail is stored as Maildir under ``<root>/mail/<user>/``.
"""

from __future__ import annotations

import mailbox
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY_UID = 65534


def dovecot_available() -> bool:
    return shutil.which("dovecot") is not None and Path("/usr/lib/dovecot/lmtp").exists()


def dovecot_imap_available() -> bool:
    return dovecot_available() and Path("/usr/lib/dovecot/imap").exists()


@dataclass
class DovecotInstance:
    root: Path
    port: int
    imap_port: int | None = None

    @property
    def config(self) -> Path:
        return self.root / "dovecot.conf"

    def messages(self, user: str) -> list[mailbox.MaildirMessage]:
        path = self.root / "mail" / user
        if not (path / "new").exists():
            return []
        return list(mailbox.Maildir(path, create=False))

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        # dovecot daemonizes; its children inherit stdio, so don't wait on pipes.
        subprocess.run(
            ["dovecot", "-c", str(self.config)],
            check=True,
            timeout=30,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "starting up" in self.log() and (self.root / "run" / "lmtp").exists():
                return
            time.sleep(0.05)
        raise RuntimeError(f"dovecot did not start:\n{self.log()}")

    def stop(self) -> None:
        subprocess.run(
            ["doveadm", "-c", str(self.config), "stop"],
            timeout=30,
            capture_output=True,
            check=False,
        )


def create_instance(
    port: int, users: dict[str, str], imap_port: int | None = None, password: str = ""
) -> DovecotInstance:
    """``users``: name -> quota rule ("" for none), e.g. {"bob": "*:storage=1K"}.

    With ``imap_port``, IMAP (plain text login on loopback, every user's password
    ``password``) listens there too, so a test can act as a user's mail client."""
    root = Path(tempfile.mkdtemp(prefix="mailflow-dovecot-"))
    root.chmod(0o755)
    for sub in ("run", "state", "mail"):
        (root / sub).mkdir()
    shutil.chown(root / "mail", NOBODY_UID, NOBODY_UID)
    lines = []
    for name, quota in users.items():
        extra = f"userdb_quota_rule={quota}" if quota else ""
        secret = f"{{PLAIN}}{password}" if password else ""
        lines.append(f"{name}:{secret}:{NOBODY_UID}:{NOBODY_UID}::{root}/mail/{name}::{extra}")
    (root / "users").write_text("\n".join(lines) + "\n")
    imap = ""
    if imap_port is not None:
        imap = f"""
disable_plaintext_auth = no
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""
    (root / "dovecot.conf").write_text(f"""\
base_dir = {root}/run
state_dir = {root}/state
protocols = lmtp{" imap" if imap_port is not None else ""}
listen = 127.0.0.1
log_path = {root}/dovecot.log
ssl = no
default_internal_user = nobody
default_internal_group = nogroup
default_login_user = nobody
mail_location = maildir:{root}/mail/%n
mail_plugins = quota
auth_username_format = %n
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}
plugin {{
  quota = maildir:User quota
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{imap}""")
    return DovecotInstance(root, port, imap_port)


def destroy(instance: DovecotInstance) -> None:
    instance.stop()
    shutil.rmtree(instance.root, ignore_errors=True)
