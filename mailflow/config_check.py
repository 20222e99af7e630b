"""Checks of what a config refers to: files it names, and names it uses.

``config validate``, ``serve`` (at start and at every reload) and ``mailflow reload``
use these after the config itself parsed, so a missing certificate, a users file
with a bad line or a rule that routes to a relay target that does not exist is
reported as ``file:line: key: what is wrong`` before any listener exists.
:func:`check_config_file` is ``config validate``: every problem at once.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailflow.config import (
    Config,
    ConfigError,
    ConfigIssue,
    load_config,
    load_yaml,
    read_text_file,
)


def _issue(config: Config, path: tuple[Any, ...], message: str) -> ConfigIssue:
    dotted = ".".join(str(p) for p in path)
    return ConfigIssue(config._source, dotted, config._lines.get(path), message)


def _readable(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file, or None."""
    try:
        with path.open("rb"):
            return None
    except FileNotFoundError:
        return f"file not found: {path}"
    except IsADirectoryError:
        return f"is a directory, not a file: {path}"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"


def tls_issues(config: Config) -> list[ConfigIssue]:
    """``server.tls``: both files readable, the certificate parses, the key parses and
    belongs to the certificate."""
    tls = config.server.tls
    if tls is None:
        return []
    cert_key, key_key = ("server", "tls", "cert"), ("server", "tls", "key")
    issues = [
        _issue(config, key, why)
        for key, path in ((cert_key, tls.cert), (key_key, tls.key))
        if (why := _readable(path)) is not None
    ]
    if issues:
        return issues
    try:
        ssl.create_default_context(cafile=str(tls.cert))
    except (ssl.SSLError, ValueError) as exc:
        return [_issue(config, cert_key, f"{tls.cert} is not a PEM certificate ({exc})")]
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls.cert), str(tls.key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            why = f"{tls.key} is not the private key of {tls.cert}"
        else:
            why = f"{tls.key} is not a PEM private key without passphrase ({exc})"
        return [_issue(config, key_key, why)]
    return []


def users_file_issues(config: Config) -> list[ConfigIssue]:
    """``server.auth.users_file``: readable, every line ``user:<argon2 hash>``."""
    auth = config.server.auth
    if auth is None:
        return []
    from mailflow.auth import UsersFileError, read_users

    why = _readable(auth.users_file)
    if why is not None:
        return [_issue(config, ("server", "auth", "users_file"), why)]
    try:
        read_users(auth.users_file)
    except UsersFileError as exc:
        return list(exc.issues)
    return []


def _relay_target_exists(config: Config, target: str) -> bool:
    """Whether the relay transport can reach ``target``: a name in ``relay.targets``,
    ``mx``, or a literal ``host:port`` (as plugins may set)."""
    if target in config.relay.target_names():
        return True
    host, sep, port = target.rpartition(":")
    return bool(sep and host and port.isdigit())


def rule_route_issues(config: Config) -> list[ConfigIssue]:
    """Every ``route`` of kind ``relay`` in the rule files of the ``rules`` plugin names
    a relay target that exists (a rule file that does not load is reported by the
    plugin itself)."""
    from mailflow.rules import load_rules

    issues: list[ConfigIssue] = []
    names = sorted(config.relay.target_names() - {"none"})
    for entry in config.plugins:
        if entry.name != "rules" or not entry.enabled:
            continue
        files = entry.settings.get("files") or []
        for name in files if isinstance(files, list) else []:
            path = Path(str(name))
            if not path.is_absolute() and config._base_dir is not None:
                path = config._base_dir / path
            try:
                ruleset = load_rules(path)
                _, lines = load_yaml(read_text_file(path), str(path))
            except ConfigError:
                continue
            for index, rule in enumerate(ruleset.rules):
                route = rule.then.route
                if route is None or route.kind != "relay":
                    continue
                key = ("rules", index, "then", "route", "target")
                line = lines.get(key) or lines.get(key[:-1])
                where = f"rules[{index}].then.route.target"
                if route.target and not _relay_target_exists(config, route.target):
                    issues.append(
                        ConfigIssue(
                            str(path),
                            where,
                            line,
                            f"rule {rule.name!r} routes to relay target {route.target!r}, "
                            f"which {config._source} does not define; expected one of "
                            f"{names} (relay.targets) or HOST:PORT",
                        )
                    )
                elif not route.target and config.relay.default == "none":
                    issues.append(
                        ConfigIssue(
                            str(path),
                            where,
                            line,
                            f"rule {rule.name!r} routes to relay without a target and "
                            f"relay.default in {config._source} is 'none': name a target",
                        )
                    )
    return issues


def file_issues(config: Config) -> list[ConfigIssue]:
    """Every problem with the files the core config names and the relay targets its
    rules name (plugins check their own settings and files when they are built)."""
    return [*tls_issues(config), *users_file_issues(config), *rule_route_issues(config)]


def plugin_issues(config: Config) -> list[ConfigIssue]:
    """Every enabled plugin built on its own, so that one bad plugin does not hide
    the problems of the next (its settings, its files: a rule file that does not
    validate, a model that does not load)."""
    from mailflow.pipeline import Pipeline

    issues: list[ConfigIssue] = []
    for index, entry in enumerate(config.plugins):
        if not entry.enabled:
            continue
        # Only this one enabled; the others stay in place so that indexes and lines hold.
        alone = [
            p if i == index else p.model_copy(update={"enabled": False})
            for i, p in enumerate(config.plugins)
        ]
        try:
            Pipeline(config.model_copy(update={"plugins": alone}))
        except ConfigError as exc:
            issues.extend(exc.issues)
    return issues


@dataclass
class Report:
    """What ``config validate`` found: problems (exit status 2) and warnings."""

    config: Config | None = None
    issues: list[ConfigIssue] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_config_file(path: str | None) -> Report:
    """Load ``path`` (None: the embedded default) and check everything it refers to."""
    report = Report()
    if path is not None:
        try:
            text = read_text_file(path)
        except ConfigError as exc:
            report.issues = list(exc.issues)
            return report
        if not any(line.split("#", 1)[0].strip() for line in text.splitlines()):
            report.warnings.append(
                f"{path}: the file is empty (or only comments): every key has its "
                "built-in default, with no plugins (this is not the embedded default "
                "config: see `mailflow config show-default`)"
            )
    try:
        config = load_config(path)
    except ConfigError as exc:
        report.issues = list(exc.issues)
        return report
    report.config = config
    report.issues = [*file_issues(config), *plugin_issues(config)]
    return report
