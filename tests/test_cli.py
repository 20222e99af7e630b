"""The `mailflow` command: version, init, plugins list, serve's banner, the per-message log line."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import re
import signal
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailflow import __version__, msglog
from mailflow.cli import main
from mailflow.config import parse_config
from mailflow.hookspecs import hookimpl
from mailflow.pipeline import available_plugins
from mailflow.testing import make_message, running_server, send
from mailflow.verdict import Result

STARTER = importlib.resources.files("mailflow").joinpath("data/starter.yaml").read_text("utf-8")


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_version():
    assert (invoke("version").exit_code, invoke("version").stdout) == (
        0,
        f"mailflow {__version__}\n",
    )
    # As docs/cli.md says: the same line as `mailflow version`.
    assert invoke("--version").stdout == f"mailflow {__version__}\n"


# --- init ---------------------------------------------------------------------------------


def test_init_writes_a_starter_that_validates_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "mailflow.yaml"
    result = invoke("init", str(target))
    assert result.exit_code == 0
    assert target.read_text() == STARTER
    assert invoke("config", "validate", str(target)).exit_code == 0

    target.write_text("# my edits\n")
    result = invoke("init", str(target))
    assert result.exit_code == 1
    assert "exists (use --force to overwrite)" in result.stderr
    assert target.read_text() == "# my edits\n"

    assert invoke("init", "--force", str(target)).exit_code == 0
    assert target.read_text() == STARTER


def uncomment(text: str) -> str:
    """The starter with every commented-out example switched on.

    A commented example is "# " followed by a YAML key or list item; where it
    replaces an active one-line setting (``plugins: []``), the active line goes.
    """
    lines = []
    for line in text.splitlines():
        m = re.match(r"^(\s*)# ( *(?:[A-Za-z_][\w.-]*:(?:\s|$)|- ))", line)
        lines.append(m.group(1) + line[m.start(2) :] if m else line)
    top = [i for i, line in enumerate(lines) if re.match(r"^[a-z_]+:", line)]
    seen: dict[str, int] = {}
    drop = set()
    for i in top:
        key = lines[i].split(":")[0]
        if key in seen:
            drop.add(seen[key])
        seen[key] = i
    return "\n".join(line for i, line in enumerate(lines) if i not in drop) + "\n"


def test_starter_examples_are_valid_when_uncommented():
    full = uncomment(STARTER)
    config = parse_config(full, "starter (uncommented)")
    # Make sure the examples really were switched on.
    assert config.server.tls is not None and config.server.auth is not None
    assert config.delivery.lmtp is not None and config.delivery.maildir.quota == 1024**3
    assert config.relay.routes == {"example.net": "smarthost", "example.org": "mx"}
    assert (config.actions.reject, config.actions.junk) == (15, 8)
    assert config.metrics.listen == "127.0.0.1:9125"
    assert [p.name for p in config.plugins] == [
        "attachments",
        "bayes",
        "phishing",
        "spf",
        "dkim",
        "arc",
        "dmarc",
        "clamav",
        "rules",
        "authres",
        "dkim_sign",
        "arc_seal",
        "example",
    ]


def test_starter_as_written_is_the_embedded_default():
    from mailflow.config import load_config

    assert parse_config(STARTER).model_dump() == load_config(None).model_dump()


def test_starter_mentions_every_config_section():
    from mailflow.config import Config

    for key in Config.model_fields:
        assert re.search(rf"^#? ?{key}:", STARTER, re.MULTILINE), key


# --- plugins list -------------------------------------------------------------------------


def test_plugins_list_shows_installed_plugins_and_hook_order(tmp_path):
    if "example" not in available_plugins():
        pytest.fail("run `pip install ./examples/mailflow-example` first", pytrace=False)
    config = tmp_path / "mailflow.yaml"
    config.write_text("plugins:\n  - name: example\n")
    result = invoke("plugins", "list", "-c", str(config))
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert any(
        re.match(r"enabled\s+example\s+mailflow_example:ExamplePlugin\s+\(mailflow-example\)", line)
        for line in lines
    )
    order = lines[lines.index("hook order:") + 1 :]
    assert order == [
        "  mailflow_mail_from: example",
        "  mailflow_rcpt_to: example",
        "  mailflow_data: example",
        "  mailflow_route: example",
    ]
    # The embedded default does not enable third-party plugins.
    result = invoke("plugins", "list")
    assert re.search(r"^disabled\s+example ", result.stdout, re.MULTILINE)
    assert "example" not in result.stdout.partition("hook order:")[2]


# --- serve --------------------------------------------------------------------------------


async def test_serve_prints_where_it_listens_and_delivers(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from mailflow.cli import main; main()",
        "serve",
        "--listen",
        "127.0.0.1:0",
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            listening = ""
            while "listening on" not in listening:  # plugins may log at start-up first
                listening = (await proc.stderr.readline()).decode()
                assert listening, "serve exited before it listened"
            where = (await proc.stderr.readline()).decode()
        m = re.fullmatch(
            rf"mailflow {__version__}: listening on 127\.0\.0\.1:(\d+) \(SMTP\)\n", listening
        )
        assert m and int(m.group(1)) > 0
        assert f"local mail -> Maildir under {tmp_path.resolve() / 'mail'}/" in where
        assert "relay: none" in where
        port = int(m.group(1))
        assert await send(port, "a@example.org", ["bob@example.com"], make_message()) == {}
        async with asyncio.timeout(30):
            while not list((tmp_path / "mail" / "bob@example.com" / "new").glob("*")):
                await asyncio.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await proc.wait()
    assert proc.returncode == 0


# --- one log line per message -------------------------------------------------------------


class Scorer:
    @hookimpl
    def mailflow_data(self, message):
        return Result(score=1.5, reason="looks odd")


@pytest.fixture
def json_log_lines():
    """JSON log lines, as `serve` sets them up from ``log.format: json``."""
    msglog.configure(True)
    yield
    msglog.configure(False)


async def deliver_one(make_config, caplog, log_format: str) -> logging.LogRecord:
    config = make_config(f"log: {{format: {log_format}}}\nplugins: [{{name: scorer}}]\n")
    caplog.set_level(logging.INFO, logger="mailflow.message")
    async with running_server(config, extra_plugins={"scorer": Scorer()}) as srv:
        message = make_message()
        await send(srv.port, "alice@example.org", ["bob@example.com", "carol@example.com"], message)
        await srv.wait_delivered("carol@example.com")
    [record] = [r for r in caplog.records if r.name == "mailflow.message"]
    return record


async def test_json_log_line_has_every_field(make_config, caplog, json_log_lines):
    record = await deliver_one(make_config, caplog, "json")
    line = json.loads(record.getMessage())
    assert re.fullmatch(r"[0-9A-F]+", line["queue_id"])
    assert line["client"] == "127.0.0.1"
    assert line["from"] == "alice@example.org"
    assert line["rcpts"] == ["bob@example.com", "carol@example.com"]
    assert line["size"] > len(make_message())  # plus our Received header
    assert line["action"] == "accept"
    assert line["score"] == 1.5
    assert line["plugins"]["scorer"]["score"] == 1.5
    assert line["plugins"]["scorer"]["time_ms"] >= 0
    assert line["delivery"] == "delivered"  # local copies are delivered before the 250
    assert line["reply"].startswith("250 ")


async def test_text_log_line_has_every_field(make_config, caplog):
    record = await deliver_one(make_config, caplog, "text")
    text = record.getMessage()
    assert re.match(
        r"[0-9A-F]+ client=127\.0\.0\.1 from=<alice@example\.org> "
        r"rcpts=<bob@example\.com>,<carol@example\.com> size=\d+ action=accept score=1\.50 "
        r"delivery=delivered reply='250 [^']*' plugins: scorer=continue/[\d.]+ms$",
        text,
    ), text


@pytest.mark.parametrize(
    "page",
    [
        "docs/index.md",
        "docs/plugins.md",
        "docs/config.md",
        "docs/cli.md",
        "examples/mailflow-example/README.md",
    ],
)
def test_relative_links_in_the_docs_resolve(page):
    root = Path(__file__).parent.parent
    path = root / page
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if not re.match(r"[a-z]+:", target):  # skip http:, mailto:
            assert (path.parent / target).exists(), f"{page}: broken link {target}"


def test_every_builtin_plugin_has_a_page_an_index_entry_and_a_starter_example():
    root = Path(__file__).parent.parent
    index = (root / "docs" / "index.md").read_text()
    builtin = [
        n for n, ep in available_plugins().items() if ep.value.startswith("mailflow_plugins.")
    ]
    assert builtin, "no builtin plugins found: is mailflow installed (pip install -e .)?"
    for name in builtin:
        assert (root / "docs" / "plugins" / f"{name}.md").exists(), name
        assert f"[plugins/{name}.md](plugins/{name}.md)" in index, name
        assert re.search(rf"- name: {name}\b", STARTER), name


def test_builtin_commands_do_not_import_plugins():
    """`mailflow queue list` and friends must not pay for scikit-learn & co."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mailflow.cli import main\n"
        "result = CliRunner().invoke(main, ['version'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in sys.modules if m.startswith(('sklearn', 'mailflow_plugins'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_log_lines_keep_the_text_they_had_when_logged(tmp_path):
    """Formatting happens in the writer thread, but the message text is fixed at once."""
    from mailflow.testing import config_for

    config = config_for(tmp_path, f"log: {{file: {tmp_path / 'mailflow.log'}}}\n")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        msglog.setup_logging(config)
        recipients = ["a@example.com"]
        logging.getLogger("mailflow.test").info("rcpts=%s", recipients)
        recipients.append("late@example.com")  # after the call: must not show up
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("mailflow.test").exception("with traceback")
        msglog._stop_log_writer()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    text = (tmp_path / "mailflow.log").read_text()
    assert "INFO mailflow.test: rcpts=['a@example.com']\n" in text
    assert "ERROR mailflow.test: with traceback\nTraceback" in text
    assert "ValueError: boom" in text
