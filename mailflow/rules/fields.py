"""Fields: what conditions read from a message, each answered for all rules at once.

A *field* is one thing a condition tests: one header (``subject`` is the Subject
header), the From addresses, the envelope sender, each recipient, the body text,
the attachments' file names or content types, and the non-text facts (client
address, authentication, size, score, ``mime_truncated``). Each distinct test
on a field is an *atom* with a small integer id; :meth:`Field.scan` says, once per
message, which atoms hold: per item (a recipient, an attachment part...) and over
all items. A condition is then a set membership, and rules none of whose atoms
hold need not be looked at (:class:`mailflow.rules.engine.CompiledRuleSet`).

Text fields (:class:`TextField`, :class:`TextIndex`):

* ``matches`` and case-sensitive ``contains`` go into one Hyperscan database,
  scanned once over each value;
* case-insensitive ``contains`` must mean Python's ``needle.casefold() in
  value.casefold()``, which Hyperscan's own caseless mode does not ("ß" is "ss").
  For an ASCII value (most header values, much body text) the two agree when the
  folded needle is ASCII, so such needles also go into the first database, as
  caseless literals; a value that is not ASCII is casefolded and scanned with a
  second database of every folded needle instead (the first one's answers for
  those needles are dropped);
* ``equals`` and ``one_of`` are dictionary look-ups of the value (casefolded
  unless case-sensitive);
* ``exists`` holds for every item when there are items, or for none.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mailflow.rules.patterns import Database, Expression, PatternError, build, encode
from mailflow.rules.schema import TextMatch

if TYPE_CHECKING:
    from mailflow.rules.engine import Facts

Where = tuple[Any, ...]  # key path of the test in the rule file, for error messages
Scan = tuple[list[set[int]], set[int]]  # atoms that hold per item, and over all items
Items = Callable[["Facts"], Sequence[Sequence[str]]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def fold(text: str) -> str:
    """Python's ``casefold``; for ASCII text (where they agree) the faster ``lower``."""
    return text.lower() if text.isascii() else text.casefold()


class Field:
    """One thing conditions read, and the atoms the rule set tests on it."""

    __slots__ = ("_keys", "cost", "key")

    def __init__(self, key: str, cost: int) -> None:
        self.key = key
        self.cost = cost  # see mailflow.rules.conditions: ENVELOPE ... BODY
        self._keys: dict[Any, int] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key}>"

    def _atom(self, key: Any) -> tuple[int, bool]:
        """The id for ``key``, and whether it is new."""
        ident = self._keys.get(key)
        if ident is not None:
            return ident, False
        ident = self._keys[key] = len(self._keys)
        return ident, True

    def compile(self) -> list[tuple[Where, str]]:
        """Prepare for scanning; the tests refused, as (where, message)."""
        return []

    def scan(self, facts: Facts) -> Scan:
        """Which atoms hold for this message (see the module docstring)."""
        raise NotImplementedError


def _one(found: set[int]) -> Scan:
    return [found], found


class TextField(Field):
    """A text field: items (values) read from the message, atoms on their text."""

    __slots__ = ("index", "items")

    def __init__(self, key: str, cost: int, items: Items) -> None:
        super().__init__(key, cost)
        self.items = items
        self.index = TextIndex()

    def atom(self, m: TextMatch, where: Where) -> int:
        return self.index.atom(m, where)

    def compile(self) -> list[tuple[Where, str]]:
        return self.index.compile()

    def scan(self, facts: Facts) -> Scan:
        return self.index.scan(self.items(facts))


class FlagField(Field):
    """A true/false fact (authenticated, mime_truncated): one atom per wanted value."""

    __slots__ = ("value",)

    def __init__(self, key: str, cost: int, value: Callable[[Facts], bool]) -> None:
        super().__init__(key, cost)
        self.value = value

    def atom(self, want: bool) -> int:
        return self._atom(want)[0]

    def scan(self, facts: Facts) -> Scan:
        ident = self._keys.get(self.value(facts))
        return _one(set() if ident is None else {ident})


class RangeField(Field):
    """A number (size, score) against ``over``/``under`` bounds: one atom per pair."""

    __slots__ = ("_bounds", "value")

    def __init__(self, key: str, value: Callable[[Facts], float]) -> None:
        super().__init__(key, 0)
        self.value = value
        self._bounds: list[tuple[float | None, float | None, int]] = []

    def atom(self, over: float | None, under: float | None) -> int:
        ident, new = self._atom((over, under))
        if new:
            self._bounds.append((over, under, ident))
        return ident

    def scan(self, facts: Facts) -> Scan:
        v = self.value(facts)
        return _one(
            {
                ident
                for over, under, ident in self._bounds
                if (over is None or v > over) and (under is None or v < under)
            }
        )


