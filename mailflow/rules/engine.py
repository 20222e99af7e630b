"""Rule evaluation: a pure function of the message context (no I/O, no mutation).

A rule file is compiled once (:func:`compile_ruleset`): patterns compiled, ``one_of``
lists folded into sets, header names lower-cased, networks parsed, and each
condition tree turned into nested closures. Evaluation is lazy: headers are read
when a header condition is reached, the MIME structure is walked when an
attachment condition is, and body text is decoded only for a body condition.

``evaluate`` says which rules match and for which recipients; ``to_result`` turns
the matches into one :class:`~mailflow.verdict.Result` (score, mutations, verdict).

Semantics (kept from the first, interpreted engine): ``all`` stops at the first
false condition, in file order; ``any`` evaluates every branch that can record a
recipient (so each matching recipient condition is remembered) and stops early
otherwise; ``not`` evaluates its condition with a fresh record, so recipients
inside it are never remembered; a rule with ``stop`` or a reject, tempfail or
discard action ends evaluation.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from mailflow import mime
from mailflow.message import MessageContext
from mailflow.rules.literals import Search, lowered
from mailflow.rules.schema import AttachmentMatch, Condition, Rule, RuleSet, TextMatch
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

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TextTest = Callable[[Sequence[str]], bool]
FINAL_ACTIONS = ("reject", "tempfail", "discard")  # a matching rule with one ends evaluation


class Evaluation:
    """Facts gathered while evaluating one rule (which recipients matched)."""

    __slots__ = ("recipients",)

    def __init__(self) -> None:
        self.recipients: set[str] = set()


class Facts:
    """What conditions read from one message, each looked up at most once."""

    __slots__ = ("_address", "_from", "_headers", "_structure", "ctx")

    def __init__(self, ctx: MessageContext) -> None:
        self.ctx = ctx
        self._headers: dict[str, list[str]] = {}
        self._from: list[str] | None = None
        self._address: tuple[int, int] | bool | None = False  # False: not looked up yet
        self._structure: mime.Structure | None = None

    def structure(self) -> mime.Structure:
        """The message's MIME structure (walked once per body, see mailflow.mime)."""
        if self._structure is None:
            self._structure = mime.structure(self.ctx)
        return self._structure

    def header(self, lname: str) -> list[str]:
        """Values of a top-level header, unfolded with runs of whitespace as one space."""
        values = self._headers.get(lname)
        if values is None:
            values = [" ".join(v.split()) for v in mime.header_values(self.ctx, lname)]
            self._headers[lname] = values
        return values

    def from_addresses(self) -> list[str]:
        """The addresses in the From header (:mod:`mailflow.mime.addresses`: linear,
        at most MAX_ADDRESSES)."""
        if self._from is None:
            found = mime.header_addresses(self.ctx, "from")
            self._from = [a.address for a in found if a.address]
        return self._from

    def address(self) -> tuple[int, int] | None:
        """The client's IP address as (version, integer); None when it does not parse."""
        if self._address is False:
            ip = self.ctx.connection.ip
            found = _ADDRESSES.get(ip, False)
            if found is False:
                addr = self.ctx.connection.address
                found = None if addr is None else (addr.version, int(addr))
                if len(_ADDRESSES) >= 4096:
                    _ADDRESSES.clear()
                _ADDRESSES[ip] = found
            self._address = found
        return self._address  # type: ignore[return-value]


# Client addresses seen lately, parsed (ipaddress.ip_address costs ~2 us a message).
_ADDRESSES: dict[str, tuple[int, int] | None] = {}


Test = Callable[[Facts, Evaluation], bool]


class Compiled(NamedTuple):
    """A compiled condition: the test, a cost rank, and whether it records recipients."""

    test: Test
    cost: int  # 0 envelope/connection, 1 headers, 2 MIME structure, 3 body text
    records: bool  # holds a recipient condition outside any `not`


# --- text operators ---------------------------------------------------------------------


