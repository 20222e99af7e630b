"""Rules engine benchmark: CPU time per message for 107 and 1,000 rules.

    python -m benchmarks.bench_rules [--corpus ../shared/corpus] [--messages 300]
                                     [--rounds 5] [--json FILE] [--engines]

Rule sets (benchmarks/rule_sets.py): the example files in rules/ followed by
generated rules of the kinds admins write, 107 and 1,000 rules in all. Messages:
the benchmark message (benchmarks/sample.py, multipart/alternative text + HTML
and an attachment) at 2, 5 and 20 KB, and ``--messages`` messages of the shared
SpamAssassin corpus (ham and spam, every n-th file; skipped with a note if the
corpus is absent). Each message is evaluated in a fresh message context, as the
plugin sees it: the time includes reading the headers, walking the MIME
structure and decoding the body text where a rule needs them. Per message the
CPU time (``time.process_time_ns``, so time spent waiting for a core is not
counted) of ``evaluate`` + ``to_result`` is taken ``--rounds`` times after a
warm-up round; the median and p99 over all those samples are reported, with the
part that reading the message alone costs (structure + body text + headers).

The same script runs on an older tree to compare engines (copy this file and
rule_sets.py there): it only uses ``compile_ruleset``, ``evaluate`` and
``to_result``.

``--engines`` adds the raw multi-pattern cost of the 1,000-rule set's
``matches`` patterns, grouped by field: Hyperscan (the engine) against
``re2.Set`` (google-re2, if installed), compile time, a scan of the typical
messages' values, and a scan of 1 MB of hostile text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.rule_sets import HAM_WORDS, HEADERS, SPAM_WORDS, rule_set
from benchmarks.sample import message_template
from mailflow import mime
from mailflow.message import Connection, Envelope, MessageContext
from mailflow.rules import RuleSet, compile_ruleset, evaluate, to_result

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
SIZES = (2 * 1024, 5 * 1024, 20 * 1024)
RULE_COUNTS = (107, 1000)
AIM_US = 200.0  # 1,000 rules per typical message (issue 11)
HOSTILE_CHARS = 1_000_000  # the body text cap (mailflow.mime.MAX_TEXT_CHARS)


def typical_messages() -> list[bytes]:
    return [message_template(size, seed) for size in SIZES for seed in (1, 2, 3)]


def corpus_messages(corpus: Path, count: int) -> list[bytes]:
    """Every n-th message of the corpus (ham and spam), ``count`` in all."""
    files = sorted(p for p in corpus.glob("*/*") if p.is_file())
    if not files or count <= 0:
        return []
    step = max(len(files) // count, 1)
    return [p.read_bytes() for p in files[::step][:count]]


def context(raw: bytes) -> MessageContext:
    envelope = Envelope("sender@example.org", ["bob@example.com"])
    return MessageContext(raw, envelope, Connection("203.0.113.5"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def time_per_message(
    messages: list[bytes],
    rounds: int,
    run: Callable[[MessageContext], Any],
    read_first: bool = False,
) -> list[float]:
    """CPU microseconds of ``run`` on a fresh context, for every message and round;
    ``read_first``: on a context that ``run`` has seen once already (the MIME walk,
    body text and header block cached in it, as when an earlier plugin read them)."""
    clock = time.process_time_ns
    for raw in messages:  # warm-up: caches, compiled databases, code paths
        run(context(raw))
    samples: list[float] = []
    for _ in range(rounds):
        for raw in messages:
            ctx = context(raw)
            if read_first:
                run(ctx)
            start = clock()
            run(ctx)
            samples.append((clock() - start) / 1000)
    return samples


def read_only(ctx: MessageContext) -> None:
    """What evaluating costs for reading the message alone: MIME walk, body text,
    the headers the rules read."""
    mime.structure(ctx).body_text()
    for name in ("subject", "from", *HEADERS):
        mime.header_values(ctx, name.lower())


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median_us": round(statistics.median(samples), 1),
        "p99_us": round(percentile(samples, 0.99), 1),
        "mean_us": round(statistics.fmean(samples), 1),
    }


def bench_rule_set(count: int, sets: dict[str, list[bytes]], rounds: int) -> dict[str, Any]:
    ruleset = RuleSet.model_validate({"rules": rule_set(count)})
    start = time.perf_counter()
    compiled = compile_ruleset(ruleset)
    compile_s = time.perf_counter() - start

    def run(ctx: MessageContext) -> None:
        to_result(evaluate(compiled, ctx), ctx)

    out: dict[str, Any] = {"rules": len(ruleset.rules), "compile_s": round(compile_s, 3)}
    for name, messages in sets.items():
        if not messages:
            continue
        out[name] = summary(time_per_message(messages, rounds, run))
        read = summary(time_per_message(messages, rounds, run, read_first=True))
        out[name]["already_read_median_us"] = read["median_us"]
        out[name]["already_read_p99_us"] = read["p99_us"]
        out[name]["reading_alone_median_us"] = summary(
            time_per_message(messages, rounds, read_only)
        )["median_us"]
        matched = [len(evaluate(compiled, context(raw))) for raw in messages]
        out[name]["rules_matched_per_message"] = round(statistics.fmean(matched), 2)
    return out


# --- raw engines ------------------------------------------------------------------------


def patterns_by_field(rules: list[dict[str, Any]]) -> dict[str, list[tuple[str, bool]]]:
    """The ``matches`` patterns of a rule list per field, with their case flag."""
    groups: dict[str, list[tuple[str, bool]]] = {}

    def walk(cond: dict[str, Any]) -> None:
        for key, value in cond.items():
            if key in ("all", "any"):
                for child in value:
                    walk(child)
            elif key == "not":
                walk(value)
            elif key == "attachment":
                for part, test in value.items():
                    if "matches" in test:
                        groups.setdefault(f"attachment.{part}", []).append(
                            (test["matches"], test.get("case_sensitive", False))
                        )
            elif isinstance(value, dict) and "matches" in value:
                name = f"header.{value['name'].lower()}" if key == "header" else key
                groups.setdefault(name, []).append(
                    (value["matches"], value.get("case_sensitive", False))
                )

    for rule in rules:
        walk(rule["when"])
    return groups


def field_values(ctx: MessageContext, field: str) -> list[str]:
    structure = mime.structure(ctx)
    if field == "body":
        return [structure.body_text()]
    if field == "subject":
        return [" ".join(v.split()) for v in mime.header_values(ctx, "subject")]
    if field.startswith("header."):
        return [" ".join(v.split()) for v in mime.header_values(ctx, field[7:])]
    if field == "from":
        import email.utils

        return [a for _, a in email.utils.getaddresses(mime.header_values(ctx, "from")) if a]
    if field == "sender":
        return [ctx.envelope.mail_from]
    if field == "recipient":
        return list(ctx.envelope.rcpt_tos)
    if field == "attachment.filename":
        return [n for p in structure.parts if p.is_attachment for n in p.filenames or ("",)]
    return [p.content_type for p in structure.parts if p.is_attachment]


def hostile_text(rng: random.Random) -> str:
    """1 MB of the words the patterns look for, never quite in their order."""
    words = [w for w in SPAM_WORDS + HAM_WORDS] + ["$", "1,000", "a", "FREE"]
    out: list[str] = []
    total = 0
    while total < HOSTILE_CHARS:
        word = rng.choice(words)
        out.append(word)
        total += len(word) + 1
    return " ".join(out)[:HOSTILE_CHARS]


def bench_engines(messages: list[bytes]) -> dict[str, Any]:
    """Hyperscan against re2.Set on the 1,000-rule set's patterns."""
    from mailflow.rules.patterns import Database, Expression, encode

    groups = patterns_by_field(rule_set(1000))
    contexts = [context(raw) for raw in messages]
    texts = {f: [v for ctx in contexts for v in field_values(ctx, f)] for f in groups}
    hostile = hostile_text(random.Random(5))
    out: dict[str, Any] = {"patterns": sum(len(p) for p in groups.values()), "fields": len(groups)}

    start = time.perf_counter()
    hs_dbs = {
        f: Database([(Expression.regex(p, cs), i) for i, (p, cs) in enumerate(pats)])
        for f, pats in groups.items()
    }
    hs_compile = time.perf_counter() - start

    def hs_scan(field: str, text: str) -> None:
        hs_dbs[field].scan(encode(text), set())

    engines: dict[str, tuple[float, Callable[[str, str], None]]] = {
        "hyperscan": (hs_compile, hs_scan)
    }
    try:
        import re2  # type: ignore[import-not-found]
    except ImportError:
        out["re2"] = "google-re2 not installed"
    else:
        start = time.perf_counter()
        sets = {}
        for field, pats in groups.items():
            options = re2.Options()
            options.log_errors = False
            options.max_mem = 64 << 20
            rset = re2.Set.SearchSet(options)
            for pattern, sensitive in pats:
                rset.Add(pattern if sensitive else f"(?i:{pattern})")
            rset.Compile()
            sets[field] = rset
        re2_compile = time.perf_counter() - start

        def re2_scan(field: str, text: str) -> None:
            sets[field].Match(encode(text))

        engines["re2.Set"] = (re2_compile, re2_scan)

    for name, (compile_s, scan) in engines.items():
        for field, values in texts.items():  # warm-up (RE2 builds its DFA lazily)
            for value in values:
                scan(field, value)
        per_round = []
        for _ in range(5):
            start = time.process_time_ns()
            for field, values in texts.items():
                for value in values:
                    scan(field, value)
            per_round.append((time.process_time_ns() - start) / 1000 / len(contexts))
        start = time.process_time_ns()
        scan("body", hostile)
        hostile_s = (time.process_time_ns() - start) / 1e9
        out[name] = {
            "compile_s": round(compile_s, 3),
            "scan_us_per_message": round(statistics.median(per_round), 1),
            "hostile_body_1MB_s": round(hostile_s, 3),
        }
    return out


def machine() -> dict[str, Any]:
    from benchmarks.report import cpu_model

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--messages", type=int, default=300, help="corpus messages")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--engines", action="store_true", help="compare Hyperscan and re2.Set")
    args = parser.parse_args(argv)

    sets = {"typical": typical_messages(), "corpus": corpus_messages(args.corpus, args.messages)}
    if not sets["corpus"]:
        print(f"note: no corpus at {args.corpus}; typical messages only", file=sys.stderr)
    results: dict[str, Any] = {
        "machine": machine(),
        "messages": {k: len(v) for k, v in sets.items()},
    }
    for count in RULE_COUNTS:
        results[f"rules_{count}"] = bench_rule_set(count, sets, args.rounds)
    if args.engines:
        results["engines"] = bench_engines(sets["typical"] + sets["corpus"][:50])
    results["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]

    print(json.dumps(results, indent=2))
    typical = results["rules_1000"]["typical"]["median_us"]
    print(
        f"1,000 rules, typical message: {typical} us median (aim < {AIM_US:.0f} us)",
        file=sys.stderr,
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
