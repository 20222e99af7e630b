"""YAML rules: the shipped example files, error messages, every condition, via check and SMTP."""

from __future__ import annotations

import email.message
import textwrap
from pathlib import Path

import aiosmtplib
import pytest

from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.config import ConfigError
from mailflow.rules import load_rules, parse_rules
from mailflow.testing import make_message, running_server, send

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "rules").glob("*.yaml"))


def test_rules_folder_ships_examples():
    assert len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_rule_files_validate(path: Path):
    assert load_rules(path).rules


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        (
            "rules:\n  - name: a\n    when: {subjekt: {contains: x}}\n    then: {score: 1}\n",
            "t.yaml:3: rules[0].when.subjekt:",
            "unknown key",
        ),
        (
            "rules:\n  - name: a\n    when: {subject: {matches: '(['}}\n    then: {score: 1}\n",
            "t.yaml:3: rules[0].when.subject:",
            "invalid regular expression",
        ),
        (
            "rules:\n  - name: a\n    when: {subject: {contains: x, equals: y}}\n"
            "    then: {score: 1}\n",
            "t.yaml:3: rules[0].when.subject:",
            "exactly one of",
        ),
        (
            "rules:\n  - name: a\n    when: {size: {over: lots}}\n    then: {score: 1}\n",
            "t.yaml:3: rules[0].when.size.over:",
            "size",
        ),
        (
            "rules:\n  - name: a\n    when: {authenticated: true}\n"
            "    then: {action: reject, code: 451}\n",
            "t.yaml:4: rules[0].then:",
            "5xx",
        ),
        (
            "rules:\n  - name: a\n    when: {client_ip: [nonsense]}\n    then: {score: 1}\n",
            "t.yaml:3: rules[0].when.client_ip:",
            "not a network",
        ),
    ],
)
def test_bad_rules_are_explained_with_file_key_and_line(text: str, where: str, what: str):
    with pytest.raises(ConfigError) as info:
        parse_rules(text, "t.yaml")
    message = str(info.value)
    assert where in message, message
    assert what in message, message


def _write_rules(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _config_with_rules(make_config, *files: Path):
    listed = ", ".join(str(f) for f in files)
    return make_config(f"plugins:\n  - name: rules\n    settings: {{files: [{listed}]}}\n")


def _pdf_message(subject: str, to: str) -> bytes:
    msg = email.message.EmailMessage()
    msg["From"] = "vendor@example.net"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Please find the document attached.")
    msg.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="doc.pdf")
    return msg.as_bytes().replace(b"\n", b"\r\n")


async def _check(config, raw: bytes, **kw):
    app = App(config)
    await app.startup()
    try:
        return report(await check_message(app, raw, **kw))
    finally:
        await app.shutdown()


async def test_department_routing_and_aliases(make_config):
    config = _config_with_rules(make_config, REPO / "rules" / "departments.yaml")
    out = await _check(
        config,
        make_message(),
        sender="x@example.net",
        recipients=["sales@example.com", "bob@example.com"],
    )
    assert out["route"]["sales@example.com"] == {"kind": "maildir", "mailbox": "sales-team"}
    assert out["route"]["bob@example.com"] == {"kind": "maildir"}
    assert ["X-Department", "sales"] in out["headers_added"]
    assert out["plugins"]["rules"]["matched"] == ["sales-alias"]

    out = await _check(config, make_message(), recipients=["jdoe@example.com"])
    assert out["recipients"] == ["asmith@example.com"]

    out = await _check(config, make_message(), recipients=["legal@example.com"])
    assert sorted(out["recipients"]) == ["archive@example.com", "legal@example.com"]

    # all + any + attachment content type: a PDF to billing@ goes to accounting
    out = await _check(
        config, _pdf_message("hello", "billing@example.com"), recipients=["billing@example.com"]
    )
    assert out["route"]["billing@example.com"]["mailbox"] == "accounting"
    out = await _check(config, make_message(subject="hello"), recipients=["billing@example.com"])
    assert "mailbox" not in out["route"]["billing@example.com"]


