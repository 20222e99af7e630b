"""`mailflow check`: the whole pipeline on one message, without SMTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.cli import main
from mailflow.hookspecs import hookimpl
from mailflow.pipeline import available_plugins
from mailflow.testing import make_message

# The example plugin (examples/mailflow-example) is the installed plugin these CLI
# tests run; .ci/run installs it.
EXAMPLE = """\
plugins:
  - name: example
    settings:
      blocked_sender_domains: [spam.test]
      refused_recipients: [gone@example.com]
      subject_keywords: {lottery: 4, prize: 2, winner: 7}
      folders: {sales@example.com: .Sales}
"""
THRESHOLDS = "actions: {reject: 10, quarantine: 5, add_header: 3}\n"


@pytest.fixture
def example_config(tmp_path: Path) -> Path:
    if "example" not in available_plugins():
        pytest.fail("run `pip install ./examples/mailflow-example` first", pytrace=False)
    path = tmp_path / "mailflow.yaml"
    path.write_text(THRESHOLDS + EXAMPLE)
    return path


def run_check(*args: str, stdin: bytes | None = None) -> tuple[int, Any]:
    result = CliRunner().invoke(main, ["check", *args], input=stdin)
    out = json.loads(result.stdout) if "--json" in args else result.stdout
    return result.exit_code, out


def eml(tmp_path: Path, **kwargs: Any) -> str:
    path = tmp_path / "m.eml"
    path.write_bytes(make_message(**kwargs))
    return str(path)


def test_json_object_shape_for_an_accepted_message(tmp_path, example_config):
    code, out = run_check(
        "--json", "-c", str(example_config), eml(tmp_path, subject="lottery", to="bob@example.com")
    )
    assert code == 0
    for key in ("action", "smtp_reply", "score", "headers_added", "recipients", "route"):
        assert key in out
    assert out["action"] == "accept"
    assert out["smtp_reply"] is None
    assert out["score"] == 4
    # The example plugin's header, then the add_header threshold's flag.
    assert out["headers_added"] == [["X-Example-Keywords", "lottery"], ["X-Spam-Flag", "YES"]]
    assert out["recipients"] == ["bob@example.com"]
    assert out["route"] == {"bob@example.com": {"kind": "maildir"}}
    example = out["plugins"]["example"]
    assert example["score"] == 4
    assert example["time_ms"] >= 0
    assert [s["stage"] for s in example["stages"]] == ["mail", "rcpt", "data"]


def test_no_scoring_plugin_means_score_0(tmp_path):
    config = tmp_path / "mailflow.yaml"
    config.write_text("plugins: []\n")
    code, out = run_check("--json", "-c", str(config), eml(tmp_path))
    assert (code, out["action"], out["score"], out["plugins"]) == (0, "accept", 0, {})


@pytest.mark.parametrize(
    ("subject", "code", "action", "reply"),
    [
        ("prize", 0, "accept", None),
        ("lottery prize", 1, "quarantine", 250),  # what SMTP would answer: 250, kept aside
        ("lottery winner", 2, "reject", 550),
    ],
)
def test_exit_code_follows_the_action(tmp_path, example_config, subject, code, action, reply):
    got, out = run_check("--json", "-c", str(example_config), eml(tmp_path, subject=subject))
    assert (got, out["action"]) == (code, action)
    assert (out["smtp_reply"] or {}).get("code") == reply


def test_from_overrides_the_header_and_an_early_reject_ends_the_check(tmp_path, example_config):
    code, out = run_check(
        "--json", "-c", str(example_config), "--from", "x@spam.test", eml(tmp_path, subject="hi")
    )
    assert code == 2
    assert out["action"] == "reject"
    assert out["smtp_reply"] == {
        "code": 550,
        "status": "5.7.1",
        "text": "Mail from spam.test is not accepted here",
    }
    assert out["recipients"] == []  # never got as far as RCPT
    assert out["sender"] == "x@spam.test"


def test_to_replaces_the_header_recipients(tmp_path, example_config):
    code, out = run_check(
        "--json",
        "-c",
        str(example_config),
        "--to",
        "sales@example.com",
        "--to",
        "gone@example.com",
        "--to",
        "carol@example.org",
        eml(tmp_path, to="bob@example.com"),
    )
    assert code == 0
    assert out["recipients"] == ["sales@example.com", "carol@example.org"]
    assert out["route"]["sales@example.com"] == {"kind": "maildir", "folder": ".Sales"}
    assert out["refused_recipients"] == {
        "gone@example.com": "550 5.1.1 <gone@example.com>: mailbox unavailable"
    }
    assert out["reason"] is None  # one refused recipient is not the message's verdict


def test_default_envelope_comes_from_the_headers(tmp_path):
    message = make_message(sender="Alice <alice@example.org>", to="bob@example.com").replace(
        b"Subject:", b"Cc: Carol <carol@example.net>, dave@example.net\r\nSubject:"
    )
    path = tmp_path / "m.eml"
    path.write_bytes(message)
    _, out = run_check("--json", str(path))
    assert out["sender"] == "alice@example.org"
    assert out["recipients"] == ["bob@example.com", "carol@example.net", "dave@example.net"]


def test_reads_the_message_from_stdin(tmp_path, example_config):
    code, out = run_check(
        "--json", "-c", str(example_config), "-", stdin=make_message(subject="prize")
    )
    assert code == 0
    assert out["score"] == 2


def test_ip_decides_relay_like_smtp_does(tmp_path):
    config = tmp_path / "mailflow.yaml"
    config.write_text(
        "local_domains: [example.com]\nrelay_networks: [10.0.0.0/8]\nrelay:\n  default: mx\n"
    )
    message = eml(tmp_path, to="someone@elsewhere.test")
    code, out = run_check("--json", "-c", str(config), "--ip", "192.0.2.1", message)
    assert code == 2
    assert out["smtp_reply"] == {"code": 554, "status": "5.7.1", "text": "Relay access denied"}
    code, out = run_check("--json", "-c", str(config), "--ip", "10.1.2.3", message)
    assert code == 0
    assert out["route"] == {"someone@elsewhere.test": {"kind": "mx"}}
    # An authenticated client may relay from anywhere.
    code, out = run_check("--json", "-c", str(config), "--ip", "192.0.2.1", "--user", "al", message)
    assert (code, out["action"]) == (0, "accept")


def test_text_output(tmp_path, example_config):
    code, out = run_check("-c", str(example_config), eml(tmp_path, subject="lottery winner"))
    assert code == 2
    assert out.splitlines()[0] == "action:     reject"
    assert "smtp reply: 550 5.7.1 Message rejected as spam (score 11.0)" in out
    assert "plugin:     example: continue (" in out


def test_errors_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["check", str(tmp_path / "absent.eml")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("sever: {}\n")
    result = CliRunner().invoke(main, ["check", "-c", str(bad), eml(tmp_path)])
    assert result.exit_code == 2
    assert f"{bad}:1: sever: unknown key (did you mean 'server'?)" in result.stderr


class Recorder:
    """Records what the connection looked like to the early stages."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    @hookimpl
    def mailflow_connect(self, connection):
        self.seen["ip"] = connection.ip

    @hookimpl
    def mailflow_helo(self, connection, name):
        self.seen["helo"] = (name, connection.helo)

    @hookimpl
    def mailflow_mail_from(self, sender):
        self.seen["sender"] = sender


