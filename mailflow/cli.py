"""The ``mailflow`` command."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from mailflow import __version__
from mailflow.cli_config import (
    DEFAULT_FILE,
    build_app,
    config_option,
    config_source,
    exit_invalid,
    find_config,
    load_or_exit,
)
from mailflow.config import Config, ConfigError, default_config_text, load_config
from mailflow.msglog import setup_logging


class PluginCommandsGroup(click.Group):
    """The top-level group; plugin commands are loaded only when they may be needed.

    Importing every installed plugin (scikit-learn, dkimpy, ...) costs seconds, so
    builtin commands such as ``queue list`` never do it. An unknown command name or
    a full command listing (``--help``) loads the plugins and asks them to register
    theirs (``mailflow_register_commands``).
    """

    _plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if not self._plugins_loaded:
            type(self)._plugins_loaded = True
            _register_plugin_commands(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._load_plugin_commands()
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)


@click.group(cls=PluginCommandsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mailflow", message="%(prog)s %(version)s")
def main() -> None:
    """mailflow: a pluggable mail filtering pipeline (SMTP in, plugins, Maildir/LMTP/relay out)."""


@main.command()
def version() -> None:
    """Print the mailflow version."""
    click.echo(f"mailflow {__version__}")


# --- serve ---------------------------------------------------------------------------------


@main.command()
@config_option
@click.option("--listen", "-l", multiple=True, help="Override server.listen (HOST:PORT).")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def serve(config_path: str | None, listen: tuple[str, ...], verbose: bool) -> None:
    """Receive mail over SMTP, filter it, deliver it.

    SIGHUP (or `mailflow reload`) re-reads the config and the files it names without
    a restart (docs/reload.md).
    """
    from mailflow.config_check import file_issues
    from mailflow.reload import Reloader, hold_sighup, remove_pid_file, write_pid_file

    sighup_during_start = hold_sighup()
    config_path = find_config(config_path)
    if config_path is not None:
        config_path = str(Path(config_path).absolute())  # reloads read the same file

    def load() -> Config:
        loaded = load_config(config_path)
        if listen:
            server_cfg = loaded.server.model_copy(update={"listen": list(listen)})
            loaded = loaded.model_copy(update={"server": server_cfg})
        return loaded

    config = load_or_exit(config_path, load)
    issues = file_issues(config)  # e.g. "server.tls.cert: file not found: /etc/..."
    if issues:
        exit_invalid(issues)
    setup_logging(config, verbose)
    from mailflow.server import Server

    app = build_app(config)

    mail_root = Path(config.delivery.maildir.root).resolve()
    spool_root = Path(config.queue.directory).resolve()

    async def run() -> None:
        server = Server(app)
        try:
            addresses = await server.start()
        except OSError as exc:
            click.echo(f"mailflow: cannot listen: {exc}", err=True)
            await server.stop()
            sys.exit(1)
        except ConfigError as exc:  # e.g. a malformed server.auth.users_file
            click.echo(f"mailflow: invalid config:\n{exc}", err=True)
            await server.stop()
            sys.exit(2)
        except Exception as exc:
            notes = " ".join(getattr(exc, "__notes__", []))
            click.echo(
                f"mailflow: cannot start: {exc.__class__.__name__}: {exc} {notes}".rstrip(),
                err=True,
            )
            await server.stop()
            sys.exit(2)
        source = config_source(config_path)
        reloader = Reloader(server, load, source)
        reloader.install_signal_handler()
        if sighup_during_start():
            reloader.request()  # the files may have changed after we read them
        write_pid_file(config)
        for host, port in addresses:
            click.echo(f"mailflow {__version__}: listening on {host}:{port} (SMTP)", err=True)
        if server.milter is not None:
            click.echo(f"mailflow: listening on {server.milter.address} (milter)", err=True)
        delivery = config.delivery
        if delivery.method == "maildir":
            where = f"Maildir under {mail_root}/"
        else:
            where = f"LMTP {delivery.lmtp}"
        click.echo(
            f"mailflow: config: {source}; local mail -> {where}; "
            f"spool: {spool_root}; "
            f"relay: {config.relay.default}",
            err=True,
        )
        try:
            await server.run_forever()
        finally:
            await reloader.close()
            remove_pid_file(config)

    asyncio.run(run())


@main.command("reload")
@config_option
def reload_command(config_path: str | None) -> None:
    """Make the running `serve` re-read its config and files (sends it SIGHUP).

    Give the --config that `serve` was started with: it is checked first as `config
    validate` checks it (a bad one is reported here and not sent), and its
    queue.directory holds the pid file of the running server. What the reload changed,
    or why the server refused it, is in the server's log. Exit status: 0 sent, 1 no
    server runs, 2 invalid config.
    """
    import os
    import signal

    from mailflow.config_check import file_issues
    from mailflow.reload import NotRunning, running_pid

    config = load_or_exit(config_path)
    issues = file_issues(config)
    if issues:
        exit_invalid(issues)
    build_app(config)  # plugin settings, rule files
    try:
        pid = running_pid(config)
        os.kill(pid, signal.SIGHUP)
    except NotRunning as exc:
        click.echo(f"mailflow: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"mailflow: cannot signal the server: {exc}", err=True)
        sys.exit(1)
    click.echo(f"sent SIGHUP to mailflow serve (pid {pid}); its log says what changed")


# --- check ---------------------------------------------------------------------------------


# Exit status of `check` per action; several files: the highest.
CHECK_EXIT = {"accept": 0, "quarantine": 1, "discard": 1}


@main.command()
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, allow_dash=True)
)
@config_option
@click.option("--from", "sender", help="Envelope sender (default: the From header).")
@click.option("--to", "recipients", multiple=True, help="Envelope recipient (repeatable).")
@click.option("--ip", default="127.0.0.1", show_default=True, help="Client IP address.")
@click.option("--helo", default="localhost", show_default=True, help="HELO/EHLO name.")
@click.option(
    "--auth", "--user", "user", default="", help="Pretend the client authenticated as USER."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object per file (JSON Lines)."
)
def check(
    files: tuple[str, ...],
    config_path: str | None,
    sender: str | None,
    recipients: tuple[str, ...],
    ip: str,
    helo: str,
    user: str,
    as_json: bool,
) -> None:
    """Run the whole pipeline on each FILE (an .eml; '-' for stdin) and print the decisions.

    The stages are those `serve` runs, with the connection facts given as options.
    With --json, one JSON object per file and line (JSON Lines), in the order given.
    Exit status: 0 every message accepted, 1 some quarantined/discarded (none worse),
    2 some rejected/tempfailed, or an error.
    """
    from mailflow.check import check_message, report

    if files.count("-") > 1:
        raise click.UsageError("'-' (stdin) can be given once")
    config = load_or_exit(config_path)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app = build_app(config)

    async def run() -> int:
        await app.startup()
        worst = 0
        try:
            for index, file in enumerate(files):
                raw = await asyncio.to_thread(_read_message, file)
                ctx = await check_message(
                    app,
                    raw,
                    sender=sender,
                    recipients=list(recipients) or None,
                    ip=ip,
                    helo=helo,
                    authenticated_user=user,
                )
                result = {"file": file, **report(ctx)}
                _print_check(result, as_json, first=index == 0, several=len(files) > 1)
                worst = max(worst, CHECK_EXIT.get(result["action"], 2))
        finally:
            await app.shutdown()
        return worst

    try:
        code = asyncio.run(run())
    except ConfigError as exc:  # a plugin that cannot start with this config
        click.echo(f"mailflow: invalid config:\n{exc}", err=True)
        sys.exit(2)
    sys.exit(code)


def _read_message(file: str) -> bytes:
    return sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()


def _print_check(result: dict[str, Any], as_json: bool, *, first: bool, several: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, separators=(",", ":"), default=str))
        return
    if several:
        click.echo(("" if first else "\n") + f"file:       {result['file']}")
    click.echo(f"action:     {result['action']}")
    if result["smtp_reply"]:
        r = result["smtp_reply"]
        click.echo(f"smtp reply: {r['code']} {r['status']} {r['text']}")
    if result["reason"]:
        click.echo(f"reason:     {result['reason']}")
    click.echo(f"score:      {result['score']}")
    click.echo(f"sender:     <{result['sender']}>")
    for rcpt, route in result["route"].items():
        click.echo(f"route:      <{rcpt}> -> {route}")
    for rcpt, reply in result.get("refused_recipients", {}).items():
        click.echo(f"refused:    <{rcpt}>: {reply}")
    for name, value in result["headers_added"]:
        click.echo(f"header:     {name}: {value}")
    for name, info in result["plugins"].items():
        click.echo(f"plugin:     {name}: {info.get('action')} ({info.get('time_ms')} ms)")


# --- config --------------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Config file commands."""


