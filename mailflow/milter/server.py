"""The milter listener: asyncio streams around :class:`~mailflow.milter.session.MilterSession`.

One task per MTA connection. A protocol error, a timeout or a bug in one connection is
logged and closes that connection only; the MTA then applies its own
``milter_default_action`` to the affected message, every other connection goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from pathlib import Path

from mailflow.app import App
from mailflow.config import MilterConfig, parse_milter_listen
from mailflow.milter.protocol import Decoder, ProtocolError
from mailflow.milter.session import PROGRESS_INTERVAL, MilterSession

log = logging.getLogger("mailflow.milter")

READ_SIZE = 256 * 1024
UNIX_SOCKET_MODE = 0o660  # the MTA's user must share our group (docs/milter.md)
CLOSE_TIMEOUT = 5.0


class MilterServer:
    """Listens where ``config.listen`` says; ``start``/``stop`` are idempotent."""

    def __init__(
        self, app: App, config: MilterConfig, *, progress_interval: float = PROGRESS_INTERVAL
    ) -> None:
        self.app = app
        self.config = config
        self.progress_interval = progress_interval
        self.server: asyncio.Server | None = None
        self.active = 0
        self.errors = 0  # connections closed for a protocol error or a bug (for tests/metrics)
        self._tasks: set[asyncio.Task[None]] = set()
        self._unix_path: str | None = None

    async def start(self) -> str:
        """Start listening; returns the bound address ("host:port" or "unix:/path")."""
        if self.server is not None:
            return self.address
        if self.config.listen is None:
            raise ValueError("milter.listen is not set")
        where = parse_milter_listen(self.config.listen)
        if isinstance(where, str):
            _remove_stale_socket(where)
            self.server = await asyncio.start_unix_server(self._serve, path=where)
            os.chmod(where, UNIX_SOCKET_MODE)
            self._unix_path = where
        else:
            host, port = where
            self.server = await asyncio.start_server(
                self._serve, host=host, port=port, reuse_address=True
            )
        log.info("milter listening on %s", self.address)
        return self.address

    @property
    def address(self) -> str:
        if self._unix_path is not None:
            return f"unix:{self._unix_path}"
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def port(self) -> int:
        assert self.server is not None and self._unix_path is None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, end open conversations (the MTA sees a closed milter)."""
        if self.server is None:
            return
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), CLOSE_TIMEOUT)
        self.server = None
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
            self._unix_path = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername") or "unix socket"
        self.active += 1
        try:
            if self.active > self.config.max_connections:
                # Closing makes the MTA apply milter_default_action to this message.
                log.warning("milter: %d connections open, refusing %s", self.active - 1, peer)
                return
            await self._conversation(reader, writer, peer)
        except asyncio.CancelledError:
            # stop() cancels open conversations; asyncio's stream server would log a
            # cancelled handler task as an error, so end it normally.
            log.debug("milter: closing %s at shutdown", peer)
        finally:
            self.active -= 1
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        async def send(packets: list[bytes]) -> None:
            writer.write(b"".join(packets))
            await writer.drain()

        decoder = Decoder()
        session = MilterSession(
            self.app,
            send,
            default_action=self.config.default_action,
            progress_interval=self.progress_interval,
        )
        try:
            while not session.closed:
                try:
                    async with asyncio.timeout(self.config.timeout or None):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    log.info("milter: %s idle for %.0fs, closing", peer, self.config.timeout)
                    return
                if not data:
                    if decoder.pending:
                        self.errors += 1
                        log.error(
                            "milter: %s closed mid-packet (%d bytes of a truncated packet)",
                            peer,
                            decoder.pending,
                        )
                    return
                for command in decoder.feed(data):
                    await session.handle(command)
                    if session.closed:
                        break
        except ProtocolError as exc:
            self.errors += 1
            log.error("milter: protocol error from %s: %s; closing the connection", peer, exc)
        except (ConnectionError, BrokenPipeError) as exc:
            log.info("milter: %s went away: %r", peer, exc)
        except Exception:
            self.errors += 1
            log.exception("milter: unexpected error with %s; closing the connection", peer)
        finally:
            session.finish()


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a previous run would make bind() fail; never remove non-sockets."""
    p = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(p.lstat().st_mode):
            p.unlink()
