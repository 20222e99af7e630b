"""Finding 7: AUTH failures are limited per client address and per user across connections.

One connection used to be cut after 3 failures, but 120 guesses over 10 parallel
connections ran with no lockout, and the password checks slowed everyone else.
Now failures count per address and per user name over all connections (growing
delays, then 454 4.7.0 without any password check for ``lockout_time``), and at
most ``max_concurrent_checks`` checks run at once.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from typing import Any

import pytest

from mailflow.auth import UsersFileAuthenticator
from mailflow.authlimit import AuthGuard, MemoryAuthLimiter, address_key
from mailflow.config import AuthThrottleConfig
from mailflow.testing import SMTPDialog, make_message, running_server
from tests.smtp_support import TEST_PASSWORD_HASH, client_context

HASH = TEST_PASSWORD_HASH


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"alice:{HASH}\nbob:{HASH}\n")
    return path


@pytest.fixture
def limited(make_config, tls_files, users_file):
    """make_config with TLS, AUTH from users_file and the given AUTH limits."""

    def build(**limits: object):
        cert, key = tls_files
        settings = {"failure_delay": 0, **limits}
        extra = "".join(f", {k}: {v}" for k, v in settings.items())
        return make_config(f"""
            server:
              tls: {{cert: {cert}, key: {key}}}
              auth: {{users_file: {users_file}{extra}}}
            local_domains: [example.com]
            """)

    return build


class Counting:
    """The users-file authenticator, counting (and optionally slowing) password checks."""

    def __init__(self, path: Any, delay: float = 0.0) -> None:
        self.inner = UsersFileAuthenticator(path)
        self.delay = delay
        self.calls = 0
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.delay)
            return self.inner(*args)
        finally:
            with self._lock:
                self.running -= 1


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def tls_dialog(port: int, cert: Any, source: str = "127.0.0.1") -> SMTPDialog:
    """A raw dialog from ``source`` (any 127.x address works on loopback), past STARTTLS."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    dialog = SMTPDialog(reader, writer)
    assert (await dialog.read_reply()).startswith("220")
    await dialog.command("EHLO client.test")
    assert (await dialog.command("STARTTLS")).startswith("220")
    await dialog.writer.start_tls(client_context(cert))
    ehlo = (await dialog.command("EHLO client.test")).splitlines()
    assert "250-AUTH LOGIN PLAIN" in ehlo  # exactly these: no attribute taken for a mechanism
    return dialog


async def attempt(port: int, cert: Any, user: str, password: str, source: str = "127.0.0.1") -> str:
    dialog = await tls_dialog(port, cert, source)
    try:
        return await dialog.command(plain(user, password))
    finally:
        await dialog.close()


async def test_failures_over_several_connections_lock_the_address_out(
    limited, tls_files, users_file, caplog
):
    cert = tls_files[0]
    auth = Counting(users_file)
    config = limited(max_failures_per_ip=4, max_failures_per_user=100)
    caplog.set_level(logging.WARNING, logger="mailflow.auth")
    async with running_server(config, authenticator=auth) as srv:
        for _ in range(2):  # two connections, two failures each: under the per-connection cut
            dialog = await tls_dialog(srv.port, cert)
            for user in ("alice", "bob"):
                assert (await dialog.command(plain(user, "guess"))).startswith("535 5.7.8")
            await dialog.close()
        assert auth.calls == 4
        # Locked out: even the right password gets 454, and no password is checked.
        reply = await attempt(srv.port, cert, "alice", "s3cret")
        assert reply.startswith("454 4.7.0"), reply
        assert auth.calls == 4
        # Another client is not affected (nor is the user name).
        other = await attempt(srv.port, cert, "alice", "s3cret", source="127.0.0.2")
        assert other.startswith("235"), other
        # The locked-out client may still send mail that needs no AUTH (an MX).
        dialog = await tls_dialog(srv.port, cert)
        assert (await dialog.command("MAIL FROM:<a@example.org>")).startswith("250")
        assert (await dialog.command("RCPT TO:<bob@example.com>")).startswith("250")
        await dialog.close()
        metrics = srv.app.metrics.exposition().decode()
    assert 'mailflow_auth_lockouts_total{scope="address"} 1.0' in metrics
    assert "mailflow_auth_failures_total 4.0" in metrics
    [line] = [r.getMessage() for r in caplog.records if "AUTH lockout" in r.getMessage()]
    assert line == "AUTH lockout: address 127.0.0.1 locked out for 900s after 4 failed attempts"


async def test_failures_for_one_user_from_many_addresses_lock_the_user_out(
    limited, tls_files, users_file
):
    cert = tls_files[0]
    auth = Counting(users_file)
    config = limited(max_failures_per_ip=100, max_failures_per_user=3)
    async with running_server(config, authenticator=auth) as srv:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            reply = await attempt(srv.port, cert, "alice", "guess", source)
            assert reply.startswith("535"), reply
        reply = await attempt(srv.port, cert, "alice", "s3cret", source="127.0.0.5")
        assert reply.startswith("454 4.7.0"), reply
        assert auth.calls == 3
        assert (await attempt(srv.port, cert, "bob", "s3cret", "127.0.0.5")).startswith("235")
        metrics = srv.app.metrics.exposition().decode()
    assert 'mailflow_auth_lockouts_total{scope="user"} 1.0' in metrics