def compile_text(m: TextMatch) -> TextTest:
    """A function of the values that says whether the operator holds for any of them."""
    if m.exists is not None:
        exists = m.exists
        return lambda values: bool(values) == exists
    if m.matches is not None:
        search = Search(m.matches, 0 if m.case_sensitive else re.IGNORECASE)
        return lambda values: any(search(v) for v in values)
    sensitive = m.case_sensitive
    if m.equals is not None:
        target = m.equals if sensitive else m.equals.casefold()
        if sensitive:
            return lambda values: target in values
        return lambda values: any(_fold(v) == target for v in values)
    if m.contains is not None:
        needle = m.contains if sensitive else m.contains.casefold()
        if sensitive:
            return lambda values: any(needle in v for v in values)
        return lambda values: any(needle in _fold(v) for v in values)
    one_of = m.one_of or []
    options = frozenset(one_of if sensitive else (o.casefold() for o in one_of))
    if sensitive:
        return lambda values: any(v in options for v in values)
    return lambda values: any(_fold(v) in options for v in values)


def _fold(text: str) -> str:
    """``casefold``; for ASCII text (where both agree) the remembered ``lower``."""
    return lowered(text) if text.isascii() else text.casefold()


def match_text(m: TextMatch, values: list[str]) -> bool:
    """True when any of ``values`` satisfies the operator (``exists``: any value at all)."""
    return compile_text(m)(values)


# --- conditions -------------------------------------------------------------------------


def compile_condition(cond: Condition) -> Compiled:
    """Turn one condition tree into a :class:`Compiled` test."""
    if cond.all is not None:
        return _all([compile_condition(c) for c in cond.all])
    if cond.any is not None:
        return _any([compile_condition(c) for c in cond.any])
    if cond.not_ is not None:
        return _not(compile_condition(cond.not_))
    if cond.header is not None:
        return _header(cond.header.name.lower(), compile_text(cond.header))
    if cond.subject is not None:
        return _header("subject", compile_text(cond.subject))
    if cond.from_ is not None:
        return _from(compile_text(cond.from_))
    if cond.sender is not None:
        return _sender(compile_text(cond.sender))
    if cond.recipient is not None:
        return _recipient(compile_text(cond.recipient))
    if cond.client_ip is not None:
        return _client_ip([ipaddress.ip_network(n, strict=False) for n in cond.client_ip])
    if cond.authenticated is not None:
        want = cond.authenticated
        return Compiled(lambda f, ev: bool(f.ctx.connection.authenticated_user) == want, 0, False)
    if cond.size is not None:
        return _between(lambda f: f.ctx.size, cond.size.over, cond.size.under)
    if cond.score is not None:
        return _between(lambda f: f.ctx.score, cond.score.over, cond.score.under)
    if cond.body is not None:
        return _body(cond.body)
    if cond.attachment is not None:
        return _attachment(cond.attachment)
    if cond.mime_truncated is not None:
        truncated = cond.mime_truncated
        return Compiled(lambda f, ev: f.structure().truncated == truncated, 2, False)
    raise AssertionError("schema guarantees one condition key")  # pragma: no cover


def _all(children: list[Compiled]) -> Compiled:
    records = any(c.records for c in children)
    if not records:  # no side effects: cheapest first
        children = sorted(children, key=lambda c: c.cost)
    tests = [c.test for c in children]

    def test(f: Facts, ev: Evaluation) -> bool:
        for t in tests:  # noqa: SIM110 - a plain loop: no generator per evaluation
            if not t(f, ev):
                return False
        return True

    return Compiled(test, max((c.cost for c in children), default=0), records)


def _any(children: list[Compiled]) -> Compiled:
    recording = [c.test for c in children if c.records]
    plain = [c.test for c in sorted(children, key=lambda c: c.cost) if not c.records]

    def test(f: Facts, ev: Evaluation) -> bool:
        hit = False
        for t in recording:  # every one: each matching recipient is remembered
            if t(f, ev):
                hit = True
        if hit:
            return True
        for t in plain:  # noqa: SIM110 - a plain loop: no generator per evaluation
            if t(f, ev):
                return True
        return False

    return Compiled(test, max((c.cost for c in children), default=0), bool(recording))