async def test_ip_and_helo_reach_the_early_stages(make_config):
    recorder = Recorder()
    app = App(make_config("plugins: [{name: rec}]\n"), extra_plugins={"rec": recorder})
    ctx = await check_message(
        app, make_message(), sender="", recipients=["b@example.com"], ip="192.0.2.7", helo="h.test"
    )
    assert recorder.seen == {"ip": "192.0.2.7", "helo": ("h.test", "h.test"), "sender": ""}
    assert report(ctx)["action"] == "accept"


def _files(tmp_path: Path, subjects: list[str]) -> list[str]:
    paths = []
    for n, subject in enumerate(subjects):
        path = tmp_path / f"{n}.eml"
        path.write_bytes(make_message(subject=subject))
        paths.append(str(path))
    return paths


@pytest.mark.parametrize(
    ("subjects", "code"),
    [
        (["prize", "hello"], 0),
        (["prize", "lottery prize", "hello"], 1),  # a quarantine among accepts
        (["lottery winner", "lottery prize"], 2),  # the highest status wins
    ],
)
def test_several_files_give_json_lines_and_the_highest_exit_status(
    tmp_path, example_config, subjects, code
):
    files = _files(tmp_path, subjects)
    result = CliRunner().invoke(main, ["check", "--json", "-c", str(example_config), *files])
    lines = result.stdout.splitlines()
    objects = [json.loads(line) for line in lines]
    assert result.exit_code == code
    assert [o["file"] for o in objects] == files  # one line per file, in order
    assert [o["score"] for o in objects] == [
        {"prize": 2, "hello": 0, "lottery prize": 6, "lottery winner": 11}[s] for s in subjects
    ]


def test_several_files_in_text_name_each_file(tmp_path, example_config):
    files = _files(tmp_path, ["prize", "lottery winner"])
    code, out = run_check("-c", str(example_config), *files)
    assert code == 2
    assert [line for line in out.splitlines() if line.startswith(("file:", "action:"))] == [
        f"file:       {files[0]}",
        "action:     accept",
        f"file:       {files[1]}",
        "action:     reject",
    ]


def test_auth_is_the_authenticated_user(tmp_path):
    config = tmp_path / "mailflow.yaml"
    config.write_text("local_domains: [example.com]\nrelay:\n  default: mx\n")
    message = eml(tmp_path, to="someone@elsewhere.test")
    code, out = run_check("--json", "-c", str(config), "--ip", "192.0.2.1", message)
    assert (code, out["action"]) == (2, "reject")
    code, out = run_check("--json", "-c", str(config), "--ip", "192.0.2.1", "--auth", "al", message)
    assert (code, out["action"]) == (0, "accept")


def test_stdin_only_once(tmp_path, example_config):
    result = CliRunner().invoke(main, ["check", "-c", str(example_config), "-", "-"], input=b"")
    assert result.exit_code == 2
    assert "once" in result.output


def test_an_mbox_from_line_is_not_part_of_the_message(tmp_path, example_config):
    message = make_message(subject="lottery", to="bob@example.com")
    plain, mbox = tmp_path / "plain.eml", tmp_path / "mbox.eml"
    plain.write_bytes(message)
    mbox.write_bytes(b"From alice@example.org  Fri Aug 23 11:23:31 2002\n" + message)
    _, a = run_check("--json", "-c", str(example_config), str(plain))
    _, b = run_check("--json", "-c", str(example_config), str(mbox))
    assert (b["score"], b["headers_added"], b["sender"]) == (4, a["headers_added"], a["sender"])
