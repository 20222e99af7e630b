"""Rule evaluation: a pure function of the message context (no I/O, no mutation).

A rule file is compiled once (:func:`compile_ruleset`): the text tests of all its
rules grouped by the field they read and compiled into Hyperscan databases (one
pass over a value answers every test on it; :mod:`mailflow.rules.fields`),
``one_of`` lists folded into dictionaries, header names lower-cased, networks
parsed, and each condition tree turned into nested closures
(:mod:`mailflow.rules.conditions`). Evaluation is lazy: a field is read and
scanned when the first rule that needs it is reached, the MIME structure is
walked when an attachment condition is, and body text is decoded only for a body
condition. Rules whose text tests cannot hold are skipped without being called
(see :class:`CompiledRuleSet`).

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

from dataclasses import dataclass
from heapq import heappop, heappush
from typing import NamedTuple

from mailflow import mime
from mailflow.config import ConfigIssue, _dotted
from mailflow.message import MessageContext
from mailflow.rules.conditions import ConditionCompiler, Evaluation, Need, Test
from mailflow.rules.fields import Field, Scan, Where
from mailflow.rules.schema import Rule, RuleSet
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

FINAL_ACTIONS = ("reject", "tempfail", "discard")  # a matching rule with one ends evaluation


class Facts:
    """What conditions read from one message, each looked up at most once."""

    __slots__ = ("_address", "_from", "_headers", "_scans", "_structure", "ctx")

    def __init__(self, ctx: MessageContext) -> None:
        self.ctx = ctx
        self._headers: dict[str, list[str]] = {}
        self._from: list[str] | None = None
        self._address: tuple[int, int] | bool | None = False  # False: not looked up yet
        self._structure: mime.Structure | None = None
        self._scans: dict[Field, Scan] = {}

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

    def scan(self, field: Field) -> Scan:
        """Which of ``field``'s atoms hold, per item and over all items (scanned once)."""
        found = self._scans.get(field)
        if found is None:
            found = self._scans[field] = field.scan(self)
        return found


# Client addresses seen lately, parsed (ipaddress.ip_address costs ~2 us a message).
_ADDRESSES: dict[str, tuple[int, int] | None] = {}


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


class RuleErrors(ValueError):
    """Patterns of a rule set that the engine refused, as (key path, message)."""

    def __init__(self, problems: list[tuple[Where, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(message for _, message in problems))

    def issues(self, filename: str, lines: dict[Where, int]) -> list[ConfigIssue]:
        """As config issues naming ``filename``, the key path and its line."""
        out = []
        for where, message in self.problems:
            line = next(
                (lines[where[:n]] for n in range(len(where), -1, -1) if where[:n] in lines), None
            )
            out.append(ConfigIssue(filename, _dotted(where), line, message))
        return sorted(out, key=lambda i: i.line or 0)


class _Gate(NamedTuple):
    """Rules that can only match when one of their atoms on ``field`` holds."""

    first: int  # the first such rule: the field is scanned when evaluation gets there
    field: Field
    rules: dict[int, tuple[int, ...]]  # atom -> indexes of the rules it lets through


class CompiledRuleSet:
    """A rule file ready to evaluate: enabled rules only, conditions compiled.

    Most rules' tests fail on a given message. Rather than call every rule,
    evaluation starts from the rules without a usable need (a `not`, or an `any`
    whose body branch no earlier rule had read: they are called as they are) and,
    field by field, adds the rules whose need one of the field's holding atoms
    satisfies; it takes them in file order. A field is scanned (``_Gate``) when the
    first rule that opens it comes up (mailflow.rules.conditions.Need), so rules
    after a final match cost nothing and no field is read earlier than a rule would
    have read it.
    """

    __slots__ = ("_always", "_gates", "rules", "ruleset")

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.rules: list[CompiledRule] = []
        compiler = ConditionCompiler()
        # Disabled rules are compiled too, apart, so that a pattern the engine cannot
        # run is refused now (`rules validate`), not when someone enables the rule.
        disabled = ConditionCompiler()
        needs: list[Need | None] = []
        for number, rule in enumerate(ruleset.rules):
            if not rule.enabled:
                disabled.compile(rule.when, ("rules", number, "when"))
                continue
            when = compiler.compile(rule.when, ("rules", number, "when"))
            final = rule.then.stop or rule.then.action in FINAL_ACTIONS
            needs.append(when.need)
            self.rules.append(CompiledRule(rule, when.test, final, when.records))
        problems = [*compiler.finish(), *disabled.finish()]
        if problems:
            raise RuleErrors(problems)
        # A field opens (is scanned) at the first rule it opens for; a rule is skipped
        # on its need only if all the need's fields are open by the time it comes up.
        opens: dict[Field, int] = {}
        for index, need in enumerate(needs):
            for field in need.opening if need is not None else ():
                opens.setdefault(field, index)
        self._always: list[int] = []
        by_field: dict[Field, dict[int, list[int]]] = {}
        for index, need in enumerate(needs):
            if need is None or any(opens.get(f, index + 1) > index for f in need.atoms):
                self._always.append(index)
                continue
            for field, atoms in need.atoms.items():
                by_atom = by_field.setdefault(field, {})
                for atom in atoms:
                    by_atom.setdefault(atom, []).append(index)
        self._gates = sorted(
            (
                _Gate(opens[field], field, {a: tuple(r) for a, r in by_atom.items()})
                for field, by_atom in by_field.items()
            ),
            key=lambda g: g.first,
        )


_compiled: dict[int, CompiledRuleSet] = {}


def compile_ruleset(ruleset: RuleSet | CompiledRuleSet) -> CompiledRuleSet:
    """The compiled form of ``ruleset`` (remembered for the rule sets seen last).

    Raises :class:`RuleErrors` for patterns the engine refuses.
    """
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
    compiled = compile_ruleset(ruleset)
    facts = Facts(ctx)
    rules = compiled.rules
    gates = compiled._gates
    hits: list[Hit] = []
    # Candidates in file order: a heap of rule indexes, fed by the rules without a
    # need and, as evaluation reaches the first rule a gate opens for, by the rules
    # the gate's matching atoms let through (see CompiledRuleSet).
    heap = compiled._always.copy()  # sorted, so already a heap
    next_gate, last = 0, -1
    while True:
        while next_gate < len(gates) and (not heap or gates[next_gate].first <= heap[0]):
            gate = gates[next_gate]
            next_gate += 1
            let_through = gate.rules
            for atom in facts.scan(gate.field)[1]:
                for index in let_through.get(atom, ()):
                    heappush(heap, index)
        if not heap:
            break
        index = heappop(heap)
        if index == last:  # let through by two atoms
            continue
        last = index
        rule, test, final, records = rules[index]
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
