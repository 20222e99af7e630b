"""mailflow: a pluggable, milter-style mail filtering pipeline.

The plugin API (:mod:`mailflow.api`) is also reachable from here
(``from mailflow import Result``); it is imported on first use, so that ``import
mailflow`` stays cheap for the CLI. Plugins should import from ``mailflow.api``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mailflow.api import *  # noqa: F403

# The same names as mailflow.api.__all__ (tests/test_plugin_api.py checks it).
_API_NAMES = frozenset(
    {
        "Action", "AddHeader", "AddRecipient", "App", "ChangeHeader", "ChangeSender",
        "CompiledRuleSet", "Config", "ConfigError", "Connection", "DNSTempError", "Envelope",
        "MessageContext", "Mutation", "PluginRun", "RemoveHeader", "RemoveRecipient",
        "ReplaceBody", "Resolver", "Result", "Route", "RouteKind", "SMTPReply", "SetRoute",
        "Symbol", "compile_ruleset", "evaluate", "hookimpl", "load_rules", "mime", "to_result",
    }
)  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from mailflow import api

        return getattr(api, name)
    raise AttributeError(f"module 'mailflow' has no attribute {name!r}")


__all__ = ["__version__", *sorted(_API_NAMES)]