def _not(inner: Compiled) -> Compiled:
    inner_test = inner.test
    if inner.records:  # recipients matched inside a `not` are not remembered
        return Compiled(lambda f, ev: not inner_test(f, Evaluation()), inner.cost, False)
    return Compiled(lambda f, ev: not inner_test(f, ev), inner.cost, False)


def _header(lname: str, match: TextTest) -> Compiled:
    return Compiled(lambda f, ev: match(f.header(lname)), 1, False)


def _from(match: TextTest) -> Compiled:
    return Compiled(lambda f, ev: match(f.from_addresses()), 1, False)


def _sender(match: TextTest) -> Compiled:
    return Compiled(lambda f, ev: match([f.ctx.envelope.mail_from]), 0, False)


def _recipient(match: TextTest) -> Compiled:
    def test(f: Facts, ev: Evaluation) -> bool:
        hits = {r for r in f.ctx.envelope.rcpt_tos if match([r])}
        ev.recipients |= hits
        return bool(hits)

    return Compiled(test, 0, True)


def _client_ip(networks: list[Network]) -> Compiled:
    # `address in network` as integers: same version, same bits under the mask.
    masks = [(n.version, int(n.netmask), int(n.network_address)) for n in networks]

    def test(f: Facts, ev: Evaluation) -> bool:
        addr = f.address()
        if addr is None:
            return False
        version, value = addr
        for net_version, mask, network in masks:
            if net_version == version and value & mask == network:
                return True
        return False

    return Compiled(test, 0, False)


def _between(value: Callable[[Facts], float], over: float | None, under: float | None) -> Compiled:
    def test(f: Facts, ev: Evaluation) -> bool:
        v = value(f)
        return (over is None or v > over) and (under is None or v < under)

    return Compiled(test, 0, False)


def _body(want: TextMatch) -> Compiled:
    match = compile_text(want)
    if want.matches is None:
        return Compiled(lambda f, ev: match([f.structure().body_text()]), 3, False)
    search = Search(want.matches, 0 if want.case_sensitive else re.IGNORECASE)

    def test(f: Facts, ev: Evaluation) -> bool:
        body = f.structure()
        parts = [(p.text(), p.content_type == "text/html") for p in body.body_parts()]
        return search.possible_in_parts(parts) and search(body.body_text())

    return Compiled(test, 3, False)


def _attachment(want: AttachmentMatch) -> Compiled:
    name_test = compile_text(want.filename) if want.filename is not None else None
    type_test = compile_text(want.content_type) if want.content_type is not None else None

    def test(f: Facts, ev: Evaluation) -> bool:
        for part in f.structure().parts:
            if not part.is_attachment:
                continue
            if name_test is not None and not name_test(part.filenames or ("",)):
                continue
            if type_test is not None and not type_test((part.content_type,)):
                continue
            return True
        return False

    return Compiled(test, 2, False)


def check(cond: Condition, ctx: MessageContext, ev: Evaluation) -> bool:
    """Evaluate one condition tree against the message (compiles it each call)."""
    return compile_condition(cond).test(Facts(ctx), ev)


# --- rule sets --------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    rule: Rule
    recipients: frozenset[str]  # recipients the rule matched; empty = not recipient-specific


class CompiledRule(NamedTuple):
    rule: Rule
    test: Test
    final: bool  # a match ends evaluation (stop, or a reject/tempfail/discard action)
    records: bool  # has recipient conditions (outside `not`) whose matches are kept


class CompiledRuleSet:
    """A rule file ready to evaluate: enabled rules only, conditions compiled."""

    __slots__ = ("rules", "ruleset")

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.rules: list[CompiledRule] = []
        for rule in ruleset.rules:
            if rule.enabled:
                when = compile_condition(rule.when)
                final = rule.then.stop or rule.then.action in FINAL_ACTIONS
                self.rules.append(CompiledRule(rule, when.test, final, when.records))


