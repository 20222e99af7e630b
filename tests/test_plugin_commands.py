"""Plugin commands: ``mailflow_register_commands`` is called through pluggy
(``pm.hook``) on every installed plugin, a broken plugin is reported by name and does
not keep the others from adding theirs."""

from __future__ import annotations

import importlib.metadata

import click
import pytest

from mailflow import pipeline
from mailflow.api import hookimpl
from mailflow.pipeline import register_plugin_commands

CALLS: list[str] = []


def command(name: str) -> click.Command:
    return click.Command(name, callback=lambda: None)


class First:
    @staticmethod
    @hookimpl
    def mailflow_register_commands(cli: click.Group) -> None:
        CALLS.append("first")
        cli.add_command(command("first-cmd"))

    @hookimpl
    def mailflow_data(self, message):  # other hooks of the class do not get in the way
        raise AssertionError("never called here")


class Broken:
    @staticmethod
    @hookimpl
    def mailflow_register_commands(cli: click.Group) -> None:
        CALLS.append("broken")
        raise RuntimeError("no disk")


class Last:
    @staticmethod
    @hookimpl
    def mailflow_register_commands(cli: click.Group) -> None:
        CALLS.append("last")
        cli.add_command(command("last-cmd"))


class Unmarked:
    @staticmethod
    def mailflow_register_commands(cli: click.Group) -> None:
        raise AssertionError("an unmarked method is not a hook")


class NeedsSelf:
    @hookimpl
    def mailflow_register_commands(self, cli: click.Group) -> None:
        raise AssertionError("a class is not built to add commands")


@hookimpl
def mailflow_register_commands(cli: click.Group) -> None:
    """This module, named by an entry point, is a plugin too."""
    CALLS.append("module")
    cli.add_command(command("module-cmd"))


def entry_point(name: str, target: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name, f"{__name__}{target}", pipeline.ENTRY_POINT_GROUP)


@pytest.fixture
def installed(monkeypatch):
    """Replace the installed plugins by these entry points."""

    def install(**targets: str) -> None:
        eps = {name: entry_point(name, target) for name, target in targets.items()}
        monkeypatch.setattr(pipeline, "available_plugins", lambda: eps)

    CALLS.clear()
    return install


def test_every_installed_plugin_adds_its_commands_through_the_hook(installed):
    installed(a=":First", m="", z=":Last")
    cli = click.Group()
    assert register_plugin_commands(cli) == []
    assert set(cli.commands) == {"first-cmd", "module-cmd", "last-cmd"}
    assert sorted(CALLS) == ["first", "last", "module"]


def test_a_failing_plugin_is_named_and_the_others_still_add_theirs(installed):
    # Registered a, b, c: pluggy calls c, then b, which raises before a is reached.
    installed(a=":First", b=":Broken", c=":Last")
    cli = click.Group()
    problems = register_plugin_commands(cli)
    assert problems == ["plugin b failed to add its commands: no disk"]
    assert set(cli.commands) == {"first-cmd", "last-cmd"}
    assert sorted(CALLS) == ["broken", "first", "last"]  # each called once


def test_plugins_that_cannot_take_part_are_reported(installed):
    installed(
        gone=".nowhere:Plugin",  # a module that does not exist
        plain=":Unmarked",
        selfish=":NeedsSelf",
        z=":Last",
    )
    cli = click.Group()
    problems = register_plugin_commands(cli)
    assert problems[0].startswith("plugin gone failed to load: ")
    assert problems[1:] == [
        "plugin plain: mailflow_register_commands is not marked @hookimpl, ignored",
        "plugin selfish: mailflow_register_commands must be a @staticmethod, ignored",
    ]
    assert set(cli.commands) == {"last-cmd"}


def test_the_builtin_and_the_example_plugins_add_their_commands():
    """The real entry points (mailflow's and the installed example package's)."""
    if "example" not in pipeline.available_plugins():
        pytest.fail("run `pip install ./examples/mailflow-example` first", pytrace=False)
    cli = click.Group()
    assert register_plugin_commands(cli) == []
    assert {"rules", "dkim", "train", "learn", "evaluate", "example"} <= set(cli.commands)
    assert isinstance(cli.commands["dkim"], click.Group)
    assert "keygen" in cli.commands["dkim"].commands  # type: ignore[attr-defined]


def test_the_pipeline_does_not_treat_the_cli_hook_as_a_stage(make_config):
    from mailflow.app import App

    app = App(make_config("plugins: [{name: rules}]\n"))
    assert app.pipeline.plugins_for("mailflow_data") == ["rules"]
    assert app.pipeline.plugins_for("mailflow_register_commands") == []
    assert not hasattr(app.pipeline, "register_commands")