async def test_a_lockout_ends_after_lockout_time(limited, tls_files):
    cert = tls_files[0]
    config = limited(max_failures_per_ip=2, lockout_time=0.4, failure_window=0.4)
    async with running_server(config) as srv:
        for _ in range(2):
            assert (await attempt(srv.port, cert, "alice", "guess")).startswith("535")
        assert (await attempt(srv.port, cert, "alice", "s3cret")).startswith("454")
        await asyncio.sleep(0.5)
        assert (await attempt(srv.port, cert, "alice", "s3cret")).startswith("235")


async def test_a_locked_out_connection_is_closed_after_its_own_limit(limited, tls_files):
    cert = tls_files[0]
    async with running_server(limited(max_failures_per_ip=1)) as srv:
        dialog = await tls_dialog(srv.port, cert)
        assert (await dialog.command(plain("alice", "guess"))).startswith("535")
        assert (await dialog.command(plain("alice", "s3cret"))).startswith("454")
        reply = await dialog.command(plain("alice", "s3cret"))
        assert reply.startswith("421 4.7.0"), reply  # the third refusal on one connection
        assert await dialog.reader.read() == b""
        await dialog.close()


async def test_password_checks_are_bounded_and_other_clients_are_served_meanwhile(
    limited, tls_files, users_file
):
    """A burst of guesses waits for one check at a time, holding no thread while it
    waits, and a client sending mail is answered while they queue."""
    cert = tls_files[0]
    auth = Counting(users_file, delay=0.15)
    config = limited(max_concurrent_checks=1, max_failures_per_ip=100)
    async with running_server(config, authenticator=auth) as srv:
        guessers = [await tls_dialog(srv.port, cert) for _ in range(5)]
        guesses = [asyncio.ensure_future(d.command(plain("alice", "guess"))) for d in guessers]
        await asyncio.sleep(0.05)
        # Mail from another client goes through while the checks are queued.
        dialog = await tls_dialog(srv.port, cert, source="127.0.0.9")
        await dialog.command("MAIL FROM:<a@example.org>")
        await dialog.command("RCPT TO:<bob@example.com>")
        assert (await dialog.command("DATA")).startswith("354")
        await dialog.write_raw(make_message())
        assert (await dialog.command(".")).startswith("250")
        assert auth.calls < len(guessers)  # the guesses were still waiting their turn
        await dialog.close()
        assert all(r.startswith("535") for r in await asyncio.gather(*guesses))
        assert auth.most_at_once == 1
        for d in guessers:
            await d.close()


async def test_guesses_queued_before_a_lockout_are_refused_when_their_turn_comes(
    limited, tls_files, users_file
):
    """Six guesses from one address arrive at once, before any has failed, and queue for
    the one check slot. The lockout comes after the second failure: the four still in
    line are refused (454) when they get the slot, not checked one after the other."""
    cert = tls_files[0]
    auth = Counting(users_file, delay=0.1)
    config = limited(max_failures_per_ip=2, max_failures_per_user=100, max_concurrent_checks=1)
    async with running_server(config, authenticator=auth) as srv:
        guessers = [await tls_dialog(srv.port, cert) for _ in range(6)]
        replies = await asyncio.gather(*(d.command(plain("alice", "guess")) for d in guessers))
        for d in guessers:
            await d.close()
    assert auth.calls == 2
    assert sorted(r[:9] for r in replies) == ["454 4.7.0"] * 4 + ["535 5.7.8"] * 2, replies


async def test_exempt_addresses_are_not_locked_out_per_address_but_per_user(
    limited, tls_files, users_file
):
    """max_failures_per_ip_exempt: a proxy logging in for many users is not locked out
    as an address; each user name still is."""
    cert = tls_files[0]
    auth = Counting(users_file)
    config = limited(
        max_failures_per_ip=2,
        max_failures_per_user=3,
        max_failures_per_ip_exempt='["127.0.0.1/32"]',
    )
    async with running_server(config, authenticator=auth) as srv:
        # Four failures from the exempt address, for two users: twice the address limit.
        for user in ("alice", "alice", "bob", "bob"):
            assert (await attempt(srv.port, cert, user, "guess")).startswith("535")
        assert (await attempt(srv.port, cert, "bob", "s3cret")).startswith("235")
        # The per-user limit still counts from there: alice's third failure locks her.
        assert (await attempt(srv.port, cert, "alice", "guess")).startswith("535")
        assert (await attempt(srv.port, cert, "alice", "s3cret")).startswith("454")
        # An address outside the networks is locked out as before.
        for user in ("bob", "carol"):
            reply = await attempt(srv.port, cert, user, "guess", source="127.0.0.2")
            assert reply.startswith("535"), reply
        reply = await attempt(srv.port, cert, "bob", "s3cret", source="127.0.0.2")
        assert reply.startswith("454"), reply
        metrics = srv.app.metrics.exposition().decode()
    assert 'mailflow_auth_lockouts_total{scope="address"} 1.0' in metrics
    assert 'mailflow_auth_lockouts_total{scope="user"} 1.0' in metrics


