"""Every hook a mailflow plugin can implement.

Hooks are named after the SMTP phase they run in, like milter callbacks. Any hook
implementation may be a plain function or an ``async def`` coroutine; the pipeline
awaits each one in the order the config lists the plugins (pluggy's own calling
order is not used, because pluggy cannot await coroutines).

Verdict hooks return ``None`` (no opinion) or a :class:`mailflow.api.Result`;
plugins import everything they use from :mod:`mailflow.api` (docs/plugins.md, "Public API").
A final action (reject, tempfail, discard, quarantine, accept) stops the chain at
that stage, except quarantine at the data stage (see ``mailflow_data``); a reject or
tempfail returned from an early stage is answered at that SMTP command (e.g. at
RCPT), before any message data is sent.

A plugin that raises, or runs longer than its ``timeout``, is logged with its name
and handled by its ``on_error`` setting (``quarantine``, ``tempfail`` or
``continue``): it never takes the server down. A data hook whose work grows with the
message belongs in a content-analysis worker process (a plugin attribute ``isolate =
True`` or ``"large"``, or ``isolate:`` in its config entry), where a timeout really
stops it; see docs/plugins.md, "Isolation".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from mailflow.api import App, Connection, MessageContext, Result, Route

PROJECT = "mailflow"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def mailflow_startup(app: App) -> None:
    """Run once when the application starts (``serve``, ``check``, ...), before any mail.

    ``app`` gives access to the validated config (``app.config``), the shared DNS
    resolver (``app.resolver``) and the directory paths in use. Open files, load
    models and connect to shared state here, not per message. May be async.
    Return value is ignored. An exception here aborts start-up with the plugin named.
    """


@hookspec
def mailflow_shutdown(app: App) -> None:
    """Run once when the application stops: close what ``mailflow_startup`` opened.

    May be async. Return value and exceptions are logged and otherwise ignored.
    """


@hookspec
def mailflow_connect(connection: Connection) -> Result | None:
    """A client has connected; runs before the SMTP greeting is sent.

    ``connection.ip`` / ``connection.port`` identify the client; the reverse DNS name
    is available through ``await connection.resolve_reverse_name()``.

    Return ``Result.reject(...)`` or ``Result.tempfail(...)`` to answer the greeting
    with 554/421 and close the connection; ``Result.accept()`` skips the remaining
    connect hooks. No mutations apply at this stage.
    """


@hookspec
def mailflow_helo(connection: Connection, name: str) -> Result | None:
    """The client sent HELO or EHLO ``name`` (also stored as ``connection.helo``).

    A reject/tempfail is answered to the HELO/EHLO command itself (the client may send
    another); ``Result.accept()`` skips the remaining helo hooks. No mutations apply.
    """


@hookspec
def mailflow_mail_from(connection: Connection, sender: str, options: list[str]) -> Result | None:
    """The client sent ``MAIL FROM:<sender>`` (``""`` is the null sender ``<>``).

    ``options`` are the ESMTP parameters (e.g. ``SIZE=1234``, ``BODY=8BITMIME``).
    A reject/tempfail is answered to MAIL FROM; ``Result.accept()`` skips the remaining
    mail hooks; discard and quarantine are ignored here. Envelope mutations
    (``ChangeSender``, ``AddRecipient``, ``SetRoute``) are kept and applied to the
    envelope when the message arrives.
    """


@hookspec
def mailflow_rcpt_to(
    connection: Connection, sender: str, recipient: str, options: list[str]
) -> Result | None:
    """The client sent ``RCPT TO:<recipient>``; relay control has already passed it.

    A reject/tempfail refuses only this recipient (the transaction goes on with the
    others); a discard also refuses it (550), since one recipient cannot be dropped
    silently; ``Result.accept()`` skips the remaining rcpt hooks. ``AddRecipient`` /
    ``RemoveRecipient`` / ``ChangeSender`` / ``SetRoute`` mutations are kept and applied
    to the envelope when the message arrives.
    """


@hookspec
def mailflow_data(message: MessageContext) -> Result | None:
    """The whole message has arrived (end of DATA); also what ``mailflow check`` runs.

    ``message`` carries the envelope, connection, raw bytes, the message as the one
    MIME/text layer reads it (``message.fields``: header fields; ``message.mime``: parts,
    file names, decoded text; walked once per body and shared by all plugins; see
    docs/mime.md), the same as stdlib objects (``message.headers``,
    ``message.message``), and the results of the plugins before this one
    (``message.runs``, ``message.score``).

    Return a Result with a verdict, a spam score and/or symbols, and mutations:
    ``AddHeader``, ``ChangeHeader``, ``RemoveHeader``, ``ReplaceBody``,
    ``AddRecipient``, ``RemoveRecipient``, ``ChangeSender``, ``SetRoute``. Mutations
    are applied before the next plugin runs, so later plugins (e.g. DKIM signing)
    see the changed message. Any verdict may be returned: reject/tempfail are answered
    after the final ".", discard and quarantine answer 250 and deliver nothing to the
    mailboxes, accept skips the remaining data hooks. Quarantine does not skip them:
    the later plugins still run and add their headers to the quarantined copy; a
    later reject, tempfail or discard replaces the quarantine, a later accept or
    quarantine changes nothing (``message.action`` tells a plugin it was
    quarantined). When no plugin decided, the total score is mapped to an action by
    the ``actions`` thresholds in the config.
    """


@hookspec
def mailflow_route(message: MessageContext, recipient: str) -> Route | None:
    """Choose where ``recipient``'s copy goes; runs after ``mailflow_data`` accepted.

    Return a :class:`mailflow.api.Route` (Maildir folder/mailbox, LMTP target,
    relay target, direct MX or discard) or ``None`` to leave the choice to the next
    plugin and finally to the config (``local_domains`` -> local delivery,
    ``relay.routes`` / ``relay.default`` otherwise). The first non-None route wins;
    a ``SetRoute`` mutation from an earlier stage takes precedence over this hook.
    """


@hookspec
def mailflow_delivered(
    queue_id: str, recipient: str, route: Route, outcome: str, detail: str
) -> None:
    """A delivery attempt for one recipient finished.

    ``outcome`` is ``delivered``, ``deferred`` (will retry), ``bounced`` or
    ``expired``; ``detail`` is the remote reply or error. For audit logs, archives
    and metrics. May be async; return value ignored; exceptions are logged only.
    """


@hookspec
def mailflow_learn(message: bytes, label: str, source: str) -> None:
    """A person said what a message is: learn from it (spam filters' feedback).

    ``label`` is ``"spam"`` or ``"ham"``; ``message`` the raw message as it was
    delivered or quarantined (with the headers mailflow added); ``source`` says where
    the judgement came from: ``"quarantine-release"`` (an admin released it: ham),
    ``"quarantine-delete"`` (deleted as spam), or ``"junk-folder"`` for a tool that
    reports users moving mail into or out of their Junk folder (bayes' own ``learn
    --maildir`` updates its model directly). Called by the CLI (``mailflow quarantine
    release`` / ``delete --spam``, after the message has been released or deleted)
    with the plugins the config enables, after ``mailflow_startup``; never while
    mail is being received. May be async. Return value ignored. An exception is
    reported on stderr and never undoes or blocks the quarantine operation; a plugin
    that is not set up to learn should log a warning and return.
    """


@hookspec
def mailflow_register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``mailflow`` CLI (e.g. ``mailflow train``): ``cli.add_command``.

    Called through the plugin manager when the CLI needs plugin commands (an unknown
    command name, or ``--help``), for every installed plugin, enabled or not, so a
    plugin's maintenance commands work before it is switched on. There is no config
    yet, so the hook is called on what the entry point names (the class, or the
    module), never on a built plugin: in a class, implement it as a
    ``@staticmethod`` marked ``@hookimpl`` (``@staticmethod`` above ``@hookimpl``).
    Return value ignored. An exception is reported on stderr with the plugin's name;
    the other plugins' commands are still added.
    """


def hook_names() -> list[str]:
    """Names of all hook specs, in the order they are documented above."""
    return [name for name in globals() if name.startswith("mailflow_")]


STAGE_HOOKS: dict[str, str] = {
    "connect": "mailflow_connect",
    "helo": "mailflow_helo",
    "mail": "mailflow_mail_from",
    "rcpt": "mailflow_rcpt_to",
    "data": "mailflow_data",
}

# Hooks the CLI calls on the installed plugins (mailflow.pipeline.register_plugin_commands),
# not the pipeline on the enabled ones.
CLI_HOOKS = frozenset({"mailflow_register_commands"})

__all__: list[Any] = ["CLI_HOOKS", "STAGE_HOOKS", "hook_names", "hookimpl", "hookspec"]
