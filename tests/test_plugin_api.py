"""The declared plugin API (mailflow.api): what it exports, that the builtin plugins use
nothing else, that ruff refuses a plugin importing a core module, and that every name
is documented."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import mailflow
from mailflow import api
from mailflow.api import MessageContext, Result, Route, RouteKind, hookimpl
from mailflow.app import App

ROOT = Path(__file__).parent.parent
PLUGINS = ROOT / "plugins"


def mailflow_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of ``mailflow`` or one of its modules in ``path``,
    at any depth (function-level imports included); ``from mailflow import x`` counts
    as ``mailflow.x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mailflow":
                modules = [f"mailflow.{alias.name}" for alias in node.names]
            else:
                modules = [node.module]
        else:
            continue
        found += [(node.lineno, m) for m in modules if m == "mailflow" or m.startswith("mailflow.")]
    return found


def test_the_builtin_and_example_plugins_import_only_the_plugin_api():
    example = ROOT / "examples" / "mailflow-example" / "mailflow_example"
    files = sorted(PLUGINS.rglob("*.py")) + sorted(example.rglob("*.py"))
    assert len(files) > 10 and example / "__init__.py" in files
    offending = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in files
        for line, module in mailflow_imports(path)
        if module != "mailflow.api"
    ]
    assert offending == []
    assert any(mailflow_imports(p) for p in files)  # the walk does see the imports


def test_the_import_check_sees_every_spelling(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import mailflow.pipeline\n"
        "from mailflow import mime\n"
        "from mailflow.api import Result\n"
        "def later():\n"
        "    from mailflow.dns import DNSTempError\n"
    )
    assert [m for _, m in mailflow_imports(bad)] == [
        "mailflow.pipeline",
        "mailflow.mime",
        "mailflow.api",
        "mailflow.dns",
    ]


def banned_modules() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(config["tool"]["ruff"]["lint"]["flake8-tidy-imports"]["banned-api"])


def test_ruff_bans_every_core_module_but_the_api():
    core = {
        f"mailflow.{p.stem}"
        for p in (ROOT / "mailflow").iterdir()
        if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.stem != "__init__"
    }
    assert "mailflow.pipeline" in core
    assert core - {"mailflow.api"} <= banned_modules()
    assert "mailflow.api" not in banned_modules()


def run_ruff(tree: Path) -> subprocess.CompletedProcess[str]:
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format=concise", "."],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_refuses_a_plugin_that_imports_a_core_module(tmp_path):
    for folder in ("plugins", "tests", "examples/x"):
        (tmp_path / folder).mkdir(parents=True)
    core_import = "from mailflow.pipeline import Pipeline\n\n__all__ = ['Pipeline']\n"
    (tmp_path / "plugins" / "bad.py").write_text(core_import)
    (tmp_path / "examples" / "x" / "bad.py").write_text(core_import)
    (tmp_path / "plugins" / "good.py").write_text(
        "from mailflow.api import Result\n\n__all__ = ['Result']\n"
    )
    (tmp_path / "tests" / "core_user.py").write_text(core_import)

    result = run_ruff(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    flagged = sorted(line for line in result.stdout.splitlines() if "TID251" in line)
    assert [line.split(":")[0] for line in flagged] == ["examples/x/bad.py", "plugins/bad.py"]
    assert all("`mailflow.pipeline` is banned" in line for line in flagged)

    (tmp_path / "plugins" / "bad.py").unlink()
    (tmp_path / "examples" / "x" / "bad.py").unlink()
    assert run_ruff(tmp_path).returncode == 0  # the API itself, and tests, are fine


def test_the_package_re_exports_the_api_lazily():
    assert set(api.__all__) == mailflow._API_NAMES
    assert set(mailflow.__all__) == {"__version__", *api.__all__}
    for name in api.__all__:
        assert getattr(mailflow, name) is getattr(api, name)
    with pytest.raises(AttributeError):
        _ = mailflow.Pipeline  # type: ignore[attr-defined]
    code = "import sys, mailflow; print('mailflow.api' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"  # `import mailflow` (the CLI) stays cheap


def test_the_application_has_what_the_app_protocol_promises(make_config):
    members = [
        name
        for name in vars(api.App)
        if not name.startswith("_") and isinstance(vars(api.App)[name], property)
    ]
    assert set(members) == {"config", "resolver", "authserv_id", "state"}
    app = App(make_config("server: {hostname: mx.test}\n"))
    assert app.config.server.hostname == app.authserv_id == "mx.test"
    assert isinstance(app.resolver, api.Resolver)
    assert isinstance(app.state, dict)


def test_every_api_name_is_documented():
    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text.split("## Public API", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Za-z_]+)", section, re.M))
    assert documented == set(api.__all__)


class ScratchUser:
    """Leaves things in ``message.extra``, reads the shared view, then wipes ``extra``."""

    @hookimpl
    def mailflow_data(self, message: MessageContext) -> Result:
        message.extra["junk"] = False  # a plugin's own key of that name means nothing
        subject = message.header("Subject")
        message.extra.clear()
        assert message.header("Subject") == subject  # the view is not kept in extra
        return Result(score=3.0, details={"subject": subject})


async def test_what_the_core_reads_is_in_typed_fields_not_in_extra(make_config):
    from mailflow.check import check_message
    from mailflow.testing import make_message

    config = make_config("actions: {junk: 2}\nplugins: [{name: scratch, on_error: continue}]\n")
    app = App(config, extra_plugins={"scratch": ScratchUser()})
    await app.startup()
    raw = make_message(subject="hello there")
    ctx = await check_message(app, raw, recipients=["bob@example.com"])
    assert ctx.result_of("scratch").details == {"subject": "hello there"}
    assert ctx.junk and ctx.score == 3.0
    assert ctx.routes["bob@example.com"] == Route(RouteKind.MAILDIR, folder=".Junk")
    assert ctx.extra == {}  # the core left nothing of its own there
