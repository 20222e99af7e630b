"""Builtin plugin ``attachments``: attachment policy by what the files really are.

At end of DATA every attachment (and every file inside its archives, nested) is
typed from its content (:mod:`mailflow.mime.filetype`, magic bytes), compared with
its name and declared Content-Type, and checked against the policy: sizes and
count, blocked/allowed kinds and extensions, double extensions and bidi-control
characters in names, Office macros, encrypted archives and archive bombs. Each
finding is a symbol with a score and an action (``reject``, ``quarantine``,
``strip``: the attachment is replaced by a short text note, or ``score``: the symbol
only). See docs/plugins/attachments.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mailflow_plugins.attachments.archive import Budget, Limits, inspect, zip_inside
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from mailflow.api import MessageContext, ReplaceBody, Result, Symbol, hookimpl, mime

Action = Literal["reject", "quarantine", "strip", "score"]
_RANK = {"score": 0, "strip": 1, "quarantine": 2, "reject": 3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


def _size(value: Any) -> Any:
    """Accept 1048576, "25M", "25MiB", "1.5G" (powers of 1024)."""
    if isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"expected a size such as 10485760, '25M' or '1G', got {value!r}")
        unit = (m.group(2) or "b").lower()[0]
        return int(float(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit])
    return value


Size = Annotated[int, BeforeValidator(_size), Field(ge=0)]

# Symbol -> (default score, default action).
SYMBOLS: dict[str, tuple[float, Action]] = {
    "ATTACHMENT_EXECUTABLE": (10.0, "reject"),
    "ATTACHMENT_SCRIPT": (10.0, "reject"),
    "ATTACHMENT_BLOCKED_TYPE": (10.0, "reject"),
    "ATTACHMENT_NOT_ALLOWED": (10.0, "reject"),
    "ATTACHMENT_RTLO": (10.0, "reject"),
    "ATTACHMENT_DOUBLE_EXTENSION": (6.0, "score"),
    "ATTACHMENT_TYPE_MISMATCH": (3.0, "score"),
    "ATTACHMENT_MACRO": (5.0, "quarantine"),
    "ATTACHMENT_TOO_BIG": (0.0, "reject"),
    "ATTACHMENTS_TOO_BIG": (0.0, "reject"),
    "ATTACHMENTS_TOO_MANY": (0.0, "reject"),
    "ARCHIVE_BOMB": (10.0, "reject"),
    "ARCHIVE_ENCRYPTED": (3.0, "quarantine"),
    "ARCHIVE_MALFORMED": (4.0, "score"),
    "ARCHIVE_UNINSPECTED": (1.0, "score"),
    # Past the MIME walk's limits (parts, depth): never decoded, so never checked.
    "ATTACHMENT_UNINSPECTED": (5.0, "quarantine"),
}
# Bidirectional-text controls: U+202E (RIGHT-TO-LEFT OVERRIDE) makes "exe.pdf" of
# "\u202efdp.exe"; the others reorder or hide text the same way.
_BIDI = frozenset("\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_DECLARED_KINDS = {
    "application/pdf": "pdf",
    "application/zip": "archive",
    "application/x-zip-compressed": "archive",
    "application/gzip": "archive",
    "application/x-gzip": "archive",
    "application/msword": "office",
    "application/vnd.ms-excel": "office",
    "application/vnd.ms-powerpoint": "office",
    "application/rtf": "rtf",
    "text/html": "html",
}
_DOC_KINDS = frozenset({"pdf", "office", "rtf", "image", "text", "html", "audio", "video"})
_NOTE = (
    "The attachment {name!r} ({real}) was removed by the mail filter: {reason}.\n"
    "Ask the sender to share it another way if you expected it."
)


class ArchiveSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    inspect: bool = True
    max_depth: int = Field(4, ge=1, le=16)
    max_members: int = Field(1000, ge=1, le=100_000)
    max_expanded: Size = Field(32 << 20, le=1 << 30)
    max_ratio: int = Field(200, ge=2, le=100_000)


class AttachmentsSettings(BaseModel):
    """``plugins: [{name: attachments, settings: {...}}]`` in mailflow.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_size: Size = 25 << 20  # one attachment, decoded; 0: no limit
    max_total_size: Size = 50 << 20  # all attachments together; 0: no limit
    max_count: int = Field(100, ge=0)  # 0: no limit
    blocked_kinds: list[str] = ["executable", "script", "shortcut", "disk-image"]
    blocked_extensions: list[str] = []  # extra names blocked whatever the content
    allowed_kinds: list[str] = []  # when set, any other kind is ATTACHMENT_NOT_ALLOWED
    encrypted: Literal["allow", "quarantine", "reject"] = "quarantine"
    archives: ArchiveSettings = ArchiveSettings()
    scores: dict[str, float] = {}  # symbol -> score, overriding the defaults
    actions: dict[str, Action] = {}  # symbol -> action, overriding the defaults

    def model_post_init(self, _: Any) -> None:
        for key in (*self.scores, *self.actions):
            if key not in SYMBOLS:
                raise ValueError(f"unknown symbol {key!r} (known: {', '.join(SYMBOLS)})")
        for kind in (*self.blocked_kinds, *self.allowed_kinds):
            if kind not in mime.KINDS and kind != "office-macro":
                raise ValueError(f"unknown kind {kind!r} (known: {', '.join(mime.KINDS)})")


