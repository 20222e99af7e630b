"""DKIM verification (RFC 6376 6, RFC 8463), plugin name ``dkim``.

Every ``DKIM-Signature`` field (up to ``max_signatures``, topmost first) is
verified with dkimpy and reported on its own: domain, selector, algorithm and
result, in the RFC 8601 2.7.1 vocabulary:

* ``pass``: the signature verified;
* ``fail``: it did not (changed body or headers, wrong key);
* ``permerror``: it cannot ever verify: broken tags, unknown algorithm, From not
  signed, no key record (6.1.2), malformed or revoked key;
* ``temperror``: the key lookup failed for now (timeout, SERVFAIL);
* ``policy``: well-formed but not acceptable: ``a=rsa-sha1``, which RFC 8301 3.1
  forbids verifiers to accept (``allow_rsa_sha1`` to override).

Only the first ``max_signatures`` signatures are looked at (bounded work and a
bounded Authentication-Results header, whatever a message carries); the others
are counted in ``not_verified``.

The message result is ``pass`` if any signature passes, else the most telling of
``temperror``, ``fail``, ``permerror``, ``policy``; ``none`` without signatures.
DMARC (RFC 7489) decides what a failure means, so by default this plugin only
reports; ``fail_score`` / ``fail_action`` let an admin act on a failure anyway.
The Authentication-Results header is built by the ``authres`` plugin from
``details``; this plugin adds no header.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from mailflow_plugins.dkim.dns import KeyTable, check_key_record, fetch_keys, key_name
from pydantic import BaseModel, ConfigDict, Field

from mailflow.api import Action, App, MessageContext, Result, Symbol, hookimpl

# Order in which per-signature results summarise the message (first found wins).
_PRECEDENCE = ("pass", "temperror", "fail", "permerror", "policy")
REASON_LIMIT = 160  # characters: reasons end up in headers and logs
HEADER_B_LENGTH = 8  # RFC 6008 2: a prefix of b= that tells signatures apart
DKIM_THREADS = 2  # dkimpy's CPU work; its own pool, so it never queues behind disk I/O

_executor: ThreadPoolExecutor | None = None


def header_block(raw: bytes) -> bytes:
    """The header section of ``raw`` (CRLF line ends), lower-cased, for cheap field checks.

    A message with no empty line is all header. Only used to rule a field out: a
    match in the body of a message without headers merely takes the slow path.
    """
    end = raw.find(b"\r\n\r\n")
    return (raw if end < 0 else raw[:end]).lower()


async def run_dkimpy(func: Callable[..., Any], *args: Any) -> Any:
    """Run dkimpy work on a small pool of its own (like ``asyncio.to_thread``)."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(DKIM_THREADS, thread_name_prefix="mailflow-dkim")
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_executor, context.run, func, *args)


class DKIMSettings(BaseModel):
    """``plugins: [{name: dkim, settings: {...}}]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_signatures: int = Field(default=5, ge=1, le=50)  # verified per message, topmost first
    min_key_bits: int = Field(default=1024, ge=1024)  # RFC 8301 3.2: shorter RSA keys never pass
    allow_rsa_sha1: bool = False  # RFC 8301 3.1: verifiers must not accept rsa-sha1
    fail_score: float = 0.0  # added when the message result is fail or permerror
    fail_action: Literal["continue", "quarantine", "reject"] = "continue"
    temperror_action: Literal["continue", "tempfail"] = "continue"


@dataclass(slots=True)
class SignatureCheck:
    """One DKIM-Signature field and what became of it."""

    index: int
    tags: dict[bytes, bytes]
    name: str | None = None  # key record name
    result: str = ""
    reason: str = ""

    def tag(self, key: bytes) -> str:
        return self.tags.get(key, b"").decode("ascii", "replace")

    def as_dict(self) -> dict[str, Any]:
        domain = self.tag(b"d").lower()
        b_value = re.sub(r"\s+", "", self.tag(b"b"))
        return {
            "domain": domain,
            "selector": self.tag(b"s"),
            "algorithm": self.tag(b"a"),
            "result": self.result,
            "reason": self.reason,
            "header_d": domain,
            "header_b": b_value[:HEADER_B_LENGTH],
            "identity": self.tag(b"i") or (f"@{domain}" if domain else ""),
        }


def _short(text: str) -> str:
    """One line, bounded, without dkimpy's ``b'...'`` byte-string reprs."""
    text = " ".join(re.sub(r"""b'([^']*)'""", r"\1", text).split())
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 3] + "..."


