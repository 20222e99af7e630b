"""Turn "message as the MTA has it" vs "message after the pipeline" into milter actions.

Why a diff and not a replay of the plugins' mutation list: the pipeline applies each
plugin's mutations to ``ctx.raw`` before the next plugin runs (so DKIM signing sees
the final headers), score thresholds add headers of their own, and a later mutation
can undo an earlier one. The final bytes and envelope are the single truth; comparing
them with what the MTA sent yields the smallest set of edits that makes the MTA's
copy identical, whatever sequence of mutations produced it.

Index rules relied on (libmilter ``smfi_chgheader`` / ``smfi_insheader``, Postfix
``cleanup_milter.c``): SMFIR_CHGHEADER addresses the n-th (1-based) header of that
name, and an empty value deletes it; SMFIR_INSHEADER's index counts all headers, 0
being the top; SMFIR_ADDHEADER appends. The MTA applies them in the order sent.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass

from mailflow.message import split_header_fields
from mailflow.milter import protocol as p

log = logging.getLogger("mailflow.milter")

CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class Field:
    """One header field: its name and the bytes after the colon (CRLF-folded, no final CRLF)."""

    name: str
    value: bytes

    @property
    def key(self) -> tuple[str, bytes]:
        # Folding whitespace differences alone are not worth an edit.
        return self.name.lower(), b" ".join(self.value.split())

    def to_bytes(self) -> bytes:
        return self.name.encode("utf-8", "surrogateescape") + b":" + self.value + CRLF


def field_from_milter(name: str, value: bytes, leading_space: bool) -> Field:
    """A header as the MTA sent it. Without SMFIP_HDR_LEADSPC the MTA stripped the
    whitespace after the colon; one space is the conventional (RFC 5322 3.6) form."""
    value = value.replace(b"\r\n", b"\n").replace(b"\n", CRLF)
    return Field(name, value if leading_space else b" " + value)


def parse_fields(head: bytes) -> list[Field]:
    """A header block (as in ``MessageContext.split()``) -> fields."""
    out = []
    for raw in split_header_fields(head):
        name, sep, rest = raw.partition(b":")
        if not sep:
            continue  # not a header line; MessageContext never produces one
        out.append(Field(name.decode("utf-8", "surrogateescape").strip(), rest.rstrip(b"\r\n")))
    return out


def _value_for_mta(value: bytes, leading_space: bool) -> bytes:
    # libmilter: a multi-line header value uses bare LF + whitespace for folding.
    value = value.replace(CRLF, b"\n")
    return value if leading_space else value.lstrip(b" \t")


def _occurrences(fields: list[Field]) -> list[int]:
    """For each field, its 1-based position among the fields with the same name."""
    seen: dict[str, int] = {}
    out = []
    for f in fields:
        name = f.name.lower()
        seen[name] = seen.get(name, 0) + 1
        out.append(seen[name])
    return out


# difflib.SequenceMatcher takes up to len(a) * len(b) steps when values repeat (a
# message with thousands of identical fields): past this many, the differing middle
# of two header lists is replaced as a whole (every edit still correct, just more).
MAX_DIFF_CELLS = 250_000
Opcode = tuple[str, int, int, int, int]


def _opcodes(a: list[object], b: list[object]) -> list[Opcode]:
    """SequenceMatcher's opcodes for a -> b, linear in the lists' length: the common
    head and tail are matched directly, and only a small enough middle is diffed."""
    lo = 0
    while lo < len(a) and lo < len(b) and a[lo] == b[lo]:
        lo += 1
    end_a, end_b = len(a), len(b)
    while end_a > lo and end_b > lo and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    out: list[Opcode] = []
    if lo:
        out.append(("equal", 0, lo, 0, lo))
    if (end_a - lo) * (end_b - lo) <= MAX_DIFF_CELLS:
        matcher = difflib.SequenceMatcher(None, a[lo:end_a], b[lo:end_b], autojunk=False)
        out.extend(
            (tag, i1 + lo, i2 + lo, j1 + lo, j2 + lo)
            for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        )
    else:
        out.append(("replace", lo, end_a, lo, end_b))
    if end_a < len(a):
        out.append(("equal", end_a, len(a), end_b, len(b)))
    return out


def header_edits(
    original: list[Field], final: list[Field], leading_space: bool, insert_offset: int = 0
) -> list[bytes]:
    """SMFIR_CHGHEADER / INSHEADER / ADDHEADER packets turning ``original`` into ``final``.

    ``insert_offset`` is the number of headers the MTA has above the ones it showed us
    and counts in SMFIR_INSHEADER indexes: Postfix (3.7, observed) does not send its own
    Received header to milters, skips it when counting for SMFIR_CHGHEADER, but counts
    it for SMFIR_INSHEADER, where index 0 still means the very top.
    """
    changes: list[tuple[int, bytes]] = []  # (original index, new value or b"" to delete)
    inserted: set[int] = set()  # final indexes that are new fields
    for tag, i1, i2, j1, j2 in _opcodes([f.key for f in original], [f.key for f in final]):
        if tag == "equal":
            continue
        # Inside a differing block, pair fields by name: same name = changed in place
        # (keeps its position, as ChangeHeader does), the rest deleted or inserted.
        by_name = _opcodes(
            [f.name.lower() for f in original[i1:i2]], [f.name.lower() for f in final[j1:j2]]
        )
        for sub, a1, a2, b1, b2 in by_name:
            if sub == "equal":
                changes.extend(
                    (i1 + a, _value_for_mta(final[j1 + b].value, leading_space))
                    for a, b in zip(range(a1, a2), range(b1, b2), strict=True)
                )
            else:
                changes.extend((i1 + a, b"") for a in range(a1, a2))
                inserted.update(j1 + b for b in range(b1, b2))
    out: list[bytes] = []
    occurrence = _occurrences(original)
    # Last occurrence first: deleting the 1st "X" would renumber the 2nd otherwise.
    for i, value in sorted(changes, reverse=True):
        field = original[i]
        out.append(p.reply_chgheader(occurrence[i], field.name, value))
    # After the changes, the MTA's list holds every kept field of ``final``; inserting
    # the new ones in ascending order puts each at its final position. New fields from
    # ``tail`` on (none of ``final`` after them is kept) are simply appended.
    tail = len(final)
    while tail > 0 and tail - 1 in inserted:
        tail -= 1
    for j in sorted(inserted):
        field = final[j]
        value = _value_for_mta(field.value, leading_space)
        if j >= tail:
            out.append(p.reply_addheader(field.name, value))  # tail: append, no index
        else:
            out.append(p.reply_insheader(j + insert_offset if j else 0, field.name, value))
    return out


def recipient_edits(original: list[str], final: list[str]) -> list[bytes]:
    """SMFIR_DELRCPT for recipients gone, SMFIR_ADDRCPT for new ones (case-insensitive)."""
    orig_l = {r.lower() for r in original}
    final_l = {r.lower() for r in final}
    out = [p.reply_delrcpt(r) for r in original if r.lower() not in final_l]
    added: set[str] = set()
    for r in final:
        if r.lower() not in orig_l and r.lower() not in added:
            added.add(r.lower())
            out.append(p.reply_addrcpt(r))
    return out


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the MTA holds: header fields, body, envelope sender and recipients."""

    fields: list[Field]
    body: bytes
    sender: str
    recipients: list[str]


