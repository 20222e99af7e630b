"""Condition trees -> closures over :class:`~mailflow.rules.engine.Facts`.

Tests do not run one by one: each leaf registers an atom with the field it reads
(:mod:`mailflow.rules.fields`), a field answers all its atoms in one scan per
message, and a leaf is a set membership. Besides its test, each compiled
condition carries a *need* (:class:`Need`): atoms of which at least one holds
whenever the condition does (None when there is no such set, as for ``not``). The
engine uses needs to skip rules without calling them; see
:class:`mailflow.rules.engine.CompiledRuleSet`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from mailflow import mime
from mailflow.rules.fields import (
    Field,
    FlagField,
    Items,
    NetworkField,
    RangeField,
    TextField,
    Where,
)
from mailflow.rules.schema import AttachmentMatch, Condition, SymbolMatch, TextMatch

if TYPE_CHECKING:
    from mailflow.rules.engine import Facts

# What reading a field costs, cheapest first: the order in which `all` and `any` try
# their branches, and which fields a need may have scanned before they are needed.
ENVELOPE, HEADERS, STRUCTURE, BODY = 0, 1, 2, 3
# A field up to this cost is cheap enough to scan as soon as any rule needs it. A
# dearer one (attachments, body) is scanned ahead of the closures only if the rule
# would read it first anyway: the rule's cheapest branch, so that an `all` that stops
# on the envelope, or an `any` that a header decides, still decodes no body.
NEED_COST = HEADERS


class Evaluation:
    """Facts gathered while evaluating one rule (which recipients matched)."""

    __slots__ = ("recipients",)

    def __init__(self) -> None:
        self.recipients: set[str] = set()


Test = Callable[["Facts", Evaluation], bool]


class Need(NamedTuple):
    """Atoms per field, at least one of which holds whenever the condition does.

    ``opening`` are the fields the condition would read first: the engine may scan
    them as soon as the rule comes up. A field that is not opening (say the body
    in ``any: [subject, body]``) is used to skip the rule only when an earlier rule
    had it scanned already.
    """

    atoms: dict[Field, frozenset[int]]
    opening: frozenset[Field]

    @property
    def cost(self) -> int:
        return max(field.cost for field in self.atoms)


class Compiled(NamedTuple):
    """A compiled condition: the test, a cost rank, whether it records recipients, and
    its :class:`Need`."""

    test: Test
    cost: int
    records: bool  # holds a recipient condition outside any `not`
    need: Need | None


def _leaf(field: Field, atom: int, records: bool = False, test: Test | None = None) -> Compiled:
    """A condition that holds exactly when ``atom`` does (for some item of ``field``)."""
    if test is None:
        test = lambda f, ev: atom in f.scan(field)[1]  # noqa: E731 - a closure per leaf
    need = Need({field: frozenset([atom])}, frozenset([field]))
    return Compiled(test, field.cost, records, need)


class ConditionCompiler:
    """Compiles the conditions of one rule set; fields are shared between its rules."""

    def __init__(self) -> None:
        self.fields: dict[str, Field] = {}

    def finish(self) -> list[tuple[Where, str]]:
        """Compile every field's atoms; the refused ones as (where, message)."""
        failures: list[tuple[Where, str]] = []
        for field in self.fields.values():
            failures.extend(field.compile())
        return failures

    def _text(self, key: str, cost: int, items: Items) -> TextField:
        field = self.fields.get(key)
        if field is None:
            field = self.fields[key] = TextField(key, cost, items)
        assert isinstance(field, TextField)
        return field

    def _flag(self, key: str, cost: int, value: Callable[[Facts], bool]) -> FlagField:
        field = self.fields.get(key)
        if field is None:
            field = self.fields[key] = FlagField(key, cost, value)
        assert isinstance(field, FlagField)
        return field

    def _range(self, key: str, value: Callable[[Facts], float]) -> RangeField:
        field = self.fields.get(key)
        if field is None:
            field = self.fields[key] = RangeField(key, value)
        assert isinstance(field, RangeField)
        return field

    def _networks(self) -> NetworkField:
        field = self.fields.get("client_ip")
        if field is None:
            field = self.fields["client_ip"] = NetworkField("client_ip", _address)
        assert isinstance(field, NetworkField)
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
            field = self._text("from", HEADERS, _from_items)
            return _leaf(field, field.atom(cond.from_, (*where, "from")))
        if cond.sender is not None:
            field = self._text("sender", ENVELOPE, _sender_items)
            return _leaf(field, field.atom(cond.sender, (*where, "sender")))
        if cond.recipient is not None:
            field = self._text("recipient", ENVELOPE, _recipient_items)
            return _recipient(field, cond.recipient, (*where, "recipient"))
        if cond.client_ip is not None:
            networks = [ipaddress.ip_network(n, strict=False) for n in cond.client_ip]
            client = self._networks()
            return _leaf(client, client.atom(networks))
        if cond.authenticated is not None:
            flag = self._flag("authenticated", ENVELOPE, _authenticated)
            return _leaf(flag, flag.atom(cond.authenticated))
        if cond.size is not None:
            size = self._range("size", _size)
            return _leaf(size, size.atom(cond.size.over, cond.size.under))
        if cond.score is not None:
            score = self._range("score", _score)
            return _leaf(score, score.atom(cond.score.over, cond.score.under))
        if cond.body is not None:
            field = self._text("body", BODY, _body_items)
            return _leaf(field, field.atom(cond.body, (*where, "body")))
        if cond.attachment is not None:
            return self._attachment(cond.attachment, (*where, "attachment"))
        if cond.mime_truncated is not None:
            flag = self._flag("mime_truncated", STRUCTURE, _truncated)
            return _leaf(flag, flag.atom(cond.mime_truncated))
        if cond.symbol is not None:
            return _symbol(cond.symbol)
        raise AssertionError("schema guarantees one condition key")  # pragma: no cover

    def _header(self, lname: str, want: TextMatch, where: Where) -> Compiled:
        field = self._text(f"header:{lname}", HEADERS, _header_items(lname))
        return _leaf(field, field.atom(want, where))

    def _attachment(self, want: AttachmentMatch, where: Where) -> Compiled:
        names = self._text("attachment:filename", STRUCTURE, _name_items)
        types = self._text("attachment:content_type", STRUCTURE, _type_items)
        reals = self._text("attachment:real_type", BODY, _real_items)
        name_atom = _part_atom(names, want.filename, (*where, "filename"))
        type_atom = _part_atom(types, want.content_type, (*where, "content_type"))
        real_atom = _part_atom(reals, want.real_type, (*where, "real_type"))
        if _NEVER in (name_atom, type_atom, real_atom):
            return Compiled(lambda f, ev: False, STRUCTURE, False, None)
        if name_atom is None and type_atom is None and real_atom is None:  # any attachment
            present = types.atom(TextMatch(exists=True), where)
            return _leaf(types, present)
        # Each attachment must pass every test given (cheapest fields first); the
        # parts are the same list, in the same order, for the three fields.
        checks = [
            (field, atom)
            for field, atom in ((names, name_atom), (types, type_atom), (reals, real_atom))
            if atom is not None
        ]

        def test(f: Facts, ev: Evaluation) -> bool:
            first_field, first_atom = checks[0]
            per_part = f.scan(first_field)[0]
            for i, hits in enumerate(per_part):
                if first_atom not in hits:
                    continue
                if all(atom in f.scan(field)[0][i] for field, atom in checks[1:]):
                    return True
            return False

        field, atom = checks[0]
        leaf = _leaf(field, atom, test=test)
        return Compiled(test, max(field.cost for field, _ in checks), False, leaf.need)


