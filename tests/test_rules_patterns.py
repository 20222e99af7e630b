"""Rule patterns on the linear-time engine (issue 11, finding 3): hostile bodies cannot
stall evaluation, patterns the engine cannot run are refused at start-up and by
`mailflow rules validate` with file, line and reason, and the Python spellings the
engine reads differently keep their Python meaning."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from mailflow_plugins.rules import RulesPlugin, RulesSettings

from mailflow.cli import main
from mailflow.config import ConfigError
from mailflow.message import Connection, Envelope, MessageContext
from mailflow.rules import evaluate, load_rules, parse_rules
from mailflow.rules.patterns import MAX_PATTERN_CHARS, PatternError, translate
from mailflow.rules.schema import RuleSet
from mailflow.testing import make_message


def ctx_for(raw: bytes) -> MessageContext:
    return MessageContext(
        raw, Envelope("a@example.org", ["b@example.com"]), Connection("192.0.2.1")
    )


def body_rule(pattern: str) -> RuleSet:
    return RuleSet.model_validate(
        {
            "rules": [
                {"name": "hostile", "when": {"body": {"matches": pattern}}, "then": {"score": 1}}
            ]
        }
    )


def best_of_3(run: Callable[[], object]) -> float:
    times = []
    for _ in range(3):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return min(times)


# --- finding 3: catastrophic backtracking ----------------------------------------------

# (pattern, hostile body for n, n small enough that backtracking still finishes at 2n,
# in about a second, while showing its exponential growth). The first engine failed
# on all but (a*)*b, which its literal pre-filter skipped (no "b" in the body).
CATASTROPHIC = [
    ("(a+)+$", lambda n: "a" * n + "!", 11),
    ("(a|aa)+$", lambda n: "a" * n + "!", 16),
    ("(a*)*b", lambda n: "a" * n, 11),
    ("(x+x+)+y", lambda n: "x" * n, 10),
]


@pytest.mark.parametrize(("pattern", "hostile", "small"), CATASTROPHIC, ids=lambda v: str(v))
def test_catastrophic_patterns_stay_linear(
    pattern: str, hostile: Callable[[int], str], small: int
) -> None:
    """Doubling the hostile input at most ~doubles the time: first at sizes where a
    backtracking engine already grows exponentially (the first engine failed here),
    then at sizes where only a linear one can finish."""
    ruleset = body_rule(pattern)

    def timed(n: int) -> float:
        raw = make_message(body=hostile(n))
        return best_of_3(lambda: evaluate(ruleset, ctx_for(raw)))

    for n in (small, 100_000):
        one, two = timed(n), timed(2 * n)
        assert two < 3 * one + 0.002, (pattern, n, one, two)  # + a little for timer noise
    assert evaluate(ruleset, ctx_for(make_message(body=hostile(30)))) == []


def test_bounded_repeats_stay_linear_on_hostile_text() -> None:
    """Counted repeats make automata large (an re2.Set thrashed at 2.8 s per MB on
    `a.{0,20}b`); the engine's scan grows linearly."""
    ruleset = body_rule(r"a.{0,20}b|c[^b]{0,60}d")

    def timed(n: int) -> float:
        raw = make_message(body="ac" * n)
        return best_of_3(lambda: evaluate(ruleset, ctx_for(raw)))

    one, two = timed(100_000), timed(200_000)
    assert two < 3 * one, (one, two)


def test_the_finding_as_reported_completes_without_a_match() -> None:
    raw = make_message(body="a" * 28 + "!")
    assert evaluate(body_rule("(a+)+$"), ctx_for(raw)) == []
    assert [h.rule.name for h in evaluate(body_rule("(a+)+!$"), ctx_for(raw))] == ["hostile"]


# --- refused patterns -------------------------------------------------------------------

REFUSED = [
    (r"(a)\1", "Back-references"),
    (r"(?P<x>a)(?P=x)", "back"),  # hyperscan says "Unrecognised character after (?P"
    (r"foo(?=bar)", "Zero-width assertions"),
    (r"(?<!x)foo", "Zero-width assertions"),
    (r"(?>a+)b", "Atomic groups"),
    (r"a++b", "Possessive quantifiers"),
    (r"a.{1000}b", "too large"),
    ("(?a)x", "Unrecognised character"),
    ("x" * (MAX_PATTERN_CHARS + 1), "longer than"),
    (r"\N{NO SUCH CHARACTER}", "unknown character name"),
]


