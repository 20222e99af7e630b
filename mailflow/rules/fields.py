"""Every text test of a rule file on one field, answered for a value in one pass.

A *field* is a text a condition reads: one header (``subject`` is the Subject
header), the From addresses, the envelope sender, each recipient, the body text,
the attachments' file names or content types. Each distinct text test on a field
(an *atom*: ``matches``, ``contains``, ``equals`` or ``one_of`` with its case
flag) gets a small integer id; :meth:`TextIndex.hits` returns the ids that hold
for one value:

* ``matches`` and case-sensitive ``contains`` go into one Hyperscan database,
  scanned once over the value;
* case-insensitive ``contains`` goes into a second database of literals, scanned
  over the value's ``casefold()`` (exactly Python's ``needle.casefold() in
  value.casefold()``, which Hyperscan's own caseless mode is not);
* ``equals`` and ``one_of`` are dictionary look-ups of the value (casefolded
  unless case-sensitive).

``exists`` is not an atom: it asks whether there are values at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mailflow.rules.patterns import Database, Expression, PatternError, build, encode
from mailflow.rules.schema import TextMatch

Where = tuple[Any, ...]  # key path of the test in the rule file, for error messages


def fold(text: str) -> str:
    """Python's ``casefold``; for ASCII text (where they agree) the faster ``lower``."""
    return text.lower() if text.isascii() else text.casefold()


class TextIndex:
    """The atoms of one field; compiled once, then asked per value."""

    __slots__ = (
        "_equal",
        "_equal_folded",
        "_folded",
        "_folded_dbs",
        "_keys",
        "_raw",
        "_raw_dbs",
        "_where",
        "name",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self._keys: dict[tuple[Any, ...], int] = {}
        self._where: dict[int, Where] = {}
        self._raw: list[tuple[Expression, int]] = []
        self._folded: list[tuple[Expression, int]] = []
        self._equal: dict[str, list[int]] = {}
        self._equal_folded: dict[str, list[int]] = {}
        self._raw_dbs: list[Database] = []
        self._folded_dbs: list[Database] = []

    def atom(self, m: TextMatch, where: Where) -> int:
        """The id of ``m``'s test (not ``exists``); the same test twice gets one id."""
        sensitive = m.case_sensitive
        if m.matches is not None:
            key: tuple[Any, ...] = ("matches", m.matches, sensitive)
        elif m.contains is not None:
            key = ("contains", m.contains if sensitive else m.contains.casefold(), sensitive)
        elif m.equals is not None:
            key = ("one_of", frozenset([m.equals if sensitive else m.equals.casefold()]), sensitive)
        elif m.one_of is not None:
            options = m.one_of if sensitive else [o.casefold() for o in m.one_of]
            key = ("one_of", frozenset(options), sensitive)
        else:
            raise ValueError("exists is not an atom")
        ident = self._keys.get(key)
        if ident is not None:
            return ident
        ident = self._keys[key] = len(self._keys)
        self._where[ident] = where
        kind, operand = key[0], key[1]
        if kind == "matches":
            self._raw.append((Expression.regex(operand, sensitive), ident))
        elif kind == "contains":
            target = self._raw if sensitive else self._folded
            target.append((Expression.literal(operand), ident))
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
        return [
            (self._where[ident], str(PatternError(by_id[ident].source, reason)))
            for ident, reason in (*raw_failures, *folded_failures)
        ]

    @property
    def empty(self) -> bool:
        return not self._keys

    def hits(self, value: str) -> set[int]:
        """The ids of the atoms that hold for ``value``."""
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
            folded = fold(value)
            if self._folded_dbs:
                data = encode(folded)
                for db in self._folded_dbs:
                    db.scan(data, found)
            ids = self._equal_folded.get(folded)
            if ids:
                found.update(ids)
        return found

    def scan(self, items: Sequence[Sequence[str]]) -> tuple[list[set[int]], set[int]]:
        """Per item (a recipient, an attachment's names...) the ids that hold for any of
        its values, and the union over all items."""
        per_item: list[set[int]] = []
        for values in items:
            if len(values) == 1:
                per_item.append(self.hits(values[0]))
            else:
                found: set[int] = set()
                for value in values:
                    found |= self.hits(value)
                per_item.append(found)
        if len(per_item) == 1:
            return per_item, per_item[0]
        union: set[int] = set()
        for found in per_item:
            union |= found
        return per_item, union
