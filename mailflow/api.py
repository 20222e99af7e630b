"""The declared plugin API: everything a mailflow plugin may import, in one place.

A plugin (builtin or third-party) imports from here and nowhere else in ``mailflow``::

    from mailflow.api import AddHeader, App, MessageContext, Result, Symbol, hookimpl

The builtin plugins and the example plugin are held to this: ruff's banned-API rule
(TID251) refuses any other ``mailflow.*`` import under ``plugins/`` and
``examples/``, and ``tests/test_plugin_api.py`` checks it again. What each name is,
and which names are stable, is in docs/plugins.md ("Public API"); what is not listed
in ``__all__`` is internal and may change in any release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from mailflow import mime
from mailflow.config import Config, ConfigError
from mailflow.dns import DNSTempError, Resolver
from mailflow.hookspecs import hookimpl
from mailflow.message import Connection, Envelope, MessageContext, PluginRun
from mailflow.rules import CompiledRuleSet, compile_ruleset, evaluate, load_rules, to_result
from mailflow.verdict import (
    Action,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    Mutation,
    RemoveHeader,
    RemoveRecipient,
    ReplaceBody,
    Result,
    Route,
    RouteKind,
    SetRoute,
    SMTPReply,
    Symbol,
)


class App(Protocol):
    """What ``mailflow_startup(app)`` / ``mailflow_shutdown(app)`` give a plugin.

    Only these members are part of the API; the application object behind it has
    more (the pipeline, the queue, metrics), which plugins must not use.
    """

    @property
    def config(self) -> Config:
        """The validated configuration (read only; docs/config.md)."""
        ...

    @property
    def resolver(self) -> Resolver:
        """The shared async DNS resolver: ``await app.resolver.query(name, "TXT")``."""
        ...

    @property
    def authserv_id(self) -> str:
        """This server's name in Authentication-Results (``authserv_id``, else the hostname)."""
        ...

    @property
    def state(self) -> dict[str, Any]:
        """Scratch space shared by the plugins of this process (one dict per process)."""
        ...


if TYPE_CHECKING:
    import mailflow.app

    def _the_application_is_an_app(app: mailflow.app.App) -> App:
        return app  # mypy checks that the real application satisfies the protocol


__all__ = [
    "Action",
    "AddHeader",
    "AddRecipient",
    "App",
    "ChangeHeader",
    "ChangeSender",
    "CompiledRuleSet",
    "Config",
    "ConfigError",
    "Connection",
    "DNSTempError",
    "Envelope",
    "MessageContext",
    "Mutation",
    "PluginRun",
    "RemoveHeader",
    "RemoveRecipient",
    "ReplaceBody",
    "Resolver",
    "Result",
    "Route",
    "RouteKind",
    "SMTPReply",
    "SetRoute",
    "Symbol",
    "compile_ruleset",
    "evaluate",
    "hookimpl",
    "load_rules",
    "mime",
    "to_result",
]
