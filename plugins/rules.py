"""Builtin plugin ``rules``: apply admin-written YAML rule files at end of message.

Conditions on headers, envelope, client, size, body text, attachments and the
score so far; actions: verdicts, score, header changes, routes, redirects and
copies. The rule files are read and validated once, at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ConfigDict

from mailflow.api import (
    CompiledRuleSet,
    ConfigError,
    MessageContext,
    Result,
    compile_ruleset,
    evaluate,
    hookimpl,
    load_rules,
    to_result,
)


class RulesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    files: list[Path] = []  # evaluated in this order, rules within a file in file order


class RulesPlugin:
    """Evaluates every configured rule file against each message."""

    Settings = RulesSettings
    # Its data hook is CPU work on the message content, linear in the message size: a
    # large message is analysed in a content-analysis worker process, where it cannot
    # hold up the server and a timeout really stops it (docs/plugins.md, "Isolation").
    isolate = "large"

    def __init__(self, settings: RulesSettings | None = None) -> None:
        self.settings = settings or RulesSettings()
        self.rulesets: list[CompiledRuleSet] = [
            compile_ruleset(load_rules(p)) for p in self.settings.files
        ]

    @hookimpl
    def mailflow_data(self, message: MessageContext) -> Result:
        hits = [hit for ruleset in self.rulesets for hit in evaluate(ruleset, message)]
        return to_result(hits, message)  # details.matched is [] when nothing matched

    @staticmethod
    @hookimpl
    def mailflow_register_commands(cli: click.Group) -> None:
        cli.add_command(rules_group)


@click.group("rules")
def rules_group() -> None:
    """Rule files (see docs/rules.md)."""


@rules_group.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def rules_validate(files: tuple[str, ...]) -> None:
    """Check rule FILES; errors name the file, key path and line."""
    failed = False
    for path in files:
        try:
            ruleset = load_rules(path)
        except ConfigError as exc:
            click.echo(str(exc), err=True)
            failed = True
            continue
        click.echo(f"{path}: OK ({len(ruleset.rules)} rules)")
    raise SystemExit(1 if failed else 0)


__all__: list[Any] = ["RulesPlugin", "RulesSettings"]