def all_edits(
    before: Snapshot, after: Snapshot, actions: int, leading_space: bool, insert_offset: int = 0
) -> list[bytes]:
    """Every modification packet, skipping (with a warning) those the MTA did not allow."""
    out: list[bytes] = []
    headers = header_edits(before.fields, after.fields, leading_space, insert_offset)
    if headers:
        if actions & (p.SMFIF_ADDHDRS | p.SMFIF_CHGHDRS) == (p.SMFIF_ADDHDRS | p.SMFIF_CHGHDRS):
            out.extend(headers)
        else:
            log.warning("milter: MTA did not allow header changes; %d edits dropped", len(headers))
    if after.body != before.body:
        if actions & p.SMFIF_CHGBODY:
            out.extend(p.reply_replbody(after.body))
        else:
            log.warning("milter: MTA did not allow body replacement; body change dropped")
    if after.sender != before.sender:
        if actions & p.SMFIF_CHGFROM:
            out.append(p.reply_chgfrom(after.sender))
        else:
            log.warning("milter: MTA did not allow sender changes; change dropped")
    for packet in recipient_edits(before.recipients, after.recipients):
        flag = p.SMFIF_ADDRCPT if packet[4:5] == p.SMFIR_ADDRCPT else p.SMFIF_DELRCPT
        if actions & flag:
            out.append(packet)
        else:
            log.warning("milter: MTA did not allow recipient changes; change dropped")
    return out
