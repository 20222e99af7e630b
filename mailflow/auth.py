"""SMTP AUTH: the users file and the PLAIN/LOGIN mechanisms (``mailflow users`` is
:mod:`mailflow.users_cli`).

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

import asyncio
import base64
import binascii
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from mailflow.authlimit import AuthGuard, LockedOut
from mailflow.config import AuthThrottleConfig, ConfigError, ConfigIssue

log = logging.getLogger("mailflow.auth")

# RFC 4954 6: the reply for wrong credentials.
R_AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
# RFC 4954 6: temporary failure, used once a connection has failed too often.
R_AUTH_TOO_MANY = "421 4.7.0 Too many failed authentication attempts, closing connection"
# RFC 4954 6: temporary failure, for a client address or user name that is locked out.
R_AUTH_LOCKED = "454 4.7.0 Too many failed authentication attempts, try again later"

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


class AuthMechanisms:
    """PLAIN (RFC 4616) and LOGIN for :class:`mailflow.smtp.MailflowSMTP`.

    Replaces aiosmtpd's built-ins so the (slow) password check runs in a worker
    thread under the server's :class:`~mailflow.authlimit.AuthGuard`, and so failures
    are slowed down, cut off per connection (``MAX_AUTH_FAILURES``, then 421) and
    locked out per client address and user name across connections (454).
    """

    MAX_AUTH_FAILURES = 3  # on one connection; then 421 and close

    # The protocol sets these per connection (MailflowSMTP takes the guard from its
    # handler); without them a default guard is shared by the class.
    mailflow_auth_guard: AuthGuard | None = None
    _default_guard: AuthGuard | None = None
    _authenticator: Any
    session: Any
    envelope: Any
    transport: Any

    if TYPE_CHECKING:  # provided by aiosmtpd's SMTP; never defined here (MRO!)

        async def push(self, status: str | bytes) -> None: ...

        async def challenge_auth(
            self,
            challenge: str | bytes,
            encode_to_b64: bool = True,
            log_client_response: bool = False,
        ) -> Any: ...

    def _auth_guard(self) -> AuthGuard:
        if self.mailflow_auth_guard is not None:
            return self.mailflow_auth_guard
        cls = type(self)
        if cls._default_guard is None:
            cls._default_guard = AuthGuard(AuthThrottleConfig())
        return cls._default_guard

    def _auth_client_ip(self) -> str:
        peer = getattr(self.session, "peer", None)
        return str(peer[0]) if isinstance(peer, tuple) else str(peer or "")

    async def _check_password(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        guard = self._auth_guard()
        ip = self._auth_client_ip()
        data = LoginPassword(login, password)
        try:
            result = await self._verify(guard, ip, mechanism, data)
        except LockedOut as locked:
            # Answered without a password check: nothing to learn here, and no core
            # spent on it. After the longest failure delay, though: a guesser answered
            # at once would only reconnect (a TLS handshake each time) and ask again.
            log.debug("%s: AUTH refused, %s locked out", ip, locked.scope)
            return await self._auth_refused(R_AUTH_LOCKED, guard.lockout_delay)
        if not result.success:
            failures = getattr(self, "_mailflow_auth_failures", 0) + 1
            # Slows down password guessing (RFC 4954 14), more so the more this
            # connection, address or user name has failed lately.
            delay = guard.failed(ip, login, failures)
            return await self._auth_refused(R_AUTH_INVALID, delay)
        guard.succeeded(ip, login)
        if result.auth_data is None:
            # The protocol names the user from auth_data.login; keep what was checked.
            return AuthResult(success=True, auth_data=data)
        return result

    async def _verify(
        self, guard: AuthGuard, ip: str, mechanism: str, data: LoginPassword
    ) -> AuthResult:
        """The password check under ``guard``; LockedOut when the address or user name
        is locked out, before this attempt waits for its turn or once it has it."""
        scope = guard.locked(ip, data.login)
        if scope is not None:
            raise LockedOut(scope)
        if self._authenticator is None:
            return AuthResult(success=False, handled=False)
        authenticator, session, envelope = self._authenticator, self.session, self.envelope

        def verify() -> AuthResult:
            return authenticator(self, session, envelope, mechanism, data)

        return await guard.check(ip, data.login, verify)

    async def _auth_refused(self, reply: str, delay: float) -> AuthResult:
        """Answer a failed or refused attempt; the connection's last one gets 421 and closes."""
        failures = getattr(self, "_mailflow_auth_failures", 0) + 1
        self._mailflow_auth_failures = failures
        if delay > 0:
            await asyncio.sleep(delay)
        if failures >= self.MAX_AUTH_FAILURES:
            await self.push(R_AUTH_TOO_MANY)
            if self.transport is not None:
                self.transport.close()
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=reply)

    async def _b64_arg(self, value: str) -> bytes | None:
        try:
            return base64.b64decode(value.encode(), validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Cannot decode base64")
            return None

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        """RFC 4616: ``[authzid] NUL authcid NUL passwd``, initial response or after 334."""
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            blob = await self._b64_arg(args[1])
            if blob is None:
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Cannot split PLAIN credentials")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            # We cannot act on behalf of another identity (RFC 4616 2).
            await self.push(R_AUTH_INVALID)
            return AuthResult(success=False, handled=True)
        return await self._check_password("PLAIN", login, password)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        """The (non-standard, widely used) LOGIN mechanism: user and password after 334s."""
        if len(args) == 1:
            login = await self.challenge_auth("Username:")
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            login = await self._b64_arg(args[1])
            if login is None:
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check_password("LOGIN", login, password)
