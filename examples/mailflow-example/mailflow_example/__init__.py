"""mailflow-example: a small but complete third-party mailflow plugin.

It implements one hook at each interesting stage, all driven by its settings:

* ``mailflow_mail_from``: refuse senders from ``blocked_sender_domains`` (550 at MAIL);
* ``mailflow_rcpt_to``: refuse the addresses in ``refused_recipients`` (550 at RCPT,
  only that recipient);
* ``mailflow_data``: look for ``subject_keywords`` in the Subject, add their scores to
  the message's spam score and say which matched in an ``X-Example-Keywords`` header;
* ``mailflow_route``: file the recipients in ``folders`` into a Maildir++ folder.

The matching logic lives in plain functions (easy to unit-test); the hook methods
only translate between mailflow's types and those functions.
"""

from __future__ import annotations

import asyncio

import click
from pydantic import BaseModel, ConfigDict, Field

from mailflow.api import (
    AddHeader,
    Connection,
    MessageContext,
    Result,
    Route,
    RouteKind,
    Symbol,
    hookimpl,
)

__all__ = ["ExamplePlugin", "ExampleSettings", "Settings", "domain_of", "matching_keywords"]
__version__ = "1.0.0"


class ExampleSettings(BaseModel):
    """What ``plugins[i].settings`` may contain for ``name: example``.

    ``extra="forbid"`` makes a misspelt key a config error (file, key path, line)
    instead of a silently ignored setting.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    blocked_sender_domains: list[str] = []
    refused_recipients: list[str] = []
    # keyword (case-insensitive, matched in the Subject) -> score it adds
    subject_keywords: dict[str, float] = {}
    header: str = Field(default="X-Example-Keywords", min_length=1)
    # recipient address -> Maildir++ folder, e.g. {"sales@example.com": ".Sales"}
    folders: dict[str, str] = {}


Settings = ExampleSettings  # the short name used in the docs


def domain_of(address: str) -> str:
    """The lower-cased domain of ``address`` ("" for the null sender or a bare name)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def matching_keywords(subject: str, keywords: dict[str, float]) -> list[tuple[str, float]]:
    """The configured keywords found in ``subject``, in settings order."""
    folded = subject.casefold()
    return [(word, score) for word, score in keywords.items() if word.casefold() in folded]


class ExamplePlugin:
    """The object mailflow registers; built once per application with validated settings."""

    # mailflow validates plugins[i].settings against this model before calling us.
    Settings = ExampleSettings

    def __init__(self, settings: ExampleSettings | None = None) -> None:
        self.settings = settings or ExampleSettings()
        self._blocked = {d.lower() for d in self.settings.blocked_sender_domains}
        self._refused = {r.lower() for r in self.settings.refused_recipients}
        self._folders = {r.lower(): f for r, f in self.settings.folders.items()}

    # An async hook: a real plugin would do a DNS or database lookup here, and
    # awaiting keeps the other SMTP connections flowing meanwhile.
    @hookimpl
    async def mailflow_mail_from(self, connection: Connection, sender: str) -> Result | None:
        await asyncio.sleep(0)
        domain = domain_of(sender)
        if domain and domain in self._blocked:
            return Result.reject(f"Mail from {domain} is not accepted here", 550, "5.7.1")
        return None

    # Hooks may take only the arguments they need; pluggy passes them by name.
    @hookimpl
    def mailflow_rcpt_to(self, recipient: str) -> Result | None:
        if recipient.lower() in self._refused:
            return Result.reject(f"<{recipient}>: mailbox unavailable", 550, "5.1.1")
        return None

    @hookimpl
    def mailflow_data(self, message: MessageContext) -> Result | None:
        found = matching_keywords(message.header("Subject"), self.settings.subject_keywords)
        if not found:
            return Result(details={"keywords": []})
        words = [word for word, _ in found]
        return Result(
            score=sum(score for _, score in found),
            symbols=[Symbol(f"EXAMPLE_KEYWORD_{w.upper()}", s, "in Subject") for w, s in found],
            mutations=[AddHeader(self.settings.header, ", ".join(words))],
            details={"keywords": words},
        )

    @hookimpl
    def mailflow_route(self, recipient: str) -> Route | None:
        folder = self._folders.get(recipient.lower())
        if folder is None:
            return None  # let later plugins and the config decide
        return Route(RouteKind.MAILDIR, folder=folder)

    # Commands are added for every installed plugin, before any config is read: the
    # hook is called on the class, so it is a static method (no ``self``, no settings).
    @staticmethod
    @hookimpl
    def mailflow_register_commands(cli: click.Group) -> None:
        cli.add_command(example_group)


@click.group("example")
def example_group() -> None:
    """The example plugin's commands."""


@example_group.command("keywords")
@click.argument("subject")
@click.option(
    "--keyword",
    "keywords",
    multiple=True,
    metavar="WORD=SCORE",
    help="A subject keyword and its score, as in the settings (repeatable).",
)
def keywords_command(subject: str, keywords: tuple[str, ...]) -> None:
    """Show which keywords SUBJECT matches and the score they add."""
    table: dict[str, float] = {}
    for item in keywords:
        word, sep, score = item.partition("=")
        try:
            if not (word and sep):
                raise ValueError(item)
            table[word] = float(score)
        except ValueError:
            raise click.BadParameter(
                f"{item!r} is not WORD=SCORE", param_hint="--keyword"
            ) from None
    found = matching_keywords(subject, table)
    for word, score in found:
        click.echo(f"{word} {score:g}")
    click.echo(f"score {sum(score for _, score in found):g}")
