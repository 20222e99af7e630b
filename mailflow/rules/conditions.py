"""Condition trees -> closures over :class:`~mailflow.rules.engine.Facts`.

Text tests do not run one by one: each registers an atom with the field it reads
(:mod:`mailflow.rules.fields`), every atom of a field is answered by one scan of
each of its values, and a test is a set membership. Besides its test, each
compiled condition carries a *need*: atoms of which at least one must hold for
the condition to be true (or None when there is no such set, e.g. for ``not``).
The engine uses needs to skip rules without calling them; see
:class:`mailflow.rules.engine.CompiledRuleSet`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from mailflow.rules.fields import TextIndex, Where
from mailflow.rules.schema import AttachmentMatch, Condition, TextMatch

if TYPE_CHECKING:
    from mailflow.rules.engine import Facts

# What a condition costs to read, cheapest first: the order in which `all` and `any`
# try their branches, and how far ahead of need a field may be scanned (NEED_COST).
ENVELOPE, HEADERS, STRUCTURE, BODY = 0, 1, 2, 3
# A rule is skipped on a need only if scanning its field early costs no more than
# the cheapest branch the rule would have tried first; fields up to HEADERS are cheap
# enough to scan early anyway. Scanning the body ahead of an `all` that would have
# stopped on the envelope would decode bodies that the rules never needed.
NEED_COST = HEADERS


class Evaluation:
    """Facts gathered while evaluating one rule (which recipients matched)."""

    __slots__ = ("recipients",)

    def __init__(self) -> None:
        self.recipients: set[str] = set()


Test = Callable[["Facts", Evaluation], bool]
Items = Callable[["Facts"], Sequence[Sequence[str]]]


class Field:
    """A text conditions read: how to get its items from the message, and its atoms.

    An item is one value (a header value, an address, the body text) or, for the
    attachment fields, the values of one attachment part (its file names).
    """

    __slots__ = ("cost", "index", "items", "key")

    def __init__(self, key: str, cost: int, items: Items) -> None:
        self.key = key
        self.cost = cost
        self.items = items
        self.index = TextIndex(key)

    def __repr__(self) -> str:
        return f"<Field {self.key}>"


Need = dict[Field, frozenset[int]]


class Compiled(NamedTuple):
    """A compiled condition: the test, a cost rank, whether it records recipients, and
    its need (atoms per field, one of which holds whenever the condition does)."""

    test: Test
    cost: int
    records: bool  # holds a recipient condition outside any `not`
    need: Need | None


def _need_cost(need: Need) -> int:
    return max(field.cost for field in need)


class ConditionCompiler:
    """Compiles the conditions of one rule set; fields are shared between its rules."""

    def __init__(self) -> None:
        self.fields: dict[str, Field] = {}

    def finish(self) -> list[tuple[Where, str]]:
        """Compile every field's atoms; the refused ones as (where, message)."""
        failures: list[tuple[Where, str]] = []
        for field in self.fields.values():
            failures.extend(field.index.compile())
        return failures

    def _field(self, key: str, cost: int, items: Items) -> Field:
        field = self.fields.get(key)
        if field is None:
            field = self.fields[key] = Field(key, cost, items)
        return field

    def compile(self, cond: Condition, where: Where) -> Compiled:
        """Turn one condition tree into a :class:`Compiled` test."""
        if cond.all is not None:
            return _all([self.compile(c, (*where, "all", i)) for i, c in enumerate(cond.all)])
        if cond.any is not None:
            return _any([self.compile(c, (*where, "any", i)) for i, c in enumerate(cond.any)])
        if cond.not_ is not None:
            return _not(self.compile(cond.not_, (*where, "not")))
        if cond.header is not None:
            return self._header(cond.header.name.lower(), cond.header, (*where, "header"))
        if cond.subject is not None:
            return self._header("subject", cond.subject, (*where, "subject"))
        if cond.from_ is not None:
            field = self._field("from", HEADERS, _from_items)
            return _any_value(field, cond.from_, (*where, "from"))
        if cond.sender is not None:
            field = self._field("sender", ENVELOPE, _sender_items)
            return _any_value(field, cond.sender, (*where, "sender"))
        if cond.recipient is not None:
            field = self._field("recipient", ENVELOPE, _recipient_items)
            return _recipient(field, cond.recipient, (*where, "recipient"))
        if cond.client_ip is not None:
            return _client_ip([ipaddress.ip_network(n, strict=False) for n in cond.client_ip])
        if cond.authenticated is not None:
            want = cond.authenticated
            return _plain(lambda f, ev: bool(f.ctx.connection.authenticated_user) == want)
        if cond.size is not None:
            return _between(lambda f: f.ctx.size, cond.size.over, cond.size.under)
        if cond.score is not None:
            return _between(lambda f: f.ctx.score, cond.score.over, cond.score.under)
        if cond.body is not None:
            field = self._field("body", BODY, _body_items)
            return _any_value(field, cond.body, (*where, "body"))
        if cond.attachment is not None:
            return self._attachment(cond.attachment, (*where, "attachment"))
        if cond.mime_truncated is not None:
            truncated = cond.mime_truncated
            return Compiled(lambda f, ev: f.structure().truncated == truncated, 2, False, None)
        raise AssertionError("schema guarantees one condition key")  # pragma: no cover

    def _header(self, lname: str, want: TextMatch, where: Where) -> Compiled:
        field = self._field(f"header:{lname}", HEADERS, _header_items(lname))
        return _any_value(field, want, where)

    def _attachment(self, want: AttachmentMatch, where: Where) -> Compiled:
        names = self._field("attachment:filename", STRUCTURE, _name_items)
        types = self._field("attachment:content_type", STRUCTURE, _type_items)
        name_atom = _part_atom(names, want.filename, (*where, "filename"))
        type_atom = _part_atom(types, want.content_type, (*where, "content_type"))
        if name_atom is _NEVER or type_atom is _NEVER:
            return _plain(lambda f, ev: False, STRUCTURE)
        need: Need | None = None
        if name_atom is not None:
            need = {names: frozenset([name_atom])}
        elif type_atom is not None:
            need = {types: frozenset([type_atom])}

        def test(f: Facts, ev: Evaluation) -> bool:
            by_name = f.scan(names)[0] if name_atom is not None else None
            by_type = f.scan(types)[0] if type_atom is not None else None
            count = len(by_name if by_name is not None else f.scan(types)[0])
            for i in range(count):
                if by_name is not None and name_atom not in by_name[i]:
                    continue
                if by_type is not None and type_atom not in by_type[i]:
                    continue
                return True
            return False

        return Compiled(test, STRUCTURE, False, need)


