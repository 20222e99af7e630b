"""DMARC (RFC 7489): align SPF and DKIM with the From domain, apply the domain's policy.

List it after ``spf`` and ``dkim`` (and before ``authres``): it reads their results
via ``message.result_of("spf")`` / ``message.result_of("dkim")``. The policy record
is looked up with the shared resolver (``_dmarc.<From domain>``, then
``_dmarc.<organizational domain>``, RFC 7489 6.6.3); the organizational domain comes
from the Public Suffix List bundled with tldextract, offline. Docs: docs/plugins/dmarc.md.

The package: this module is the plugin (settings, lookup, verdict);
:mod:`.record` parses policy records and From fields and knows organizational
domains and alignment; :mod:`.policy` evaluates one author domain's outcome.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from mailflow_plugins.dmarc.policy import Evaluation, rank, undecided
from mailflow_plugins.dmarc.record import (
    Record,
    aligned,
    author_domains,
    from_fields,
    organizational_domain,
    select_record,
)
from pydantic import BaseModel, ConfigDict

from mailflow.api import App, DNSTempError, MessageContext, Result, Symbol, hookimpl

PolicyAction = Literal["reject", "quarantine", "tag"]


class DMARCSettings(BaseModel):
    """``plugins: [{name: dmarc, settings: {...}}]``; every key is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # What a failing message gets, per the domain's policy: honour it, or override.
    on_reject: PolicyAction = "reject"
    on_quarantine: PolicyAction = "quarantine"
    honour_pct: bool = True  # RFC 7489 6.6.4 sampling; False applies p to every failure
    on_temperror: Literal["tempfail", "tag"] = "tag"  # DNS trouble looking up the policy
    # No From field, several From fields, or a From without a usable domain (6.6.1).
    on_invalid_from: PolicyAction = "reject"
    fail_score: float = 0.0  # added to the spam score whenever DMARC fails


class DMARCPlugin:
    """Evaluates DMARC at end of data; rejects, quarantines or tags per policy."""

    Settings = DMARCSettings

    def __init__(self, settings: DMARCSettings | None = None) -> None:
        self.settings = settings or DMARCSettings()
        self.resolver: Any = None
        self.random = random.Random()  # pct sampling; tests may seed it

    @hookimpl
    def mailflow_startup(self, app: App) -> None:
        self.resolver = app.resolver

    async def lookup(self, from_domain: str) -> tuple[Record | None, str]:
        """(record, the domain it was found at); raises DNSTempError (RFC 7489 6.6.3)."""
        org = organizational_domain(from_domain)
        for domain in dict.fromkeys((from_domain, org)):
            record = select_record(await self.resolver.query(f"_dmarc.{domain}", "TXT"))
            if record is not None:
                return record, domain
        return None, ""

    async def evaluate(
        self, from_domain: str, spf: dict[str, Any], dkim: dict[str, Any]
    ) -> Evaluation:
        ev = Evaluation(from_domain)
        try:
            record, where = await self.lookup(from_domain)
        except DNSTempError as exc:
            ev.result, ev.reason = "temperror", f"policy lookup failed: {exc}"
            return ev
        if record is None:
            ev.reason = "no DMARC policy published"
            return ev
        ev.record, ev.policy_domain = record, where
        # RFC 7489 6.6.3: sp applies when the policy came from the organizational domain
        # of a sub-domain.
        ev.policy = record.sp if where != from_domain else record.p
        if spf.get("result") == "pass" and not spf.get("skipped"):
            ev.aligned["spf"] = aligned(str(spf.get("domain", "")), from_domain, record.aspf)
        for sig in dkim.get("signatures") or []:
            if sig.get("result") == "pass" and aligned(
                str(sig.get("domain", "")), from_domain, record.adkim
            ):
                ev.aligned["dkim"] = True
        if ev.aligned["spf"] or ev.aligned["dkim"]:
            ev.result = "pass"
            return ev
        pending = undecided(spf, dkim, from_domain, record)
        if pending:
            # An aligned identifier could not be checked for now: a DNS hiccup must not
            # become a policy failure that rejects legitimate mail (RFC 7489 6.6.2).
            ev.result, ev.reason = "temperror", f"{pending} gave temperror"
            return ev
        ev.result = "fail"
        ev.reason = "neither SPF nor DKIM passed aligned with the From domain"
        ev.disposition = self._sample(ev.policy, record.pct, ev)
        return ev

    def _sample(self, policy: str, pct: int, ev: Evaluation) -> str:
        """RFC 7489 6.6.4: outside the pct sample, reject becomes quarantine and
        quarantine becomes none."""
        if policy == "none" or not self.settings.honour_pct or pct >= 100:
            return policy
        if self.random.random() * 100 < pct:
            return policy
        ev.sampled_out = True
        return {"reject": "quarantine", "quarantine": "none"}[policy]

    @hookimpl
    async def mailflow_data(self, message: MessageContext) -> Result:
        if message.connection.trusted:
            return Result(details={"result": "none", "policy": "none", "disposition": "none",
                                   "skipped": "trusted client"})  # fmt: skip
        domains, problem = author_domains(from_fields(message.head))
        if problem:
            return self._invalid_from(problem)
        spf = _details(message, "spf")
        dkim = _details(message, "dkim")
        evaluations = [await self.evaluate(d, spf, dkim) for d in domains]
        # Several author domains: the strictest outcome decides (RFC 7489 6.6.1).
        worst = max(evaluations, key=rank)
        details = worst.as_dict()
        if len(evaluations) > 1:
            details["from_domains"] = [e.as_dict() for e in evaluations]
        return self._verdict(worst, details)

    def _verdict(self, ev: Evaluation, details: dict[str, Any]) -> Result:
        s = self.settings
        symbol = Symbol(f"DMARC_{ev.result.upper()}", reason=ev.reason)
        if ev.result == "temperror" and s.on_temperror == "tempfail":
            result = Result.tempfail(
                f"DMARC policy of {ev.from_domain} could not be retrieved, try again later",
                451,
                "4.7.1",  # RFC 3463 3.8: delivery not authorized (for now)
            )
        elif ev.result == "fail":
            text = (
                f"DMARC policy of {ev.policy_domain} ({ev.policy}): {ev.from_domain} "
                f"not authenticated by aligned SPF or DKIM"
            )
            action = {"reject": s.on_reject, "quarantine": s.on_quarantine}.get(
                ev.disposition, "tag"
            )
            result = self._act(action, text)
            symbol.score = s.fail_score
            result.score = s.fail_score
        else:
            result = Result()
        result.symbols.append(symbol)
        result.details = details
        return result

    @staticmethod
    def _act(action: str, text: str) -> Result:
        if action == "reject":
            return Result.reject(text, 550, "5.7.1")
        if action == "quarantine":
            return Result.quarantine(text)
        return Result(reason=text)

    def _invalid_from(self, problem: str) -> Result:
        result = self._act(self.settings.on_invalid_from, f"DMARC permerror: {problem}")
        result.symbols.append(Symbol("DMARC_PERMERROR", reason=problem))
        disposition = {"reject": "reject", "quarantine": "quarantine"}.get(
            self.settings.on_invalid_from, "none"
        )
        result.details = {
            "result": "permerror",
            "policy": "none",
            "disposition": disposition,
            "from_domain": "",
            "reason": problem,
        }
        return result


def _details(message: MessageContext, plugin: str) -> dict[str, Any]:
    res = message.result_of(plugin)
    return dict(res.details) if res is not None else {}