def rule_file(tmp_path: Path, pattern: str, name: str = "refused.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        textwrap.dedent(
            """\
            rules:
              - name: fine
                when: {subject: {matches: '\\bfine\\b'}}
                then: {score: 1}
              - name: nested
                when:
                  all:
                    - {authenticated: false}
                    - {body: {matches: PATTERN}}
                then: {score: 1}
            """
        ).replace("PATTERN", "'" + pattern.replace("'", "''") + "'")
    )
    return path


@pytest.mark.parametrize(("pattern", "reason"), REFUSED, ids=[r[1] for r in REFUSED])
def test_load_rules_refuses_what_the_engine_cannot_run(
    tmp_path: Path, pattern: str, reason: str
) -> None:
    path = rule_file(tmp_path, pattern)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    message = str(info.value)
    assert message.startswith(f"{path}:9: rules[1].when.all[1].body: invalid regular expression"), (
        message
    )
    assert reason.lower() in message.lower(), message
    assert len(info.value.issues) == 1  # the fine pattern is not blamed


def test_start_up_refuses_the_rule_file(tmp_path: Path) -> None:
    path = rule_file(tmp_path, r"(a)\1")
    with pytest.raises(ConfigError, match=r"refused\.yaml:9: .*Back-references"):
        RulesPlugin(RulesSettings(files=[path]))


