"""SMTP AUTH: the users file and the ``mailflow users`` CLI (the mechanisms: mailflow.smtp.auth).

The users file holds one ``user:<argon2 hash>`` per line; ``#`` comments and blank
lines are allowed. It is re-read whenever it changes on disk (checked on each AUTH,
one ``stat``), so ``mailflow users add`` takes effect without a restart. A file that
is unreadable or malformed at start-up is a :class:`UsersFileError` naming the file
and line; a later broken edit is logged and the previous users stay in force.

Password hashing (argon2, ~50 ms by design) runs in a worker thread so one AUTH
never stalls the other connections on the event loop; how many checks run at once,
and how failures are slowed down and locked out across connections, is
:mod:`mailflow.authlimit`.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from aiosmtpd.smtp import AuthResult, LoginPassword
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from mailflow.config import ConfigError, ConfigIssue

log = logging.getLogger("mailflow.auth")

_HASH_PREFIX = "$argon2"


class UsersFileError(ConfigError):
    """The users file cannot be read or has a malformed line (names file and line)."""

    def __init__(self, path: Path, line: int | None, message: str) -> None:
        super().__init__([ConfigIssue(str(path), "server.auth.users_file", line, message)])


@dataclass(frozen=True, slots=True)
class _Stamp:
    """What identifies one version of the file on disk (cheap to compare)."""

    mtime_ns: int
    size: int
    inode: int


def _stamp(path: Path) -> _Stamp:
    st = path.stat()
    return _Stamp(st.st_mtime_ns, st.st_size, st.st_ino)


def parse_users(text: str, path: Path) -> dict[str, str]:
    """``user -> argon2 hash`` from the file's text; raise UsersFileError on a bad line."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        user, hashed = user.strip(), hashed.strip()
        if not sep or not user:
            raise UsersFileError(path, number, "expected 'user:<argon2 hash>'")
        if any(ch.isspace() for ch in user):
            raise UsersFileError(path, number, f"user name {user!r} contains whitespace")
        if not hashed.startswith(_HASH_PREFIX):
            raise UsersFileError(
                path,
                number,
                f"password for {user!r} is not an argon2 hash (use `mailflow users add`)",
            )
        if user in users:
            raise UsersFileError(path, number, f"user {user!r} is listed twice")
        users[user] = hashed
    return users


def read_users(path: Path) -> dict[str, str]:
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise UsersFileError(path, None, f"cannot read users file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsersFileError(path, None, "users file is not UTF-8 text") from None
    return parse_users(text, path)


class UsersFileAuthenticator:
    """An aiosmtpd ``authenticator`` backed by a users file, reloaded when it changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._hasher = PasswordHasher()
        self._lock = threading.Lock()
        self._stamp = _stamp_or_error(self.path)
        self._users = read_users(self.path)
        # Verified against when the user is unknown, so "no such user" and "wrong
        # password" take the same time (no user enumeration by timing).
        self._dummy = self._hasher.hash("mailflow-dummy-password")

    @property
    def users(self) -> list[str]:
        self._maybe_reload()
        return sorted(self._users)

    def _maybe_reload(self) -> None:
        with self._lock:
            try:
                stamp = _stamp(self.path)
            except OSError as exc:
                log.error("users file %s: %s; keeping the previous users", self.path, exc)
                return
            if stamp == self._stamp:
                return
            try:
                users = read_users(self.path)
            except UsersFileError as exc:
                log.error("%s; keeping the previous users", exc)
                return
            self._users, self._stamp = users, stamp
            log.info("users file %s reloaded: %d users", self.path, len(users))

    def verify(self, user: str, password: bytes) -> bool:
        """True when ``password`` matches ``user``'s hash. Blocking (argon2): use a thread."""
        self._maybe_reload()
        hashed = self._users.get(user)
        try:
            return bool(self._hasher.verify(hashed or self._dummy, password)) and bool(hashed)
        except (VerificationError, InvalidHashError):
            return False

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd's authenticator signature (also usable outside mailflow's protocol)."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        try:
            user = auth_data.login.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False)
        ok = self.verify(user, auth_data.password)
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


def _stamp_or_error(path: Path) -> _Stamp:
    try:
        return _stamp(path)
    except OSError as exc:
        raise UsersFileError(path, None, f"cannot read users file: {exc.strerror}") from None


# --- the mechanisms, mixed into the SMTP protocol -------------------------------------------


def _users_path(file: str | None, config_path: str | None) -> Path:
    if file:
        return Path(file)
    from mailflow.config import load_config

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(f"invalid config:\n{exc}") from None
    if config.server.auth is None:
        raise click.UsageError("give --file, or a --config that sets server.auth.users_file")
    return Path(config.server.auth.users_file)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror}") from None


def _write_lines(path: Path, lines: list[str]) -> None:
    """Atomic replace (temp file + fsync + rename): a running server never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".users.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # hashes are still worth protecting
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _line_user(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or ":" not in stripped:
        return None
    return stripped.partition(":")[0].strip()


_file_option = click.option("--file", "-f", "file", help="The users file (default: from config).")
_config_option = click.option("--config", "-c", "config_path", help="mailflow.yaml to read.")


@click.group("users")
def users_group() -> None:
    """Manage SMTP AUTH users (the server.auth.users_file)."""


@users_group.command("add")
@click.argument("user")
@_file_option
@_config_option
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
def users_add(user: str, file: str | None, config_path: str | None, password_stdin: bool) -> None:
    """Add USER, or set a new password for an existing USER."""
    if not user or ":" in user or any(ch.isspace() for ch in user):
        raise click.BadParameter("must be non-empty, without ':' or whitespace", param_hint="USER")
    path = _users_path(file, config_path)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.ClickException("empty password")
    lines = _read_lines(path)
    try:
        parse_users("\n".join(lines), path)
    except UsersFileError as exc:
        raise click.ClickException(str(exc)) from None
    entry = f"{user}:{PasswordHasher().hash(password)}"
    replaced = False
    for i, line in enumerate(lines):
        if _line_user(line) == user:
            lines[i], replaced = entry, True
    if not replaced:
        lines.append(entry)
    _write_lines(path, lines)
    click.echo(f"{'updated' if replaced else 'added'} {user} in {path}")


@users_group.command("remove")
@click.argument("user")
@_file_option
@_config_option
def users_remove(user: str, file: str | None, config_path: str | None) -> None:
    """Remove USER (exit status 1 when there is no such user)."""
    path = _users_path(file, config_path)
    lines = _read_lines(path)
    kept = [line for line in lines if _line_user(line) != user]
    if len(kept) == len(lines):
        click.echo(f"no user {user!r} in {path}", err=True)
        sys.exit(1)
    _write_lines(path, kept)
    click.echo(f"removed {user} from {path}")


@users_group.command("list")
@_file_option
@_config_option
def users_list(file: str | None, config_path: str | None) -> None:
    """Print the user names, one per line."""
    path = _users_path(file, config_path)
    try:
        users = read_users(path)
    except UsersFileError as exc:
        raise click.ClickException(str(exc)) from None
    for name in sorted(users):
        click.echo(name)