class NetworkField(Field):
    """The client address against lists of networks: one atom per list.

    Networks are kept by (version, prefix length) as integers, so a scan costs one
    look-up per distinct prefix length, however many rules name networks.
    """

    __slots__ = ("_by_prefix", "address")

    def __init__(self, key: str, address: Callable[[Facts], tuple[int, int] | None]) -> None:
        super().__init__(key, 0)
        self.address = address
        self._by_prefix: dict[tuple[int, int, int], dict[int, set[int]]] = {}

    def atom(self, networks: Sequence[Network]) -> int:
        ident, new = self._atom(frozenset(networks))
        if new:
            for net in networks:
                key = (net.version, net.prefixlen, int(net.netmask))
                self._by_prefix.setdefault(key, {}).setdefault(int(net.network_address), set()).add(
                    ident
                )
        return ident

    def scan(self, facts: Facts) -> Scan:
        found: set[int] = set()
        addr = self.address(facts)
        if addr is not None:
            version, value = addr
            for (net_version, _, mask), networks in self._by_prefix.items():
                if net_version == version:
                    ids = networks.get(value & mask)
                    if ids:
                        found |= ids
        return _one(found)


class TextIndex:
    """The text atoms of one field; compiled once, then asked per value."""

    __slots__ = (
        "_equal",
        "_equal_folded",
        "_exists",
        "_folded",
        "_folded_dbs",
        "_folded_ids",
        "_keys",
        "_raw",
        "_raw_dbs",
        "_where",
    )

    def __init__(self) -> None:
        self._keys: dict[tuple[Any, ...], int] = {}
        self._where: dict[int, Where] = {}
        self._raw: list[tuple[Expression, int]] = []
        self._folded: list[tuple[Expression, int]] = []
        self._folded_ids: frozenset[int] = frozenset()  # in both databases
        self._equal: dict[str, list[int]] = {}
        self._equal_folded: dict[str, list[int]] = {}
        self._exists: dict[bool, int] = {}
        self._raw_dbs: list[Database] = []
        self._folded_dbs: list[Database] = []

    def atom(self, m: TextMatch, where: Where) -> int:
        """The id of ``m``'s test; the same test twice gets one id."""
        sensitive = m.case_sensitive
        if m.exists is not None:
            key: tuple[Any, ...] = ("exists", m.exists)
        elif m.matches is not None:
            key = ("matches", m.matches, sensitive)
        elif m.contains is not None:
            key = ("contains", m.contains if sensitive else m.contains.casefold(), sensitive)
        elif m.equals is not None:
            key = ("one_of", frozenset([m.equals if sensitive else m.equals.casefold()]), sensitive)
        else:
            options = m.one_of or []
            key = (
                "one_of",
                frozenset(options if sensitive else [o.casefold() for o in options]),
                sensitive,
            )
        ident = self._keys.get(key)
        if ident is not None:
            return ident
        ident = self._keys[key] = len(self._keys)
        self._where[ident] = where
        kind, operand = key[0], key[1]
        if kind == "exists":
            self._exists[operand] = ident
        elif kind == "matches":
            self._raw.append((Expression.regex(operand, sensitive), ident))
        elif kind == "contains" and sensitive:
            self._raw.append((Expression.literal(operand), ident))
        elif kind == "contains":
            self._folded.append((Expression.literal(operand), ident))
            if operand.isascii():
                self._raw.append((Expression.literal(operand, caseless=True), ident))
                self._folded_ids |= {ident}
        else:
            table = self._equal if sensitive else self._equal_folded
            for option in operand:
                table.setdefault(option, []).append(ident)
        return ident

    def compile(self) -> list[tuple[Where, str]]:
        """Build the databases; the tests refused by the engine, as (where, message)."""
        self._raw_dbs, raw_failures = build(tuple(self._raw))
        self._folded_dbs, folded_failures = build(tuple(self._folded))
        by_id = {ident: e for e, ident in (*self._raw, *self._folded)}
        reasons: dict[int, str] = {}
        for ident, reason in (*raw_failures, *folded_failures):
            reasons.setdefault(ident, reason)  # a needle is in both databases
        return [
            (self._where[ident], str(PatternError(by_id[ident].source, reason)))
            for ident, reason in sorted(reasons.items())
        ]

    def hits(self, value: str) -> set[int]:
        """The ids of the atoms (other than ``exists``) that hold for ``value``."""
        found: set[int] = set()
        if self._raw_dbs:
            data = encode(value)
            for db in self._raw_dbs:
                db.scan(data, found)
        if self._equal:
            ids = self._equal.get(value)
            if ids:
                found.update(ids)
        if self._folded_dbs or self._equal_folded:
            ascii = value.isascii()
            folded = value.lower() if ascii else value.casefold()
            if self._folded_dbs and not ascii:  # see the module docstring
                found -= self._folded_ids
                data = encode(folded)
                for db in self._folded_dbs:
                    db.scan(data, found)
            ids = self._equal_folded.get(folded)
            if ids:
                found.update(ids)
        return found

    def scan(self, items: Sequence[Sequence[str]]) -> Scan:
        """Per item (a recipient, an attachment's names...) the ids that hold for any of
        its values, and the union over all items."""
        per_item: list[set[int]] = []
        for values in items:
            if len(values) == 1:
                found = self.hits(values[0])
            else:
                found = set()
                for value in values:
                    found |= self.hits(value)
            per_item.append(found)
        present = self._exists.get(True)
        if present is not None:  # `exists: true` holds for each item there is
            for found in per_item:
                found.add(present)
        if len(per_item) == 1:
            return per_item, per_item[0]
        union: set[int] = set()
        for found in per_item:
            union |= found
        absent = self._exists.get(False)
        if absent is not None and not per_item:
            union.add(absent)
        return per_item, union
