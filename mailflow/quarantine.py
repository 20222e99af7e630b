"""Quarantine: messages kept out of the mailboxes, stored durably for an admin to review."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from mailflow.message import MessageContext


class Quarantine:
    """``<dir>/<queue id>.eml`` plus ``<queue id>.json`` (envelope, reason, score)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    async def store(self, ctx: MessageContext) -> Path:
        return await asyncio.to_thread(self.store_sync, ctx)

    def store_sync(self, ctx: MessageContext) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "id": ctx.queue_id,
            "sender": ctx.envelope.mail_from,
            "recipients": ctx.envelope.rcpt_tos,
            "client_ip": ctx.connection.ip,
            "reason": ctx.reason,
            "decided_by": ctx.decided_by,
            "score": ctx.score,
            "received_at": ctx.received_at,
        }
        path = self.directory / f"{ctx.queue_id}.eml"
        _durable_write(path, ctx.raw)
        _durable_write(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def list(self) -> list[dict[str, object]]:
        out = []
        for meta in sorted(self.directory.glob("*.json")):
            try:
                out.append(json.loads(meta.read_text()))
            except (OSError, ValueError):
                continue
        return out


def _durable_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
