"""ARC chain verification (RFC 8617 5.2), plugin name ``arc``.

An Authenticated Received Chain lets a forwarder (mailing list, forwarding
service) vouch for the authentication results it saw before it changed the
message. This plugin validates the chain with dkimpy and reports

* ``none``: no ARC sets;
* ``pass``: every ARC-Seal and the newest ARC-Message-Signature verify, and the
  ``cv=`` values are consistent (RFC 8617 5.2 steps 1-6);
* ``fail``: anything else, including a seal that already says ``cv=fail``,
  a structural error (missing or duplicate set members, i= beyond 50) and a
  key that could not be fetched.

Keys are fetched up front through the shared async resolver (see
``mailflow_plugins.dkim.dns``), then dkimpy runs in a worker thread. Whether to trust a passing
chain is a local policy decision (RFC 8617 7.2), made by DMARC or the admin;
by default this plugin only reports. The ``authres`` plugin writes the
``arc=`` result into Authentication-Results from ``details``.
"""

from __future__ import annotations

import re
from typing import Any

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from mailflow_plugins.dkim.dns import KeyTable, fetch_keys, key_name
from mailflow_plugins.dkim.verify import header_block, run_dkimpy
from pydantic import BaseModel, ConfigDict, Field

from mailflow.api import App, MessageContext, Result, Symbol, hookimpl

MAX_INSTANCES = 50  # RFC 8617 4.2.1: i= is 1..50
REASON_LIMIT = 160
_ARC_FIELDS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_INSTANCE_RE = re.compile(rb"(?:^|;)\s*i\s*=\s*(\d+)")


class ARCSettings(BaseModel):
    """``plugins: [{name: arc, settings: {...}}]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fail_score: float = 0.0  # added when a chain is present but fails
    pass_score: float = 0.0  # e.g. negative, to favour mail through trusted forwarders
    min_key_bits: int = Field(default=1024, ge=1024)


def _short(text: str) -> str:
    text = " ".join(re.sub(r"""b'([^']*)'""", r"\1", text).split())
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 3] + "..."


def _text(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")


def collect(raw: bytes) -> tuple[Any, int, set[str], str]:
    """Parse once: (dkimpy ARC object, highest instance, key names, early failure reason).

    The early reason is set when the chain is unusable before any key is needed.
    """
    try:
        arc = dkim.ARC(raw)
    except Exception as exc:  # dkimpy's parser raises assorted errors on garbage
        return None, 0, set(), f"message header unparsable: {_short(str(exc))}"
    names: set[str] = set()
    highest = 0
    for name, value in arc.headers:
        if name.lower() not in _ARC_FIELDS:
            continue
        match = _INSTANCE_RE.search(value)
        instance = int(match.group(1)) if match else 0
        if not 1 <= instance <= MAX_INSTANCES:
            return arc, instance, set(), f"invalid ARC instance i={instance}"
        highest = max(highest, instance)
        if name.lower() == b"arc-authentication-results":
            continue
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            continue  # dkimpy reports the broken set itself
        key = key_name(tags.get(b"s", b""), tags.get(b"d", b""))
        if key is not None:
            names.add(key)
    return arc, highest, names, ""


def verify_chain(arc: Any, keys: KeyTable, min_key_bits: int) -> tuple[str, str, list[dict]]:
    """Run dkimpy's chain validation (CPU work: run in a thread)."""
    arc.minkey = min_key_bits
    try:
        cv, sets, reason = arc.verify(dnsfunc=keys.dnsfunc)
    except Exception as exc:  # hostile input reaches dkimpy's internals
        return "fail", _short(str(exc) or exc.__class__.__name__), []
    result = {dkim.CV_Pass: "pass", dkim.CV_None: "none"}.get(cv, "fail")
    report = [
        {
            "instance": s.get("instance"),
            "ams_domain": _text(s.get("ams-domain")),
            "ams_selector": _text(s.get("ams-selector")),
            "ams_valid": bool(s.get("ams-valid")),
            "as_domain": _text(s.get("as-domain")),
            "as_selector": _text(s.get("as-selector")),
            "as_valid": bool(s.get("as-valid")),
            "cv": _text(s.get("cv")),
        }
        for s in sets
    ]
    if result == "fail" and keys.errors:
        reason = f"{reason}; key lookup failed: {'; '.join(sorted(keys.errors.values()))}"
    return result, ("" if result == "pass" else _short(reason)), report


class ARCVerify:
    """The ``arc`` plugin: see the module docstring."""

    Settings = ARCSettings
    # Body canonicalization and hashing take time linear in the message, much of it in
    # regular expressions that hold the interpreter lock: a large message is handled in
    # a content-analysis worker process (docs/plugins.md, "Isolation").
    isolate = "large"

    def __init__(self, settings: ARCSettings | None = None) -> None:
        self.settings = settings or ARCSettings()
        self.resolver: Any = None

    @hookimpl
    def mailflow_startup(self, app: App) -> None:
        self.resolver = app.resolver

    async def evaluate(self, raw: bytes) -> dict[str, Any]:
        head = header_block(raw)
        if not any(name in head for name in _ARC_FIELDS):
            # No ARC set at all (most mail): no parse, no thread hop.
            return {"result": "none", "chain_length": 0, "reason": "", "sets": []}
        arc, highest, names, early = await run_dkimpy(collect, raw)
        if early:
            return {"result": "fail", "chain_length": highest, "reason": early, "sets": []}
        if highest == 0:
            return {"result": "none", "chain_length": 0, "reason": "", "sets": []}
        keys = await fetch_keys(self.resolver, names) if names else KeyTable()
        result, reason, sets = await run_dkimpy(verify_chain, arc, keys, self.settings.min_key_bits)
        if result == "none":  # sets exist but dkimpy found none usable
            result, reason = "fail", reason or "no usable ARC set"
        return {"result": result, "chain_length": highest, "reason": reason, "sets": sets}

    @hookimpl
    async def mailflow_data(self, message: MessageContext) -> Result:
        details = await self.evaluate(message.raw)
        symbol = Symbol(f"ARC_{details['result'].upper()}")
        if details["result"] == "fail":
            symbol.score = self.settings.fail_score
        elif details["result"] == "pass":
            symbol.score = self.settings.pass_score
        return Result(score=symbol.score, symbols=[symbol], details=details)
