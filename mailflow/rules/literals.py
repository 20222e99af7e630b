"""Regular expressions with a literal pre-filter, for searching long texts (bodies).

Python's ``re`` tries a pattern at every position of the text; with ``IGNORECASE``
it cannot skip ahead to a literal prefix, so a body rule such as
``\\bwire (the )?transfer fee\\b`` costs ~10 ns per character of every message. Most
rule patterns contain literal text that any match must include ("transfer fee"),
and ``str.__contains__`` finds (or rules out) that in a fraction of the time. So
:class:`Search` works out, once, a set of strings one of which every match must
contain, and only runs the regular expression when one of them is in the text.

The filter never changes a result: it only says "cannot match" when a required
literal is absent. For case-insensitive patterns it compares lower-cased ASCII
literals with the lower-cased text; that is exact unless the text holds one of
the three characters whose case folding in ``re`` differs from ``str.lower``
(checked by a test over all of Unicode), and then the filter is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from re import _constants as sre  # type: ignore[attr-defined]  # stable since 3.11
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

MIN_FILTERED_CHARS = 256  # shorter texts go straight to the regular expression
# Characters that re.IGNORECASE matches to an ASCII letter but str.lower() does
# not turn into it: U+0130 (lower() is "i" + U+0307), U+0131 (i), U+017F (s).
FOLD_EXCEPTIONS = ("\u0130", "\u0131", "\u017f")

_BLANKS = re.compile(r"[ \t\r\f\v]+")  # what html_to_text collapses to one space
_REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT)


class Search:
    """``re.search`` for one pattern, skipped when a required literal is missing."""

    __slots__ = ("_folded", "_literals", "_words", "pattern")

    def __init__(self, regex: str, flags: int = 0) -> None:
        self.pattern = re.compile(regex, flags)
        folded = bool(self.pattern.flags & re.IGNORECASE)
        literals = required_literals(regex, flags)
        if literals is not None and folded:
            literals = frozenset(s.lower() for s in literals)
        self._literals = tuple(sorted(literals)) if literals else ()
        self._folded = folded
        # The blank-separated words of each literal, for possible_in_parts (which
        # cannot reason about a literal with a newline, or one that is all blanks).
        words = [tuple(w for w in _BLANKS.split(s) if w) for s in self._literals]
        usable = all(w and "\n" not in s for w, s in zip(words, self._literals, strict=True))
        self._words: tuple[tuple[str, ...], ...] = tuple(words) if usable else ()

    @property
    def literals(self) -> tuple[str, ...]:
        """The strings one of which every match contains (empty: no filter)."""
        return self._literals

    def __call__(self, text: str) -> bool:
        """True when the pattern matches anywhere in ``text``."""
        if self._literals and len(text) >= MIN_FILTERED_CHARS and not self._possible(text):
            return False
        return self.pattern.search(text) is not None

    def possible_in_parts(self, parts: Iterable[tuple[str, bool]]) -> bool:
        """False only when the pattern cannot match a body text built from ``parts``.

        ``parts`` are (decoded text, is HTML) pairs, and the body text is what
        :meth:`mailflow.mime.Structure.body_text` makes of them: HTML converted by
        ``html_to_text``, parts joined by newlines. That conversion only turns tags
        into blanks, entities into characters and blank runs into one space, so a
        literal without a newline can only be in the body text if each of its
        blank-separated words is in one of the parts as decoded (for HTML without
        "&"); this rules a message out without converting its HTML.
        """
        if not self._words:
            return True
        folded = self._folded
        for text, is_html in parts:
            if is_html and "&" in text:
                return True
            if folded:
                if not text.isascii() and any(c in text for c in FOLD_EXCEPTIONS):
                    return True
                text = text.lower()
            if is_html:
                for words in self._words:
                    if all(word in text for word in words):
                        return True
            else:
                for literal in self._literals:
                    if literal in text:
                        return True
        return False

    def _possible(self, text: str) -> bool:
        if self._folded:
            if not text.isascii() and any(c in text for c in FOLD_EXCEPTIONS):
                return True
            text = lowered(text)
        return any(literal in text for literal in self._literals)


_last_lowered: tuple[str, str] = ("", "")


def lowered(text: str) -> str:
    """``text.lower()``, remembered for the last long text (a body is searched by
    several rules in a row)."""
    global _last_lowered
    if len(text) < MIN_FILTERED_CHARS:
        return text.lower()
    last = _last_lowered
    if last[0] is text:
        return last[1]
    low = text.lower()
    _last_lowered = (text, low)
    return low


def required_literals(regex: str, flags: int = 0) -> frozenset[str] | None:
    """Strings one of which any match of ``regex`` contains, or None when unknown.

    Only what is certain is used: literal runs in sequence, groups, repeats of at
    least one, and alternations whose every branch has its own requirement.
    Anything else (classes, scoped flags, back references) ends a run.
    """
    try:
        parsed = sre_parse.parse(regex, flags)
    except Exception:  # invalid patterns are rejected by the schema; be safe anyway
        return None
    folded = bool(parsed.state.flags & re.IGNORECASE)
    found = _required(parsed, folded)
    if found is None or "" in found:
        return None
    return found


def _required(items: Any, folded: bool) -> frozenset[str] | None:
    """Requirement of a sequence: its most selective literal run or sub-requirement."""
    best: frozenset[str] | None = None
    run: list[str] = []
    for op, arg in items:
        if op is sre.LITERAL and (not folded or arg < 128):
            run.append(chr(arg))
            continue
        best = _better(best, _run(run))
        run = []
        best = _better(best, _item(op, arg, folded))
    return _better(best, _run(run))


def _run(run: list[str]) -> frozenset[str] | None:
    return frozenset(["".join(run)]) if run else None


def _item(op: Any, arg: Any, folded: bool) -> frozenset[str] | None:
    if op is sre.SUBPATTERN:
        _, add_flags, del_flags, sub = arg
        if (add_flags | del_flags) & re.IGNORECASE:
            return None  # (?i:...) / (?-i:...): case rules change inside
        return _required(sub, folded)
    if op is sre.ATOMIC_GROUP:
        return _required(arg, folded)
    if op in _REPEATS:
        low, _, sub = arg
        return _required(sub, folded) if low >= 1 else None
    if op is sre.BRANCH:
        union: set[str] = set()
        for branch in arg[1]:
            need = _required(branch, folded)
            if need is None:
                return None
            union |= need
        return frozenset(union)
    return None


def _better(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    """The more selective requirement: longer shortest string, then fewer strings."""
    if a is None or "" in a:
        return b
    if b is None or "" in b:
        return a
    key_a = (min(map(len, a)), -len(a))
    key_b = (min(map(len, b)), -len(b))
    return b if key_b > key_a else a