# --- the limiter itself ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_counts_expire_and_lock_for_a_while():
    clock = Clock()
    settings = AuthThrottleConfig(
        max_failures_per_ip=3, max_failures_per_user=5, failure_window=60, lockout_time=300
    )
    limiter = MemoryAuthLimiter(settings, clock=clock)
    assert limiter.failed("192.0.2.1", "alice").count == 1
    clock.now += 61  # a quiet window: forgotten
    assert limiter.failed("192.0.2.1", "alice").count == 1
    assert limiter.failed("192.0.2.1", "alice").locked == []
    assert limiter.failed("192.0.2.1", "alice").locked == ["address"]
    assert limiter.locked("192.0.2.1", "bob") == "address"
    assert limiter.locked("192.0.2.2", "alice") is None
    clock.now += 299
    assert limiter.locked("192.0.2.1", "bob") == "address"
    clock.now += 2
    assert limiter.locked("192.0.2.1", "bob") is None


def test_limiter_success_clears_the_user_but_not_the_address():
    settings = AuthThrottleConfig(max_failures_per_ip=3, max_failures_per_user=3)
    limiter = MemoryAuthLimiter(settings, clock=Clock())
    limiter.failed("192.0.2.1", "alice")
    limiter.failed("192.0.2.1", "alice")
    limiter.succeeded("192.0.2.1", "alice")
    assert limiter.failed("192.0.2.1", "alice").locked == ["address"]  # 3rd from the address


def test_limiter_success_after_an_expired_lockout_clears_the_user():
    clock = Clock()
    settings = AuthThrottleConfig(
        max_failures_per_ip=100, max_failures_per_user=3, failure_window=900, lockout_time=60
    )
    limiter = MemoryAuthLimiter(settings, clock=clock)
    addresses = (f"192.0.2.{i}" for i in range(1, 100))  # a new one each time: users only
    for _ in range(3):
        limiter.failed(next(addresses), "alice")
    assert limiter.locked(next(addresses), "alice") == "user"
    limiter.succeeded(next(addresses), "alice")  # cannot happen now, but must not unlock
    assert limiter.locked(next(addresses), "alice") == "user"
    clock.now += 61  # the lockout is over; the failures are still within the window
    assert limiter.failed(next(addresses), "alice").count == 1
    limiter.succeeded(next(addresses), "alice")
    assert limiter.failed(next(addresses), "alice").count == 1  # counted from 0 again
    assert limiter.failed(next(addresses), "alice").locked == []


async def test_a_login_after_a_lockout_ends_starts_the_user_count_over(limited, tls_files):
    cert = tls_files[0]
    config = limited(
        max_failures_per_ip=100, max_failures_per_user=2, lockout_time=0.4, failure_window=60
    )
    async with running_server(config) as srv:
        for _ in range(2):
            assert (await attempt(srv.port, cert, "alice", "guess")).startswith("535")
        assert (await attempt(srv.port, cert, "alice", "s3cret")).startswith("454")
        await asyncio.sleep(0.5)
        assert (await attempt(srv.port, cert, "alice", "guess")).startswith("535")
        assert (await attempt(srv.port, cert, "alice", "s3cret")).startswith("235")
        # The failure before the login is forgotten: one more is not the second.
        assert (await attempt(srv.port, cert, "alice", "guess")).startswith("535")
        reply = await attempt(srv.port, cert, "alice", "s3cret")
        assert reply.startswith("235"), reply


def test_limiter_memory_is_bounded():
    clock = Clock()
    limiter = MemoryAuthLimiter(AuthThrottleConfig(), capacity=100, clock=clock)
    for i in range(10_000):
        limiter.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"user{i}")
    assert len(limiter.addresses) == 100 and len(limiter.users) == 100
    clock.now += 10_000  # everything expired: the next failure sweeps them out
    limiter.failed("192.0.2.1", "alice")
    assert len(limiter.addresses) == 1 and len(limiter.users) == 1


def test_ipv6_clients_are_counted_by_their_slash_64():
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9")
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("192.0.2.7") == "192.0.2.7"


def test_delays_grow_with_the_failures_up_to_a_cap():
    settings = AuthThrottleConfig(failure_delay=0.5, max_failures_per_ip=100)
    guard = AuthGuard(settings)
    delays = [guard.failed("192.0.2.1", b"alice", 1) for _ in range(12)]
    assert delays[:3] == [0.5, 1.0, 1.5]
    assert delays[-1] == 5.0  # ten steps at most
    assert guard.failed("192.0.2.99", b"carol", 3) == 1.5  # this connection's own count
    # A locked-out attempt waits the longest delay for its 454: no fast reconnect loop.
    assert guard.lockout_delay == 5.0
