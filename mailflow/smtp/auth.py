"""SMTP AUTH in the protocol: the PLAIN and LOGIN mechanisms (RFC 4954, 4616).

The users file and the password check are :mod:`mailflow.auth`; throttling and lockout
across connections :mod:`mailflow.authlimit`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword

from mailflow.authlimit import AuthGuard, LockedOut
from mailflow.config import AuthThrottleConfig

log = logging.getLogger("mailflow.auth")

# RFC 4954 6: the reply for wrong credentials.
R_AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
# RFC 4954 6: temporary failure, used once a connection has failed too often.
R_AUTH_TOO_MANY = "421 4.7.0 Too many failed authentication attempts, closing connection"
# RFC 4954 6: temporary failure, for a client address or user name that is locked out.
R_AUTH_LOCKED = "454 4.7.0 Too many failed authentication attempts, try again later"


class AuthMechanisms:
    """PLAIN (RFC 4616) and LOGIN for :class:`mailflow.smtp.protocol.MailflowSMTP`.

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


# --- `mailflow users` ------------------------------------------------------------------------
