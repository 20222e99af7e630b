"""Look-alike domains and impersonating display names. Plain functions, bounded cost:
an edit distance is computed only up to a small bound (a band of the table), on labels
of at most 63 characters.
"""

from __future__ import annotations

import re

from .urls import MAX_LABEL, registered_domain, skeleton


def within_distance(a: str, b: str, bound: int) -> bool:
    """True when the Levenshtein distance of ``a`` and ``b`` is at most ``bound``.

    Only the band of width ``2 * bound + 1`` around the diagonal is computed, and the
    scan stops as soon as every cell of a row exceeds the bound: O(len * bound).
    """
    a, b = a[:MAX_LABEL], b[:MAX_LABEL]
    if abs(len(a) - len(b)) > bound:
        return False
    if a == b:
        return True
    big = bound + 1
    previous = [j if j <= bound else big for j in range(len(b) + 1)]
    for i in range(1, len(a) + 1):
        lo, hi = max(1, i - bound), min(len(b), i + bound)
        current = [big] * (len(b) + 1)
        current[0] = i if i <= bound else big
        best = current[0]
        for j in range(lo, hi + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            value = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            current[j] = value if value <= bound else big
            best = min(best, current[j])
        if best > bound:
            return False
        previous = current
    return previous[len(b)] <= bound


def distance_bound(label: str) -> int:
    """Edits allowed for a look-alike: 1 for short labels (up to 6 characters; two
    edits of a short name are another name), 2 for longer ones."""
    return 1 if len(label) <= 6 else 2


def lookalike_of(host: str, protected: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """The protected domain ``host`` imitates, and how, or None.

    ``protected`` maps each protected registered domain to its (label, suffix). A host
    under a protected domain is that domain, not a look-alike. A look-alike has a
    registered label within :func:`distance_bound` edits of a protected label, the
    same skeleton (confusable characters folded), or the same label under another
    suffix.
    """
    label, suffix = registered_domain(host)
    if not label:
        return None
    domain = f"{label}.{suffix}"
    if domain in protected:
        return None
    shape = skeleton(label)
    for name, (p_label, _suffix) in protected.items():
        if len(p_label) < 3:
            continue  # "ab.example": every two-letter name is one edit away
        if label == p_label:
            return name, f"same name under .{suffix}"
        if shape == skeleton(p_label):
            return name, "confusable characters"
        if label.isascii() and within_distance(label, p_label, distance_bound(p_label)):
            return name, "edit distance"
    return None


_BLANKS = re.compile(r"[\s\"'`]+")
_DOMAIN_IN_TEXT = re.compile(r"[a-z0-9][a-z0-9.-]{0,251}\.[a-z]{2,63}")


def normalize_name(name: str) -> str:
    """A display name as compared: confusables folded, case, quotes and blanks evened."""
    return _BLANKS.sub(" ", skeleton(name[:256])).strip()


def impersonated_name(display: str, protected_names: dict[str, str]) -> str | None:
    """The protected person ``display`` names (whole words), or None. ``protected_names``
    maps normalized names to the names as configured."""
    shown = f" {normalize_name(display)} "
    for normal, original in protected_names.items():
        if normal and f" {normal} " in shown:
            return original
    return None


def domains_in_text(text: str) -> list[str]:
    """Domain-like names in a display name ("PayPal.com Support"), at most 5."""
    return _DOMAIN_IN_TEXT.findall(text[:256].lower())[:5]