_NEVER = -1  # a part test that no part passes


def _part_atom(field: TextField, want: TextMatch | None, where: Where) -> int | None:
    """The atom testing one attachment part; None when every part passes (no test,
    or ``exists: true``: a part always has a value, its names or ""), _NEVER when
    none does (``exists: false``)."""
    if want is None:
        return None
    if want.exists is not None:
        return None if want.exists else _NEVER
    return field.atom(want, where)


# --- what the fields read ---------------------------------------------------------------


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


def _real_items(f: Facts) -> list[tuple[str, ...]]:
    """Per attachment: the kind and MIME type told from its content (and
    ``office-macro`` for a document with macros); see mailflow.mime.filetype."""
    return [mime.part_type(p).labels for p in f.structure().parts if p.is_attachment]


def _address(f: Facts) -> tuple[int, int] | None:
    return f.address()


def _authenticated(f: Facts) -> bool:
    return bool(f.ctx.connection.authenticated_user)


def _size(f: Facts) -> float:
    return f.ctx.size


def _score(f: Facts) -> float:
    return f.ctx.score


def _truncated(f: Facts) -> bool:
    return f.structure().truncated


# --- leaves with more to them -----------------------------------------------------------


def _symbol(want: SymbolMatch) -> Compiled:
    """Holds when a plugin that ran before the rules (any stage) emitted the symbol,
    with at least ``min_score`` when given. Read from the message's plugin runs
    (``ctx.runs``), which also reach a content-analysis worker."""
    name = want.name.upper()
    floor = want.min_score

    def test(f: Facts, ev: Evaluation) -> bool:
        for run in f.ctx.runs:
            result = run.result
            if result is None:
                continue
            for sym in result.symbols:
                if sym.name.upper() == name and (floor is None or sym.score >= floor):
                    return True
        return False

    return Compiled(test, ENVELOPE, False, None)