_NEVER = -1  # a part test that no part passes


def _part_atom(field: Field, want: TextMatch | None, where: Where) -> int | None:
    """The atom testing one attachment part; None when every part passes (no test,
    or ``exists: true``: a part always has a value, its names or ""), _NEVER when
    none does (``exists: false``)."""
    if want is None:
        return None
    if want.exists is not None:
        return None if want.exists else _NEVER
    return field.index.atom(want, where)


# --- the fields' items ------------------------------------------------------------------


def _header_items(lname: str) -> Items:
    return lambda f: [(v,) for v in f.header(lname)]


def _from_items(f: Facts) -> list[tuple[str]]:
    return [(a,) for a in f.from_addresses()]


def _sender_items(f: Facts) -> list[tuple[str]]:
    return [(f.ctx.envelope.mail_from,)]


def _recipient_items(f: Facts) -> list[tuple[str]]:
    return [(r,) for r in f.ctx.envelope.rcpt_tos]


def _body_items(f: Facts) -> list[tuple[str]]:
    return [(f.structure().body_text(),)]


def _name_items(f: Facts) -> list[tuple[str, ...]]:
    return [p.filenames or ("",) for p in f.structure().parts if p.is_attachment]


def _type_items(f: Facts) -> list[tuple[str]]:
    return [(p.content_type,) for p in f.structure().parts if p.is_attachment]


# --- leaves -----------------------------------------------------------------------------


def _plain(test: Test, cost: int = ENVELOPE) -> Compiled:
    return Compiled(test, cost, False, None)


def _any_value(field: Field, want: TextMatch, where: Where) -> Compiled:
    """True when the test holds for any value of ``field`` (``exists``: any value)."""
    if want.exists is not None:
        exists = want.exists
        return _plain(lambda f, ev: bool(field.items(f)) == exists, field.cost)
    atom = field.index.atom(want, where)
    return Compiled(
        lambda f, ev: atom in f.scan(field)[1], field.cost, False, {field: frozenset([atom])}
    )


def _recipient(field: Field, want: TextMatch, where: Where) -> Compiled:
    if want.exists is not None:
        exists = want.exists

        def every(f: Facts, ev: Evaluation) -> bool:
            hits = set(f.ctx.envelope.rcpt_tos) if exists else set()
            ev.recipients |= hits
            return bool(hits)

        return Compiled(every, ENVELOPE, True, None)
    atom = field.index.atom(want, where)

    def test(f: Facts, ev: Evaluation) -> bool:
        per_item, union = f.scan(field)
        if atom not in union:
            return False
        rcpts = f.ctx.envelope.rcpt_tos
        ev.recipients.update(r for r, hits in zip(rcpts, per_item, strict=True) if atom in hits)
        return True

    return Compiled(test, ENVELOPE, True, {field: frozenset([atom])})


def _client_ip(networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> Compiled:
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

    return _plain(test)


def _between(value: Callable[[Facts], float], over: float | None, under: float | None) -> Compiled:
    def test(f: Facts, ev: Evaluation) -> bool:
        v = value(f)
        return (over is None or v > over) and (under is None or v < under)

    return _plain(test)


# --- combinations -----------------------------------------------------------------------


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

    # Every child's need is one of the whole; take the cheapest, unless reading its
    # field would cost more than the branch that `all` tries first.
    need = None
    needs = [c.need for c in children if c.need is not None]
    if needs:
        best = min(needs, key=_need_cost)
        first = min(c.cost for c in children)
        if _need_cost(best) <= max(NEED_COST, first):
            need = best
    return Compiled(test, max((c.cost for c in children), default=0), records, need)


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

    # True only if some branch is: the union of the branches' needs, when each has
    # one, and when scanning all their fields costs no more than `any` would anyway.
    need: Need | None = None
    if children and all(c.need is not None for c in children):
        merged: dict[Field, frozenset[int]] = {}
        for c in children:
            for field, atoms in (c.need or {}).items():
                merged[field] = merged.get(field, frozenset()) | atoms
        if len(merged) == 1 or _need_cost(merged) <= NEED_COST:
            need = merged
    return Compiled(test, max((c.cost for c in children), default=0), bool(recording), need)


def _not(inner: Compiled) -> Compiled:
    inner_test = inner.test
    if inner.records:  # recipients matched inside a `not` are not remembered
        return Compiled(lambda f, ev: not inner_test(f, Evaluation()), inner.cost, False, None)
    return Compiled(lambda f, ev: not inner_test(f, ev), inner.cost, False, None)
