"""Rule patterns on Hyperscan: many patterns matched in one linear pass over a text.

Python's ``re`` backtracks: ``(a+)+$`` against ``'a' * 28 + '!'`` takes seconds,
and every extra ``a`` doubles that. Hyperscan (here the Vectorscan build that the
``hyperscan`` wheel links in) compiles patterns into automata that read each
byte of the text once; it refuses what it cannot run that way (back-references,
look-around, atomic groups, possessive quantifiers, patterns too large), so a
pattern that is accepted cannot blow up. All patterns of one database are
matched in the same pass, as rspamd does: the engine groups a rule file's
patterns by the text they test and scans each text once.

Why Hyperscan and not RE2 (``google-re2``), measured in docs/performance.md: an
``re2.Set`` (RE2's multi-pattern matcher) has no fallback when its lazily built
DFA thrashes; one pattern such as ``a.{0,20}b`` over a hostile 1 MB text took
2.8 s (two patterns 10 s), where Hyperscan took under 25 ms. Hyperscan compiles
more slowly (about 1.3 s for the 1,000-rule benchmark set, at start-up only).

Patterns are written as for Python's ``re`` where both engines agree; a few
Python spellings that Hyperscan reads differently or not at all are rewritten
(:func:`translate`): ``\\Z`` (end of text), ``\\v`` (vertical tab), ``{,n}``,
``\\uXXXX``, ``\\UXXXXXXXX``, ``\\N{NAME}``. docs/rules.md lists every remaining
difference an admin can meet (``\\w``, ``\\d``, ``\\s`` and ``\\b`` are ASCII-only).
"""

from __future__ import annotations

import codecs
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hyperscan

MAX_PATTERN_CHARS = 4096  # longer patterns are refused: compile time grows with them
# Every pattern reports a match at most once per scan (we only ask whether it
# matched), may match the empty string (``a|`` does, as in Python), and is UTF-8.
_BASE_FLAGS = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_ALLOWEMPTY | hyperscan.HS_FLAG_UTF8
_CASELESS = hyperscan.HS_FLAG_CASELESS
_REPLACE = "mailflow.rules.replace"
REPLACEMENT = "\ufffd"


