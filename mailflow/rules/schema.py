"""The rule-file format: YAML -> strict models, errors with file, key path and line.

A rule file is a mapping with one key, ``rules``, a list of rules::

    rules:
      - name: invoices-to-accounting
        when: {subject: {contains: invoice}}
        then: {route: {kind: maildir, mailbox: accounting}, add_headers: {X-Dept: accounting}}

See docs/rules.md for every condition and action; :mod:`mailflow.rules.loader` reads
files into these models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mailflow.config import Size, check_networks, first_repeated
from mailflow.rules.patterns import PatternError, translate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TextMatch(_Strict):
    """Exactly one operator; comparisons ignore case unless ``case_sensitive``."""

    equals: str | None = None
    contains: str | None = None
    matches: str | None = None  # a regular expression, searched (docs/rules.md)
    one_of: list[str] | None = None
    exists: bool | None = None
    case_sensitive: bool = False

    @model_validator(mode="after")
    def _one_operator(self) -> TextMatch:
        given = [
            k
            for k in ("equals", "contains", "matches", "one_of", "exists")
            if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError("give exactly one of: equals, contains, matches, one_of, exists")
        if self.matches is not None:
            # Only what can be told from the text; whether the engine can run the
            # pattern is known when the rule set is compiled (mailflow.rules.loader).
            try:
                translate(self.matches)
            except PatternError as exc:
                raise ValueError(str(exc)) from None
        return self


class HeaderMatch(TextMatch):
    name: str


class SizeMatch(_Strict):
    over: Size | None = None
    under: Size | None = None


class ScoreMatch(_Strict):
    over: float | None = None
    under: float | None = None


def _text_shorthand(value: object) -> object:
    """``real_type: executable`` is ``real_type: {equals: executable}``."""
    return {"equals": value} if isinstance(value, str) else value


class AttachmentMatch(_Strict):
    filename: TextMatch | None = None
    content_type: TextMatch | None = None
    # The type told from the content (mailflow.mime.filetype): a kind such as
    # executable, script, archive, office, office-macro, pdf, image, or a MIME type.
    real_type: TextMatch | None = None

    @field_validator("real_type", mode="before")
    @classmethod
    def _shorthand(cls, value: object) -> object:
        return _text_shorthand(value)


class SymbolMatch(_Strict):
    """A symbol an earlier plugin emitted (``PHISHING_LINK_MISMATCH``), optionally
    with at least ``min_score``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    min_score: float | None = None


class Condition(_Strict):
    """Exactly one key per condition; combine with ``all`` / ``any`` / ``not``."""

    all: list[Condition] | None = None
    any: list[Condition] | None = None
    not_: Condition | None = Field(None, alias="not")
    header: HeaderMatch | None = None
    subject: TextMatch | None = None
    from_: TextMatch | None = Field(None, alias="from")  # address(es) in the From header
    sender: TextMatch | None = None  # envelope sender (MAIL FROM)
    recipient: TextMatch | None = None  # any envelope recipient
    client_ip: list[str] | None = None  # CIDR networks
    authenticated: bool | None = None
    size: SizeMatch | None = None
    body: TextMatch | None = None  # decoded text of the message body
    attachment: AttachmentMatch | None = None
    score: ScoreMatch | None = None  # total spam score from earlier plugins
    mime_truncated: bool | None = None  # the MIME walk stopped at a limit (mailflow.mime)
    symbol: SymbolMatch | None = None  # a symbol emitted by a plugin that ran before

    @model_validator(mode="after")
    def _one_key(self) -> Condition:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            names = ", ".join(f.alias or k for k, f in type(self).model_fields.items())
            raise ValueError(f"a condition needs exactly one of: {names}")
        return self

    @field_validator("client_ip")
    @classmethod
    def _networks(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_networks(value)


class RouteSpec(_Strict):
    kind: Literal["maildir", "lmtp", "relay", "mx", "discard"] = "maildir"
    target: str = ""
    folder: str = ""
    mailbox: str = ""


class Then(_Strict):
    action: Literal["accept", "reject", "tempfail", "discard", "quarantine"] | None = None
    message: str = ""  # SMTP reply text for reject/tempfail; reason otherwise
    code: int | None = Field(None, ge=400, le=599)
    score: float = 0.0
    add_headers: dict[str, str] = {}
    remove_headers: list[str] = []
    route: RouteSpec | None = None  # for the recipients the rule matched (or all)
    redirect: list[str] = []  # replace the matched recipients by these (aliases)
    add_recipients: list[str] = []  # send a copy to these too (forwarding, archives)
    stop: bool = False  # evaluate no further rules after this one matched

    @model_validator(mode="after")
    def _code_fits_action(self) -> Then:
        if self.code is not None:
            want = {"reject": 5, "tempfail": 4}.get(self.action or "")
            if want is None or self.code // 100 != want:
                raise ValueError("code needs action reject (5xx) or tempfail (4xx)")
        return self


class Rule(_Strict):
    name: str
    enabled: bool = True
    when: Condition
    then: Then


class RuleSet(_Strict):
    rules: list[Rule] = []

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, value: list[Rule]) -> list[Rule]:
        twice = first_repeated(rule.name for rule in value)
        if twice is not None:
            raise ValueError(f"rule name {twice!r} is used twice")
        return value
