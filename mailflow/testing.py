"""Test helpers for mailflow itself and for plugin authors.

Everything here uses real sockets on 127.0.0.1 with port 0 inside the caller's
event loop: a running mailflow server, a scriptable SMTP sink, message builders.

    async with running_server(config_text, tmp_path) as srv:
        reply = await send(srv.port, "a@example.org", ["b@example.com"], make_message())
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import socket
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailflow.app import App
from mailflow.config import Config, parse_config
from mailflow.server import Server


def make_message(
    subject: str = "Test message",
    body: str = "Hello,\r\nthis is a test.\r\n",
    sender: str = "alice@example.org",
    to: str = "bob@example.com",
    extra_headers: dict[str, str] | None = None,
) -> bytes:
    """A small RFC 5322 message with CRLF line endings."""
    headers = {
        "From": sender,
        "To": to,
        "Subject": subject,
        "Date": email.utils.formatdate(),
        "Message-ID": email.utils.make_msgid(domain="example.org"),
        "MIME-Version": "1.0",
        "Content-Type": "text/plain; charset=utf-8",
    }
    headers.update(extra_headers or {})
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n" + body.replace("\r\n", "\n").replace("\n", "\r\n")).encode()


def config_for(tmp_path: Path, yaml_text: str = "") -> Config:
    """Parse ``yaml_text`` (may be empty) with listen/maildir/spool/quarantine under tmp_path.

    Keys given in ``yaml_text`` win; sections are merged key by key, so overriding
    e.g. ``server: {max_message_size: 3000}`` keeps the test listener on port 0 and
    the temp directories (lists, such as ``plugins``, are replaced whole).
    """
    base = textwrap.dedent(f"""\
        server:
          listen: ["127.0.0.1:0"]
          hostname: mx.test
        delivery:
          maildir:
            root: {tmp_path / "mail"}
        queue:
          directory: {tmp_path / "spool"}
          scan_interval: 0.05
          retry_schedule: [0.2]
        quarantine:
          directory: {tmp_path / "quarantine"}
        """)
    import yaml

    merged = _deep_merge(yaml.safe_load(base), yaml.safe_load(textwrap.dedent(yaml_text)) or {})
    return parse_config(yaml.safe_dump(merged), "test.yaml")


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class RunningServer:
    app: App
    server: Server
    host: str
    port: int

    @property
    def maildir_root(self) -> Path:
        return Path(self.app.config.delivery.maildir.root)

    def mailbox(self, recipient: str, folder: str = "") -> Path:
        return self.app.maildir.folder_path(recipient, folder)

    def delivered(self, recipient: str, folder: str = "") -> list[bytes]:
        """Messages in the recipient's ``new/`` directory, oldest first."""
        new = self.mailbox(recipient, folder) / "new"
        if not new.exists():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    async def wait_delivered(
        self, recipient: str, count: int = 1, folder: str = "", timeout: float = 10.0
    ) -> list[bytes]:
        async with asyncio.timeout(timeout):
            while True:
                msgs = self.delivered(recipient, folder)
                if len(msgs) >= count:
                    return msgs
                await asyncio.sleep(0.02)

    async def wait_queue_empty(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.app.spool.ids():
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_server(
    config: Config,
    *,
    extra_plugins: dict[str, Any] | None = None,
    plugin_factories: dict[str, Any] | None = None,
    authenticator: Any = None,
) -> AsyncIterator[RunningServer]:
    """Start a real mailflow server on 127.0.0.1 (port 0) in the current loop.

    ``extra_plugins`` are plugin objects, run in this process; ``plugin_factories``
    (name -> importable class or function, instead of the installed entry points) are
    built from the config like installed plugins, so content-analysis worker
    processes can build them too (``isolate``).
    """
    app = App(config, extra_plugins=extra_plugins, available_plugins=plugin_factories)
    server = Server(app, authenticator=authenticator)
    addresses = await server.start()
    host, port = addresses[0]
    try:
        yield RunningServer(app, server, host, port)
    finally:
        await server.stop()


async def send(
    port: int,
    sender: str,
    recipients: list[str],
    message: bytes,
    host: str = "127.0.0.1",
) -> dict[str, tuple[int, str]]:
    """Send one message with aiosmtplib; returns refused recipients ({} when all accepted).

    Raises ``aiosmtplib.SMTPResponseException`` (with ``.code``) when DATA or MAIL fails.
    """
    import aiosmtplib

    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as client:
        errors, _ = await client.sendmail(sender, recipients, message)
        return {k: (v.code, v.message) for k, v in errors.items()}


class SMTPDialog:
    """A raw line-level SMTP client for protocol edge cases (smuggling, garbage)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> tuple[SMTPDialog, str]:
        reader, writer = await asyncio.open_connection(host, port)
        dialog = cls(reader, writer)
        return dialog, await dialog.read_reply()

    async def read_reply(self, timeout: float = 10.0) -> str:
        lines = []
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.reader.readline()).decode("utf-8", "replace")
                if not line:
                    break
                lines.append(line.rstrip("\r\n"))
                if len(line) < 4 or line[3] != "-":
                    break
        return "\n".join(lines)

    async def command(self, line: bytes | str) -> str:
        data = line.encode() if isinstance(line, str) else line
        self.writer.write(data + b"\r\n")
        await self.writer.drain()
        return await self.read_reply()

    async def write_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# --- a scriptable SMTP sink (the "upstream MTA" in relay tests) ----------------------------


@dataclass
class SinkMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool = False
    auth_user: str | None = None


@dataclass
class SinkBehaviour:
    """Replies the sink gives; each list is consumed one item per transaction, then the
    last item repeats. ``None`` means the normal 250."""

    data_replies: list[str | None] = field(default_factory=lambda: [None])
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # per recipient, permanent
    # LMTP only: the reply after DATA for these recipients (RFC 2033 4.2); others get 250.
    lmtp_data_replies: dict[str, str] = field(default_factory=dict)


def _login_of(auth_data: object) -> str | None:
    login = getattr(auth_data, "login", None)
    return login.decode() if isinstance(login, bytes) else None


class SinkHandler:
    def __init__(self, behaviour: SinkBehaviour) -> None:
        self.behaviour = behaviour
        self.messages: list[SinkMessage] = []
        self.transactions = 0
        self.connections = 0
        self.rcpts_asked: list[str] = []  # every RCPT TO address, refused or not

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self.rcpts_asked.append(address)
        reply = self.behaviour.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        replies = self.behaviour.data_replies
        index = min(self.transactions, len(replies) - 1)
        self.transactions += 1
        reply = replies[index]
        if reply is not None:
            return reply
        stored = list(envelope.rcpt_tos)
        lmtp_lines = None
        if isinstance(server, LMTP):
            per_rcpt = self.behaviour.lmtp_data_replies
            lmtp_lines = [per_rcpt.get(r, "250 2.0.0 OK") for r in envelope.rcpt_tos]
            stored = [r for r in envelope.rcpt_tos if r not in per_rcpt]
        self.messages.append(
            SinkMessage(
                envelope.mail_from or "",
                stored,
                envelope.original_content or b"",
                tls=session.ssl is not None,
                auth_user=_login_of(session.auth_data),
            )
        )
        if lmtp_lines is not None:
            return "\r\n".join(lmtp_lines)  # LMTP: one reply per recipient
        return "250 OK: stored"


class _CountingSMTP(SMTP):
    def __init__(self, handler: SinkHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            self._sink.connections += 1
        super().connection_made(transport)


@dataclass
class Sink:
    handler: SinkHandler
    server: asyncio.Server
    host: str
    port: int

    @property
    def messages(self) -> list[SinkMessage]:
        return self.handler.messages

    async def wait_messages(self, count: int = 1, timeout: float = 10.0) -> list[SinkMessage]:
        async with asyncio.timeout(timeout):
            while len(self.handler.messages) < count:
                await asyncio.sleep(0.02)
        return self.handler.messages


@contextlib.asynccontextmanager
async def smtp_sink(
    behaviour: SinkBehaviour | None = None,
    *,
    lmtp: bool = False,
    factory_kwargs: dict[str, Any] | None = None,
    smtp_class: Callable[..., SMTP] | None = None,
    port: int = 0,
) -> AsyncIterator[Sink]:
    """A real aiosmtpd server on 127.0.0.1 (port 0 unless ``port`` is given) that records
    what it receives."""
    handler = SinkHandler(behaviour or SinkBehaviour())
    loop = asyncio.get_running_loop()
    if smtp_class is None:
        if lmtp:
            from aiosmtpd.lmtp import LMTP

            class _CountingLMTP(LMTP):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    if self.transport is None:
                        handler.connections += 1
                    super().connection_made(transport)

            smtp_class = _CountingLMTP
        else:
            smtp_class = _CountingSMTP
    kwargs = {"hostname": "sink.test", "loop": loop, **(factory_kwargs or {})}
    server = await loop.create_server(
        lambda: smtp_class(handler, **kwargs), host="127.0.0.1", port=port
    )
    port = server.sockets[0].getsockname()[1]
    try:
        yield Sink(handler, server, "127.0.0.1", port)
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
