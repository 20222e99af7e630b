"""Admin-written YAML rules: schema (models) and engine (pure matching, no I/O)."""

from mailflow.rules.engine import CompiledRuleSet, Hit, compile_ruleset, evaluate, to_result
from mailflow.rules.schema import RuleSet, load_rules, parse_rules

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
