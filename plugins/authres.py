"""One RFC 8601 ``Authentication-Results`` header with every authentication result.

List this plugin after ``spf``, ``dkim``, ``arc`` and ``dmarc`` in the config: it
reads their ``details`` through ``message.result_of(...)`` and writes exactly one
header (built with the ``authres`` library), naming this server by
``app.authserv_id``. Incoming Authentication-Results fields that claim our
authserv-id are forgeries or stale copies and are deleted (RFC 8601 5); fields of
other authserv-ids are kept, as RFC 8601 5 allows. Docs: docs/plugins/authres.md.
"""

from __future__ import annotations

from typing import Any

import authres as ar
from pydantic import BaseModel, ConfigDict

from mailflow.api import (
    AddHeader,
    App,
    ChangeHeader,
    MessageContext,
    Mutation,
    RemoveHeader,
    Result,
    hookimpl,
    mime,
)

HEADER = "Authentication-Results"
MAX_REASON = 120  # characters of a reason= text kept in the header
MAX_SINGLE_REMOVALS = 20  # above this many forged fields, remove all and re-add the others
BUILD_CACHE_MAX = 1024  # header values remembered by their inputs (cleared when full)
_METHODS = ("spf", "dkim", "arc", "dmarc")  # plugins whose results the header reports
_FEATURES = ar.all_features()
_CLASSES = _FEATURES.result_class_by_auth_method
# RFC 8601 2.7 result vocabularies: anything else a plugin reports becomes "none"/"neutral"
_VALID = {
    "spf": {"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror", "policy"},
    "dkim": {"none", "pass", "fail", "policy", "neutral", "temperror", "permerror"},
    "dmarc": {"none", "pass", "fail", "temperror", "permerror"},
    "arc": {"none", "pass", "fail"},
}


