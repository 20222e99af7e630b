"""The compiled rules engine: same results as the first (interpreted) engine, the
regular-expression pre-filter never changes a match, and the evaluation order rules."""

from __future__ import annotations

import email.message
import email.utils
import ipaddress
import random
import re
from typing import Any

import pytest

from benchmarks.sample import message_template
from mailflow import mime
from mailflow.message import Connection, Envelope, MessageContext, PluginRun
from mailflow.rules import compile_ruleset, evaluate, to_result
from mailflow.rules.engine import Hit
from mailflow.rules.schema import Condition, RuleSet, TextMatch
from mailflow.testing import make_message
from mailflow.verdict import Action, Result, Route, RouteKind, SMTPReply, Symbol

# --- the first engine, kept as the reference --------------------------------------------


def ref_match_text(m: TextMatch, values: list[str]) -> bool:
    if m.exists is not None:
        return bool(values) == m.exists
    fold = (lambda s: s) if m.case_sensitive else str.casefold
    for value in values:
        if m.equals is not None and fold(value) == fold(m.equals):
            return True
        if m.contains is not None and fold(m.contains) in fold(value):
            return True
        if m.matches is not None and re.search(
            m.matches, value, 0 if m.case_sensitive else re.IGNORECASE
        ):
            return True
        if m.one_of is not None and fold(value) in {fold(v) for v in m.one_of}:
            return True
    return False


def ref_header_values(ctx: MessageContext, name: str) -> list[str]:
    return [" ".join(str(v).split()) for v in ctx.headers.get_all(name, [])]


def ref_check(cond: Condition, ctx: MessageContext, recipients: set[str]) -> bool:
    if cond.all is not None:
        return all(ref_check(c, ctx, recipients) for c in cond.all)
    if cond.any is not None:
        return any([ref_check(c, ctx, recipients) for c in cond.any])
    if cond.not_ is not None:
        return not ref_check(cond.not_, ctx, set())
    if cond.header is not None:
        return ref_match_text(cond.header, ref_header_values(ctx, cond.header.name))
    if cond.subject is not None:
        return ref_match_text(cond.subject, ref_header_values(ctx, "Subject"))
    if cond.from_ is not None:
        pairs = email.utils.getaddresses(ref_header_values(ctx, "From"))
        return ref_match_text(cond.from_, [a for _, a in pairs if a])
    if cond.sender is not None:
        return ref_match_text(cond.sender, [ctx.envelope.mail_from])
    if cond.recipient is not None:
        hits = {r for r in ctx.envelope.rcpt_tos if ref_match_text(cond.recipient, [r])}
        recipients |= hits
        return bool(hits)
    if cond.client_ip is not None:
        addr = ctx.connection.address
        return addr is not None and any(
            addr in ipaddress.ip_network(n, strict=False) for n in cond.client_ip
        )
    if cond.authenticated is not None:
        return bool(ctx.connection.authenticated_user) == cond.authenticated
    if cond.size is not None:
        over, under = cond.size.over, cond.size.under
        return (over is None or ctx.size > over) and (under is None or ctx.size < under)
    if cond.score is not None:
        over_s, under_s = cond.score.over, cond.score.under
        return (over_s is None or ctx.score > over_s) and (under_s is None or ctx.score < under_s)
    if cond.body is not None:
        return ref_match_text(cond.body, [mime.body_text(ctx)])
    if cond.attachment is not None:
        want = cond.attachment
        for part in mime.parts(ctx):
            if not part.is_attachment:
                continue
            names = list(part.filenames) or [""]
            if want.filename is not None and not ref_match_text(want.filename, names):
                continue
            if want.content_type is not None and not ref_match_text(
                want.content_type, [part.content_type]
            ):
                continue
            if want.real_type is not None and not ref_match_text(
                want.real_type,
                ["unknown", "application/octet-stream"]
                if part.opaque
                else list(mime.detect(part.payload(), part.filename).labels),
            ):
                continue
            return True
        return False
    if cond.mime_truncated is not None:
        return mime.structure(ctx).truncated == cond.mime_truncated
    if cond.symbol is not None:
        floor = cond.symbol.min_score
        return any(
            s.name.upper() == cond.symbol.name.upper() and (floor is None or s.score >= floor)
            for run in ctx.runs
            if run.result is not None
            for s in run.result.symbols
        )
    raise AssertionError(cond)


