"""Admin-written YAML rules: schema (models), loader (files), engine (pure matching, no I/O)."""

from mailflow.rules.engine import CompiledRuleSet, Hit, compile_ruleset, evaluate, to_result
from mailflow.rules.loader import load_rules, parse_rules
from mailflow.rules.schema import RuleSet

__all__ = [
    "CompiledRuleSet",
    "Hit",
    "RuleSet",
    "compile_ruleset",
    "evaluate",
    "load_rules",
    "parse_rules",
    "to_result",
]
