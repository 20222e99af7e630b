"""ARC sealing (RFC 8617 5.1), plugin name ``arc_seal``.

Adds this server's ARC set (ARC-Authentication-Results, ARC-Message-Signature,
ARC-Seal) so that a later receiver can see the authentication results we saw,
even after the message is changed downstream (list footers, forwarding).

The set is built from what is already in the message at this plugin's turn:

* the ``Authentication-Results`` header carrying our authserv-id (written by
  the ``authres`` plugin) becomes the ARC-Authentication-Results;
* its ``arc=`` result (from the ``arc`` plugin) becomes the seal's ``cv=``
  (RFC 8617 5.1.1: ``none`` for the first set, else pass/fail of the chain).

So the order is ``arc`` (verify) ... ``authres`` ... ``arc_seal``, and, like
``dkim_sign``, after any plugin that changes the message. Only ``rsa-sha256`` is
offered: it is the one algorithm RFC 8617 4.1.3 allows and dkimpy's sealer
implements.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import dkim
from mailflow_plugins.dkim import keys as dkim_keys
from pydantic import BaseModel, ConfigDict, Field

from mailflow.api import AddHeader, App, MessageContext, Mutation, Result, hookimpl

log = logging.getLogger("mailflow.plugins.arc_seal")

# The header fields the ARC-Message-Signature covers (RFC 8617 4.1.2 refers to
# RFC 6376 5.4 for the choice); ARC and Authentication-Results fields never.
DEFAULT_HEADERS = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "DKIM-Signature",  # RFC 8617 4.1.2: the AMS may cover DKIM signatures
]


class SealSettings(BaseModel):
    """``plugins: [{name: arc_seal, settings: {...}}]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str = Field(min_length=1)
    selector: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    key_file: Path  # RSA PEM, e.g. from `mailflow dkim keygen DOMAIN SELECTOR`
    headers: list[str] = DEFAULT_HEADERS


def seal(raw: bytes, settings: SealSettings, private: bytes, authserv_id: str) -> list[bytes]:
    """dkimpy's sealer: the new ARC set fields, or [] when it declines to seal."""
    include = [h.lower().encode() for h in settings.headers]
    signer = dkim.ARC(raw)
    # dkimpy lists DKIM-Signature as "should not sign" (advice for DKIM signers);
    # ARC allows it, and signing it binds the DKIM evidence to this seal.
    signer.should_not_sign.discard(b"dkim-signature")
    return list(
        signer.sign(
            settings.selector.encode(),
            settings.domain.lower().encode(),
            private,
            authserv_id.encode(),
            include_headers=include,
        )
    )


def to_mutations(fields: list[bytes]) -> list[Mutation]:
    """Header lines -> AddHeader mutations keeping dkimpy's top-to-bottom order."""
    out: list[Mutation] = []
    for line in reversed(fields):  # each AddHeader prepends: add the last one first
        name, _, value = line.decode("ascii", "replace").partition(":")
        out.append(AddHeader(name.strip(), " ".join(value.split())))
    return out


class ARCSeal:
    """The ``arc_seal`` plugin: see the module docstring."""

    Settings = SealSettings
    # Body canonicalization and hashing take time linear in the message, much of it in
    # regular expressions that hold the interpreter lock: a large message is handled in
    # a content-analysis worker process (docs/plugins.md, "Isolation").
    isolate = "large"

    def __init__(self, settings: SealSettings) -> None:
        self.settings = settings
        self.private = b""
        self.authserv_id = ""

    @hookimpl
    def mailflow_startup(self, app: App) -> None:
        """Load the key now, so a bad file stops start-up with its name."""
        self.private = dkim_keys.load_private(self.settings.key_file, "rsa-sha256")
        self.authserv_id = app.authserv_id

    @hookimpl
    async def mailflow_data(self, message: MessageContext) -> Result:
        try:
            fields = await asyncio.to_thread(
                seal, message.raw, self.settings, self.private, self.authserv_id
            )
        except Exception as exc:  # hostile existing ARC headers reach dkimpy's internals
            log.warning("arc_seal: cannot seal %s: %s", message.queue_id, exc)
            return Result(details={"sealed": False, "reason": f"cannot seal: {exc}"})
        if not fields:
            # dkimpy declines when our Authentication-Results is missing, or when a
            # chain exists but our results do not say how it validated (RFC 8617 5.1).
            reason = (
                f"no Authentication-Results from {self.authserv_id} with an arc= result "
                "(list authres, and arc for existing chains, before arc_seal)"
            )
            return Result(details={"sealed": False, "reason": reason})
        instance = next(
            (line.split(b"i=", 1)[1].split(b";", 1)[0] for line in fields if b"i=" in line),
            b"?",
        )
        return Result(
            mutations=to_mutations(fields),
            details={"sealed": True, "instance": int(instance) if instance.isdigit() else 0},
        )