def _shown(text: str, limit: int = 200) -> str:
    """Printable ASCII for logs and SMTP replies: anything else (bidi controls
    included) as a \\uXXXX escape."""
    if not text:
        return "(no name)"
    out: list[str] = []
    used = 0
    for c in text:  # at most ``limit`` characters shown, escapes (6 each) included
        piece = c if " " <= c <= "~" else f"\\u{ord(c):04x}"
        if used + len(piece) > limit:
            return "".join(out) + "..."
        out.append(piece)
        used += len(piece)
    return "".join(out)


@dataclass
class Finding:
    symbol: str
    reason: str
    index: int  # which attachment (-1: the message as a whole)


class AttachmentsPlugin:
    """Types every attachment from its content and applies the attachment policy."""

    Settings = AttachmentsSettings
    # CPU work linear in the attachments (decoding, archive reading within the
    # budgets): large messages go to a content-analysis worker (docs/plugins.md).
    isolate = "large"

    def __init__(self, settings: AttachmentsSettings | None = None) -> None:
        self.settings = s = settings or AttachmentsSettings()
        self.limits = Limits(
            s.archives.max_depth,
            s.archives.max_members,
            s.archives.max_expanded,
            s.archives.max_ratio,
        )
        self.blocked = frozenset(s.blocked_kinds)
        self.allowed = frozenset(s.allowed_kinds)
        self.blocked_ext = frozenset(e.lower().lstrip(".") for e in s.blocked_extensions)
        self.score_of = {k: s.scores.get(k, v[0]) for k, v in SYMBOLS.items()}
        self.action_of: dict[str, Action] = {k: s.actions.get(k, v[1]) for k, v in SYMBOLS.items()}
        if s.encrypted == "allow":
            self.action_of["ARCHIVE_ENCRYPTED"] = "score"
        else:
            self.action_of["ARCHIVE_ENCRYPTED"] = s.actions.get("ARCHIVE_ENCRYPTED", s.encrypted)

    @hookimpl
    def mailflow_data(self, message: MessageContext) -> Result | None:
        parts = message.mime.attachments()
        if not parts:
            return None
        return self.check(message, parts)

    # --- the checks -----------------------------------------------------------------------

    def check(self, message: MessageContext, parts: list[mime.Part]) -> Result:
        s = self.settings
        findings: list[Finding] = []
        described: list[dict[str, Any]] = []
        budget = Budget(self.limits)
        total = 0
        if s.max_count and len(parts) > s.max_count:
            findings.append(
                Finding("ATTACHMENTS_TOO_MANY", f"{len(parts)} attachments > {s.max_count}", -1)
            )
        for index, part in enumerate(parts):
            info, size = self._part(part, index, findings, budget)
            described.append(info)
            total += size
        if s.max_total_size and total > s.max_total_size:
            findings.append(
                Finding("ATTACHMENTS_TOO_BIG", f"{total} bytes > {s.max_total_size}", -1)
            )
        return self._result(message, parts, findings, described, budget)

    def _part(
        self, part: mime.Part, index: int, findings: list[Finding], budget: Budget
    ) -> tuple[dict[str, Any], int]:
        s = self.settings
        names = part.filenames or ("",)
        name = names[0]
        info: dict[str, Any] = {"name": _shown(name), "declared_type": part.content_type}
        if part.opaque:
            info.update(real_type="unknown", size=part.size, opaque=True)
            # Whatever hides past the limit (an .exe after 1,000 parts) is unseen:
            # held for a person by default rather than passed as checked.
            findings.append(
                Finding(
                    "ATTACHMENT_UNINSPECTED",
                    f"{_shown(name)}: {part.size} bytes past the MIME walk's limits, not inspected",
                    index,
                )
            )
            return info, part.size
        data = part.payload()
        real = mime.part_type(part)
        info.update(real_type=real.kind, real_mime=real.mime, size=len(data))
        if real.macros:
            info["macros"] = True

        shown = _shown(name)

        def add(symbol: str, reason: str) -> None:
            findings.append(Finding(symbol, f"{shown}: {_shown(reason)}", index))

        if s.max_size and len(data) > s.max_size:
            add("ATTACHMENT_TOO_BIG", f"{len(data)} bytes > {s.max_size}")
        for each in names:
            self._name(each, real, part.content_type, add)
        self._kind(real, name, add)
        for other in names[1:]:
            # Content-Type name= and Content-Disposition filename= can differ, and
            # mail clients differ in which one they save the file under.
            ext = mime.extension(other)
            if ext != mime.extension(name) and (
                ext in self.blocked_ext or mime.EXTENSION_KINDS.get(ext, "") in self.blocked
            ):
                add("ATTACHMENT_BLOCKED_TYPE", f"blocked file name extension .{ext} (other name)")
        if (real.kind in ("archive", "office") or zip_inside(data, real)) and s.archives.inspect:
            before = len(budget.found)
            seen = (len(budget.hits), len(budget.malformed), len(budget.encrypted))
            inspect(data, real, name or f"attachment{index}", budget)
            inner = budget.found[before:]
            if inner:
                info["members"] = [
                    {"path": m.path, "real_type": m.real.kind, "real_mime": m.real.mime}
                    for m in inner[:20]
                ]
            for member in inner:
                # An encrypted member's content is unknown: it is judged by its name.
                if any(c in _BIDI for c in member.name):
                    add(
                        "ATTACHMENT_RTLO",
                        f"bidirectional control character in a file name inside ({member.path})",
                    )
                self._double(member.name, member.path, add)
                self._kind(member.real, member.name, add, inside=member.path)
            for hit in budget.hits[seen[0] :]:
                add("ARCHIVE_BOMB", hit)
            for bad in budget.malformed[seen[1] :]:
                add("ARCHIVE_MALFORMED", bad)
            if len(budget.encrypted) > seen[2]:
                add("ARCHIVE_ENCRYPTED", f"encrypted member {budget.encrypted[seen[2]]}")
            for what in budget.uninspected:
                if what.startswith(name or f"attachment{index}"):
                    add("ARCHIVE_UNINSPECTED", f"not opened: {what}")
            budget.uninspected.clear()
        return info, len(data)

    def _kind(self, real: mime.FileType, name: str, add: Any, inside: str = "") -> None:
        where = f" inside ({inside})" if inside else ""
        ext = mime.extension(name)
        labels = set(real.labels)
        if real.kind == "executable" and "executable" in self.blocked:
            add("ATTACHMENT_EXECUTABLE", f"executable ({real.mime}){where}")
        elif real.kind == "script" and "script" in self.blocked:
            add("ATTACHMENT_SCRIPT", f"script ({real.mime}){where}")
        elif labels & self.blocked:
            add("ATTACHMENT_BLOCKED_TYPE", f"blocked type {real.kind} ({real.mime}){where}")
        elif ext in self.blocked_ext or mime.EXTENSION_KINDS.get(ext, "") in self.blocked:
            add("ATTACHMENT_BLOCKED_TYPE", f"blocked file name extension .{ext}{where}")
        if self.allowed and not labels & self.allowed and real.kind != "archive":
            add("ATTACHMENT_NOT_ALLOWED", f"type {real.kind} is not allowed{where}")
        if real.macros:
            add("ATTACHMENT_MACRO", f"Office document with macros{where}")

    def _name(self, name: str, real: mime.FileType, declared: str, add: Any) -> None:
        if any(c in _BIDI for c in name):
            add("ATTACHMENT_RTLO", "bidirectional control character in the file name")
        self._double(name, "", add)
        ext = mime.extension(name)
        expected = mime.EXTENSION_KINDS.get(ext)
        told = real.kind not in ("unknown", "text") or expected in _DOC_KINDS - {"text"}
        docx_zip = expected == "archive" and real.kind == "office"  # a .zip of a docx is ok
        if expected and told and expected != real.kind and real.kind != "unknown" and not docx_zip:
            add("ATTACHMENT_TYPE_MISMATCH", f"named .{ext} but is {real.kind} ({real.mime})")
            return
        want = _DECLARED_KINDS.get(declared) or (
            declared.split("/", 1)[0] if declared.startswith(("image/", "audio/", "video/")) else ""
        )
        if want and real.kind not in ("unknown", want) and real.kind != "text":
            add("ATTACHMENT_TYPE_MISMATCH", f"declared {declared} but is {real.kind} ({real.mime})")

    def _double(self, name: str, inside: str, add: Any) -> None:
        """``invoice.pdf.exe``, ``invoice.pdf      .exe``: a document extension
        before an extension that runs."""
        base = name.rstrip(" .").rsplit("/", 1)[-1]
        pieces = base.split(".")
        if len(pieces) < 3:
            return
        last = pieces[-1].strip().lower()
        before = pieces[-2].strip().lower()
        runs = mime.EXTENSION_KINDS.get(last) in mime.DANGEROUS_KINDS
        if runs and mime.EXTENSION_KINDS.get(before) in _DOC_KINDS | {"archive"}:
            where = f" inside ({inside})" if inside else ""
            add("ATTACHMENT_DOUBLE_EXTENSION", f"double extension .{before}.{last}{where}")

    # --- the verdict ----------------------------------------------------------------------

    def _result(
        self,
        message: MessageContext,
        parts: list[mime.Part],
        findings: list[Finding],
        described: list[dict[str, Any]],
        budget: Budget,
    ) -> Result:
        details: dict[str, Any] = {"attachments": described}
        if budget.members or budget.hits:
            details["archives"] = budget.counters()
        if not findings:
            return Result(details=details)
        symbols: dict[str, Symbol] = {}
        worst: Action = "score"
        strip: dict[int, list[str]] = {}
        acted: list[tuple[Finding, Action]] = []
        for f in findings:
            if f.symbol not in symbols:
                symbols[f.symbol] = Symbol(f.symbol, self.score_of[f.symbol], f.reason)
            action = self.action_of[f.symbol]
            if action == "strip" and f.index < 0:
                action = "reject"  # nothing to strip for a whole-message finding
            if action == "strip":
                strip.setdefault(f.index, []).append(f.reason)
            if _RANK[action] > _RANK[worst]:
                worst = action
            acted.append((f, action))
        for index, f_list in strip.items():
            described[index]["stripped"] = True
            described[index]["strip_reasons"] = f_list[:5]
        score = sum(sym.score for sym in symbols.values())
        first = next(f for f, action in acted if action == worst)
        reason = first.reason
        details["findings"] = [{"symbol": f.symbol, "reason": f.reason} for f in findings[:50]]
        syms = list(symbols.values())
        if worst == "reject":
            too_big = first.symbol in ("ATTACHMENT_TOO_BIG", "ATTACHMENTS_TOO_BIG")
            text = f"Attachment refused: {reason}"
            refusal = Result.reject(text, 552, "5.3.4") if too_big else Result.reject(text)
            return Result(
                action=refusal.action,
                reason=text,
                reply=refusal.reply,
                score=score,
                symbols=syms,
                details=details,
            )
        if worst == "quarantine":
            q = Result.quarantine(f"attachment: {reason}")
            return Result(
                action=q.action, reason=q.reason, score=score, symbols=syms, details=details
            )
        if worst == "strip":
            body = self._strip(message, parts, strip, described)
            if body is None:  # cannot be cut out cleanly: hold it rather than pass it
                details["strip_failed"] = True
                q = Result.quarantine(f"attachment (could not strip): {reason}")
                return Result(
                    action=q.action, reason=q.reason, score=score, symbols=syms, details=details
                )
            return Result(
                score=score,
                reason=f"stripped: {reason}",
                symbols=syms,
                mutations=[ReplaceBody(body)],
                details=details,
            )
        return Result(score=score, reason=reason, symbols=syms, details=details)

    def _strip(
        self,
        message: MessageContext,
        parts: list[mime.Part],
        strip: dict[int, list[str]],
        described: list[dict[str, Any]],
    ) -> bytes | None:
        raw = message.raw
        edits = []
        for index, reasons in strip.items():
            info = described[index]
            note = _NOTE.format(
                name=info["name"] or "(no name)",
                real=info.get("real_mime", "unknown type"),
                reason=reasons[0].split(": ", 1)[-1],
            )
            edits.append((parts[index], mime.note_entity(note)))
        new = mime.replace_parts(raw, edits)
        if new is None:
            return None
        head = message.head
        return new[len(head) + 2 :] if head else new


__all__ = ["SYMBOLS", "AttachmentsPlugin", "AttachmentsSettings"]
