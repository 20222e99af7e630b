"""Helpers shared by the SMTP tests (TLS certificates, a recording plugin, relay configs)."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mailflow.hookspecs import hookimpl
from mailflow.message import Connection, MessageContext


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")


def self_signed_cert(directory: Path, hostname: str = "mx.test") -> tuple[Path, Path]:
    """A throwaway EC certificate for ``hostname`` and 127.0.0.1, made by the openssl CLI."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN={hostname}",
            "-addext", f"subjectAltName=DNS:{hostname},IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


def client_context(cert: Path) -> ssl.SSLContext:
    """A client context that trusts exactly ``cert``."""
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    return ctx


@dataclass
class Seen:
    """What one stage saw of the connection (copied: the Connection object lives on)."""

    tls: bool
    tls_version: str
    user: str


@dataclass
class Recorder:
    """A plugin that records what each stage saw; it never gives a verdict."""

    stages: dict[str, list[Seen]] = field(default_factory=dict)
    messages: list[bytes] = field(default_factory=list)

    def _seen(self, stage: str, conn: Connection) -> None:
        seen = Seen(conn.tls, conn.tls_version, conn.authenticated_user)
        self.stages.setdefault(stage, []).append(seen)

    @hookimpl
    def mailflow_mail_from(self, connection: Connection, sender: str, options: list[str]) -> None:
        self._seen("mail", connection)

    @hookimpl
    def mailflow_rcpt_to(self, connection: Connection, sender: str, recipient: str) -> None:
        self._seen("rcpt", connection)

    @hookimpl
    def mailflow_data(self, message: MessageContext) -> None:
        self._seen("data", message.connection)
        self.messages.append(message.raw)


def relay_config(
    make_config: Callable[[str], Any],
    port: int,
    *,
    target: str = "tls: none",
    extra: str = "",
    **relay: object,
) -> Any:
    """A config relaying everything outside example.org to 127.0.0.1:``port`` (target ``up``).

    ``target`` adds keys to that target; keyword arguments become further ``relay:``
    keys (``pool_idle=5``, ``inline_timeout=0``); ``extra`` is more top-level YAML.
    """
    options = "".join(f"\n          {key}: {value}" for key, value in relay.items())
    return make_config(
        f"""
        local_domains: [example.org]
        relay_networks: ["127.0.0.0/8"]
        relay:
          default: up{options}
          targets:
            up: {{host: 127.0.0.1, port: {port}, timeout: 5, {target}}}
        {extra}
        """
    )


def _cheap_hash(password: str) -> str:
    from argon2 import PasswordHasher

    # Cheap parameters keep the tests quick; verification reads them from the hash.
    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(password)


TEST_PASSWORD = "s3cret"
TEST_PASSWORD_HASH = _cheap_hash(TEST_PASSWORD)
