"""SMTP AUTH: the users file (the PLAIN/LOGIN mechanisms are :mod:`mailflow.smtp.auth`,
``mailflow users`` is :mod:`mailflow.users_cli`).

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
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
