"""Key records for dkimpy without blocking: fetch asynchronously, answer synchronously.

dkimpy looks keys up through a synchronous ``dnsfunc(name, timeout)``. Calling the
system resolver from there would block (or, in a thread, escape the shared
resolver, its cache and its configured servers). Instead the plugins first collect
every ``selector._domainkey.domain`` name a message needs, fetch them all
concurrently with ``app.resolver``, and then run dkimpy in a worker thread with
:meth:`KeyTable.dnsfunc`, which only reads what was fetched. A name that timed out
or failed is answered with dkimpy's ``DnsTimeoutError``, so it can never hang.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

import dkim

# RFC 6376 3.5 (d=, s=) are domain names; RFC 1035 2.3.4 bounds them.
MAX_NAME_LENGTH = 253
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def key_name(selector: bytes, domain: bytes) -> str | None:
    """``selector._domainkey.domain`` (RFC 6376 3.6.2.1), or None when not a valid name."""
    try:
        s = selector.decode("ascii").strip()
        d = domain.decode("ascii").strip().rstrip(".")
    except UnicodeDecodeError:
        return None  # U-labels must arrive as A-labels (RFC 6376 3.5, d=)
    name = f"{s}._domainkey.{d}"
    if not s or not d or len(name) > MAX_NAME_LENGTH or not _NAME_RE.match(name):
        return None
    return name.lower()


@dataclass
class KeyTable:
    """Key records fetched for one message: name -> TXT text, or the failure."""

    records: dict[str, str | None] = field(default_factory=dict)  # None: no record
    errors: dict[str, str] = field(default_factory=dict)  # temporary failures

    def dnsfunc(self, name: bytes, timeout: float = 0.0) -> bytes | None:
        """dkimpy's DNS hook: answers from the table, never from the network."""
        key = name.decode("ascii", "replace").rstrip(".").lower()
        if key in self.errors:
            raise dkim.DnsTimeoutError(self.errors[key])
        value = self.records.get(key)
        return value.encode("utf-8", "surrogateescape") if value is not None else None


async def fetch_keys(resolver: Any, names: set[str]) -> KeyTable:
    """Look up every name's TXT record concurrently through the shared resolver.

    When a name holds several TXT records the first is used: RFC 6376 3.6.2.2
    leaves the outcome undefined and says verifiers may pick one.
    """
    from mailflow.api import DNSTempError

    table = KeyTable()
    ordered = sorted(names)

    async def one(name: str) -> None:
        try:
            records = await resolver.query(name, "TXT")
        except DNSTempError as exc:
            table.errors[name] = str(exc) or "DNS lookup failed"
            return
        table.records[name] = records[0] if records else None

    await asyncio.gather(*(one(n) for n in ordered))
    return table


def check_key_record(name: str, table: KeyTable) -> tuple[str, str] | None:
    """Classify a fetched key before dkimpy sees it: (result, reason), or None if usable.

    RFC 6376 6.1.2: no key record, an unparsable one or a revoked key (empty
    ``p=``, 3.6.1) are permanent failures; a lookup that failed now is temporary.
    """
    if name in table.errors:
        return "temperror", f"key lookup failed: {table.errors[name]}"
    text = table.records.get(name)
    if text is None:
        return "permerror", f"no key for signature ({name})"
    if re.search(r"(^|;)\s*p\s*=\s*(;|$)", text):
        return "permerror", "key revoked (empty p=)"
    try:
        dkim.evaluate_pk(name.encode(), text.encode("utf-8", "surrogateescape"))
    except dkim.DKIMException as exc:
        return "permerror", f"key record unusable: {exc}"
    except Exception as exc:  # dkimpy's key parsers raise assorted errors on garbage
        return "permerror", f"key record unusable: {exc.__class__.__name__}"
    return None
