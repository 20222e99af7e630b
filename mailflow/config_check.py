"""Checks of what a config refers to: files it names, and names it uses.

``config validate``, ``serve`` (at start and at every reload) and ``mailflow reload``
use these after the config itself parsed, so a missing certificate or a users file
with a bad line is reported as ``file:line: key: what is wrong`` before any
listener exists.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from mailflow.config import Config, ConfigIssue


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


def file_issues(config: Config) -> list[ConfigIssue]:
    """Every problem with the files the core config names (plugins check their own
    when they are built)."""
    return [*tls_issues(config), *users_file_issues(config)]
