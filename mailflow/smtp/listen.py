"""The SMTP listeners: one aiosmtpd protocol (:class:`~mailflow.smtp.protocol.MailflowSMTP`)
per connection, all sharing one :class:`~mailflow.smtp.handler.Handler`."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from mailflow.app import App
from mailflow.config import parse_listen
from mailflow.smtp.handler import Handler
from mailflow.smtp.protocol import MailflowSMTP


def make_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def protocol_factory(
    app: App, handler: Handler, authenticator: Any = None
) -> Callable[[], MailflowSMTP]:
    """What makes the protocol object for each new connection (the TLS context is loaded
    here, once)."""
    cfg = app.config.server
    tls_context = make_tls_context(str(cfg.tls.cert), str(cfg.tls.key)) if cfg.tls else None
    loop = asyncio.get_running_loop()
    excluded = _excluded_mechanisms(app, authenticator)

    def factory() -> MailflowSMTP:
        return MailflowSMTP(
            handler,
            hostname=cfg.hostname,
            ident="mailflow ESMTP",
            data_size_limit=cfg.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls_context,
            require_starttls=bool(cfg.tls and cfg.tls.require),
            timeout=cfg.command_timeout,
            auth_require_tls=True,
            authenticator=authenticator,
            auth_exclude_mechanism=excluded,
            loop=loop,
        )

    return factory


async def start_servers(
    app: App,
    handler: Handler,
    authenticator: Any = None,
    *,
    factory: Callable[[], MailflowSMTP] | None = None,
) -> list[asyncio.Server]:
    """Listen on every configured address; returns the asyncio servers.

    ``factory`` (default: :func:`protocol_factory`) is called for every connection; a
    reload (mailflow.reload) passes one whose target it can swap.
    """
    make = factory or protocol_factory(app, handler, authenticator)
    loop = asyncio.get_running_loop()
    servers = []
    for item in app.config.server.listen:
        host, port = parse_listen(item)
        servers.append(await loop.create_server(make, host=host, port=port, reuse_address=True))
    return servers


def _excluded_mechanisms(app: App, authenticator: Any) -> list[str]:
    """Mechanisms not to offer: all without an authenticator (else aiosmtpd offers
    ones that always fail), otherwise those missing from ``server.auth.mechanisms``."""
    if authenticator is None:
        return ["PLAIN", "LOGIN"]
    auth = app.config.server.auth
    allowed = set(auth.mechanisms) if auth else {"PLAIN", "LOGIN"}
    return [m for m in ("PLAIN", "LOGIN") if m not in allowed]


def bound_addresses(servers: list[asyncio.Server]) -> list[tuple[str, int]]:
    out = []
    for server in servers:
        for sock in server.sockets:
            name = sock.getsockname()
            out.append((name[0], name[1]))
    return out