@config_group.command("validate")
@click.argument("path", type=click.Path(dir_okay=False), required=False)
@config_option
def config_validate(path: str | None, config_path: str | None) -> None:
    """Validate a config file and everything it refers to.

    Checks every key, the files it names (TLS certificate and key: parse and match;
    users file; rule files), the relay targets its rules route to, and the settings of
    every plugin it enables; reports every problem at once. PATH or --config; without
    either, ./mailflow.yaml if it exists, else the embedded default.
    """
    from mailflow.config_check import check_config_file

    target = find_config(path or config_path, quiet=True)
    report = check_config_file(target)
    for warning in report.warnings:
        click.echo(f"mailflow: warning: {warning}", err=True)
    if report.issues:
        exit_invalid(report.issues)
    click.echo(f"{config_source(target)}: OK")


@config_group.command("show-default")
def config_show_default() -> None:
    """Print the embedded default config."""
    click.echo(default_config_text(), nl=False)


@main.command()
@click.argument("path", type=click.Path(dir_okay=False), default="mailflow.yaml")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: str, force: bool) -> None:
    """Write a commented starter config to PATH (default: mailflow.yaml)."""
    import importlib.resources

    target = Path(path)
    if target.exists() and not force:
        click.echo(f"mailflow: {target} exists (use --force to overwrite)", err=True)
        sys.exit(1)
    text = importlib.resources.files("mailflow").joinpath("data/starter.yaml").read_text("utf-8")
    target.write_text(text, "utf-8")
    click.echo(f"wrote {target}; check it with: mailflow config validate {target}")
    if target.resolve() == Path(DEFAULT_FILE).resolve():
        click.echo(
            "run it with: mailflow serve  (./mailflow.yaml is used when no --config is given)"
        )
    else:
        click.echo(f"run it with: mailflow serve --config {target}")


