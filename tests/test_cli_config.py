"""Config and CLI paper cuts: ./mailflow.yaml as the default config, paths relative to
the config file, `config validate` checking what the config refers to (all at once),
one --config option, `init`'s hint, `--version`."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mailflow import __version__
from mailflow.cli import main
from mailflow.cli_config import CONFIG_HELP
from mailflow.config import load_config
from mailflow.testing import make_message, send
from tests.serve_support import ServeProcess
from tests.smtp_support import self_signed_cert

DOCS = Path(__file__).parent.parent / "docs"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from mailflow.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


# --- ./mailflow.yaml -------------------------------------------------------------------------


async def test_serve_uses_mailflow_yaml_in_the_current_directory_and_says_so(tmp_path):
    (tmp_path / "mailflow.yaml").write_text(
        "server: {listen: ['127.0.0.1:0']}\ndelivery: {maildir: {root: inbox}}\n"
    )
    server = await ServeProcess.start(cwd=tmp_path)
    try:
        await server.wait_for(r"mailflow: config: /")
        assert await send(server.port, "a@example.org", ["bob@example.com"], make_message()) == {}
        async with asyncio.timeout(30):
            while not list((tmp_path / "inbox" / "bob@example.com" / "new").glob("*")):
                await asyncio.sleep(0.05)
    finally:
        assert await server.stop() == 0
    assert "mailflow: config: ./mailflow.yaml (no --config given)" in server.log
    assert f"mailflow: config: {tmp_path / 'mailflow.yaml'}; local mail -> " in server.log


def test_every_verb_reads_mailflow_yaml_in_the_current_directory(tmp_path):
    (tmp_path / "mailflow.yaml").write_text("server: {max_recipients: lots}\n")
    for args in (["queue", "list"], ["plugins", "list"], ["quarantine", "list"], ["reload"]):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2, args
        assert "mailflow.yaml:1: server.max_recipients: expected a whole number" in result.stderr
    # config validate finds it too (and names it in its verdict).
    (tmp_path / "mailflow.yaml").write_text("server: {max_recipients: 5}\n")
    result = run_cli("config", "validate", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "mailflow.yaml: OK\n")
    # Without the file: the embedded default, as before.
    (tmp_path / "mailflow.yaml").unlink()
    result = run_cli("config", "validate", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "embedded default config: OK\n")


def test_init_says_how_to_check_and_run_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["init"])
    assert result.exit_code == 0
    assert "check it with: mailflow config validate mailflow.yaml" in result.stdout
    assert "run it with: mailflow serve " in result.stdout
    result = CliRunner().invoke(main, ["init", "etc/other.yaml"])
    assert result.exit_code == 1  # etc/ does not exist: nothing written
    (tmp_path / "etc").mkdir()
    result = CliRunner().invoke(main, ["init", "etc/other.yaml"])
    assert "run it with: mailflow serve --config etc/other.yaml" in result.stdout


# --- relative paths --------------------------------------------------------------------------

RULES = """\
rules:
  - name: tag
    when: {subject: {contains: hello}}
    then: {add_headers: {X-Tagged: "yes"}}
