"""The ``mailflow`` command."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from mailflow import __version__
from mailflow.config import Config, ConfigError, default_config_text, load_config

CONFIG_HELP = "Path to mailflow.yaml (default: the embedded default config)."


LOG_FLUSH_INTERVAL = 0.05  # seconds: how late a log line may reach the stream or file


class _LogWriter(threading.Thread):
    """Writes queued log records from its own thread, looking every ``LOG_FLUSH_INTERVAL``.

    Unlike ``logging.handlers.QueueListener`` nothing wakes it per record: a
    thread woken for every line costs the event loop a context switch on a small
    machine. Records reach the handler at most ``LOG_FLUSH_INTERVAL`` late; the
    rest are written when it stops (at exit).
    """

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__(name="mailflow-log", daemon=True)
        self.handler = handler
        self.records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(LOG_FLUSH_INTERVAL):
            self._write_out()
        self._write_out()

    def _write_out(self) -> None:
        while True:
            try:
                record = self.records.get_nowait()
            except queue.Empty:
                return
            self.handler.handle(record)

    def stop(self) -> None:
        self._stopping.set()
        self.join()
        self.handler.flush()
        self.handler.close()  # a log file is closed, not left to the garbage collector


class _DeferredFormatQueueHandler(logging.handlers.QueueHandler):
    """Queues records with their message text fixed, leaving the formatting (time
    stamp, level, logger name) to the writer thread, off the event loop.

    The ``%`` arguments are merged in the calling thread, so an argument changed
    later cannot change the line; records with a traceback are prepared in full.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info or record.stack_info:
            return super().prepare(record)
        record.msg = record.getMessage()
        record.args = None
        return record


_log_writer: _LogWriter | None = None


def _stop_log_writer() -> None:
    """Write out what is still queued (at exit)."""
    global _log_writer
    if _log_writer is not None:
        _log_writer.stop()
        _log_writer = None


def setup_logging(config: Config, verbose: bool = False) -> None:
    from mailflow import msglog

    global _log_writer
    level = logging.DEBUG if verbose else getattr(logging, config.log.level)
    handler: logging.Handler
    if config.log.file:
        handler = logging.FileHandler(config.log.file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # The event loop only puts records on a queue; a listener thread does the writing,
    # so a slow terminal, pipe or disk never stalls SMTP sessions.
    if _log_writer is not None:
        _log_writer.stop()
    else:
        atexit.register(_stop_log_writer)
    _log_writer = _LogWriter(handler)
    _log_writer.start()
    # The line format names no process, thread or source location: do not collect
    # them for every record (a stack walk and a getpid system call each time).
    # Documented switches (logging HOWTO, "Optimization").
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    root.handlers[:] = [_DeferredFormatQueueHandler(_log_writer.records)]
    root.setLevel(level)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's chatty logger
    msglog.configure(config.log.format == "json")


def load_or_exit(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"mailflow: invalid config:\n{exc}", err=True)
        sys.exit(2)


def build_app(config: Config) -> Any:
    from mailflow.app import App

    try:
        return App(config)
    except ConfigError as exc:
        click.echo(f"mailflow: invalid config:\n{exc}", err=True)
        sys.exit(2)


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
@click.version_option(__version__, prog_name="mailflow")
def main() -> None:
    """mailflow: a pluggable mail filtering pipeline (SMTP in, plugins, Maildir/LMTP/relay out)."""


@main.command()
def version() -> None:
    """Print the mailflow version."""
    click.echo(f"mailflow {__version__}")


# --- serve ---------------------------------------------------------------------------------


@main.command()
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--listen", "-l", multiple=True, help="Override server.listen (HOST:PORT).")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def serve(config_path: str | None, listen: tuple[str, ...], verbose: bool) -> None:
    """Receive mail over SMTP, filter it, deliver it."""
    config = load_or_exit(config_path)
    if listen:
        server_cfg = config.server.model_copy(update={"listen": list(listen)})
        config = config.model_copy(update={"server": server_cfg})
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
        source = config_path or "embedded default config"
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
        await server.run_forever()

    asyncio.run(run())


# --- check ---------------------------------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--from", "sender", help="Envelope sender (default: the From header).")
@click.option("--to", "recipients", multiple=True, help="Envelope recipient (repeatable).")
@click.option("--ip", default="127.0.0.1", show_default=True, help="Client IP address.")
@click.option("--helo", default="localhost", show_default=True, help="HELO/EHLO name.")
@click.option("--user", default="", help="Pretend the client authenticated as USER.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def check(
    file: str,
    config_path: str | None,
    sender: str | None,
    recipients: tuple[str, ...],
    ip: str,
    helo: str,
    user: str,
    as_json: bool,
) -> None:
    """Run the whole content pipeline on FILE (an .eml; '-' for stdin) and print the decision.

    Exit status: 0 accept, 1 quarantine/discard, 2 reject/tempfail or error.
    """
    from mailflow.check import check_message, report

    config = load_or_exit(config_path)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    app = build_app(config)

    async def run() -> dict[str, Any]:
        await app.startup()
        try:
            ctx = await check_message(
                app,
                raw,
                sender=sender,
                recipients=list(recipients) or None,
                ip=ip,
                helo=helo,
                authenticated_user=user,
            )
        finally:
            await app.shutdown()
        return report(ctx)

    try:
        result = asyncio.run(run())
    except ConfigError as exc:  # a plugin that cannot start with this config
        click.echo(f"mailflow: invalid config:\n{exc}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
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
        for name, value in result["headers_added"]:
            click.echo(f"header:     {name}: {value}")
        for name, info in result["plugins"].items():
            click.echo(f"plugin:     {name}: {info.get('action')} ({info.get('time_ms')} ms)")
    code = {"accept": 0, "quarantine": 1, "discard": 1}.get(result["action"], 2)
    sys.exit(code)


# --- config --------------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Config file commands."""


@config_group.command("validate")
@click.argument("path", type=click.Path(dir_okay=False), required=False)
@click.option("--config", "-c", "config_opt", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def config_validate(path: str | None, config_opt: str | None) -> None:
    """Validate a config file (and the settings of the plugins it enables)."""
    target = path or config_opt
    config = load_or_exit(target)
    build_app(config)  # loads plugins and validates their settings
    click.echo(f"{target or 'embedded default config'}: OK")


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


# --- queue ---------------------------------------------------------------------------------


@main.group("queue")
def queue_group() -> None:
    """Inspect and manage the delivery queue (works while `serve` runs)."""


def _spool(config_path: str | None) -> Any:
    from mailflow.delivery.spool import Spool

    config = load_or_exit(config_path)
    return Spool(Path(config.queue.directory), config.storage.sync)


@queue_group.command("list")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
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
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
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
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
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
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
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
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
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
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
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
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
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
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
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
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
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


from mailflow.auth import users_group  # noqa: E402  (mailflow users add/remove/list)

main.add_command(users_group)
