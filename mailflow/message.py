"""The one message model both front ends (SMTP, milter, `check`) feed the pipeline.

Reading the message is lazy and shared: ``fields`` (the top-level header fields) and
``mime`` (the MIME structure, walked at most once per body) come from the one
MIME/text layer, :mod:`mailflow.mime`, cached per version of the message.
``headers`` and ``message`` give the same as stdlib ``email.message.Message`` objects
for plugins that want that API. Plugins never see aiosmtpd or milter types.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import Message
from enum import StrEnum
from typing import Any

from mailflow.mime import (
    HeaderBlock,
    MessageView,
    Structure,
    header_text,
    split_header_fields,
    view,
)
from mailflow.mime.walk import MAX_DEPTH
from mailflow.verdict import (
    Action,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    Mutation,
    RemoveHeader,
    RemoveRecipient,
    ReplaceBody,
    Result,
    Route,
    SetRoute,
    SMTPReply,
)

CRLF = b"\r\n"


@dataclass(slots=True)
class Connection:
    """What is known about the SMTP client.

    ``reverse_name`` is resolved lazily (PTR lookups cost time): call
    ``await conn.resolve_reverse_name()`` in a hook that needs it.
    """

    ip: str
    port: int = 0
    helo: str = ""
    tls: bool = False
    tls_version: str = ""
    authenticated_user: str = ""
    relay_allowed: bool = False  # client network is in relay_networks
    front_end: str = "smtp"  # "smtp" or "milter" (`mailflow check` runs as "smtp")
    # The milter front end: every macro the MTA sent (docs/milter.md); empty otherwise.
    milter_macros: dict[str, str] = field(default_factory=dict)
    connected_at: float = field(default_factory=time.time)
    reverse_name: str | None = None
    _resolver: Callable[[str], Awaitable[str | None]] | None = None

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(self.ip)
        except ValueError:
            return None

    @property
    def trusted(self) -> bool:
        """Authenticated, or connecting from a configured relay network."""
        return bool(self.authenticated_user) or self.relay_allowed

    async def resolve_reverse_name(self) -> str | None:
        """The client's PTR name (cached); None when unknown or lookups are off."""
        if self.reverse_name is None and self._resolver is not None:
            self.reverse_name = await self._resolver(self.ip) or ""
        return self.reverse_name or None


@dataclass(slots=True)
class PluginRun:
    """One plugin's outcome at one stage, kept for ``check --json``, logs and metrics."""

    plugin: str
    stage: str
    result: Result | None
    elapsed_ms: float
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.stage, "time_ms": round(self.elapsed_ms, 3)}
        if self.error:
            out["error"] = self.error
        res = self.result
        if res is not None:
            out["action"] = res.action.value
            if res.score:
                out["score"] = res.score
            if res.reason:
                out["reason"] = res.reason
            if res.symbols:
                out["symbols"] = [
                    {"name": s.name, "score": s.score, "reason": s.reason} for s in res.symbols
                ]
            out.update(res.details)
        else:
            out["action"] = Action.CONTINUE.value
        return out


class Delivery(StrEnum):
    """What became of an accepted message as a whole (``ctx.delivery``; the
    ``delivery`` field of the message log line, as its string value).

    Set by the front end that answered (discarded, quarantined, refused, ...) and by
    the dispatcher (``mailflow.delivery.dispatch``) for what it stored or handed on.
    """

    DELIVERED = "delivered"  # every copy delivered or handed on before the reply
    DELIVERED_QUEUED = "delivered+queued"  # some copies delivered, the others spooled
    QUEUED = "queued"  # spooled; the queue delivers it
    QUARANTINED = "quarantined"
    DISCARDED = "discarded"
    NO_RECIPIENTS = "no recipients left"  # plugins removed every recipient
    REFUSED_UPSTREAM = "refused upstream"  # the next hop refused every copy for good
    STORE_FAILED = "store failed"  # could not be stored: the client was told 451
    REFUSED = "refused"  # milter: the MTA was told to reject or tempfail
    MILTER = "milter"  # milter: handed back to the MTA, which delivers


