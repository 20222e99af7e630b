"""What every ``mailflow`` command that reads a config shares: the one ``--config``
option, finding ``./mailflow.yaml``, and loading with the problems on stderr."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from mailflow.config import Config, ConfigError, ConfigIssue, load_config

if TYPE_CHECKING:
    from mailflow.app import App

DEFAULT_FILE = "mailflow.yaml"  # used from the current directory when no --config is given
EMBEDDED = "embedded default config"
CONFIG_HELP = (
    "The config file (default: ./mailflow.yaml if it exists, else the embedded default config)."
)

config_option = click.option(
    "--config", "-c", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP
)


def find_config(path: str | None, *, quiet: bool = False) -> str | None:
    """``path``; without one ``./mailflow.yaml`` when it exists (said on stderr unless
    ``quiet``); else None, the embedded default."""
    if path is not None:
        return path
    if Path(DEFAULT_FILE).is_file():
        if not quiet:
            click.echo(f"mailflow: config: ./{DEFAULT_FILE} (no --config given)", err=True)
        return DEFAULT_FILE
    return None


def config_source(path: str | None) -> str:
    return path if path is not None else EMBEDDED


def exit_invalid(issues: list[ConfigIssue] | ConfigError) -> NoReturn:
    """Print the problems, one per line, and exit with status 2."""
    if isinstance(issues, ConfigError):
        issues = issues.issues
    click.echo("mailflow: invalid config:\n" + "\n".join(map(str, issues)), err=True)
    sys.exit(2)


def load_or_exit(path: str | None, load: Callable[[], Config] | None = None) -> Config:
    """The config at ``path`` (found as :func:`find_config` does), or ``load()``."""
    try:
        return load() if load is not None else load_config(find_config(path))
    except ConfigError as exc:
        exit_invalid(exc)


def build_app(config: Config) -> App:
    """The application (plugins loaded and checked); all plugin problems, then exit 2."""
    from mailflow.app import App
    from mailflow.config_check import plugin_issues

    try:
        return App(config)
    except ConfigError as exc:
        exit_invalid(plugin_issues(config) or exc)


__all__: list[Any] = [
    "CONFIG_HELP",
    "DEFAULT_FILE",
    "build_app",
    "config_option",
    "config_source",
    "exit_invalid",
    "find_config",
    "load_or_exit",
]
