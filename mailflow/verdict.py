"""Verdicts, mutations and routes: what a plugin may return from a hook.

Plugins return *evidence* (a :class:`Result`); the pipeline alone turns the
evidence of all plugins into one decision. Nothing in this module does I/O.
"""

from __future__ import annotations

import enum
import re
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


class Stage(enum.StrEnum):
    """The SMTP phases a verdict can be given at (one pipeline stage each)."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


# The one stage -> reply table (like Haraka's ``<phase>_respond``): what a refusal at
# each stage answers when the plugin gave no ``reply``. A plugin's ``reason`` replaces
# the text, its ``reply`` the whole line (see :func:`refusal_reply`). Every front end
# (SMTP, milter, ``mailflow check``) answers from this table, through
# :mod:`mailflow.transaction`.
STAGE_REPLIES: dict[tuple[Stage, Action], SMTPReply] = {
    # RFC 5321 3.1: 554 instead of the greeting; 421 and close for a temporary refusal.
    (Stage.CONNECT, Action.REJECT): SMTPReply(554, "Connection refused", "5.7.1"),
    (Stage.CONNECT, Action.TEMPFAIL): SMTPReply(421, "Try again later", "4.7.1"),
    (Stage.HELO, Action.REJECT): SMTPReply(550, "HELO/EHLO rejected", "5.7.1"),
    (Stage.HELO, Action.TEMPFAIL): SMTPReply(451, "HELO/EHLO deferred, try again later", "4.7.1"),
    (Stage.MAIL, Action.REJECT): SMTPReply(550, "Sender rejected", "5.7.1"),
    (Stage.MAIL, Action.TEMPFAIL): SMTPReply(451, "Sender deferred, try again later", "4.7.1"),
    (Stage.RCPT, Action.REJECT): SMTPReply(550, "Recipient rejected", "5.7.1"),
    (Stage.RCPT, Action.TEMPFAIL): SMTPReply(451, "Recipient deferred, try again later", "4.7.1"),
    (Stage.DATA, Action.REJECT): SMTPReply(550, "Message rejected", "5.7.1"),
    (Stage.DATA, Action.TEMPFAIL): SMTPReply(
        451, "Temporary failure, please try again later", "4.7.1"
    ),
}

# What each stage does with each final action (docs/plugins.md "Where each verdict is
# honoured"). REFUSE: the reply above ends that command (at connect: the connection);
# PENDING: the transaction's message gets this verdict at end of data; IGNORED: only
# the stage's chain ends. DISCARD at connect and at RCPT can only be a refusal.
REFUSE, PENDING, IGNORED = "refuse", "pending", "ignored"
STAGE_ACTIONS: dict[Stage, dict[Action, str]] = {
    Stage.CONNECT: {
        Action.REJECT: REFUSE,
        Action.TEMPFAIL: REFUSE,
        Action.DISCARD: REFUSE,
        Action.QUARANTINE: IGNORED,
        Action.ACCEPT: IGNORED,
    },
    Stage.HELO: {
        Action.REJECT: REFUSE,
        Action.TEMPFAIL: REFUSE,
        Action.DISCARD: IGNORED,
        Action.QUARANTINE: IGNORED,
        Action.ACCEPT: IGNORED,
    },
    Stage.MAIL: {
        Action.REJECT: REFUSE,
        Action.TEMPFAIL: REFUSE,
        Action.DISCARD: PENDING,
        Action.QUARANTINE: PENDING,
        Action.ACCEPT: IGNORED,
    },
    Stage.RCPT: {
        Action.REJECT: REFUSE,
        Action.TEMPFAIL: REFUSE,
        Action.DISCARD: REFUSE,
        Action.QUARANTINE: PENDING,
        Action.ACCEPT: IGNORED,
    },
}

# RFC 3463 2: class.subject.detail
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")

# Kept for plugins that read it: the data-stage defaults.
DEFAULT_REPLIES: dict[Action, SMTPReply] = {
    Action.REJECT: STAGE_REPLIES[Stage.DATA, Action.REJECT],
    Action.TEMPFAIL: STAGE_REPLIES[Stage.DATA, Action.TEMPFAIL],
}


def refusal_reply(
    stage: Stage, action: Action, reply: SMTPReply | None = None, reason: str = ""
) -> SMTPReply:
    """The answer to a refusal (``action`` reject or tempfail; discard refuses as reject).

    ``reply`` (the plugin's own) is used when its code fits the action: 5xx for reject,
    4xx for tempfail; otherwise its text goes with the table's code and status, so a
    verdict can never come out as a 2xx/3xx "accept". At connect the code is 554 or 421
    whatever the plugin said (RFC 5321 3.1, 4.2.2: the only greeting refusals).

    The text is one line: CR, LF, NUL and runs of white space become one space, so a
    plugin's reason (which may quote a DNS TXT record or a header) cannot add a line
    the client would read as the reply to its next command. A status whose class
    does not match the code (RFC 3463) is replaced by the table's.
    """
    kind = Action.TEMPFAIL if action is Action.TEMPFAIL else Action.REJECT
    default = STAGE_REPLIES[stage, kind]
    wanted = "4" if kind is Action.TEMPFAIL else "5"
    if reply is not None and str(reply.code)[:1] == wanted and 400 <= reply.code < 600:
        chosen = reply
    elif reply is not None and reply.text:
        chosen = SMTPReply(default.code, reply.text, default.status)
    elif reason:
        chosen = SMTPReply(default.code, reason, default.status)
    else:
        chosen = default
    code = default.code if stage is Stage.CONNECT else chosen.code
    status = chosen.status
    if status and not (_STATUS.fullmatch(status) and status[0] == str(code)[0]):
        status = default.status
    return SMTPReply(code, " ".join(chosen.text.replace("\0", " ").split()), status)


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

    def smtp_reply(self, stage: Stage = Stage.DATA) -> SMTPReply | None:
        """The SMTP answer this result implies at ``stage`` (reject and tempfail only)."""
        if self.action not in (Action.REJECT, Action.TEMPFAIL):
            return self.reply
        return refusal_reply(stage, self.action, self.reply, self.reason)