@dataclass(slots=True)
class Envelope:
    mail_from: str = ""  # "" is the null sender <>
    rcpt_tos: list[str] = field(default_factory=list)
    mail_options: list[str] = field(default_factory=list)


class MessageContext:
    """Envelope + raw message + everything plugins concluded about it.

    Plugins read from it and return :class:`~mailflow.verdict.Result` objects;
    the pipeline (not plugins) applies mutations via :meth:`apply`.
    """

    def __init__(
        self,
        raw: bytes,
        envelope: Envelope,
        connection: Connection,
        queue_id: str = "",
    ) -> None:
        self.queue_id = queue_id
        self.connection = connection
        self.envelope = envelope
        self.received_at = time.time()
        self._raw = raw
        # Counts the changes of ``raw``: a content-analysis worker holding version n
        # of this message needs no new copy of it (mailflow.isolation).
        self.raw_version = 0
        self._headers: Message | None = None
        self._message: Message | None = None
        self.runs: list[PluginRun] = []
        self.score: float = 0.0
        self.headers_added: list[tuple[str, str]] = []
        self.routes: dict[str, Route] = {}
        self.action: Action = Action.CONTINUE
        self.reply: SMTPReply | None = None
        self.reason: str = ""
        self.decided_by: str = ""
        # What became of the message (None until a front end or delivery decides).
        self.delivery: Delivery | None = None
        # The score reached ``actions.junk``: local Maildir copies go to ``.Junk``.
        self.junk = False
        # Which message this is for the content-analysis workers (0: none asked yet).
        self.isolation_token = 0
        # Recipients refused at RCPT while others were accepted: recipient -> reply.
        self.refused_recipients: dict[str, str] = {}
        self._view: MessageView | None = None  # mailflow.mime.view's cache (this version)
        # The plugins' scratch space: what the core itself needs is in typed fields
        # (docs/plugins.md, "Public API").
        self.extra: dict[str, Any] = {}

    # --- raw access -----------------------------------------------------------------------

    @property
    def raw(self) -> bytes:
        """The message as it will be delivered (after mutations applied so far)."""
        return self._raw

    @property
    def size(self) -> int:
        return len(self._raw)

    def split(self) -> tuple[bytes, bytes]:
        """(header block including its final CRLF, body)."""
        raw = self._raw
        if raw.startswith(CRLF):  # no header section at all: everything is body
            return b"", raw[2:]
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            return raw if raw.endswith(CRLF) or not raw else raw + CRLF, b""
        return raw[: end + 2], raw[end + 4 :]

    @property
    def head(self) -> bytes:
        """The header block with its final CRLF, as ``split()[0]`` (without copying
        the body: that is most of a large message)."""
        raw = self._raw
        if raw.startswith(CRLF):
            return b""
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            return raw if raw.endswith(CRLF) or not raw else raw + CRLF
        return raw[: end + 2]

    @property
    def body(self) -> bytes:
        return self.split()[1]

    # --- reading the message (mailflow.mime) ---------------------------------------------

    @property
    def view(self) -> MessageView:
        """This version's header block and MIME structure (:mod:`mailflow.mime.context`)."""
        return view(self)

    @property
    def fields(self) -> HeaderBlock:
        """The top-level header fields: ``get(name)``, ``get_all(name)``, ``names()``
        (text; 8-bit bytes decoded by the charset policy; no RFC 2047 decoding)."""
        return view(self).fields

    @property
    def mime(self) -> Structure:
        """The MIME structure: ``parts``, ``attachments()``, ``body_text()``,
        ``truncated``. Walked on first use, at most once per body (header changes by
        earlier plugins do not cause a second walk)."""
        return view(self).structure

    def header(self, name: str, default: str = "") -> str:
        """The first ``name`` field's value as text (``default`` when absent)."""
        return view(self).fields.get(name, default)

    @property
    def headers(self) -> Message:
        """The header fields as a stdlib compat32 ``Message`` (``.get``, ``.get_all``,
        iteration over names), built from :attr:`fields`; it has no payload: read
        ``body`` or :attr:`mime` for that."""
        if self._headers is None:
            msg = Message()
            block = view(self).fields
            for name, value in block.fields().items():
                msg[name] = header_text(value)
            self._headers = msg
        return self._headers

    @property
    def message(self) -> Message:
        """The full MIME tree as the stdlib compat32 parser builds it (on first use,
        at most once). Use ``part.get_payload(decode=True)`` to decode only the parts
        you need; :attr:`mime` is the faster, bounded way to read parts.

        The stdlib parser's cost grows with the square of the nesting depth; a message
        nested deeper than :data:`~mailflow.mime.walk.MAX_DEPTH` levels (already
        ``mime.truncated``) is parsed with its headers only (the body is one text
        payload), which keeps the cost linear.
        """
        if self._message is None:
            structure = view(self).structure
            if structure.truncated and any(p.depth >= MAX_DEPTH for p in structure.parts):
                self._message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
                    self._raw, headersonly=True
                )
            else:
                self._message = email.message_from_bytes(self._raw, policy=email.policy.compat32)
        return self._message

    def _invalidate(self) -> None:
        """``raw`` changed: drop what was parsed from the old bytes, count the version."""
        self._headers = None
        self._message = None
        self.raw_version += 1

    # --- evidence -------------------------------------------------------------------------

    def record(self, run: PluginRun) -> None:
        self.runs.append(run)
        if run.result is not None:
            self.score += run.result.score

    def result_of(self, plugin: str) -> Result | None:
        """The latest Result ``plugin`` returned at any stage so far (None if it never did).

        A stage where the plugin had no opinion (returned None) does not hide what it
        said earlier, e.g. SPF's MAIL FROM details stay visible after a silent RCPT hook.
        """
        for run in reversed(self.runs):
            if run.plugin == plugin and run.result is not None:
                return run.result
        return None

    def plugin_report(self) -> dict[str, Any]:
        """``{plugin: details}`` merged across stages, for JSON output and logs.

        The top level holds the latest run's fields over the earlier ones' details and
        the total ``time_ms``; ``stages`` lists every run (stage, action, time, reason,
        error) so that e.g. a recipient refused at RCPT is not mistaken for a verdict
        on the whole message.
        """
        report: dict[str, Any] = {}
        for run in self.runs:
            entry = run.as_dict()
            step = {
                k: entry[k] for k in ("stage", "action", "time_ms", "reason", "error") if k in entry
            }
            if run.plugin in report:
                prev = report[run.plugin]
                entry["time_ms"] = round(prev["time_ms"] + entry["time_ms"], 3)
                prev.pop("reason", None)  # a reason belongs to its own stage, kept in stages
                prev.pop("error", None)
                entry = {**prev, **entry, "stages": [*prev["stages"], step]}
            else:
                entry["stages"] = [step]
            report[run.plugin] = entry
        return report

    # --- mutations ------------------------------------------------------------------------

    def apply(self, mutations: list[Mutation]) -> None:
        """Apply mutations in order. Raw bytes stay the single source of truth.

        Header mutations in a row are applied to one list of header fields and the
        message is rebuilt once, not once per mutation (a plugin typically returns
        a remove-then-add pair per header it owns). The usual batch (remove a header
        that is not there, prepend new ones) does not split the header block at all:
        the new fields are put in front of the message bytes.
        """
        fields: list[bytes] | None = None  # header fields being edited, not yet written back
        body = b""
        prepended: list[bytes] = []  # AddHeader(index=0) lines while no field list is needed
        head_lower: bytes | None = None
        for m in mutations:
            match m:
                case AddHeader(name=name, value=value, index=index):
                    line = format_header(name, value)
                    if fields is None and index == 0:
                        prepended.insert(0, line)
                    else:
                        if fields is None:
                            fields, body = self._fields(prepended)
                        if index == 0:
                            fields.insert(0, line)
                        else:
                            fields.append(line)
                    self.headers_added.append((name, value))
                case ChangeHeader(name=name, value=value, occurrence=occ):
                    if fields is None:
                        fields, body = self._fields(prepended)
                    fields = _change_field(fields, name, value, occ)
                case RemoveHeader(name=name):
                    if fields is None:
                        if head_lower is None:
                            head_lower = self.head.lower()
                        lname = name.lower().encode("utf-8", "surrogateescape")
                        if lname not in head_lower and not any(
                            lname in line.lower() for line in prepended
                        ):
                            continue  # nothing to remove (the usual case): one scan in C
                        fields, body = self._fields(prepended)
                    fields = _change_field(fields, name, None, 0)
                case ReplaceBody(body=new_body):
                    if fields is None:
                        fields, _ = self._fields(prepended)
                    body = new_body
                case AddRecipient(address=addr):
                    if addr not in self.envelope.rcpt_tos:
                        self.envelope.rcpt_tos.append(addr)
                case RemoveRecipient(address=addr):
                    self.envelope.rcpt_tos = [
                        r for r in self.envelope.rcpt_tos if r.lower() != addr.lower()
                    ]
                    self.routes.pop(addr, None)
                case ChangeSender(address=addr):
                    self.envelope.mail_from = addr
                case SetRoute(route=route, recipient=rcpt):
                    for r in [rcpt] if rcpt else list(self.envelope.rcpt_tos):
                        self.routes[r] = route
        if fields is not None:
            self._raw = b"".join(fields) + CRLF + body
            self._invalidate()
        elif prepended:
            raw = self._raw
            if raw.startswith(CRLF) or b"\r\n\r\n" in raw:  # split() keeps it as it is
                self._raw = b"".join(prepended) + raw
            else:
                head, body = self.split()
                self._raw = b"".join(prepended) + head + CRLF + body
            self._invalidate()

    def _fields(self, prepended: list[bytes]) -> tuple[list[bytes], bytes]:
        """The header fields (after the lines prepended so far) and the body."""
        head, body = self.split()
        return prepended + split_header_fields(head), body


