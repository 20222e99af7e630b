"""Verdicts, mutations and routes: what a plugin may return from a hook.

Plugins return *evidence* (a :class:`Result`); the pipeline alone turns the
evidence of all plugins into one decision. Nothing in this module does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Action(enum.StrEnum):
    """What should happen to the message (or the current SMTP command)."""

    CONTINUE = "continue"  # no opinion: run the next plugin
    ACCEPT = "accept"  # stop the chain here and accept
    REJECT = "reject"  # permanent refusal (5xx)
    TEMPFAIL = "tempfail"  # temporary refusal (4xx)
    DISCARD = "discard"  # answer 250 but drop the message
    QUARANTINE = "quarantine"  # answer 250, keep the message out of the mailboxes

    @property
    def is_final(self) -> bool:
        """True when this action ends the plugin chain."""
        return self is not Action.CONTINUE


@dataclass(frozen=True, slots=True)
class SMTPReply:
    """An SMTP reply: code, RFC 3463 enhanced status code and text."""

    code: int
    text: str
    status: str = ""  # enhanced status code, e.g. "5.7.1"

    def __str__(self) -> str:
        status = f"{self.status} " if self.status else ""
        return f"{self.code} {status}{self.text}"

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "status": self.status, "text": self.text}


DEFAULT_REPLIES: dict[Action, SMTPReply] = {
    Action.REJECT: SMTPReply(550, "Message rejected", "5.7.1"),
    Action.TEMPFAIL: SMTPReply(451, "Temporary failure, please try again later", "4.7.1"),
}


# --- mutations (milter's "modification actions") -------------------------------------------


@dataclass(frozen=True, slots=True)
class AddHeader:
    """Prepend (``index=0``, the default) or append (``index=-1``) a header."""

    name: str
    value: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Replace the value of the ``occurrence``-th (1-based) header ``name``.

    ``value=None`` deletes that occurrence.
    """

    name: str
    value: str | None
    occurrence: int = 1


@dataclass(frozen=True, slots=True)
class RemoveHeader:
    """Remove every header called ``name`` (case-insensitive)."""

    name: str


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """Replace everything after the header block with ``body`` (raw bytes, CRLF lines)."""

    body: bytes


@dataclass(frozen=True, slots=True)
class AddRecipient:
    address: str


@dataclass(frozen=True, slots=True)
class RemoveRecipient:
    address: str


@dataclass(frozen=True, slots=True)
class ChangeSender:
    address: str


@dataclass(frozen=True, slots=True)
class SetRoute:
    """Send ``recipient`` (all recipients when None) along ``route``."""

    route: Route
    recipient: str | None = None


Mutation = (
    AddHeader
    | ChangeHeader
    | RemoveHeader
    | ReplaceBody
    | AddRecipient
    | RemoveRecipient
    | ChangeSender
    | SetRoute
)


# --- routes --------------------------------------------------------------------------------


class RouteKind(enum.StrEnum):
    MAILDIR = "maildir"  # local Maildir under the configured root
    LMTP = "lmtp"  # hand to a local mail store over LMTP
    RELAY = "relay"  # smarthost: a fixed upstream host:port
    MX = "mx"  # direct delivery to the recipient domain's MX hosts
    DISCARD = "discard"  # drop this recipient silently


@dataclass(frozen=True, slots=True)
class Route:
    """Where one recipient's copy goes.

    ``target`` names a relay/LMTP target from the config (or ``host:port``);
    ``folder`` is a Maildir++ subfolder such as ``.Junk`` for local delivery;
    ``mailbox`` overrides the local mailbox name (aliases, departments).
    """

    kind: RouteKind
    target: str = ""
    folder: str = ""
    mailbox: str = ""

    def as_dict(self) -> dict[str, str]:
        out = {"kind": self.kind.value}
        for key in ("target", "folder", "mailbox"):
            value = getattr(self, key)
            if value:
                out[key] = value
        return out


# --- results -------------------------------------------------------------------------------


@dataclass(slots=True)
class Symbol:
    """A named piece of evidence with a score, in the spirit of rspamd symbols."""

    name: str
    score: float = 0.0
    reason: str = ""


@dataclass(slots=True)
class Result:
    """What a hook implementation returns.

    Every field is optional: ``Result()`` means "seen, no opinion".

    * ``action`` / ``reply``: a verdict; a final action ends the chain. ``reply``
      overrides the default SMTP answer for reject/tempfail.
    * ``reason``: human text for logs and quarantine (also used as the reply text
      when ``reply`` is not given).
    * ``score`` / ``symbols``: spam evidence added to the message total.
    * ``mutations``: header/body/recipient/sender/route changes (end of message only;
      recipient and sender changes also at RCPT/MAIL).
    * ``details``: anything JSON-serialisable, shown under ``plugins.<name>`` in
      ``mailflow check --json`` and the log line.
    """

    action: Action = Action.CONTINUE
    reply: SMTPReply | None = None
    reason: str = ""
    score: float = 0.0
    symbols: list[Symbol] = field(default_factory=list)
    mutations: list[Mutation] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    # convenience constructors ------------------------------------------------------------

    @classmethod
    def reject(cls, text: str, code: int = 550, status: str = "5.7.1") -> Result:
        return cls(Action.REJECT, SMTPReply(code, text, status), reason=text)

    @classmethod
    def tempfail(cls, text: str, code: int = 451, status: str = "4.7.1") -> Result:
        return cls(Action.TEMPFAIL, SMTPReply(code, text, status), reason=text)

    @classmethod
    def discard(cls, reason: str = "") -> Result:
        return cls(Action.DISCARD, reason=reason)

    @classmethod
    def quarantine(cls, reason: str) -> Result:
        return cls(Action.QUARANTINE, reason=reason)

    @classmethod
    def accept(cls, reason: str = "") -> Result:
        return cls(Action.ACCEPT, reason=reason)

    def smtp_reply(self) -> SMTPReply | None:
        """The SMTP answer this result implies, or None when it implies none."""
        if self.reply is not None:
            return self.reply
        default = DEFAULT_REPLIES.get(self.action)
        if default is None:
            return None
        if self.reason:
            return SMTPReply(default.code, self.reason, default.status)
        return default