# --- queue ---------------------------------------------------------------------------------


@main.group("queue")
def queue_group() -> None:
    """Inspect and manage the delivery queue (works while `serve` runs)."""


def _spool(config_path: str | None) -> Any:
    from mailflow.delivery.spool import Spool

    config = load_or_exit(config_path)
    return Spool(Path(config.queue.directory), config.storage.sync)


@queue_group.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True)
def queue_list(config_path: str | None, as_json: bool) -> None:
    """List queued messages."""
    spool = _spool(config_path)
    rows = []
    for entry in spool.entries():
        rows.append(
            {
                "id": entry.id,
                "age_s": round(time.time() - entry.created),
                "size": entry.size,
                "sender": entry.sender,
                "pending": [
                    {
                        "rcpt": r.address,
                        "attempts": r.attempts,
                        "last_reply": r.last_reply,
                        "next_attempt_in_s": max(0, round(r.next_attempt - time.time())),
                    }
                    for r in entry.pending()
                ],
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("queue is empty")
        return
    for row in rows:
        click.echo(f"{row['id']}  {row['size']:>8}  {row['age_s']:>6}s  <{row['sender']}>")
        for p in row["pending"]:
            click.echo(
                f"    -> <{p['rcpt']}> attempts={p['attempts']} "
                f"next in {p['next_attempt_in_s']}s  {p['last_reply']}"
            )
    click.echo(f"{len(rows)} message(s)")


@queue_group.command("show")
@click.argument("queue_id")
@config_option
@click.option("--body", is_flag=True, help="Also print the message.")
def queue_show(queue_id: str, config_path: str | None, body: bool) -> None:
    """Show one queued message's envelope and delivery state."""
    from dataclasses import asdict

    spool = _spool(config_path)
    try:
        entry = spool.load(queue_id)
    except (FileNotFoundError, ValueError):  # ValueError: not a queue id (e.g. "../x")
        click.echo(f"mailflow: no queued message {queue_id}", err=True)
        sys.exit(1)
    click.echo(json.dumps(asdict(entry), indent=2))
    if body:
        click.echo(spool.read_message(queue_id).decode("utf-8", "replace"))


@queue_group.command("flush")
@config_option
def queue_flush(config_path: str | None) -> None:
    """Ask the running server to retry every queued message now."""
    from mailflow.delivery.queue import FLUSH_TRIGGER

    spool = _spool(config_path)
    for entry in spool.entries():
        if not spool.message_path(entry.id).exists():
            continue  # finished by the server meanwhile: do not resurrect its metadata
        for r in entry.pending():
            r.next_attempt = 0
        spool.update(entry)
    (spool.root / FLUSH_TRIGGER).touch()
    click.echo("flush requested")


@queue_group.command("delete")
@click.argument("queue_ids", nargs=-1, required=True)
@config_option
def queue_delete(queue_ids: tuple[str, ...], config_path: str | None) -> None:
    """Delete queued messages (no bounce is sent)."""
    spool = _spool(config_path)
    missing = 0
    for queue_id in queue_ids:
        try:
            exists = spool.meta_path(queue_id).exists()
        except ValueError:  # not a queue id (e.g. "../x"): never a path outside the spool
            exists = False
        if not exists:
            click.echo(f"mailflow: no queued message {queue_id}", err=True)
            missing += 1
            continue
        spool.remove(queue_id)
        click.echo(f"deleted {queue_id}")
    sys.exit(1 if missing else 0)


# --- quarantine ----------------------------------------------------------------------------


@main.group("quarantine")
def quarantine_group() -> None:
    """Review quarantined messages: list, show, release into delivery, delete."""


def _quarantine(config_path: str | None) -> tuple[Config, Any]:
    from mailflow.quarantine import Quarantine

    config = load_or_exit(config_path)
    return config, Quarantine(Path(config.quarantine.directory))


@quarantine_group.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True)
def quarantine_list(config_path: str | None, as_json: bool) -> None:
    """List quarantined messages, oldest first."""
    _, quarantine = _quarantine(config_path)
    rows = quarantine.list()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("quarantine is empty")
        return
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.get("received_at") or 0))
        rcpts = ",".join(f"<{r}>" for r in row.get("recipients") or [])
        click.echo(
            f"{row['id']}  {when}  score={row.get('score', 0):.2f}  "
            f"<{row.get('sender', '')}> -> {rcpts}  {row.get('reason') or ''}"
        )
    click.echo(f"{len(rows)} message(s)")