_compiled: dict[int, CompiledRuleSet] = {}


def compile_ruleset(ruleset: RuleSet | CompiledRuleSet) -> CompiledRuleSet:
    """The compiled form of ``ruleset`` (remembered for the rule sets seen last)."""
    if isinstance(ruleset, CompiledRuleSet):
        return ruleset
    done = _compiled.get(id(ruleset))
    if done is None or done.ruleset is not ruleset:
        if len(_compiled) >= 64:
            _compiled.clear()
        done = _compiled[id(ruleset)] = CompiledRuleSet(ruleset)
    return done


def evaluate(ruleset: RuleSet | CompiledRuleSet, ctx: MessageContext) -> list[Hit]:
    """The enabled rules that match, in file order, up to the first one with ``stop``."""
    facts = Facts(ctx)
    hits: list[Hit] = []
    for rule, test, final, records in compile_ruleset(ruleset).rules:
        ev = Evaluation() if records else _NOTHING_RECORDED
        if test(facts, ev):
            hits.append(Hit(rule, frozenset(ev.recipients) if records else _NO_RECIPIENTS))
            if final:
                break
    return hits


# For rules without recipient conditions: nothing is ever added to it.
_NOTHING_RECORDED = Evaluation()
_NO_RECIPIENTS: frozenset[str] = frozenset()


class _Plan(NamedTuple):
    """What a rule's ``then`` does, prepared once (only the targets vary by message)."""

    headers: list[Mutation]  # header removals, then additions
    route: Route | None
    redirect: list[AddRecipient]
    copies: list[AddRecipient]
    action: Action | None
    reason: str
    reply: SMTPReply | None


_plans: dict[int, tuple[Rule, _Plan]] = {}


def _plan(rule: Rule) -> _Plan:
    known = _plans.get(id(rule))
    if known is not None and known[0] is rule:
        return known[1]
    then = rule.then
    headers: list[Mutation] = [RemoveHeader(name) for name in then.remove_headers]
    headers.extend(AddHeader(name, value) for name, value in then.add_headers.items())
    route = None
    if then.route is not None:
        spec = then.route
        route = Route(RouteKind(spec.kind), spec.target, spec.folder, spec.mailbox)
    reply = None
    if then.action in ("reject", "tempfail"):
        code = then.code or (550 if then.action == "reject" else 451)
        reply = SMTPReply(code, then.message or "Message refused by policy", f"{code // 100}.7.1")
    plan = _Plan(
        headers,
        route,
        [AddRecipient(r) for r in then.redirect],
        [AddRecipient(r) for r in then.add_recipients],
        None if then.action is None else Action(then.action),
        then.message or f"rule {rule.name}",
        reply,
    )
    if len(_plans) >= 4096:
        _plans.clear()
    _plans[id(rule)] = (rule, plan)
    return plan


def to_result(hits: list[Hit], ctx: MessageContext) -> Result:
    """Combine matches: scores add up, mutations apply in order, the first verdict wins."""
    result = Result(details={"matched": [h.rule.name for h in hits]})
    for hit in hits:
        plan = _plan(hit.rule)
        result.score += hit.rule.then.score
        result.mutations.extend(plan.headers)
        if plan.route is not None or plan.redirect:
            targets = sorted(hit.recipients) or list(ctx.envelope.rcpt_tos)
            if plan.route is not None:
                result.mutations.extend(SetRoute(plan.route, r) for r in targets)
            if plan.redirect:
                result.mutations.extend(RemoveRecipient(r) for r in targets)
                result.mutations.extend(plan.redirect)
        result.mutations.extend(plan.copies)
        if plan.action is not None and result.action is Action.CONTINUE:
            result.action = plan.action
            result.reason = plan.reason
            result.reply = plan.reply
            result.details["decided_by"] = hit.rule.name
    return result