def _change_field(
    fields: list[bytes], name: str, value: str | None, occurrence: int
) -> list[bytes]:
    """Change the n-th (1-based) ``name`` field; occurrence 0 means every one.

    ``value=None`` removes; changing an occurrence past the last one appends it.
    """
    lname = name.lower().encode()
    if value is None and lname not in b"".join(fields).lower():
        return fields  # nothing to remove (the usual case): one scan in C
    seen = 0
    out: list[bytes] = []
    for f in fields:
        if f[: len(lname)].lower() == lname and f.split(b":", 1)[0].strip().lower() == lname:
            seen += 1
            if occurrence in (0, seen):
                if value is not None:
                    out.append(format_header(name, value))
                continue
        out.append(f)
    if value is not None and occurrence > seen:
        out.append(format_header(name, value))
    return out


def format_header(name: str, value: str) -> bytes:
    """One header field as CRLF-terminated bytes, folded at whitespace (RFC 5322 2.2.3)."""
    # Never let a value smuggle extra header lines in.
    value = " ".join(value.replace("\r", " ").replace("\n", " ").split())
    line = f"{name}: {value}"
    if len(line) <= 78:
        return line.encode("utf-8", "surrogateescape") + CRLF
    words = line.split(" ")
    lines: list[str] = []
    current = words[0]
    for word in words[1:]:
        if len(current) + 1 + len(word) > 78:
            lines.append(current)
            current = "\t" + word
        else:
            current += " " + word
    lines.append(current)
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + CRLF


__all__ = [
    "CRLF",
    "Connection",
    "Envelope",
    "MessageContext",
    "PluginRun",
    "format_header",
    "split_header_fields",  # re-exported from mailflow.mime (the milter diff uses it)
]