class AuthResSettings(BaseModel):
    """``plugins: [{name: authres, settings: {...}}]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    include_reasons: bool = True  # reason="..." for results that are not pass/none
    remove_ours: bool = True  # delete incoming fields claiming our authserv-id


def authserv_id_of(value: str) -> str:
    """The authserv-id that starts an Authentication-Results value (RFC 8601 2.2).

    Written by hand rather than with a full parser, so that malformed or unknown
    method lists (the usual shape of a forgery) are still recognised by their id.
    """
    text = _skip_cfws(value)
    if text.startswith('"'):
        out, escaped = [], False
        for ch in text[1:]:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                break
            else:
                out.append(ch)
        return "".join(out).strip().lower()
    end = len(text)
    for stop in (";", "(", " ", "\t", "\r", "\n"):
        pos = text.find(stop)
        if 0 <= pos < end:
            end = pos
    return text[:end].strip().lower()


def _skip_cfws(text: str) -> str:
    """Drop leading whitespace and (nested) comments."""
    text = text.lstrip()
    while text.startswith("("):
        depth = 0
        for i, ch in enumerate(text):
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    text = text[i + 1 :].lstrip()
                    break
        else:
            return ""  # unterminated comment: nothing usable follows
    return text


def _fields_named(head: bytes, name: str) -> list[str]:
    """Values of every ``name`` field, counted exactly as ChangeHeader counts them.

    The email parser stops at the first line that is not a header field, so a
    forgery placed after such a line would be missed; the core's field splitter
    sees every line up to the blank line, like the mutation that deletes it.
    """
    wanted = name.lower().encode()
    if wanted not in head.lower():  # one C-level scan rules out most messages
        return []
    values = []
    for field in mime.split_header_fields(head):
        fname, sep, value = field.partition(b":")
        if sep and fname.strip().lower() == wanted:
            values.append(value.decode("utf-8", "replace"))
    return values


def _vocab(method: str, result: Any) -> str:
    value = str(result or "none").lower()
    return value if value in _VALID[method] else "none"


def _reason(text: Any) -> str | None:
    clean = " ".join("".join(c if 32 <= ord(c) < 127 else " " for c in str(text)).split())
    clean = clean.replace('"', "'").replace("\\", "/")
    return clean[:MAX_REASON] or None


def _prop(ptype: str, name: str, value: Any) -> ar.AuthenticationResultProperty:
    return ar.AuthenticationResultProperty(ptype, name, str(value))


class AuthResPlugin:
    """Builds the single Authentication-Results header at end of data."""

    Settings = AuthResSettings

    def __init__(self, settings: AuthResSettings | None = None) -> None:
        self.settings = settings or AuthResSettings()
        self.authserv_id = "localhost"
        self._built: dict[tuple[Any, ...], str] = {}

    @hookimpl
    def mailflow_startup(self, app: App) -> None:
        self.authserv_id = app.authserv_id

    # --- one builder per method -----------------------------------------------------------

    def _why(self, details: dict[str, Any], result: str) -> str | None:
        if not self.settings.include_reasons or result in ("pass", "none"):
            return None
        why = details.get("reason") or details.get("explanation")
        return _reason(why) if why else None

    def spf(self, details: dict[str, Any], helo: str) -> list[Any]:
        if not details or "skipped" in details:
            return []
        result = _vocab("spf", details.get("result"))
        props: dict[str, Any] = {}
        if details.get("identity") == "helo" or not details.get("sender"):
            props["smtp_helo"] = details.get("domain") or helo or None
        else:
            props["smtp_mailfrom"] = details.get("sender")
        out = [_CLASSES["spf"](result=result, reason=self._why(details, result), **props)]
        helo_result = details.get("helo_result")
        if "smtp_mailfrom" in props and helo_result and helo_result != "none":
            # The HELO identity was checked too (RFC 7208 2.3): report it on its own.
            out.append(
                _CLASSES["spf"](
                    result=_vocab("spf", helo_result),
                    smtp_helo=details.get("helo_domain") or helo or None,
                )
            )
        return out

    def dkim(self, details: dict[str, Any]) -> list[Any]:
        if not details:
            return []
        signatures = details.get("signatures") or []
        if not signatures:
            result = _vocab("dkim", details.get("result"))
            return [_CLASSES["dkim"](result=result, reason=self._why(details, result))]
        out = []
        for sig in signatures:
            result = _vocab("dkim", sig.get("result"))
            props = []
            if sig.get("selector"):
                props.append(_prop("header", "s", sig["selector"]))
            if sig.get("algorithm"):
                props.append(_prop("header", "a", sig["algorithm"]))
            out.append(
                _CLASSES["dkim"](
                    result=result,
                    reason=self._why(sig, result),
                    header_d=sig.get("domain") or sig.get("header_d") or None,
                    header_i=sig.get("identity") or None,
                    header_b=sig.get("header_b") or None,  # RFC 6008: tells signatures apart
                    properties=props,
                )
            )
        return out

    def arc(self, details: dict[str, Any], ip: str) -> list[Any]:
        if not details or "result" not in details:
            return []
        result = _vocab("arc", details.get("result"))
        return [
            _CLASSES["arc"](result=result, reason=self._why(details, result), smtp_remote_ip=ip)
        ]

    def dmarc(self, details: dict[str, Any]) -> list[Any]:
        if not details or "result" not in details:
            return []
        result = _vocab("dmarc", details.get("result"))
        props = []
        if details.get("policy") in ("none", "quarantine", "reject"):
            props.append(_prop("policy", "dmarc", details["policy"]))
        return [
            _CLASSES["dmarc"](
                result=result,
                reason=self._why(details, result),
                header_from=details.get("from_domain") or None,
                properties=props,
            )
        ]

    def build(self, message: MessageContext) -> str:
        """The header value (without the field name) for ``message``.

        Messages from the same client with the same results get the same value, so
        values are remembered by their inputs (most mail is unsigned, from a few
        relays): formatting through the ``authres`` objects costs more than the key.
        """
        conn = message.connection
        found = {}
        for name in _METHODS:
            res = message.result_of(name)
            found[name] = res.details if res is not None else {}
        key = (self.authserv_id, conn.authenticated_user, conn.helo, conn.ip, repr(found))
        value = self._built.get(key)
        if value is None:
            if len(self._built) >= BUILD_CACHE_MAX:
                self._built.clear()
            value = self._built[key] = self._format(conn, found)
        return value

    def _format(self, conn: Any, found: dict[str, dict[str, Any]]) -> str:
        def details(name: str) -> dict[str, Any]:
            return dict(found[name])

        results: list[Any] = []
        if conn.authenticated_user:
            # RFC 8601 2.7.4: the client authenticated with SMTP AUTH.
            results.append(_CLASSES["auth"](result="pass", smtp_auth=conn.authenticated_user))
        results += self.spf(details("spf"), conn.helo)
        results += self.dkim(details("dkim"))
        results += self.arc(details("arc"), conn.ip)
        results += self.dmarc(details("dmarc"))
        if not results:
            return f"{self.authserv_id}; none"  # RFC 8601 2.2: no method was applied
        header = _FEATURES.header(authserv_id=self.authserv_id, results=results)
        return str(header).partition(":")[2].strip()

    def _removals(self, values: list[Any]) -> tuple[list[Mutation], int]:
        """Mutations deleting the fields that claim our authserv-id, and their count."""
        ours = self.authserv_id.lower()
        claims = [authserv_id_of(str(v)) == ours for v in values]
        count = sum(claims)
        if count <= MAX_SINGLE_REMOVALS:
            # Delete from the last occurrence down, so earlier indexes stay valid.
            return [
                ChangeHeader(HEADER, None, occurrence=index)
                for index in range(len(values), 0, -1)
                if claims[index - 1]
            ], count
        # A flood of forgeries: each single deletion rewrites the header block, so drop
        # every field at once and append the foreign ones again, in their order.
        keep = [str(v) for v, claim in zip(values, claims, strict=True) if not claim]
        mutations: list[Mutation] = [RemoveHeader(HEADER)]
        mutations += [AddHeader(HEADER, v, index=-1) for v in keep]
        return mutations, count

    @hookimpl
    def mailflow_data(self, message: MessageContext) -> Result:
        mutations: list[Mutation] = []
        removed = 0
        if self.settings.remove_ours:
            mutations, removed = self._removals(_fields_named(message.head, HEADER))
        value = self.build(message)
        mutations.append(AddHeader(HEADER, value, index=0))
        return Result(mutations=mutations, details={"header": value, "removed": removed})