def parse_signatures(
    raw: bytes, limit: int, allow_rsa_sha1: bool = False
) -> tuple[Any, list[SignatureCheck], int]:
    """Parse the message once with dkimpy and pre-check the first ``limit`` signatures.

    Returns the dkimpy verifier object (None if the header is unparsable), one
    entry per examined signature (entries that already have a result need no
    key) and the number of signatures left unexamined.
    """
    try:
        verifier = dkim.DKIM(raw)
    except Exception as exc:  # dkimpy's parser raises assorted errors on garbage
        return None, [SignatureCheck(0, {}, result="permerror", reason=_short(str(exc)))], 0
    fields = [v for k, v in verifier.headers if k.lower() == b"dkim-signature"]
    checks = []
    for index, value in enumerate(fields[:limit]):
        check = SignatureCheck(index, {})
        checks.append(check)
        try:
            check.tags = parse_tag_value(value)
        except InvalidTagValueList as exc:
            check.result, check.reason = "permerror", f"malformed tag list: {_short(str(exc))}"
            continue
        try:
            dkim.validate_signature_fields(check.tags)
        except dkim.DKIMException as exc:
            check.result, check.reason = "permerror", _short(str(exc))
            continue
        except Exception as exc:  # e.g. IndexError for an i= equal to d= in dkimpy 1.1
            check.result = "permerror"
            check.reason = f"malformed signature: {exc.__class__.__name__}"
            continue
        if check.tags[b"a"].lower() == b"rsa-sha1" and not allow_rsa_sha1:
            check.result, check.reason = "policy", "rsa-sha1 is not acceptable (RFC 8301 3.1)"
            continue
        signed = [h.strip().lower() for h in check.tags[b"h"].split(b":")]
        if b"from" not in signed:  # RFC 6376 6.1.1
            check.result, check.reason = "permerror", "From field not signed"
            continue
        check.name = key_name(check.tags[b"s"], check.tags[b"d"])
        if check.name is None:
            check.result, check.reason = "permerror", "invalid d= or s= domain name"
    return verifier, checks, max(0, len(fields) - limit)


def verify_signatures(
    verifier: Any, checks: list[SignatureCheck], keys: KeyTable, min_key_bits: int
) -> None:
    """Verify the signatures still pending, in place (CPU work: run in a thread)."""
    verifier.minkey = min_key_bits
    for check in checks:
        if check.result:
            continue
        assert check.name is not None
        problem = check_key_record(check.name, keys)
        if problem is not None:
            check.result, check.reason = problem[0], _short(problem[1])
            continue
        try:
            ok = verifier.verify(check.index, dnsfunc=keys.dnsfunc)
        except dkim.ValidationError as exc:
            text = str(exc)
            if text.startswith("body hash mismatch"):
                check.result, check.reason = "fail", "body hash did not verify"
            else:
                check.result, check.reason = "permerror", _short(text)
            continue
        except Exception as exc:  # hostile input reaches dkimpy's internals
            check.result = "permerror"
            check.reason = _short(str(exc) or exc.__class__.__name__)
            continue
        if ok:
            check.result, check.reason = "pass", ""
        else:
            check.result, check.reason = "fail", "signature did not verify"


def summarise(checks: list[SignatureCheck]) -> str:
    found = {c.result for c in checks}
    return next((r for r in _PRECEDENCE if r in found), "none")


class DKIMVerify:
    """The ``dkim`` plugin: see the module docstring."""

    Settings = DKIMSettings
    # Body canonicalization and hashing take time linear in the message, much of it in
    # regular expressions that hold the interpreter lock: a large message is handled in
    # a content-analysis worker process (docs/plugins.md, "Isolation").
    isolate = "large"

    def __init__(self, settings: DKIMSettings | None = None) -> None:
        self.settings = settings or DKIMSettings()
        self.resolver: Any = None

    @hookimpl
    def mailflow_startup(self, app: App) -> None:
        self.resolver = app.resolver

    async def evaluate(self, raw: bytes) -> dict[str, Any]:
        """The ``details`` for one message: see the module docstring."""
        if b"dkim-signature" not in header_block(raw):
            # Unsigned mail (most of it): no parse, no thread hop (RFC 6376 6.1: "none").
            return {"result": "none", "signatures": []}
        verifier, checks, skipped = await run_dkimpy(
            parse_signatures, raw, self.settings.max_signatures, self.settings.allow_rsa_sha1
        )
        if verifier is not None:
            names = {c.name for c in checks if not c.result and c.name}
            keys = await fetch_keys(self.resolver, names) if names else KeyTable()
            if any(not c.result for c in checks):
                await run_dkimpy(
                    verify_signatures, verifier, checks, keys, self.settings.min_key_bits
                )
        elif b"dkim-signature" not in raw.split(b"\r\n\r\n", 1)[0].lower():
            checks = []  # unparsable, but nothing claimed a signature either
        result = summarise(checks)
        details: dict[str, Any] = {
            "result": result,
            "signatures": [c.as_dict() for c in checks],
        }
        if skipped:
            details["not_verified"] = skipped
        if verifier is None and checks:
            details["reason"] = f"message header unparsable: {checks[0].reason}"
        return details

    @hookimpl
    async def mailflow_data(self, message: MessageContext) -> Result:
        details = await self.evaluate(message.raw)
        result = details["result"]
        symbol = Symbol(f"DKIM_{result.upper()}")
        out = Result(symbols=[symbol], details=details)
        s = self.settings
        if result in ("fail", "permerror"):
            symbol.score = out.score = s.fail_score
            if s.fail_action != "continue":
                out.action = Action(s.fail_action)
                out.reason = f"DKIM {result}"
        elif result == "temperror" and s.temperror_action == "tempfail":
            out = Result.tempfail("DKIM key lookup failed, try again later")
            out.symbols, out.details = [symbol], details
        return out
