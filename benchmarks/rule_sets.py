"""Generated, realistic rule files for the rules benchmark (and its tests).

What a mail admin's local rule set looks like (SpamAssassin local.cf or rspamd
multimap rules translated into mailflow's YAML): subject and header patterns
with word boundaries and alternations, From-domain patterns, body phrases, a few
character classes and counted repeats, ``contains`` tests, block lists as
``equals``/``one_of``, routing by recipient, attachments by name or type,
trusted networks and size limits; some ``all``/``any``/``not`` combinations.
Most rules do not match a typical message, as in real mail, but some do (words
such as "invoice" or "report" are in both the vocabulary and the test messages).

Every pattern is valid for Python's ``re`` and for the rules engine, so the same
rule set can be timed on the engine before and after a change.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "rules").glob("*.yaml"))

SPAM_WORDS = [
    "viagra",
    "lottery",
    "jackpot",
    "bitcoin",
    "crypto",
    "pharmacy",
    "casino",
    "loan",
    "mortgage",
    "refinance",
    "diploma",
    "replica",
    "rolex",
    "weight loss",
    "act now",
    "limited time",
    "risk free",
    "wire transfer",
    "bank account",
    "inheritance",
    "beneficiary",
    "urgent",
    "confidential",
    "investment",
    "guaranteed",
    "cheap",
    "discount",
    "pills",
    "dating",
    "singles",
    "prize",
    "congratulations",
    "verify your account",
    "suspended",
    "unclaimed",
    "wholesale",
    "seo services",
    "web design",
    "click below",
    "earn money",
]
HAM_WORDS = ["invoice", "report", "meeting", "agenda", "order", "delivery", "password"]
DOMAINS = ["spam-example", "bulkmail", "promo-deals", "cheap-meds", "win-big", "newsletter"]
TLDS = ["com", "net", "ru", "cn", "xyz", "top", "info"]
HEADERS = [
    "X-Mailer",
    "User-Agent",
    "Reply-To",
    "Message-ID",
    "List-Id",
    "List-Unsubscribe",
    "Content-Type",
    "Return-Path",
    "To",
    "X-Priority",
    "Received",
    "Precedence",
]
MAILERS = ["PHPMailer", "Mass Mailer", "Outlook Express 6", "The Bat!", "Sendblaster", "Atomic"]


def _word(rng: random.Random) -> str:
    return rng.choice(HAM_WORDS) if rng.random() < 0.02 else rng.choice(SPAM_WORDS)


def _escape(text: str) -> str:
    return text.replace(".", r"\.")


def _phrase_pattern(rng: random.Random) -> str:
    """A subject/body pattern of the kinds admins write."""
    a, b, c = _word(rng), _word(rng), _word(rng)
    kind = rng.randrange(10)
    if kind == 0:
        return rf"\b{a}\b"
    if kind == 1:
        return rf"\b({a}|{b}|{c})\b"
    if kind == 2:
        return rf"\b{a}\s+(now|today|online)\b"
    if kind == 3:
        return rf"^(re|fwd?): {a}"
    if kind == 4:
        return rf"\$\d+(,\d{{3}})*(\.\d\d)? {a}"
    if kind == 5:
        return rf"[A-Z]{{6,}} {a}"
    if kind == 6:
        return rf"\b{a}[0-9]{{2,4}}\b"
    if kind == 7:
        return rf"\b(free|cheap|best) {a}\b"
    if kind == 8:
        return rf"{a}.{{0,20}}{b}"
    return rf"\b{a} (and|or|&) {b}\b"


def _text_match(rng: random.Random, field: str) -> dict[str, Any]:
    """A text operator for ``field`` (subject, body, from, header or sender)."""
    roll = rng.random()
    if field == "from" or field == "sender":
        domain, tld = rng.choice(DOMAINS), rng.choice(TLDS)
        if roll < 0.5:
            return {"matches": rf"@([a-z0-9-]+\.)*{_escape(domain)}\.{tld}$"}
        if roll < 0.7:
            return {"equals": f"{rng.choice(['sales', 'info', 'promo'])}@{domain}.{tld}"}
        if roll < 0.9:
            return {"one_of": [f"u{rng.randrange(999)}@{d}.{tld}" for d in DOMAINS[:4]]}
        return {"contains": f"{domain}."}
    if roll < 0.72:
        out: dict[str, Any] = {"matches": _phrase_pattern(rng)}
    elif roll < 0.97:
        out = {"contains": _word(rng)}
    else:
        out = {"equals": f"{_word(rng)} {_word(rng)}"}
    if rng.random() < 0.1:
        out["case_sensitive"] = True
    return out


def _header_condition(rng: random.Random) -> dict[str, Any]:
    name = rng.choice(HEADERS)
    roll = rng.random()
    if name == "X-Mailer" or name == "User-Agent":
        if roll < 0.6:
            return {"header": {"name": name, "matches": rf"^{rng.choice(MAILERS)}( [0-9.]+)?$"}}
        return {"header": {"name": name, "contains": rng.choice(MAILERS)}}
    if name == "List-Id" or name == "List-Unsubscribe" or name == "Precedence":
        if roll < 0.3:
            return {"header": {"name": name, "exists": True}}
        return {"header": {"name": name, "matches": rf"{rng.choice(DOMAINS)}\.{rng.choice(TLDS)}"}}
    if name == "Message-ID":
        return {"header": {"name": name, "matches": rf"@{rng.choice(DOMAINS)}\.[a-z]+>$"}}
    if name == "Content-Type":
        return {"header": {"name": name, "matches": r'charset="?(koi8-r|gb2312|big5)'}}
    if name == "X-Priority":
        return {"header": {"name": name, "one_of": ["1", "1 (Highest)", "2 (High)"]}}
    if name == "Received":
        return {"header": {"name": name, "matches": rf"from \S+\.{rng.choice(TLDS)} \("}}
    return {"header": {"name": name, "matches": rf"@{rng.choice(DOMAINS)}\.{rng.choice(TLDS)}"}}


def _leaf(rng: random.Random) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.22:
        return {"subject": _text_match(rng, "subject")}
    if roll < 0.38:
        return _header_condition(rng)
    if roll < 0.50:
        return {"from": _text_match(rng, "from")}
    if roll < 0.53:
        return {"sender": _text_match(rng, "sender")}
    if roll < 0.58:
        dept = rng.choice(["sales", "billing", "support", "legal", "hr", "jobs"])
        if rng.random() < 0.5:
            return {"recipient": {"matches": rf"^{dept}(-[a-z]+)?@example\.com$"}}
        return {"recipient": {"one_of": [f"{dept}@example.com", f"{dept}-team@example.com"]}}
    if roll < 0.82:
        return {"body": _text_match(rng, "body")}
    if roll < 0.88:
        if rng.random() < 0.6:
            kinds = ["exe", "scr", "zip", "rar", "js", "iso", "docm", "xlsm"]
            exts = "|".join(rng.sample(kinds, 3))
            return {"attachment": {"filename": {"matches": rf"\.({exts})$"}}}
        kind = rng.choice(["application/zip", "application/x-msdownload", "application/pdf"])
        return {"attachment": {"content_type": {"equals": kind}}}
    if roll < 0.93:
        net = f"{rng.randrange(1, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.0/24"
        return {"client_ip": [net, "2001:db8::/32"]}
    if roll < 0.96:
        return {"size": {"over": rng.choice(["5M", "10M", "20M"])}}
    return {"authenticated": True}  # e.g. "our own users are not scored"


def _condition(rng: random.Random) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.08:
        return {"all": [_leaf(rng), _leaf(rng)]}
    if roll < 0.14:
        return {"any": [_leaf(rng), _leaf(rng), _leaf(rng)]}
    if roll < 0.16:
        return {"all": [_leaf(rng), {"not": _leaf(rng)}]}
    return _leaf(rng)


def _then(rng: random.Random, index: int) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.75:
        return {"score": round(rng.uniform(-2.0, 4.0), 1)}
    if roll < 0.88:
        return {"score": 1.0, "add_headers": {"X-Rule-Hit": f"r{index}"}}
    if roll < 0.97:
        return {"route": {"kind": "maildir", "mailbox": f"box{index % 20}"}}
    return {"action": "quarantine", "score": 2.0}


def generated_rules(count: int, seed: int = 1) -> list[dict[str, Any]]:
    """``count`` generated rules (plain data, as a rule file's ``rules`` list)."""
    rng = random.Random(seed)
    return [
        {"name": f"gen-{i}", "when": _condition(rng), "then": _then(rng, i)} for i in range(count)
    ]


def shipped_rules() -> list[dict[str, Any]]:
    """The example rule files in rules/, in order (names prefixed by their file)."""
    out: list[dict[str, Any]] = []
    for path in SHIPPED:
        for rule in yaml.safe_load(path.read_text())["rules"]:
            out.append({**rule, "name": f"{path.stem}/{rule['name']}"})
    return out


def rule_set(total: int, seed: int = 1) -> list[dict[str, Any]]:
    """The shipped example rules followed by generated ones, ``total`` in all."""
    shipped = shipped_rules()
    return shipped + generated_rules(max(total - len(shipped), 0), seed)