def ref_evaluate(ruleset: RuleSet, ctx: MessageContext) -> list[Hit]:
    hits = []
    for rule in ruleset.rules:
        if not rule.enabled:
            continue
        recipients: set[str] = set()
        if ref_check(rule.when, ctx, recipients):
            hits.append(Hit(rule, frozenset(recipients)))
            if rule.then.stop or rule.then.action in ("reject", "tempfail", "discard"):
                break
    return hits


# --- random rule files ------------------------------------------------------------------

WORDS = ["invoice", "Lottery", "wire", "transfer fee", "\u017fecret", "KELVIN", "café", "x.exe", ""]
PATTERNS = [
    r"\binvoice\b",
    r"(?i)\b(lottery|you have won)\b",
    r"wire (the )?transfer fee",
    r"\.(exe|scr)$",
    r"^partner@",
    r"s[e]cret",
    r"kelvin",
    r"(?-i:Lottery)",
    r"caf.",
    r"a|",
    r"\d{3,}",
]


def random_text_match(rng: random.Random, values: list[str]) -> dict[str, Any]:
    op = rng.choice(["equals", "contains", "matches", "one_of", "exists"])
    out: dict[str, Any]
    if op == "exists":
        out = {"exists": rng.random() < 0.5}
    elif op == "matches":
        out = {"matches": rng.choice(PATTERNS)}
    elif op == "one_of":
        out = {"one_of": rng.sample(values + WORDS, 3)}
    else:
        out = {op: rng.choice(values + WORDS)}
    if rng.random() < 0.3:
        out["case_sensitive"] = True
    return out


RECIPIENTS = ["sales@example.com", "Bob@example.com", "legal-x@example.com"]


