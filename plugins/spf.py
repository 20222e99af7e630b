"""SPF (RFC 7208) for the MAIL FROM and HELO identities, with pyspf.

pyspf is synchronous and does its own DNS. Here it runs in a worker thread, and
every lookup it makes is answered by mailflow's shared async resolver (its
nameservers, port, cache, per-query timeout and per-message budget) through a
small sync bridge, so the event loop never blocks and a DNS failure becomes SPF's
``temperror`` (RFC 7208 2.6.6) within the configured time.

Results appear under ``plugins.spf`` in ``check --json``; the ``authres`` plugin
turns them into the Authentication-Results header, ``dmarc`` uses them for
alignment. Docs: docs/plugins/spf.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, Literal

import spf as pyspf
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailflow.api import AddHeader, App, DNSTempError, MessageContext, Result, Symbol, hookimpl

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
SpfAction = Literal["reject", "tempfail", "tag", "ignore"]

# RFC 7372 3: 5.7.23 "SPF validation failed", 5.7.24 "SPF validation error".
STATUS_FAILED = "5.7.23"
STATUS_ERROR_PERM = "5.7.24"
STATUS_ERROR_TEMP = "4.7.24"
MAX_EXPLANATION = 200  # the exp= text comes from the sender's DNS: keep it short
MAX_PENDING = 10_000  # MAIL FROM results waiting for RCPT (reject_at: rcpt)
BRIDGE_SLACK = 1.0  # seconds the thread waits beyond the resolver's own timeout


class SPFSettings(BaseModel):
    """``plugins: [{name: spf, settings: {...}}]``; every key is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # What to do per SPF result; results not listed are tagged.
    actions: dict[str, SpfAction] = {"fail": "reject"}
    # Answer a reject/tempfail at MAIL FROM, or at each RCPT (lets postmaster@ through).
    reject_at: Literal["mail", "rcpt"] = "mail"
    check_helo: bool = True  # RFC 7208 2.3: also evaluate the HELO identity
    # Worker threads of this plugin's own pool: an SPF check waits on DNS in its thread,
    # so it must not crowd out other users of asyncio's default executor.
    max_concurrent: Annotated[int, Field(ge=1, le=1024)] = 32
    scores: dict[str, float] = {"fail": 5.0, "softfail": 2.0, "permerror": 1.0}
    # RFC 7208 9.1: also prepend a Received-SPF trace field at end of data (the
    # authres plugin's Authentication-Results carries the same result).
    received_spf: bool = False

    @field_validator("actions", "scores")
    @classmethod
    def _known_results(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(RESULTS))
        if unknown:
            raise ValueError(f"unknown SPF result(s) {unknown}; expected some of {list(RESULTS)}")
        return value


@dataclasses.dataclass(slots=True)
class Outcome:
    """The result of one SPF evaluation, before policy turns it into an action."""

    result: str
    domain: str
    identity: str  # "mailfrom" or "helo" (RFC 7208 2.3, 2.4)
    explanation: str = ""
    mechanism: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- the DNS bridge ------------------------------------------------------------------------

LookupFn = Callable[[str, str], list[tuple[tuple[str, str], Any]]]
_current_lookup: contextvars.ContextVar[LookupFn | None] = contextvars.ContextVar(
    "mailflow_spf_lookup", default=None
)
_original_lookup = pyspf.DNSLookup


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> Any:
    """pyspf's module-level DNSLookup, routed to the lookup of the current context.

    The context variable is set only inside our worker threads, so other users of
    pyspf in the same process keep the original behaviour.
    """
    fn = _current_lookup.get()
    if fn is None:
        return _original_lookup(name, qtype, strict, timeout)
    return fn(name, qtype)


pyspf.DNSLookup = _dispatch


def _bridge(resolver: Any, loop: asyncio.AbstractEventLoop) -> LookupFn:
    """A synchronous lookup in pyspf's format, answered by the async ``resolver``."""
    wait = float(getattr(resolver, "timeout", 2.0)) + BRIDGE_SLACK

    def lookup(name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        future = asyncio.run_coroutine_threadsafe(resolver.query(name, qtype), loop)
        try:
            records: list[str] = future.result(timeout=wait)
        except DNSTempError as exc:
            raise pyspf.TempError(f"DNS {exc}") from None
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise pyspf.TempError(f"DNS {qtype} {name}: no answer in {wait:.1f}s") from None
        key = (name, qtype)
        if qtype in ("TXT", "SPF"):
            # pyspf joins the character-strings itself and wants bytes (RFC 7208 3.3).
            return [(key, [r.encode("utf-8")]) for r in records]
        if qtype == "MX":
            out = []
            for rec in records:
                pref, _, host = rec.partition(" ")
                out.append((key, (int(pref), host.rstrip("."))))
            return out
        if qtype == "PTR":
            return [(key, r.rstrip(".")) for r in records]
        return [(key, r) for r in records]

    return lookup


def _run_query(lookup: LookupFn, ip: str, sender: str, helo: str, receiver: str) -> Outcome:
    """Evaluate one identity with pyspf (runs in a worker thread)."""
    _current_lookup.set(lookup)
    query = pyspf.query(i=ip, s=sender, h=helo, receiver=receiver, querytime=0)
    result, _code, explanation = query.check()
    return Outcome(
        result=str(result),
        domain=query.o or "",
        identity=query.ident,
        explanation=_printable(str(explanation)),
        mechanism=str(query.mechanism or ""),
    )


def _printable(text: str) -> str:
    clean = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in text)
    return " ".join(clean.split())[:MAX_EXPLANATION]


