"""Rule evaluation: a pure function of the message context (no I/O, no mutation).

``evaluate`` says which rules match and for which recipients; ``to_result`` turns
the matches into one :class:`~mailflow.verdict.Result` (score, mutations, verdict).
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import re
from dataclasses import dataclass, field

from mailflow import mime
from mailflow.message import MessageContext
from mailflow.rules.schema import Condition, Rule, RuleSet, TextMatch
from mailflow.verdict import (
    Action,
    AddHeader,
    AddRecipient,
    Mutation,
    RemoveHeader,
    RemoveRecipient,
    Result,
    Route,
    RouteKind,
    SetRoute,
    SMTPReply,
)


@functools.lru_cache(maxsize=1024)
def _pattern(regex: str, case_sensitive: bool) -> re.Pattern[str]:
    return re.compile(regex, 0 if case_sensitive else re.IGNORECASE)


@functools.lru_cache(maxsize=256)
def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr, strict=False)


def match_text(m: TextMatch, values: list[str]) -> bool:
    """True when any of ``values`` satisfies the operator (``exists``: any value at all)."""
    if m.exists is not None:
        return bool(values) == m.exists
    fold = (lambda s: s) if m.case_sensitive else str.casefold
    for value in values:
        if m.equals is not None and fold(value) == fold(m.equals):
            return True
        if m.contains is not None and fold(m.contains) in fold(value):
            return True
        if m.matches is not None and _pattern(m.matches, m.case_sensitive).search(value):
            return True
        if m.one_of is not None and fold(value) in {fold(v) for v in m.one_of}:
            return True
    return False


@dataclass
class Evaluation:
    """Facts gathered while evaluating one rule (which recipients matched)."""

    recipients: set[str] = field(default_factory=set)


def _header_values(ctx: MessageContext, name: str) -> list[str]:
    return [" ".join(str(v).split()) for v in ctx.headers.get_all(name, [])]


def check(cond: Condition, ctx: MessageContext, ev: Evaluation) -> bool:
    """Evaluate one condition tree against the message."""
    if cond.all is not None:
        return all(check(c, ctx, ev) for c in cond.all)
    if cond.any is not None:
        # No short-circuit: every matching recipient condition should be recorded.
        return any([check(c, ctx, ev) for c in cond.any])
    if cond.not_ is not None:
        return not check(cond.not_, ctx, Evaluation())
    if cond.header is not None:
        return match_text(cond.header, _header_values(ctx, cond.header.name))
    if cond.subject is not None:
        return match_text(cond.subject, _header_values(ctx, "Subject"))
    if cond.from_ is not None:
        addresses = [a for _, a in email.utils.getaddresses(_header_values(ctx, "From")) if a]
        return match_text(cond.from_, addresses)
    if cond.sender is not None:
        return match_text(cond.sender, [ctx.envelope.mail_from])
    if cond.recipient is not None:
        hits = {r for r in ctx.envelope.rcpt_tos if match_text(cond.recipient, [r])}
        ev.recipients |= hits
        return bool(hits)
    if cond.client_ip is not None:
        addr = ctx.connection.address
        return addr is not None and any(addr in _network(n) for n in cond.client_ip)
    if cond.authenticated is not None:
        return bool(ctx.connection.authenticated_user) == cond.authenticated
    if cond.size is not None:
        over, under = cond.size.over, cond.size.under
        return (over is None or ctx.size > over) and (under is None or ctx.size < under)
    if cond.score is not None:
        over_s, under_s = cond.score.over, cond.score.under
        return (over_s is None or ctx.score > over_s) and (under_s is None or ctx.score < under_s)
    if cond.body is not None:
        return match_text(cond.body, [mime.body_text(ctx)])
    if cond.attachment is not None:
        want = cond.attachment
        for part in mime.parts(ctx):
            if not part.is_attachment:
                continue
            if want.filename is not None and not match_text(want.filename, [part.filename]):
                continue
            if want.content_type is not None and not match_text(
                want.content_type, [part.content_type]
            ):
                continue
            return True
        return False
    raise AssertionError("schema guarantees one condition key")  # pragma: no cover


@dataclass(frozen=True)
class Hit:
    rule: Rule
    recipients: frozenset[str]  # recipients the rule matched; empty = not recipient-specific


def evaluate(ruleset: RuleSet, ctx: MessageContext) -> list[Hit]:
    """The enabled rules that match, in file order, up to the first one with ``stop``."""
    hits: list[Hit] = []
    for rule in ruleset.rules:
        if not rule.enabled:
            continue
        ev = Evaluation()
        if check(rule.when, ctx, ev):
            hits.append(Hit(rule, frozenset(ev.recipients)))
            if rule.then.stop or rule.then.action in ("reject", "tempfail", "discard"):
                break
    return hits


def to_result(hits: list[Hit], ctx: MessageContext) -> Result:
    """Combine matches: scores add up, mutations apply in order, the first verdict wins."""
    result = Result(details={"matched": [h.rule.name for h in hits]})
    for hit in hits:
        then = hit.rule.then
        result.score += then.score
        targets = sorted(hit.recipients) or list(ctx.envelope.rcpt_tos)
        mutations: list[Mutation] = []
        for name in then.remove_headers:
            mutations.append(RemoveHeader(name))
        for name, value in then.add_headers.items():
            mutations.append(AddHeader(name, value))
        if then.route is not None:
            route = Route(
                RouteKind(then.route.kind), then.route.target, then.route.folder, then.route.mailbox
            )
            mutations.extend(SetRoute(route, r) for r in targets)
        if then.redirect:
            mutations.extend(RemoveRecipient(r) for r in targets)
            mutations.extend(AddRecipient(r) for r in then.redirect)
        mutations.extend(AddRecipient(r) for r in then.add_recipients)
        result.mutations.extend(mutations)
        if then.action is not None and result.action is Action.CONTINUE:
            result.action = Action(then.action)
            result.reason = then.message or f"rule {hit.rule.name}"
            if then.action in ("reject", "tempfail"):
                code = then.code or (550 if then.action == "reject" else 451)
                status = f"{code // 100}.7.1"
                result.reply = SMTPReply(code, then.message or "Message refused by policy", status)
            result.details["decided_by"] = hit.rule.name
    return result