async def test_content_policy_conditions(make_config, tmp_path: Path):
    config = _config_with_rules(make_config, REPO / "rules" / "content-policy.yaml")
    out = await _check(config, make_message(subject="You have won the LOTTERY"))
    assert out["score"] == 4.0
    assert out["action"] == "accept"
    out = await _check(config, make_message(body="Just pay the wire transfer fee.\r\n"))
    assert out["plugins"]["rules"]["matched"] == [
        "lottery-spam-phrases",
        "strip-internal-headers-from-outside",
    ]
    out = await _check(config, make_message(), ip="192.0.2.7")
    assert out["score"] == -3.0
    exe = _pdf_message("tool", "bob@example.com").replace(b"doc.pdf", b"setup.exe")
    out = await _check(config, exe)
    assert out["action"] == "reject"
    assert out["smtp_reply"]["code"] == 554
    # authenticated users keep internal headers; others have them removed
    internal = make_message(extra_headers={"X-Internal-Classification": "secret"})
    out = await _check(config, internal, authenticated_user="bob")
    assert "strip-internal-headers-from-outside" not in out["plugins"]["rules"]["matched"]
    # more MIME parts than mailflow reads: refused before any attachment rule is fooled
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(1100))
    bomb = (
        b"From: a@example.org\r\nSubject: many parts\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"
    )
    out = await _check(config, bomb, recipients=["bob@example.com"])
    assert out["plugins"]["rules"]["matched"][0] == "too-many-mime-parts"
    assert (out["action"], out["smtp_reply"]["code"]) == ("reject", 554)


async def test_score_condition_sees_earlier_plugins_and_stop(make_config, tmp_path: Path):
    path = _write_rules(
        tmp_path,
        """\
        rules:
          - name: first
            when: {header: {name: X-Flag, exists: true}}
            then: {score: 5, stop: true}
          - name: never
            when: {subject: {exists: true}}
            then: {score: 100}
        """,
    )
    config = _config_with_rules(make_config, path)
    out = await _check(config, make_message(extra_headers={"X-Flag": "1"}))
    assert out["score"] == 5
    assert out["plugins"]["rules"]["matched"] == ["first"]


async def test_rules_through_smtp(make_config):
    config = _config_with_rules(
        make_config, REPO / "rules" / "departments.yaml", REPO / "rules" / "content-policy.yaml"
    )
    async with running_server(config) as srv:
        await send(srv.port, "x@example.net", ["orders@example.com"], make_message())
        [raw] = await srv.wait_delivered("sales-team")
        assert b"X-Department: sales" in raw
        exe = _pdf_message("tool", "bob@example.com").replace(b"doc.pdf", b"run.exe")
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            await send(srv.port, "x@example.net", ["bob@example.com"], exe)
        assert info.value.code == 554
        assert "Executable attachments" in info.value.message
        assert srv.delivered("bob@example.com") == []
        internal = make_message(extra_headers={"X-Internal-Classification": "secret"})
        await send(srv.port, "x@example.net", ["carol@example.com"], internal)
        [raw] = await srv.wait_delivered("carol@example.com")
        assert b"X-Internal-Classification" not in raw


def test_rules_validate_command(tmp_path: Path):
    from click.testing import CliRunner

    from mailflow.cli import main

    bad = _write_rules(tmp_path, "rules:\n  - name: a\n    when: {}\n    then: {}\n")
    runner = CliRunner()
    ok = runner.invoke(main, ["rules", "validate", str(SHIPPED[0])])
    assert ok.exit_code == 0 and "OK" in ok.output
    fail = runner.invoke(main, ["rules", "validate", str(bad)])
    assert fail.exit_code == 1
    assert "rules[0].when" in fail.output