@quarantine_group.command("show")
@click.argument("queue_id")
@config_option
@click.option("--body", is_flag=True, help="Also print the message.")
def quarantine_show(queue_id: str, config_path: str | None, body: bool) -> None:
    """Show why a message was quarantined (and optionally the message)."""
    from mailflow.quarantine import NotQuarantined

    _, quarantine = _quarantine(config_path)
    try:
        click.echo(json.dumps(quarantine.load(queue_id), indent=2))
        if body:
            click.echo(quarantine.read_message(queue_id).decode("utf-8", "replace"))
    except NotQuarantined:
        click.echo(f"mailflow: no quarantined message {queue_id}", err=True)
        sys.exit(1)


NO_LEARN_HELP = "Do not tell the plugins what the messages are (hook mailflow_learn)."


@quarantine_group.command("release")
@click.argument("queue_ids", nargs=-1, required=True)
@config_option
@click.option("--no-learn", is_flag=True, help=NO_LEARN_HELP)
def quarantine_release(queue_ids: tuple[str, ...], config_path: str | None, no_learn: bool) -> None:
    """Deliver quarantined messages to their recipients (the running server sends them).

    Unless --no-learn or `quarantine.learn_on_release: false`, the plugins then learn
    that the messages are ham (hook mailflow_learn); a failure there is reported on
    stderr and does not change the exit status: 0 all released, 1 some were not found.
    """
    from mailflow.delivery.queue import FLUSH_TRIGGER
    from mailflow.delivery.spool import Spool
    from mailflow.quarantine import NotQuarantined

    config, quarantine = _quarantine(config_path)
    spool = Spool(Path(config.queue.directory), config.storage.sync)
    learn = config.quarantine.learn_on_release and not no_learn
    released: list[tuple[str, bytes]] = []
    missing = 0
    for queue_id in queue_ids:
        try:
            raw = quarantine.read_message(queue_id) if learn else b""
            entry = quarantine.release(queue_id, config, spool)
        except NotQuarantined:
            click.echo(f"mailflow: no quarantined message {queue_id}", err=True)
            missing += 1
            continue
        released.append((queue_id, raw))
        click.echo(f"released {queue_id} to {', '.join(r.address for r in entry.recipients)}")
    (spool.root / FLUSH_TRIGGER).touch()  # a running server picks the entries up now
    if learn:
        teach(config, released, "ham", "quarantine-release")
    sys.exit(1 if missing else 0)


