"""Quarantine: messages kept out of the mailboxes, stored durably for an admin to review.

Layout: ``<dir>/<queue id>.eml`` (the message as it would have been delivered) and
``<dir>/<queue id>.json`` (envelope, client, reason, deciding plugin, score). An admin
lists, reads, deletes or releases them with ``mailflow quarantine``; a released
message goes into the delivery queue (spool first, then removed from quarantine, so
a crash in between can duplicate but never lose it).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from mailflow.config import Config
from mailflow.delivery.durable import fsync_dir, write_files
from mailflow.delivery.spool import QueueEntry, RecipientState, Spool, check_queue_id
from mailflow.message import MessageContext
from mailflow.pipeline import default_route


class NotQuarantined(LookupError):
    """No quarantined message has this id."""


class Quarantine:
    """The quarantine directory of one mailflow instance."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    # --- storing (the SMTP front end) -----------------------------------------------------

    async def store(self, ctx: MessageContext) -> Path:
        return await asyncio.to_thread(self.store_sync, ctx)

    def store_sync(self, ctx: MessageContext) -> Path:
        """Store message and metadata; returns after both and the directory are fsync'd."""
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
            "size": ctx.size,
        }
        path = self.directory / f"{ctx.queue_id}.eml"
        # The message first: a .json without its .eml would list a message that is gone.
        write_files([(os.fspath(path), ctx.raw)])
        write_files([(os.fspath(path.with_suffix(".json")), json.dumps(meta, indent=1).encode())])
        fsync_dir(self.directory)
        return path

    # --- reviewing (the CLI) --------------------------------------------------------------

    def _paths(self, queue_id: str) -> tuple[Path, Path]:
        try:
            check_queue_id(queue_id)
        except ValueError:
            raise NotQuarantined(queue_id) from None
        eml = self.directory / f"{queue_id}.eml"
        return eml, eml.with_suffix(".json")

    def list(self) -> list[dict[str, Any]]:
        """Metadata of every quarantined message, oldest first."""
        out = []
        for meta in sorted(self.directory.glob("*.json")):
            try:
                out.append(json.loads(meta.read_text()))
            except (OSError, ValueError):
                continue
        out.sort(key=lambda m: m.get("received_at") or 0)
        return out

    def load(self, queue_id: str) -> dict[str, Any]:
        _, meta = self._paths(queue_id)
        try:
            data: dict[str, Any] = json.loads(meta.read_text())
        except FileNotFoundError:
            raise NotQuarantined(queue_id) from None
        return data

    def read_message(self, queue_id: str) -> bytes:
        eml, _ = self._paths(queue_id)
        try:
            return eml.read_bytes()
        except FileNotFoundError:
            raise NotQuarantined(queue_id) from None

    def delete(self, queue_id: str) -> None:
        eml, meta = self._paths(queue_id)
        if not meta.exists() and not eml.exists():
            raise NotQuarantined(queue_id)
        meta.unlink(missing_ok=True)
        eml.unlink(missing_ok=True)

    def release(self, queue_id: str, config: Config, spool: Spool) -> QueueEntry:
        """Hand the message to the delivery queue along the config's routes.

        The plugins are not run again: releasing is the admin's decision. The spool
        copy is durable before the quarantine copy is removed.
        """
        meta = self.load(queue_id)
        message = self.read_message(queue_id)
        now = time.time()
        entry = QueueEntry(
            id=queue_id,
            sender=meta.get("sender") or "",
            recipients=[
                RecipientState(rcpt, default_route(config, rcpt).as_dict(), next_attempt=now)
                for rcpt in meta.get("recipients") or []
            ],
            created=now,
            size=len(message),
            client_ip=meta.get("client_ip") or "",
            extra={"released_from_quarantine": True},
        )
        spool.store_sync(entry, message)
        self.delete(queue_id)
        return entry