def _recipient(field: TextField, want: TextMatch, where: Where) -> Compiled:
    """Holds when any recipient passes; remembers which did."""
    if want.exists is False:  # a recipient always has a value: no one passes
        return Compiled(lambda f, ev: False, ENVELOPE, True, None)
    atom = field.atom(want, where)

    def test(f: Facts, ev: Evaluation) -> bool:
        per_item, union = f.scan(field)
        if atom not in union:
            return False
        rcpts = f.ctx.envelope.rcpt_tos
        ev.recipients.update(r for r, hits in zip(rcpts, per_item, strict=True) if atom in hits)
        return True

    return _leaf(field, atom, records=True, test=test)


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

    # Every child's need is one of the whole. Take one whose fields may open (they
    # cost no more than the branch `all` tries first, or are cheap anyway), text
    # tests before flags and ranges (they are rarer: `authenticated: false` holds for
    # most mail); failing that the cheapest, riding only.
    need = None
    needs = [c.need for c in children if c.need is not None]
    if needs:
        limit = max(NEED_COST, min(c.cost for c in children))
        eligible = [n for n in needs if n.cost <= limit]
        if eligible:
            need = min(eligible, key=lambda n: (not _textual(n), n.cost))
        else:
            cheapest = min(needs, key=lambda n: n.cost)
            need = Need(cheapest.atoms, frozenset())
    return Compiled(test, max((c.cost for c in children), default=0), records, need)


def _textual(need: Need) -> bool:
    return all(isinstance(field, TextField) for field in need.atoms)


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

    # True only if a branch is: when each branch has a need, the union of them. The
    # cheapest fields, and any cheap enough, may open; the others (a body after a
    # header) only ride along.
    need = None
    if children and all(c.need is not None for c in children):
        atoms: dict[Field, frozenset[int]] = {}
        opening: set[Field] = set()
        for c in children:
            assert c.need is not None
            for field, ids in c.need.atoms.items():
                atoms[field] = atoms.get(field, frozenset()) | ids
            opening |= c.need.opening
        cheapest = min(field.cost for field in atoms)
        limit = max(NEED_COST, cheapest)
        need = Need(atoms, frozenset(f for f in opening if f.cost <= limit))
    return Compiled(test, max((c.cost for c in children), default=0), bool(recording), need)


def _not(inner: Compiled) -> Compiled:
    inner_test = inner.test
    if inner.records:  # recipients matched inside a `not` are not remembered
        return Compiled(lambda f, ev: not inner_test(f, Evaluation()), inner.cost, False, None)
    return Compiled(lambda f, ev: not inner_test(f, ev), inner.cost, False, None)