@quarantine_group.command("delete")
@click.argument("queue_ids", nargs=-1, required=True)
@config_option
@click.option("--spam", is_flag=True, help="They are spam: the plugins learn it (mailflow_learn).")
@click.option("--no-learn", is_flag=True, help=NO_LEARN_HELP)
def quarantine_delete(
    queue_ids: tuple[str, ...], config_path: str | None, spam: bool, no_learn: bool
) -> None:
    """Delete quarantined messages for good.

    With --spam (and unless --no-learn or `quarantine.learn_on_delete_spam: false`)
    the plugins then learn that the messages are spam; a failure there is reported
    on stderr and does not change the exit status: 0 all deleted, 1 some were not found.
    """
    from mailflow.quarantine import NotQuarantined

    config, quarantine = _quarantine(config_path)
    learn = spam and config.quarantine.learn_on_delete_spam and not no_learn
    deleted: list[tuple[str, bytes]] = []
    missing = 0
    for queue_id in queue_ids:
        try:
            raw = quarantine.read_message(queue_id) if learn else b""
        except NotQuarantined:
            raw = b""  # a .json without its .eml: deleted below, nothing to learn from
        try:
            quarantine.delete(queue_id)
        except NotQuarantined:
            click.echo(f"mailflow: no quarantined message {queue_id}", err=True)
            missing += 1
            continue
        if raw:
            deleted.append((queue_id, raw))
        click.echo(f"deleted {queue_id}")
    if learn:
        teach(config, deleted, "spam", "quarantine-delete")
    sys.exit(1 if missing else 0)


def _run_coroutine(factory: Any) -> Any:
    """``asyncio.run(factory())``; in a thread of its own when this one already runs an
    event loop (the CLI called in-process, as tests and embeddings do)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def teach(config: Config, messages: list[tuple[str, bytes]], label: str, source: str) -> int:
    """Tell the enabled plugins what these messages are (hook ``mailflow_learn``).

    Called after the quarantine operation is done, so nothing here can undo or block
    it: a config the plugins refuse, a plugin that cannot start or fails to learn is
    reported on stderr. The plugins' warnings (and what they learned, at INFO) are
    shown on stderr while they learn. Returns the number of failures.
    """
    if not messages:
        return 0
    from mailflow.app import App

    logger = logging.getLogger("mailflow")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mailflow: %(message)s"))
    handler.setLevel(logging.WARNING)
    saved_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)

    async def run(app: App) -> int:
        await app.startup()
        failures = 0
        try:
            handler.setLevel(logging.INFO)
            logger.setLevel(logging.INFO)
            for queue_id, raw in messages:
                for plugin, exc in await app.pipeline.notify_each(
                    "mailflow_learn", message=raw, label=label, source=source
                ):
                    failures += 1
                    click.echo(
                        f"mailflow: learning from {queue_id} failed in plugin {plugin}: "
                        f"{exc.__class__.__name__}: {exc}",
                        err=True,
                    )
        finally:
            handler.setLevel(logging.WARNING)
            logger.setLevel(saved_level)
            await app.shutdown()
        return failures

    try:
        app = App(config)
        if not app.pipeline.has("mailflow_learn"):
            return 0
        return _run_coroutine(lambda: run(app))
    except Exception as exc:  # an invalid plugin config, a plugin that cannot start
        ids = ", ".join(queue_id for queue_id, _ in messages)
        text = str(exc).strip().replace("\n", "\n  ")
        click.echo(f"mailflow: not learned from {ids} (as {label}): {text}", err=True)
        return len(messages)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)


# --- plugins -------------------------------------------------------------------------------


@main.group("plugins")
def plugins_group() -> None:
    """Installed plugins and the hook order."""


@plugins_group.command("list")
@config_option
def plugins_list(config_path: str | None) -> None:
    """Installed plugins, whether the config enables them, and their hook order."""
    from mailflow.hookspecs import hook_names
    from mailflow.pipeline import available_plugins

    config = load_or_exit(config_path)
    enabled = {p.name for p in config.plugins if p.enabled}
    for name, ep in sorted(available_plugins().items()):
        mark = "enabled " if name in enabled else "disabled"
        click.echo(f"{mark}  {name:<16} {ep.value}  ({ep.dist.name if ep.dist else '?'})")
    app = build_app(config)
    click.echo("\nhook order:")
    for hook in hook_names():
        names = app.pipeline.plugins_for(hook)
        if names:
            click.echo(f"  {hook}: {' -> '.join(names)}")


def _register_plugin_commands(cli: click.Group) -> None:
    """Let installed plugins add commands (``pm.hook.mailflow_register_commands``)."""
    from mailflow.pipeline import register_plugin_commands

    for problem in register_plugin_commands(cli):
        click.echo(f"mailflow: {problem}", err=True)


from mailflow.users_cli import users_group  # noqa: E402  (mailflow users add/remove/list)

main.add_command(users_group)