def _helo_is_checkable(helo: str) -> bool:
    """A HELO name can be checked only when it is a domain, not an address literal."""
    if not helo or "." not in helo or helo.startswith("["):
        return False
    try:
        ipaddress.ip_address(helo)
    except ValueError:
        return True
    return False


# --- the plugin ----------------------------------------------------------------------------


class SPFPlugin:
    """Checks SPF at MAIL FROM; rejects or tags per ``actions``."""

    Settings = SPFSettings

    def __init__(self, settings: SPFSettings | None = None) -> None:
        self.settings = settings or SPFSettings()
        self.resolver: Any = None
        self.receiver = "localhost"
        # connection id -> (sender, result): the MAIL FROM verdict answered at RCPT
        self._pending: OrderedDict[int, tuple[str, Result]] = OrderedDict()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @hookimpl
    def mailflow_startup(self, app: App) -> None:
        self.resolver = app.resolver
        self.receiver = app.authserv_id

    @hookimpl
    def mailflow_shutdown(self, app: App) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def _in_thread(self, lookup: LookupFn, ip: str, sender: str, helo: str) -> Outcome:
        """Run pyspf in this plugin's pool, in a copy of the caller's context (so the
        message's DNS budget reaches the lookups, as with ``asyncio.to_thread``)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.settings.max_concurrent, thread_name_prefix="mailflow-spf"
            )
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, context.run, _run_query, lookup, ip, sender, helo, self.receiver
        )

    async def evaluate(self, ip: str, sender: str, helo: str) -> tuple[Outcome, Outcome | None]:
        """(MAIL FROM outcome, HELO outcome or None) for one transaction."""
        if self.resolver is None:
            raise RuntimeError("spf plugin used before mailflow_startup")
        lookup = _bridge(self.resolver, asyncio.get_running_loop())
        helo_outcome = None
        if self.settings.check_helo or not sender:
            if _helo_is_checkable(helo):
                helo_outcome = await self._in_thread(lookup, ip, "", helo)
            else:
                helo_outcome = Outcome("none", helo, "helo", "HELO name is not a domain")
        if not sender and helo_outcome is not None:
            # RFC 7208 2.4: for the null sender, MAIL FROM is postmaster@<HELO name>.
            return dataclasses.replace(helo_outcome, identity="helo"), helo_outcome
        outcome = await self._in_thread(lookup, ip, sender, helo)
        return outcome, helo_outcome

    def decide(self, ip: str, sender: str, outcome: Outcome, helo: Outcome | None) -> Result:
        """Turn an outcome into a Result according to the settings."""
        details: dict[str, Any] = {
            "result": outcome.result,
            "domain": outcome.domain,
            "identity": outcome.identity,
            "sender": sender,
            "client_ip": ip,
        }
        if outcome.explanation:
            details["explanation"] = outcome.explanation
        if outcome.mechanism:
            details["mechanism"] = outcome.mechanism
        if helo is not None:
            details["helo_result"] = helo.result
            details["helo_domain"] = helo.domain
        action = self.settings.actions.get(outcome.result, "tag")
        text = self._reply_text(outcome, ip)
        if action == "reject":
            status = STATUS_FAILED if outcome.result in ("fail", "softfail") else STATUS_ERROR_PERM
            result = Result.reject(text, 550, status)
        elif action == "tempfail":
            result = Result.tempfail(text, 451, STATUS_ERROR_TEMP)
        else:
            result = Result()
        if action != "ignore":
            score = self.settings.scores.get(outcome.result, 0.0)
            result.score = score
            result.symbols.append(Symbol(f"SPF_{outcome.result.upper()}", score, text))
        result.details = details
        return result

    @staticmethod
    def _reply_text(outcome: Outcome, ip: str) -> str:
        who = outcome.domain or "the sender"
        base = {
            "fail": f"SPF fail: {who} does not allow {ip} to send its mail",
            "softfail": f"SPF softfail: {who} discourages mail from {ip}",
            "permerror": f"SPF permerror: the SPF record of {who} is broken",
            "temperror": f"SPF temperror: could not check SPF for {who}, try again later",
        }.get(outcome.result, f"SPF {outcome.result} for {who} from {ip}")
        if outcome.result == "fail" and outcome.explanation:
            base += f" ({outcome.explanation})"
        return base

    @hookimpl
    async def mailflow_mail_from(self, connection: Any, sender: str, options: list[str]) -> Result:
        if connection.trusted:
            # Our own users and relay networks are not judged by the sender's SPF.
            why = "authenticated" if connection.authenticated_user else "relay network"
            result = Result(details={"result": "none", "skipped": why, "sender": sender})
        else:
            outcome, helo = await self.evaluate(connection.ip, sender, connection.helo)
            result = self.decide(connection.ip, sender, outcome, helo)
        self._remember(connection, sender, result)
        if self.settings.reject_at == "rcpt" and result.action.is_final:
            details = {**result.details, "deferred_to": "rcpt"}
            return Result(score=result.score, symbols=result.symbols, details=details)
        return result

    @hookimpl
    def mailflow_data(self, message: MessageContext) -> Result | None:
        """With ``received_spf``: prepend the Received-SPF field of this message's check.

        The MAIL FROM details are repeated, so ``message.result_of("spf")`` still
        returns them.
        """
        if not self.settings.received_spf:
            return None
        pending = self._pending.get(id(message.connection))
        if pending is None or pending[0] != message.envelope.mail_from:
            return None
        details = pending[1].details
        if "skipped" in details:  # our own users and relay networks: nothing checked
            return None
        value = received_spf(details, self.receiver, message.connection.helo)
        return Result(details=dict(details), mutations=[AddHeader("Received-SPF", value)])

    def _remember(self, connection: Any, sender: str, result: Result) -> None:
        self._pending[id(connection)] = (sender, result)
        self._pending.move_to_end(id(connection))
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    @hookimpl
    def mailflow_rcpt_to(
        self, connection: Any, sender: str, recipient: str, options: list[str]
    ) -> Result | None:
        """Repeat the MAIL FROM details (and, with ``reject_at: rcpt``, its verdict).

        The details are repeated because ``message.result_of("spf")`` returns the
        latest run of this plugin, which is this RCPT run.
        """
        pending = self._pending.get(id(connection))
        if pending is None or pending[0] != sender:
            return None
        verdict = pending[1]
        details = dict(verdict.details)
        deferred = self.settings.reject_at == "rcpt" and verdict.action.is_final
        # RFC 5321 4.5.1: postmaster must stay reachable, even for failing senders.
        if deferred and recipient.partition("@")[0].lower() != "postmaster":
            return Result(verdict.action, verdict.reply, reason=verdict.reason, details=details)
        return Result(details=details)


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _field_value(value: str) -> str:
    """A key-value pair's value: a dot-atom as it is, anything else a quoted-string."""
    value = _UNPRINTABLE.sub("", value)
    if _DOT_ATOM.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def received_spf(details: dict[str, Any], receiver: str, helo: str) -> str:
    """The value of a Received-SPF field (RFC 7208 9.1) for an SPF result's details.

    Everything the client or the sender's DNS chose (HELO name, sender, the
    explanation) is reduced to printable ASCII and quoted where needed, so it can
    neither break the field nor add one.
    """
    result = str(details.get("result", "none"))
    ip = str(details.get("client_ip", ""))
    domain = str(details.get("domain") or "the sender")
    sender = str(details.get("sender") or "")
    comment = {
        "pass": f"domain of {domain} designates {ip} as permitted sender",
        "fail": f"domain of {domain} does not designate {ip} as permitted sender",
        "softfail": f"domain of transitioning {domain} does not designate {ip} as permitted sender",
        "neutral": f"{ip} is neither permitted nor denied by domain of {domain}",
        "none": f"domain of {domain} does not provide an SPF record",
        "temperror": f"error in processing during lookup of {domain}",
        "permerror": f"permanent error in processing domain of {domain}",
    }.get(result, result)
    comment = _UNPRINTABLE.sub("", f"{receiver}: {comment}").replace("(", "").replace(")", "")
    pairs = [
        ("client-ip", ip),
        ("envelope-from", sender),
        ("helo", helo),
        ("receiver", receiver),
        ("identity", str(details.get("identity") or "")),
    ]
    if details.get("mechanism"):
        pairs.append(("mechanism", str(details["mechanism"])))
    if result in ("temperror", "permerror") and details.get("explanation"):
        pairs.append(("problem", str(details["explanation"])))
    fields = " ".join(f"{key}={_field_value(value)};" for key, value in pairs if value)
    return f"{result} ({comment}) {fields}"
