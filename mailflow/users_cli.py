"""``mailflow users add / remove / list``: the SMTP AUTH users file (server.auth.users_file).

The file is replaced atomically, so a running server (which re-reads it when it
changes, :class:`mailflow.auth.UsersFileAuthenticator`) never sees half of it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click
from argon2 import PasswordHasher

from mailflow.auth import UsersFileError, parse_users, read_users
from mailflow.cli_config import config_option, load_or_exit


def _users_path(file: str | None, config_path: str | None) -> Path:
    if file:
        return Path(file)
    config = load_or_exit(config_path)
    if config.server.auth is None:
        raise click.UsageError("give --file, or a --config that sets server.auth.users_file")
    return Path(config.server.auth.users_file)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror}") from None


def _write_lines(path: Path, lines: list[str]) -> None:
    """Atomic replace (temp file + fsync + rename): a running server never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".users.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # hashes are still worth protecting
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _line_user(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or ":" not in stripped:
        return None
    return stripped.partition(":")[0].strip()


_file_option = click.option(
    "--file", "-f", "file", help="The users file (default: server.auth.users_file of the config)."
)


@click.group("users")
def users_group() -> None:
    """Manage SMTP AUTH users (the server.auth.users_file)."""


@users_group.command("add")
@click.argument("user")
@_file_option
@config_option
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
def users_add(user: str, file: str | None, config_path: str | None, password_stdin: bool) -> None:
    """Add USER, or set a new password for an existing USER."""
    if not user or ":" in user or any(ch.isspace() for ch in user):
        raise click.BadParameter("must be non-empty, without ':' or whitespace", param_hint="USER")
    path = _users_path(file, config_path)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.ClickException("empty password")
    lines = _read_lines(path)
    try:
        parse_users("\n".join(lines), path)
    except UsersFileError as exc:
        raise click.ClickException(str(exc)) from None
    entry = f"{user}:{PasswordHasher().hash(password)}"
    replaced = False
    for i, line in enumerate(lines):
        if _line_user(line) == user:
            lines[i], replaced = entry, True
    if not replaced:
        lines.append(entry)
    _write_lines(path, lines)
    click.echo(f"{'updated' if replaced else 'added'} {user} in {path}")


@users_group.command("remove")
@click.argument("user")
@_file_option
@config_option
def users_remove(user: str, file: str | None, config_path: str | None) -> None:
    """Remove USER (exit status 1 when there is no such user)."""
    path = _users_path(file, config_path)
    lines = _read_lines(path)
    kept = [line for line in lines if _line_user(line) != user]
    if len(kept) == len(lines):
        click.echo(f"no user {user!r} in {path}", err=True)
        sys.exit(1)
    _write_lines(path, kept)
    click.echo(f"removed {user} from {path}")


@users_group.command("list")
@_file_option
@config_option
def users_list(file: str | None, config_path: str | None) -> None:
    """Print the user names, one per line."""
    path = _users_path(file, config_path)
    try:
        users = read_users(path)
    except UsersFileError as exc:
        raise click.ClickException(str(exc)) from None
    for name in sorted(users):
        click.echo(name)
