"""The example third-party plugin (examples/mailflow-example), exercised as installed.

It must be found through its ``mailflow.plugins`` entry point, exactly as a plugin
from PyPI would be: ``.ci/run`` installs it with ``pip install ./examples/mailflow-example``.
"""

from __future__ import annotations

import json
import mailbox
import textwrap
from pathlib import Path

import aiosmtplib
import pytest
from click.testing import CliRunner

from mailflow.cli import main
from mailflow.config import ConfigError
from mailflow.pipeline import available_plugins
from mailflow.testing import make_message, running_server, send

INSTALL_HINT = (
    "the example plugin package is not installed: run "
    "`pip install ./examples/mailflow-example` (as .ci/run does) and re-run the tests"
)

SETTINGS = """\
plugins:
  - name: example
    settings:
      blocked_sender_domains: [spam.test]
      refused_recipients: [gone@example.com]
      subject_keywords: {lottery: 3.5, prize: 1.5}
      folders: {sales@example.com: .Sales}
"""


@pytest.fixture(autouse=True)
def example_installed() -> None:
    """Fail (never skip) when the package is missing: a skip would let CI pass silently."""
    ep = available_plugins().get("example")
    if ep is None or ep.value != "mailflow_example:ExamplePlugin":
        pytest.fail(INSTALL_HINT, pytrace=False)


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def check_json(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["check", "--json", *args])
    return result.exit_code, json.loads(result.stdout)


def test_check_json_shows_score_header_route_and_plugin_result(tmp_path):
    config = write(tmp_path, "mailflow.yaml", SETTINGS)
    eml = write(tmp_path, "m.eml", make_message(subject="You won the Lottery PRIZE"))
    code, out = check_json(
        "--config", str(config), "--to", "sales@example.com", "--to", "bob@example.com", str(eml)
    )
    assert code == 0
    assert out["action"] == "accept"
    assert out["score"] == 5.0
    assert out["headers_added"] == [["X-Example-Keywords", "lottery, prize"]]
    assert out["route"]["sales@example.com"] == {"kind": "maildir", "folder": ".Sales"}
    assert out["route"]["bob@example.com"] == {"kind": "maildir"}
    plugin = out["plugins"]["example"]
    assert plugin["keywords"] == ["lottery", "prize"]
    assert plugin["score"] == 5.0
    assert plugin["time_ms"] >= 0


def test_check_rejects_blocked_sender_at_mail_from(tmp_path):
    config = write(tmp_path, "mailflow.yaml", SETTINGS)
    eml = write(tmp_path, "m.eml", make_message())
    code, out = check_json("--config", str(config), "--from", "boss@SPAM.test", str(eml))
    assert code == 2
    assert out["action"] == "reject"
    assert out["smtp_reply"]["code"] == 550
    assert "spam.test" in out["smtp_reply"]["text"]
    assert out["plugins"]["example"]["stage"] == "mail"


async def test_through_smtp_each_stage_applies(make_config):
    config = make_config(SETTINGS)
    async with running_server(config) as srv:
        # MAIL FROM: the whole transaction is refused before any data is sent.
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused_sender:
            await send(srv.port, "x@spam.test", ["bob@example.com"], make_message())
        assert refused_sender.value.code == 550

        # RCPT TO: only the configured recipient is refused; the others get the mail.
        message = make_message(subject="lottery results")
        refused = await send(
            srv.port, "alice@example.org", ["gone@example.com", "sales@example.com"], message
        )
        assert refused["gone@example.com"][0] == 550
        assert "5.1.1" in refused["gone@example.com"][1]

        # DATA + route: the header is added and the copy filed into the .Sales folder.
        await srv.wait_delivered("sales@example.com", folder=".Sales")
        folder = mailbox.Maildir(srv.mailbox("sales@example.com"), create=False).get_folder("Sales")
        [msg] = list(folder)
        assert msg["X-Example-Keywords"] == "lottery"
        assert srv.delivered("sales@example.com") == []  # not in INBOX
        assert not srv.mailbox("gone@example.com").exists()


def test_bad_settings_name_the_key_and_line(tmp_path):
    config = write(
        tmp_path,
        "mailflow.yaml",
        textwrap.dedent("""\
            plugins:
              - name: example
                settings:
                  subject_keywords: {lottery: 3}
                  blocked_domains: [spam.test]
            """),
    )
    result = CliRunner().invoke(main, ["config", "validate", str(config)])
    assert result.exit_code == 2
    assert f"{config}:5: plugins[0].settings.blocked_domains: unknown key" in result.stderr


def test_wrongly_typed_setting_is_a_config_error(make_config):
    config = make_config("""\
        plugins:
          - name: example
            settings:
              subject_keywords: {lottery: lots}
        """)
    from mailflow.app import App

    with pytest.raises(ConfigError) as info:
        App(config)
    [issue] = info.value.issues
    assert issue.path == "plugins[0].settings.subject_keywords.lottery"
    assert "number" in issue.message
    assert "'lots'" in issue.message


async def test_the_testing_example_in_docs_plugins_md(tmp_path):
    """The "Testing your plugin" example from docs/plugins.md, verbatim in substance."""
    from mailflow_example import ExamplePlugin, Settings

    from mailflow.testing import config_for

    config = config_for(tmp_path, "plugins: [{name: example, on_error: continue}]")
    plugin = ExamplePlugin(Settings(refused_recipients=["gone@example.com"]))
    async with running_server(config, extra_plugins={"example": plugin}) as srv:
        refused = await send(
            srv.port, "a@example.org", ["gone@example.com", "bob@example.com"], make_message()
        )
        assert refused["gone@example.com"][0] == 550
        await srv.wait_delivered("bob@example.com")


def test_the_installed_mailflow_command_finds_it(tmp_path):
    """The console script, in its own process: discovery exactly as a user gets it."""
    import shutil
    import subprocess

    exe = shutil.which("mailflow")
    assert exe, "the `mailflow` console script is not on PATH: `pip install -e .` first"
    config = write(tmp_path, "mailflow.yaml", SETTINGS)
    eml = write(tmp_path, "m.eml", make_message(subject="a prize"))
    proc = subprocess.run(
        [exe, "check", "--json", "-c", str(config), str(eml)],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["plugins"]["example"]["keywords"] == ["prize"]


def test_its_command_is_added_to_the_installed_mailflow_command():
    """``mailflow_register_commands`` of a third-party package, through the console script."""
    import shutil
    import subprocess

    exe = shutil.which("mailflow")
    assert exe, "the `mailflow` console script is not on PATH: `pip install -e .` first"
    args = [exe, "example", "keywords", "You won the LOTTERY"]
    proc = subprocess.run(
        [*args, "--keyword", "lottery=3.5", "--keyword", "prize=1.5"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "lottery 3.5\nscore 3.5\n", "")
    proc = subprocess.run(
        [*args, "--keyword", "lottery"], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 2
    assert "'lottery' is not WORD=SCORE" in proc.stderr


def test_matching_is_case_insensitive_and_keeps_settings_order():
    from mailflow_example import domain_of, matching_keywords

    keywords = {"prize": 1.0, "Lottery": 2.0, "cash": 3.0}
    assert matching_keywords("LOTTERY PRIZE inside", keywords) == [("prize", 1.0), ("Lottery", 2.0)]
    assert matching_keywords("hello", keywords) == []
    assert domain_of("Boss@Spam.Test") == "spam.test"
    assert domain_of("") == ""
    assert domain_of("postmaster") == ""
