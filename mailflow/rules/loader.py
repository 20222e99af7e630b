"""Rule files -> validated, compiled rule sets; errors name the file, key path and line.

Validation has two steps: the models (:mod:`mailflow.rules.schema`) check the
structure, then the rule set is compiled (:func:`~mailflow.rules.engine.compile_ruleset`),
which is where the pattern engine refuses what it cannot run. Both kinds of
problem come back as one :class:`~mailflow.config.ConfigError`. The compiled form
is remembered, so the plugin that loads a file does not compile it twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mailflow.config import ConfigError, load_yaml, read_text_file, validate_model
from mailflow.rules.engine import RuleErrors, compile_ruleset
from mailflow.rules.schema import RuleSet


def parse_rules(text: str, filename: str) -> RuleSet:
    """Parse, validate and compile rule-file text; :class:`ConfigError` on any problem."""
    data, lines = load_yaml(text, filename)
    ruleset = validate_model(RuleSet, data, filename, lines)
    return _compiled(ruleset, filename, lines)


def load_rules(path: str | Path) -> RuleSet:
    """Load one rule file; :class:`ConfigError` names the file, key path and line."""
    return parse_rules(read_text_file(path), str(path))


def rules_from_data(data: Any, source: str) -> RuleSet:
    """A rule set from already-loaded data (a list of rules); errors name ``source``."""
    ruleset = validate_model(RuleSet, {"rules": data}, source, {})
    return _compiled(ruleset, source, {})


def _compiled(ruleset: RuleSet, filename: str, lines: dict[tuple[Any, ...], int]) -> RuleSet:
    try:
        compile_ruleset(ruleset)
    except RuleErrors as exc:
        raise ConfigError(exc.issues(filename, lines)) from None
    return ruleset
