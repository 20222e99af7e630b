"""DMARC evaluation of one author domain: the outcome, and how outcomes compare.

Pure functions over a parsed :class:`~mailflow_plugins.dmarc.record.Record` and the
SPF / DKIM details of the plugins before ``dmarc``; no DNS, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mailflow_plugins.dmarc.record import Record, aligned, organizational_domain

# How strict each disposition is, to pick the strictest among several From domains.
SEVERITY = {"none": 0, "quarantine": 1, "reject": 2}


@dataclass(slots=True)
class Evaluation:
    """DMARC for one author domain."""

    from_domain: str
    result: str = "none"  # pass / fail / none / temperror / permerror
    policy: str = "none"  # the p or sp that applies, "none" without a record
    disposition: str = "none"  # after pct: none / quarantine / reject
    policy_domain: str = ""
    record: Record | None = None
    aligned: dict[str, bool] = field(default_factory=lambda: {"spf": False, "dkim": False})
    reason: str = ""
    sampled_out: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "result": self.result,
            "policy": self.policy,
            "disposition": self.disposition,
            "from_domain": self.from_domain,
            "org_domain": organizational_domain(self.from_domain),
            "aligned": dict(self.aligned),
        }
        if self.policy_domain:
            out["policy_domain"] = self.policy_domain
        if self.record is not None:
            r = self.record
            out["record"] = {"p": r.p, "sp": r.sp, "adkim": r.adkim, "aspf": r.aspf, "pct": r.pct}
        if self.sampled_out:
            out["sampled_out"] = True
        if self.reason:
            out["reason"] = self.reason
        return out


def undecided(spf: dict[str, Any], dkim: dict[str, Any], author: str, record: Record) -> str:
    """Name the aligned identifier whose check ended in temperror, or ""."""
    if spf.get("result") == "temperror" and aligned(
        str(spf.get("domain", "")), author, record.aspf
    ):
        return "SPF"
    for sig in dkim.get("signatures") or []:
        if sig.get("result") == "temperror" and aligned(
            str(sig.get("domain", "")), author, record.adkim
        ):
            return "DKIM"
    return ""


def rank(ev: Evaluation) -> tuple[int, int]:
    failing = ev.result in ("fail", "temperror")
    return (SEVERITY.get(ev.disposition, 0), int(failing))