def random_condition(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    if depth < 3 and rng.random() < 0.4:
        kind = rng.choice(["all", "any", "not"])
        if kind == "not":
            return {"not": random_condition(rng, depth + 1)}
        return {kind: [random_condition(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    kind = rng.choice(
        [
            "header",
            "subject",
            "from",
            "sender",
            "recipient",
            "recipient",
            "client_ip",
            "authenticated",
            "size",
            "score",
            "body",
            "attachment",
            "mime_truncated",
            "symbol",
        ]
    )
    if kind == "header":
        name = rng.choice(["X-Flag", "List-Id", "Subject", "Received"])
        return {"header": {"name": name, **random_text_match(rng, ["1", "list"])}}
    if kind in ("subject", "body"):
        return {kind: random_text_match(rng, ["Lottery", "quarterly", "transfer fee"])}
    if kind == "from":
        return {"from": random_text_match(rng, ["alice@example.org", "partner@example.net"])}
    if kind == "sender":
        return {"sender": random_text_match(rng, ["a@example.org", ""])}
    if kind == "recipient":
        return {"recipient": random_text_match(rng, RECIPIENTS)}
    if kind == "client_ip":
        return {"client_ip": rng.sample(["192.0.2.0/24", "2001:db8::/32", "10.0.0.1/32"], 2)}
    if kind == "authenticated":
        return {"authenticated": rng.random() < 0.5}
    if kind == "size":
        return {"size": {rng.choice(["over", "under"]): rng.choice([100, 3000, 10_000])}}
    if kind == "score":
        return {"score": {"over": rng.choice([-1, 0, 2])}}
    if kind == "mime_truncated":
        return {"mime_truncated": rng.random() < 0.5}
    if kind == "symbol":
        symbol: dict[str, Any] = {"name": rng.choice(["BAYES_SPAM", "phishing_link_mismatch"])}
        if rng.random() < 0.5:
            symbol["min_score"] = rng.choice([1.0, 3.0])
        return {"symbol": symbol}
    want: dict[str, Any] = {}
    if rng.random() < 0.7:
        want["filename"] = random_text_match(rng, ["report.bin", "x.exe"])
    if not want or rng.random() < 0.4:
        want["content_type"] = random_text_match(rng, ["application/pdf", "text/plain"])
    if rng.random() < 0.4:
        want["real_type"] = random_text_match(rng, ["executable", "application/x-dosexec"])
    return {"attachment": want}


def random_ruleset(rng: random.Random) -> RuleSet:
    rules = []
    for i in range(rng.randint(1, 6)):
        then: dict[str, Any] = {"score": rng.choice([0, 1.5, -2])}
        if rng.random() < 0.3:
            then["action"] = rng.choice(["accept", "reject", "tempfail", "discard", "quarantine"])
        if rng.random() < 0.2:
            then["stop"] = True
        if rng.random() < 0.3:
            then["route"] = {"kind": "maildir", "mailbox": f"box{i}"}
        if rng.random() < 0.2:
            then["redirect"] = ["alias@example.com"]
        if rng.random() < 0.2:
            then["add_recipients"] = ["archive@example.com"]
        if rng.random() < 0.3:
            then["add_headers"] = {"X-Rule": str(i)}
            then["remove_headers"] = ["X-Flag"]
        rules.append(
            {
                "name": f"r{i}",
                "enabled": rng.random() < 0.9,
                "when": random_condition(rng),
                "then": then,
            }
        )
    return RuleSet.model_validate({"rules": rules})


def exe_message() -> bytes:
    msg = email.message.EmailMessage()
    msg["From"] = "Partner <partner@example.net>"
    msg["Subject"] = "You have WON the lottery"
    msg["X-Flag"] = "1"
    msg.set_content("Please pay the wire transfer fee.\n" + "padding words here " * 30)
    msg.add_alternative("<p>Pay the <b>wire</b> transfer   fee &amp; win</p>", subtype="html")
    msg.add_attachment(b"MZ", maintype="application", subtype="octet-stream", filename="x.exe")
    return msg.as_bytes().replace(b"\n", b"\r\n")


MESSAGES = [
    message_template(),
    exe_message(),
    make_message(subject="Invoice 2024", body="\u017fecret KELVIN café 12345\r\n" * 20),
    make_message(extra_headers={"List-Id": "<list.example.com>", "X-Flag": "1"}),
]
CLIENTS = [
    Connection("192.0.2.7"),
    Connection("2001:db8::1", authenticated_user="bob"),
    Connection("not an address"),
    Connection("::ffff:192.0.2.7"),
]


def contexts(rng: random.Random) -> list[MessageContext]:
    out = []
    for raw in MESSAGES:
        rcpts = rng.sample([*RECIPIENTS, "other@example.com"], rng.randint(1, 3))
        ctx = MessageContext(raw, Envelope(rng.choice(["a@example.org", ""]), rcpts), CLIENTS[0])
        ctx.connection = rng.choice(CLIENTS)
        ctx.score = rng.choice([0.0, 1.0, 5.0])
        if rng.random() < 0.5:  # an earlier plugin's symbols, for `symbol:`
            found = Symbol(rng.choice(["BAYES_SPAM", "PHISHING_LINK_MISMATCH"]), 2.0)
            ctx.runs.append(PluginRun("earlier", "data", Result(symbols=[found]), 0.1))
        out.append(ctx)
    return out


def result_view(result: Result) -> tuple[Any, ...]:
    return (
        result.action,
        result.score,
        result.reason,
        result.reply,
        result.mutations,
        result.details,
    )


def test_compiled_engine_agrees_with_the_first_engine():
    rng = random.Random(20260522)
    for _ in range(400):
        ruleset = random_ruleset(rng)
        compiled = compile_ruleset(ruleset)
        for ctx in contexts(rng):
            want = ref_evaluate(ruleset, ctx)
            got = evaluate(compiled, ctx)
            assert [(h.rule.name, h.recipients) for h in got] == [
                (h.rule.name, h.recipients) for h in want
            ], ruleset.model_dump(by_alias=True, exclude_defaults=True)
            assert result_view(to_result(got, ctx)) == result_view(ref_to_result(want, ctx))


def ref_to_result(hits: list[Hit], ctx: MessageContext) -> Result:
    from mailflow.verdict import (
        AddHeader,
        AddRecipient,
        Mutation,
        RemoveHeader,
        RemoveRecipient,
        SetRoute,
    )

    result = Result(details={"matched": [h.rule.name for h in hits]})
    for hit in hits:
        then = hit.rule.then
        result.score += then.score
        targets = sorted(hit.recipients) or list(ctx.envelope.rcpt_tos)
        mutations: list[Mutation] = [RemoveHeader(n) for n in then.remove_headers]
        mutations += [AddHeader(n, v) for n, v in then.add_headers.items()]
        if then.route is not None:
            r = then.route
            route = Route(RouteKind(r.kind), r.target, r.folder, r.mailbox)
            mutations += [SetRoute(route, t) for t in targets]
        if then.redirect:
            mutations += [RemoveRecipient(t) for t in targets]
            mutations += [AddRecipient(t) for t in then.redirect]
        mutations += [AddRecipient(t) for t in then.add_recipients]
        result.mutations.extend(mutations)
        if then.action is not None and result.action is Action.CONTINUE:
            result.action = Action(then.action)
            result.reason = then.message or f"rule {hit.rule.name}"
            if then.action in ("reject", "tempfail"):
                code = then.code or (550 if then.action == "reject" else 451)
                reply = then.message or "Message refused by policy"
                result.reply = SMTPReply(code, reply, f"{code // 100}.7.1")
            result.details["decided_by"] = hit.rule.name
    return result


# --- evaluation order and laziness ------------------------------------------------------


def rules(*entries: dict[str, Any]) -> RuleSet:
    return RuleSet.model_validate({"rules": list(entries)})


def ctx_for(raw: bytes, rcpts: list[str] | None = None) -> MessageContext:
    envelope = Envelope("a@example.org", rcpts or ["b@example.com"])
    return MessageContext(raw, envelope, Connection("192.0.2.1"))


def test_any_remembers_every_matching_recipient_and_not_remembers_none():
    ruleset = rules(
        {
            "name": "both",
            "when": {
                "any": [
                    {"recipient": {"equals": "a@example.com"}},
                    {"subject": {"exists": True}},
                    {"recipient": {"equals": "b@example.com"}},
                    {"not": {"recipient": {"equals": "c@example.com"}}},
                ]
            },
            "then": {"route": {"mailbox": "x"}},
        }
    )
    ctx = ctx_for(make_message(), ["a@example.com", "b@example.com", "c@example.com"])
    [hit] = evaluate(ruleset, ctx)
    assert hit.recipients == {"a@example.com", "b@example.com"}


def test_body_is_not_decoded_when_a_cheaper_branch_decides(monkeypatch: pytest.MonkeyPatch):
    calls: list[str] = []
    real = mime.Structure.body_text
    monkeypatch.setattr(mime.Structure, "body_text", lambda s: calls.append("body") or real(s))
    ruleset = rules(
        {
            "name": "r",
            "when": {"any": [{"body": {"contains": "never"}}, {"subject": {"exists": True}}]},
            "then": {"score": 1},
        },
        {
            "name": "s",
            "when": {"all": [{"body": {"contains": "never"}}, {"authenticated": True}]},
            "then": {"score": 1},
        },
    )
    assert [h.rule.name for h in evaluate(ruleset, ctx_for(make_message()))] == ["r"]
    assert calls == []


def test_stop_and_final_actions_end_evaluation():
    ruleset = rules(
        {"name": "a", "when": {"authenticated": False}, "then": {"score": 1}},
        {"name": "b", "when": {"authenticated": False}, "then": {"action": "discard"}},
        {"name": "c", "when": {"authenticated": False}, "then": {"score": 1}},
    )
    assert [h.rule.name for h in evaluate(ruleset, ctx_for(make_message()))] == ["a", "b"]
    ruleset = rules(
        {"name": "a", "enabled": False, "when": {"authenticated": False}, "then": {"stop": True}},
        {"name": "b", "when": {"authenticated": False}, "then": {"action": "quarantine"}},
        {"name": "c", "when": {"authenticated": False}, "then": {"stop": True}},
        {"name": "d", "when": {"authenticated": False}, "then": {}},
    )
    assert [h.rule.name for h in evaluate(ruleset, ctx_for(make_message()))] == ["b", "c"]


def test_attachment_matches_any_of_the_names_a_part_carries():
    part = (
        b'Content-Type: text/plain; name="harmless.txt"\r\n'
        b"Content-Disposition: attachment; filename=\"a.txt\"; filename*=UTF-8''b.exe\r\n\r\nx"
    )
    raw = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n' + part + b"\r\n--b--\r\n"
    ruleset = rules(
        {"name": "exe", "when": {"attachment": {"filename": {"matches": r"\.exe$"}}}, "then": {}}
    )
    assert [h.rule.name for h in evaluate(ruleset, ctx_for(raw))] == ["exe"]


def test_mime_truncated_condition(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(mime.walk, "MAX_PARTS", 5)
    parts = b"".join(b"--b\r\n\r\npart\r\n" for _ in range(10))
    raw = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"
    ruleset = rules({"name": "cut", "when": {"mime_truncated": True}, "then": {"action": "reject"}})
    assert [h.rule.name for h in evaluate(ruleset, ctx_for(raw))] == ["cut"]
    assert evaluate(ruleset, ctx_for(make_message())) == []


def test_client_ip_networks_by_version():
    ruleset = rules(
        {"name": "v4", "when": {"client_ip": ["192.0.2.0/24"]}, "then": {}},
        {"name": "v6", "when": {"client_ip": ["::/0"]}, "then": {}},
    )
    for ip, names in [
        ("192.0.2.200", ["v4"]),
        ("192.0.3.1", []),
        ("2001:db8::5", ["v6"]),
        ("::ffff:192.0.2.1", ["v6"]),
        ("bogus", []),
    ]:
        ctx = ctx_for(make_message())
        ctx.connection = Connection(ip)
        assert [h.rule.name for h in evaluate(ruleset, ctx)] == names, ip


def test_a_rule_set_is_compiled_once():
    ruleset = rules({"name": "r", "when": {"subject": {"exists": True}}, "then": {}})
    assert compile_ruleset(ruleset) is compile_ruleset(ruleset)
    compiled = compile_ruleset(ruleset)
    assert compile_ruleset(compiled) is compiled


def test_shipped_policy_sees_an_exe_inside_a_forwarded_message():
    from pathlib import Path

    from mailflow.rules import load_rules

    policy = load_rules(Path(__file__).resolve().parent.parent / "rules" / "content-policy.yaml")
    inner = exe_message()
    outer = email.message.EmailMessage()
    outer["Subject"] = "fwd"
    outer.set_content("see attached")
    outer.add_attachment(email.message_from_bytes(inner))
    raw = outer.as_bytes().replace(b"\n", b"\r\n")
    hits = evaluate(policy, ctx_for(raw))
    assert hits[0].rule.name == "executable-attachments"
    assert to_result(hits, ctx_for(raw)).reply == SMTPReply(
        554, "Executable attachments are not accepted; please send a link instead", "5.7.1"
    )


# --- grouped matching: every field's tests answered in one pass --------------------------


def test_larger_random_rule_sets_agree_with_the_first_engine():
    """Many rules per set: fields opened by one rule and skipped rules riding on them."""
    rng = random.Random(11)
    for _ in range(40):
        rules_data = []
        for i in range(rng.randint(20, 60)):
            then: dict[str, Any] = {"score": 1}
            if rng.random() < 0.05:
                then["action"] = rng.choice(["reject", "quarantine"])
            if rng.random() < 0.1:
                then["route"] = {"mailbox": f"b{i}"}
            rules_data.append({"name": f"r{i}", "when": random_condition(rng), "then": then})
        ruleset = RuleSet.model_validate({"rules": rules_data})
        compiled = compile_ruleset(ruleset)
        for ctx in contexts(rng):
            got = [(h.rule.name, h.recipients) for h in evaluate(compiled, ctx)]
            want = [(h.rule.name, h.recipients) for h in ref_evaluate(ruleset, ctx)]
            assert got == want


def shipped_and_generated(count: int) -> RuleSet:
    from benchmarks.rule_sets import rule_set

    return RuleSet.model_validate({"rules": rule_set(count)})


def sample_messages(step: int) -> list[bytes]:
    from pathlib import Path

    corpus = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
    files = sorted(p for p in corpus.glob("*/*") if p.is_file())[::step]
    return [*MESSAGES, *(message_template(size, 3) for size in (2048, 20480))] + [
        p.read_bytes() for p in files
    ]


@pytest.mark.parametrize(("count", "step"), [(10, 40), (1000, 400)])
def test_example_and_benchmark_rule_sets_agree_with_the_first_engine(count: int, step: int):
    """The shipped rules/ files (count 10) and the benchmark's 1,000 rules, on the test
    messages and every step-th corpus message (when the corpus is there)."""
    ruleset = shipped_and_generated(count)
    compiled = compile_ruleset(ruleset)
    for raw in sample_messages(step):
        for rcpts in (["bob@example.com"], ["sales@example.com", "legal-x@example.com"]):
            ctx = MessageContext(raw, Envelope("a@example.org", rcpts), Connection("192.0.2.7"))
            got = [(h.rule.name, h.recipients) for h in evaluate(compiled, ctx)]
            want = [(h.rule.name, h.recipients) for h in ref_evaluate(ruleset, ctx)]
            assert got == want, raw[:200]


def test_many_patterns_on_one_field():
    words = [f"token{i:03d}" for i in range(300)]
    ruleset = rules(
        *(
            {"name": w, "when": {"subject": {"matches": rf"\b{w}\b"}}, "then": {"score": 1}}
            for w in words
        ),
        {"name": "contains", "when": {"subject": {"contains": "TOKEN007"}}, "then": {}},
        {"name": "equals", "when": {"subject": {"equals": "x token007 token250"}}, "then": {}},
        {
            "name": "one_of",
            "when": {"subject": {"one_of": ["nope", "X TOKEN007 TOKEN250"]}},
            "then": {},
        },
    )
    ctx = ctx_for(make_message(subject="x token007 token250"))
    assert [h.rule.name for h in evaluate(ruleset, ctx)] == [
        "token007",
        "token250",
        "contains",
        "equals",
        "one_of",
    ]


def test_case_sensitivity_per_test_on_one_field():
    ruleset = rules(
        {"name": "folded", "when": {"subject": {"matches": "invoice"}}, "then": {}},
        {
            "name": "exact",
            "when": {"subject": {"matches": "invoice", "case_sensitive": True}},
            "then": {},
        },
        {"name": "inline-off", "when": {"subject": {"matches": "(?-i:INVOICE)"}}, "then": {}},
        {
            "name": "inline-on",
            "when": {"subject": {"matches": "(?i)invoice", "case_sensitive": True}},
            "then": {},
        },
        {"name": "contains", "when": {"subject": {"contains": "VOICE"}}, "then": {}},
        {
            "name": "contains-exact",
            "when": {"subject": {"contains": "voice", "case_sensitive": True}},
            "then": {},
        },
        {"name": "equals", "when": {"subject": {"equals": "your invoice"}}, "then": {}},
        {
            "name": "equals-exact",
            "when": {"subject": {"equals": "your invoice", "case_sensitive": True}},
            "then": {},
        },
    )
    names = [h.rule.name for h in evaluate(ruleset, ctx_for(make_message(subject="Your INVOICE")))]
    assert names == ["folded", "inline-off", "inline-on", "contains", "equals"]


def test_case_insensitive_contains_is_python_casefold():
    """`contains` compares casefolded text, as before ("ß" is "ss"); Hyperscan's
    caseless mode alone would not find "STRASSE" in "Straße"."""
    ruleset = rules(
        {"name": "ss", "when": {"body": {"contains": "STRASSE"}}, "then": {}},
        {"name": "sharp", "when": {"body": {"contains": "straße"}}, "then": {}},
        {
            "name": "exact",
            "when": {"body": {"contains": "STRASSE", "case_sensitive": True}},
            "then": {},
        },
    )
    hits = evaluate(ruleset, ctx_for(make_message(body="Hauptstraße 1\r\n")))
    assert [h.rule.name for h in hits] == ["ss", "sharp"]


def test_not_of_a_grouped_test():
    ruleset = rules(
        {
            "name": "no-list",
            "when": {"not": {"header": {"name": "List-Id", "exists": True}}},
            "then": {},
        },
        {"name": "not-lottery", "when": {"not": {"subject": {"matches": "lottery"}}}, "then": {}},
        {
            "name": "both",
            "when": {
                "all": [{"subject": {"matches": "report"}}, {"not": {"body": {"contains": "x"}}}]
            },
            "then": {},
        },
    )
    plain = ctx_for(make_message(subject="The report", body="nothing here\r\n"))
    assert [h.rule.name for h in evaluate(ruleset, plain)] == ["no-list", "not-lottery", "both"]
    listed = ctx_for(
        make_message(subject="LOTTERY report", body="x\r\n", extra_headers={"List-Id": "<l>"})
    )
    assert evaluate(ruleset, listed) == []


def test_recipients_recorded_from_grouped_tests():
    ruleset = rules(
        {
            "name": "depts",
            "when": {
                "any": [
                    {"recipient": {"matches": r"^sales(-[a-z]+)?@"}},
                    {"recipient": {"one_of": ["legal@example.com"]}},
                    {"not": {"recipient": {"contains": "nobody"}}},
                ]
            },
            "then": {"route": {"mailbox": "x"}},
        },
        {"name": "exists", "when": {"recipient": {"exists": True}}, "then": {}},
        {"name": "never", "when": {"recipient": {"exists": False}}, "then": {}},
    )
    rcpts = ["sales-eu@example.com", "LEGAL@example.com", "bob@example.com"]
    hits = evaluate(ruleset, ctx_for(make_message(), rcpts))
    assert [(h.rule.name, h.recipients) for h in hits] == [
        ("depts", {"sales-eu@example.com", "LEGAL@example.com"}),
        ("exists", set(rcpts)),
    ]


def test_fields_are_read_only_when_a_rule_needs_them(monkeypatch: pytest.MonkeyPatch):
    """A final rule ends evaluation before later rules' fields are read; a header
    branch that decides an `any` leaves its body branch undecoded."""
    calls: list[str] = []
    real = mime.Structure.body_text
    monkeypatch.setattr(mime.Structure, "body_text", lambda s: calls.append("body") or real(s))
    ruleset = rules(
        {"name": "stop", "when": {"subject": {"matches": "stop"}}, "then": {"action": "reject"}},
        {"name": "body", "when": {"body": {"matches": "anything"}}, "then": {}},
    )
    assert [h.rule.name for h in evaluate(ruleset, ctx_for(make_message(subject="stop")))] == [
        "stop"
    ]
    assert calls == []
    ruleset = rules(
        {
            "name": "either",
            "when": {"any": [{"body": {"matches": "never"}}, {"subject": {"matches": "decides"}}]},
            "then": {},
        }
    )
    assert [h.rule.name for h in evaluate(ruleset, ctx_for(make_message(subject="decides")))] == [
        "either"
    ]
    assert calls == []
    assert evaluate(ruleset, ctx_for(make_message(subject="other"))) == []
    assert calls == ["body"]