def test_validate_command_names_file_line_and_reason(tmp_path: Path) -> None:
    path = rule_file(tmp_path, r"foo(?=bar)")
    good = rule_file(tmp_path, r"\bfoo\b", "good.yaml")
    result = CliRunner().invoke(main, ["rules", "validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}:9: rules[1].when.all[1].body: invalid regular expression" in result.output
    assert "Zero-width assertions are not supported" in result.output
    result = CliRunner().invoke(main, ["rules", "validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "OK (2 rules)" in result.output


def test_every_refused_pattern_is_reported_at_once() -> None:
    text = textwrap.dedent(
        """\
        rules:
          - name: a
            when: {subject: {matches: '(a)\\1'}}
            then: {score: 1}
          - name: b
            when: {subject: {matches: 'ok'}}
            then: {score: 1}
          - name: c
            when:
              attachment: {filename: {matches: '(?<=x)y'}}
            then: {score: 1}
        """
    )
    with pytest.raises(ConfigError) as info:
        parse_rules(text, "t.yaml")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("t.yaml:3: rules[0].when.subject: invalid regular expression")
    assert lines[1].startswith("t.yaml:10: rules[2].when.attachment.filename:")
    assert len(lines) == 2


def test_model_validation_alone_defers_to_the_engine() -> None:
    """A rule set built without a file (plugin code, tests) is refused when compiled."""
    from mailflow.rules import compile_ruleset
    from mailflow.rules.engine import RuleErrors

    with pytest.raises(RuleErrors, match="Back-references"):
        compile_ruleset(body_rule(r"(a)\1"))


# --- Python spellings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("python", "engine"),
    [
        (r"foo\Z", r"foo\z"),
        (r"a\vb", r"a\x0bb"),
        (r"x{,3}", r"x{0,3}"),
        (r"x{,}", r"x{0,}"),
        (r"[{,3}]", r"[{,3}]"),  # in a class: literal in both
        (r"\u00e9\U0001F600", r"\x{e9}\x{1f600}"),
        (r"\N{LATIN SMALL LETTER E WITH ACUTE}", r"\x{e9}"),
        (r"\\Z", r"\\Z"),  # an escaped backslash, then Z
        (r"[\Z]", r"[\Z]"),
        (r"\Qa\Zb\E", r"\Qa\Zb\E"),
        (r"(?#\Z)a", r"(?#\Z)a"),
        ("a\x00b", r"a\x00b"),
        (r"[]\v]", r"[]\x0b]"),
    ],
)
def test_translate(python: str, engine: str) -> None:
    assert translate(python) == engine


def test_translate_refuses_unknown_names() -> None:
    with pytest.raises(PatternError, match="unknown character name"):
        translate(r"\N{NOT A NAME}")


def matches(pattern: str, text: str, case_sensitive: bool = False, field: str = "subject") -> bool:
    rule = {field: {"matches": pattern, "case_sensitive": case_sensitive}}
    ruleset = RuleSet.model_validate({"rules": [{"name": "r", "when": rule, "then": {}}]})
    raw = make_message(body=text) if field == "body" else make_message(subject=text)
    return bool(evaluate(ruleset, ctx_for(raw)))


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        # kept from Python's re
        (r"report$", "quarterly report", True),
        (r"(?i)REPORT", "report", True),
        (r"(?-i:Report)", "report", False),
        (r"x{,3}y", "xxy", True),
        (r"^a|", "zzz", True),  # matches the empty string, as in Python
        (r"caf\u00e9", "CAFÉ", True),  # Unicode case folding
        ("\u03c3", "\u03a3", True),  # sigma
        # documented differences: \d, \w, \s and \b are ASCII
        (r"\d", "٣", False),
        (r"\w", "é", False),
        (r"\bcafé\b", "un café noir", False),
        (r"\s", "a\u00a0b", False),
        (r"[[:digit:]]", "7", True),  # POSIX classes work (Python read them as a set)
        (r"\p{Lu}", "É", True),
    ],
)
def test_pattern_semantics(pattern: str, text: str, expected: bool) -> None:
    # Non-ASCII text in the body, where it is decoded (a raw 8-bit Subject is not text).
    field = "subject" if text.isascii() else "body"
    assert matches(pattern, text, field=field) is expected


def test_end_of_text_anchors_on_the_body() -> None:
    body = "last line\n"  # the body text ends with CR LF
    assert matches(r"line\r?$", body, field="body")  # $ also before a final newline, as in re
    assert not matches(r"line\r?\Z", body, field="body")  # \Z: the very end, as in re
    assert matches(r"line\r\n\Z", body, field="body")


def test_eight_bit_header_bytes_do_not_raise() -> None:
    raw = b"Subject: caf\xe9 \xff\xfe offer\r\nFrom: a@example.org\r\n\r\nbody\r\n"
    ruleset = RuleSet.model_validate(
        {
            "rules": [
                {"name": "r", "when": {"subject": {"matches": r"offer$"}}, "then": {}},
                {"name": "s", "when": {"subject": {"contains": "CAF"}}, "then": {}},
            ]
        }
    )
    assert [h.rule.name for h in evaluate(ruleset, ctx_for(raw))] == ["r", "s"]


def test_evaluation_from_several_threads() -> None:
    """Hyperscan needs scratch space per thread; each thread gets its own."""
    from concurrent.futures import ThreadPoolExecutor

    ruleset = RuleSet.model_validate(
        {
            "rules": [
                {"name": f"r{i}", "when": {"body": {"matches": rf"\bword{i}\b"}}, "then": {}}
                for i in range(20)
            ]
        }
    )
    raws = [make_message(body=f"a word{i} here\r\n" * 50) for i in range(20)]

    def names(i: int) -> list[str]:
        return [h.rule.name for h in evaluate(ruleset, ctx_for(raws[i % 20]))]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(names, range(400)))
    assert results == [[f"r{i % 20}"] for i in range(400)]


def test_a_disabled_rule_with_a_refused_pattern_is_refused_too(tmp_path: Path) -> None:
    """Found by `rules validate` now, not when someone enables the rule."""
    path = tmp_path / "disabled.yaml"
    path.write_text(
        "rules:\n"
        "  - name: fine\n    when: {subject: {matches: 'ok'}}\n    then: {score: 1}\n"
        "  - name: later\n    enabled: false\n"
        "    when: {subject: {matches: '(\\w+) \\1'}}\n    then: {score: 1}\n"
    )
    result = CliRunner().invoke(main, ["rules", "validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}:7: rules[1].when.subject: invalid regular expression" in result.output