"""


def relative_setup(tmp_path: Path) -> Path:
    """etc/mailflow.yaml naming files beside it by relative paths; returns etc/."""
    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    self_signed_cert(etc / "tls")
    (etc / "rules.yaml").write_text(RULES)
    (etc / "mailflow.yaml").write_text(
        "server:\n"
        "  tls: {cert: tls/cert.pem, key: tls/key.pem}\n"
        "delivery: {maildir: {root: ../var/mail}}\n"
        "queue: {directory: spool}\n"
        "plugins:\n"
        "  - name: rules\n"
        "    settings: {files: [rules.yaml]}\n"
    )
    return etc


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    etc = relative_setup(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config("../etc/mailflow.yaml")
    assert config.server.tls is not None
    assert config.server.tls.cert == etc.absolute() / "tls/cert.pem"
    assert config.delivery.maildir.root.resolve() == (tmp_path / "var/mail").resolve()
    assert config.queue.directory == etc.absolute() / "spool"
    assert config.quarantine.directory == etc.absolute() / "quarantine"  # the default too
    # `config validate` from another directory finds every file ...
    result = run_cli("config", "validate", "../etc/mailflow.yaml", cwd=elsewhere)
    assert (result.returncode, result.stdout) == (0, "../etc/mailflow.yaml: OK\n"), result.stderr
    # ... and the rules plugin reads rules.yaml beside the config, not in the cwd.
    (elsewhere / "m.eml").write_bytes(make_message("hello"))
    result = run_cli("check", "--json", "-c", "../etc/mailflow.yaml", "m.eml", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert ["X-Tagged", "yes"] in json.loads(result.stdout)["headers_added"]


# --- config validate ------------------------------------------------------------------------


def test_validate_reports_every_problem_with_what_the_config_refers_to(tmp_path):
    (tmp_path / "users").write_text("alice:$argon2id$v=19$m=65536,t=3,p=4$x$y\nbob secret\n")
    (tmp_path / "rules.yaml").write_text(
        "rules:\n"
        "  - name: to-partner\n"
        "    when: {subject: {contains: order}}\n"
        "    then:\n"
        "      route: {kind: relay, target: partnr}\n"
    )
    config = tmp_path / "mailflow.yaml"
    config.write_text(
        "server:\n"
        "  tls: {cert: missing.pem, key: key.pem}\n"
        "  auth: {users_file: users}\n"
        "relay:\n"
        "  targets: {partner: {host: 192.0.2.1}}\n"
        "plugins:\n"
        "  - name: rules\n"
        "    settings: {files: [rules.yaml]}\n"
        "  - name: spf\n"
        "    settings: {actionz: {}}\n"
    )
    result = run_cli("config", "validate", str(config), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "mailflow: invalid config:"
    assert lines[1:] == [
        f"{config}:2: server.tls.cert: file not found: {tmp_path / 'missing.pem'}",
        f"{config}:2: server.tls.key: file not found: {tmp_path / 'key.pem'}",
        f"{tmp_path / 'users'}:2: server.auth.users_file: expected 'user:<argon2 hash>'",
        f"{tmp_path / 'rules.yaml'}:5: rules[0].then.route.target: rule 'to-partner' routes "
        f"to relay target 'partnr', which {config} does not define; expected one of "
        "['mx', 'partner'] (relay.targets) or HOST:PORT",
        f"{config}:10: plugins[1].settings.actionz: unknown key (did you mean 'actions'?)",
    ]


def test_validate_checks_that_certificate_and_key_parse_and_match(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    cert, _ = self_signed_cert(one)
    _, other_key = self_signed_cert(two)
    config = tmp_path / "mailflow.yaml"
    config.write_text(f"server:\n  tls:\n    cert: {cert}\n    key: {other_key}\n")
    result = run_cli("config", "validate", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{config}:4: server.tls.key: {other_key} is not the private key of {cert}" in (
        result.stderr
    )
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    config.write_text(f"server:\n  tls:\n    cert: bad.pem\n    key: {other_key}\n")
    result = run_cli("config", "validate", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{config}:3: server.tls.cert: {tmp_path / 'bad.pem'} is not a PEM certificate" in (
        result.stderr
    )


def test_validate_warns_on_an_empty_file(tmp_path):
    config = tmp_path / "mailflow.yaml"
    config.write_text("# nothing yet\n\n")
    result = run_cli("config", "validate", str(config), cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == f"{config}: OK\n"
    assert f"mailflow: warning: {config}: the file is empty" in result.stderr


def test_serve_with_a_missing_certificate_names_the_key_and_the_file(tmp_path):
    (tmp_path / "mailflow.yaml").write_text(
        "server:\n  listen: ['127.0.0.1:0']\n  tls: {cert: /nonexistent/cert.pem, key: k.pem}\n"
    )
    result = run_cli("serve", cwd=tmp_path)
    assert result.returncode == 2
    assert "mailflow.yaml:3: server.tls.cert: file not found: /nonexistent/cert.pem" in (
        result.stderr
    )


# --- one --config, --version ----------------------------------------------------------------


def _commands(group: click.Group, ctx: click.Context) -> list[tuple[str, click.Command]]:
    out = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        out.append((name, command))
        if isinstance(command, click.Group):
            out += [(f"{name} {n}", c) for n, c in _commands(command, ctx)]
    return out


def test_every_config_option_is_the_same_one():
    ctx = click.Context(main)
    with_config = []
    for name, command in _commands(main, ctx):
        for param in command.params:
            if "--config" in getattr(param, "opts", []):
                with_config.append(name)
                assert isinstance(param, click.Option)
                assert (param.name, param.opts, param.help) == (
                    "config_path",
                    ["--config", "-c"],
                    CONFIG_HELP,
                ), name
    assert {"serve", "check", "reload", "config validate", "users add", "queue list"} <= set(
        with_config
    )


def test_version_output_is_as_documented():
    documented = (DOCS / "cli.md").read_text()
    assert "Prints `mailflow <version>` (also `mailflow --version`)." in documented
    for args in (["--version"], ["version"]):
        result = CliRunner().invoke(main, args)
        assert (result.exit_code, result.stdout) == (0, f"mailflow {__version__}\n")


@pytest.mark.skipif(shutil.which("mailflow") is None, reason="console script not installed")
def test_installed_console_script_prints_the_same_version(tmp_path):
    result = subprocess.run(["mailflow", "--version"], capture_output=True, text=True, timeout=60)
    assert result.stdout == f"mailflow {__version__}\n"