def _replace_unencodable(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    return REPLACEMENT * (exc.end - exc.start), exc.end


codecs.register_error(_REPLACE, _replace_unencodable)


def encode(text: str) -> bytes:
    """``text`` as valid UTF-8, as Hyperscan's UTF-8 mode requires (its behaviour on
    invalid input is undefined): lone surrogates, which header values decoded with
    ``surrogateescape`` carry for 8-bit bytes, become U+FFFD."""
    return text.encode("utf-8", _REPLACE)


class PatternError(ValueError):
    """A pattern the engine cannot run, and why."""

    def __init__(self, pattern: str, reason: str) -> None:
        self.pattern = pattern
        self.reason = reason
        super().__init__(f"invalid regular expression {pattern!r}: {reason}")


# --- Python spellings -------------------------------------------------------------------

_HEX = frozenset("0123456789abcdefABCDEF")


def translate(pattern: str) -> str:
    """``pattern`` with the Python spellings Hyperscan reads differently rewritten.

    ``\\Z`` is the end of the text in Python but "end or before a final newline"
    in Hyperscan (``\\z`` there); ``\\v`` is a vertical tab in Python but any
    vertical space in Hyperscan; ``x{,3}`` repeats in Python but is literal text in
    Hyperscan; ``\\uXXXX``, ``\\UXXXXXXXX`` and ``\\N{NAME}`` are unknown to it; a
    NUL character would end the pattern early (patterns are passed as C strings).
    Raises :class:`PatternError` for an unknown character name or a pattern that
    is too long.
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(pattern[:40] + "...", f"longer than {MAX_PATTERN_CHARS} characters")
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    class_start = 0  # where the current class's members begin (a "]" there is literal)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            i = _escape(pattern, i, out, in_class)
            continue
        if c == "\x00":
            out.append("\\x00")
        elif in_class:
            out.append(c)
            if c == "]" and i > class_start:
                in_class = False
        elif c == "[":
            out.append(c)
            in_class = True
            class_start = i + 1
            if class_start < n and pattern[class_start] == "^":
                class_start += 1
        elif c == "(" and pattern.startswith("(?#", i):  # a comment: copied as it is
            end = pattern.find(")", i)
            end = n if end < 0 else end + 1
            out.append(pattern[i:end])
            i = end
            continue
        elif c == "{" and pattern.startswith("{,", i):
            j = i + 2
            while j < n and pattern[j].isdigit():
                j += 1
            if j < n and pattern[j] == "}":  # Python's {,n}: zero to n times
                out.append("{0," + pattern[i + 2 : j] + "}")
                i = j + 1
                continue
            out.append(c)
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _escape(pattern: str, i: int, out: list[str], in_class: bool) -> int:
    """Copy or rewrite the escape at ``pattern[i]`` (a backslash); the next index."""
    c = pattern[i + 1]
    if c == "Q":  # \Q...\E quotes literally (Hyperscan; Python refuses \Q): copy as is
        end = pattern.find("\\E", i + 2)
        end = len(pattern) if end < 0 else end + 2
        out.append(pattern[i:end])
        return end
    if c == "Z" and not in_class:
        out.append("\\z")
        return i + 2
    if c == "v":
        out.append("\\x0b")
        return i + 2
    if c in "uU":
        width = 4 if c == "u" else 8
        digits = pattern[i + 2 : i + 2 + width]
        if len(digits) == width and all(d in _HEX for d in digits):
            out.append(f"\\x{{{int(digits, 16):x}}}")
            return i + 2 + width
    if c == "N" and pattern.startswith("{", i + 2):
        end = pattern.find("}", i + 3)
        if end > 0:
            name = pattern[i + 3 : end]
            try:
                char = unicodedata.lookup(name)
            except KeyError:
                raise PatternError(pattern, f"unknown character name {name!r}") from None
            out.append(f"\\x{{{ord(char):x}}}")
            return end + 1
    out.append(pattern[i : i + 2])
    return i + 2


def escape_literal(text: str) -> str:
    """A pattern that matches ``text`` literally (non-ASCII characters are literal in
    UTF-8 mode; every ASCII character but letters and digits is written as \\xHH)."""
    return "".join(
        c if (c.isascii() and c.isalnum()) or not c.isascii() else f"\\x{ord(c):02x}" for c in text
    )


# --- databases --------------------------------------------------------------------------


@dataclass(frozen=True)
class Expression:
    """One pattern as Hyperscan gets it, with the admin's spelling for messages."""

    source: str  # as written in the rule file
    text: str  # translated
    caseless: bool

    @classmethod
    def regex(cls, pattern: str, case_sensitive: bool) -> Expression:
        return cls(pattern, translate(pattern), not case_sensitive)

    @classmethod
    def literal(cls, text: str, caseless: bool = False) -> Expression:
        return cls(text, escape_literal(text), caseless)


def _on_match(ident: int, start: int, end: int, flags: int, found: set[int]) -> None:
    found.add(ident)


class Database:
    """Compiled expressions, each with an id; :meth:`scan` says which ids match."""

    __slots__ = ("_db", "_local", "_owner", "_scratch", "ids")

    def __init__(self, entries: Sequence[tuple[Expression, int]]) -> None:
        self.ids = tuple(ident for _, ident in entries)
        self._db = _compile(entries)
        # Hyperscan scratch space is per thread: one for the thread that compiled (it
        # evaluates too, as a rule) and, lazily, one for any other thread.
        self._owner = threading.get_ident()
        self._scratch = hyperscan.Scratch(self._db)
        self._local = threading.local()

    def scan(self, data: bytes, found: set[int]) -> None:
        """Add to ``found`` the ids of the expressions that match ``data`` (UTF-8)."""
        scratch = self._scratch
        if threading.get_ident() != self._owner:
            scratch = getattr(self._local, "scratch", None) or self._new_scratch()
        # Positional: (data, handler, flags, context, scratch), no keyword parsing.
        self._db.scan(data, _on_match, 0, found, scratch)

    def _new_scratch(self) -> hyperscan.Scratch:
        scratch = self._local.scratch = hyperscan.Scratch(self._db)
        return scratch


def _compile(entries: Sequence[tuple[Expression, int]]) -> Any:
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(
        expressions=[encode(e.text) for e, _ in entries],
        ids=[ident for _, ident in entries],
        elements=len(entries),
        flags=[_BASE_FLAGS | (_CASELESS if e.caseless else 0) for e, _ in entries],
    )
    return db


def build(
    entries: Sequence[tuple[Expression, int]],
) -> tuple[list[Database], list[tuple[int, str]]]:
    """Compile ``entries`` into as few databases as will compile.

    One database when all compile together (the normal case). When they do not,
    halves are tried in turn: a single expression that fails is a refused pattern,
    returned as (id, reason); expressions that compile alone but not together
    (Hyperscan's resource limits) end up in separate databases.
    """
    databases: list[Database] = []
    failures: list[tuple[int, str]] = []
    pending: list[Sequence[tuple[Expression, int]]] = [entries] if entries else []
    while pending:
        chunk = pending.pop()
        try:
            databases.append(Database(chunk))
        except hyperscan.error as exc:
            if len(chunk) == 1:
                failures.append((chunk[0][1], _reason(exc)))
                continue
            half = len(chunk) // 2
            pending.extend((chunk[half:], chunk[:half]))
    failures.sort()
    return databases, failures


def _reason(exc: hyperscan.error) -> str:
    text = str(exc.args[0] if exc.args else exc).strip().rstrip(".")
    return f"{text or 'not supported'} ({ENGINE_HINT})"


ENGINE_HINT = "rule patterns run on a linear-time engine; see docs/rules.md, Regular expressions"
