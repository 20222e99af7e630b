"""Reload without restart: SIGHUP (or ``mailflow reload``) re-reads the config and
everything it names, and new connections get the result.

A reload builds a complete new *generation* next to the running one: the config
(parsed and checked as ``config validate`` does), a new :class:`~mailflow.app.App`
with freshly instantiated plugins (which read their rule files, lists and models in
their constructor or ``mailflow_startup``), their content-analysis workers, the users
file, the TLS certificate and the SMTP handler. Only when all of that succeeded is it
swapped in, in one step on the event loop: new SMTP and milter connections use it;
connections already open finish on the generation they started with, which is shut
down (``mailflow_shutdown``, its workers stopped) when its last connection has ended.
If anything fails, the errors are logged (``file:line: key: what is wrong``, as
``config validate`` prints them) and the running generation keeps serving.

Some keys cannot change under a running process (listeners, the queue and its
workers, delivery, logging): :data:`RESTART_KEYS`. A change there is logged as needing
a restart, and the new generation keeps the running value, so that one process never
mixes two of them. See docs/reload.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from mailflow.app import App
from mailflow.config import Config, ConfigError, ConfigIssue
from mailflow.config_check import file_issues, plugin_issues

if TYPE_CHECKING:
    from mailflow.server import Server
    from mailflow.smtp import Handler, MailflowSMTP

log = logging.getLogger("mailflow.reload")

# Keys (and whole sections) a reload does not apply: they are bound to listening
# sockets, the spool and the queue's workers, the Maildir writer, the relay's session
# pool, the resolver, or the log writer set up at start. The rest of ``queue``,
# ``delivery`` and ``relay`` applies: the dispatcher is reconfigured
# (:meth:`mailflow.delivery.dispatch.Dispatcher.reconfigure`).
RESTART_KEYS: tuple[str, ...] = (
    "server.listen",
    "milter.listen",
    "metrics.listen",
    "queue.directory",
    "queue.workers",
    "storage",
    "delivery.maildir",
    "relay.helo_name",
    "relay.pool_size",
    "relay.pool_idle",
    "dns",
    "log",
)
PID_FILE_NAME = "mailflow.pid"  # in queue.directory, while `serve` runs
RETIRE_POLL = 0.2  # seconds between looks at an old generation's open connections


class ProtocolSwitch:
    """The protocol factory the SMTP listeners were started with; a reload points it at
    the new generation's, so the listening sockets never close."""

    def __init__(self, target: Callable[[], MailflowSMTP]) -> None:
        self.target = target

    def __call__(self) -> MailflowSMTP:
        return self.target()


# --- what changed ----------------------------------------------------------------------------


def flatten(config: Config) -> dict[str, Any]:
    """Dotted key -> value for every leaf of the config; lists are leaves, except
    ``plugins``, which is keyed by plugin name (``plugins.rules.settings.files``)."""
    data = config.model_dump(mode="json")
    data["plugins"] = {entry["name"]: entry for entry in data.get("plugins", [])}
    out: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = value

    walk(data, "")
    return out


def changed_keys(old: Config, new: Config) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, None) != b.get(k, None))


def needs_restart(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESTART_KEYS)


def _replaced(model: BaseModel, parts: list[str], value: Any) -> Any:
    """``model`` with the field at ``parts`` set to ``value`` (frozen models: copies)."""
    head, *rest = parts
    inner = value if not rest else _replaced(getattr(model, head), rest, value)
    return model.model_copy(update={head: inner})


def keep_restart_values(running: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with the running value of every restart-only key, and the dotted keys
    whose value in ``new`` was different (what needs a restart)."""
    changed = [k for k in changed_keys(running, new) if needs_restart(k)]
    for key in RESTART_KEYS:
        if any(c == key or c.startswith(key + ".") for c in changed):
            parts = key.split(".")
            current: Any = running
            for part in parts:
                current = getattr(current, part)
            new = _replaced(new, parts, current)
    return new, changed


def _file_names(value: Any) -> Iterable[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _file_names(item)
    elif isinstance(value, list):
        for item in value:
            yield from _file_names(item)
    elif isinstance(value, str) and value and "\n" not in value and len(value) < 4096:
        yield value


def config_files(config: Config) -> list[Path]:
    """The files a config names that exist: the TLS pair, the users file and every
    plugin setting that names a file (rule files, lists, models)."""
    names: list[Path] = []
    if config.server.tls is not None:
        names += [config.server.tls.cert, config.server.tls.key]
    if config.server.auth is not None:
        names.append(config.server.auth.users_file)
    for entry in config.plugins:
        if entry.enabled:
            names += [config_relative(config, Path(n)) for n in _file_names(entry.settings)]
    out: list[Path] = []
    for path in names:
        with contextlib.suppress(OSError, ValueError):
            if path.is_file() and path not in out:
                out.append(path)
    return out


def config_relative(config: Config, path: Path) -> Path:
    """Where a relative path in ``config`` points: beside the config file."""
    base = config._base_dir
    if path.is_absolute() or base is None:
        return path
    return base / path


def fingerprint(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of each file's content (a rewritten file with an old mtime counts too)."""
    out: dict[str, str] = {}
    for path in paths:
        digest = hashlib.sha256()
        try:
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            continue
        out[str(path)] = digest.hexdigest()
    return out


# --- generations -----------------------------------------------------------------------------


@dataclass(eq=False)
class Generation:
    """One complete configuration of the server, from one load of the config."""

    number: int
    app: App
    handler: Handler
    authenticator: object | None
    factory: Callable[[], MailflowSMTP]
    files: dict[str, str]
    milter_tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def busy(self) -> bool:
        return self.handler.active > 0 or any(not t.done() for t in self.milter_tasks)


async def close_app(app: App) -> None:
    """Stop a generation's workers and its plugins (``mailflow_shutdown``)."""
    try:
        await app.pipeline.stop_isolation()
    finally:
        await app.shutdown()


def _share_handler_state(old: Handler, new: Handler) -> None:
    """What counts across generations: open connections, in all and per client address,
    always; the large-message budget, the read pacing and the AUTH failure counts
    while their settings are unchanged."""
    new.active_by_ip = old.active_by_ip
    new.all_active = old.all_active
    a, b = old.app.config.server, new.app.config.server
    if a.large_message_memory == b.large_message_memory:
        new.large_messages = old.large_messages
    if a.large_message_rate == b.large_message_rate:
        new.bulk = old.bulk
    from mailflow.config import AuthThrottleConfig

    throttle = AuthThrottleConfig.model_fields
    if all(getattr(a.auth, k, None) == getattr(b.auth, k, None) for k in throttle):
        new.login_guard = old.login_guard


class Reloader:
    """Builds, swaps in and retires generations for a running :class:`Server`."""

    def __init__(self, server: Server, load: Callable[[], Config], source: str) -> None:
        assert server.handler is not None and server.protocols is not None
        self.server = server
        self.load = load  # reads the config again (with serve's --listen applied)
        self.source = source  # for the log: the file, or the embedded default
        config = server.app.config
        self.current = Generation(
            1,
            server.app,
            server.handler,
            server.authenticator,
            server.protocols.target,
            fingerprint(config_files(config)),
        )
        self._given_authenticator = server.authenticator if config.server.auth is None else None
        self._lock = asyncio.Lock()
        self._retiring: dict[Generation, asyncio.Task[None]] = {}
        self._requests: set[asyncio.Task[bool]] = set()

    # -- triggers --

    def install_signal_handler(self) -> None:
        """SIGHUP asks for a reload (instead of ending the process)."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.request)

    def request(self) -> None:
        log.info("reload requested (SIGHUP)")
        task = asyncio.get_running_loop().create_task(self.reload())
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    # -- the reload --

    async def reload(self) -> bool:
        """Load, check and build a new generation and swap it in; False when refused."""
        async with self._lock:  # a second SIGHUP waits for the first reload
            old = self.current
            try:
                new, restart = await self._build(old)
            except ConfigError as exc:
                self._refused([str(i) for i in exc.issues])
                return False
            except Exception as exc:
                notes = " ".join(getattr(exc, "__notes__", []))
                self._refused([f"{exc.__class__.__name__}: {exc} {notes}".rstrip()])
                log.debug("reload failed", exc_info=exc)
                return False
            self._swap(old, new)
            if self.server.dispatcher is not None:  # delivery keys that apply without restart
                await self.server.dispatcher.reconfigure(new.app.config)
            self._report(old, new, restart)
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring[old] = task
            return True

    def _refused(self, lines: list[str]) -> None:
        log.error(
            "reload refused; configuration %d (%s) keeps running:\n  %s",
            self.current.number,
            self.source,
            "\n  ".join(lines),
        )

    async def _build(self, old: Generation) -> tuple[Generation, list[str]]:
        from mailflow.auth import UsersFileAuthenticator
        from mailflow.smtp import Handler, protocol_factory

        config = await asyncio.to_thread(self.load)
        config, restart = keep_restart_values(old.app.config, config)
        issues: list[ConfigIssue] = await asyncio.to_thread(file_issues, config)
        if issues:
            raise ConfigError(issues)
        try:
            app = App(config)  # plugins re-instantiated: their settings are checked here
        except ConfigError as exc:  # every plugin's problems, as `config validate` lists them
            raise ConfigError(plugin_issues(config) or exc.issues) from None
        app.share_services(old.app)
        try:
            await app.startup()
            await app.pipeline.start_isolation(on_restart=app.metrics.observe_worker_restart)
            authenticator: object | None = self._given_authenticator
            if config.server.auth is not None:
                users = config.server.auth.users_file
                running = old.app.config.server.auth
                if running is not None and running.users_file == users:
                    authenticator = old.authenticator  # it re-reads the file when it changes
                else:  # (a thread: it hashes a dummy password, ~50 ms)
                    authenticator = await asyncio.to_thread(UsersFileAuthenticator, users)
            handler = Handler(app, self.server.enqueue, clear_incoming=False)
            _share_handler_state(old.handler, handler)
            factory = protocol_factory(app, handler, authenticator)
            files = await asyncio.to_thread(lambda: fingerprint(config_files(config)))
        except BaseException:
            await close_app(app)
            raise
        return Generation(old.number + 1, app, handler, authenticator, factory, files), restart

    def _swap(self, old: Generation, new: Generation) -> None:
        """Point everything that serves new connections at ``new`` (no await: atomic)."""
        server = self.server
        assert server.protocols is not None
        server.app = new.app
        server.handler = new.handler
        server.authenticator = new.authenticator
        server.protocols.target = new.factory
        if server.milter is not None:
            old.milter_tasks = set(server.milter._tasks)
            server.milter.app = new.app
            server.milter.config = new.app.config.milter
        self.current = new

    def _report(self, old: Generation, new: Generation, restart: list[str]) -> None:
        keys = [k for k in changed_keys(old.app.config, new.app.config) if not needs_restart(k)]
        files = sorted(
            name
            for name in old.files.keys() | new.files.keys()
            if old.files.get(name) != new.files.get(name)
        )
        what = []
        if keys:
            what.append("changed keys: " + ", ".join(keys))
        if files:
            what.append("changed files: " + ", ".join(files))
        log.info(
            "reloaded %s: configuration %d serves new connections; %s",
            self.source,
            new.number,
            "; ".join(what) or "no key or file changed",
        )
        if restart:
            log.warning(
                "reload: %s changed but only take effect at a restart; "
                "still running with the values in use",
                ", ".join(restart),
            )

    async def _retire(self, old: Generation) -> None:
        try:
            while old.busy():
                await asyncio.sleep(RETIRE_POLL)
            await close_app(old.app)
            log.info("configuration %d closed (its last connection ended)", old.number)
        finally:
            self._retiring.pop(old, None)

    async def close(self) -> None:
        """At shutdown: close the generations still waiting for their connections."""
        for task in list(self._requests):
            task.cancel()
        for old, retiring in list(self._retiring.items()):
            retiring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retiring
            await close_app(old.app)


def hold_sighup() -> Callable[[], bool]:
    """Until :meth:`Reloader.install_signal_handler`, a SIGHUP (during start-up) is
    remembered instead of ending the process; returns "was there one?"."""
    seen: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: seen.append(signum))
    return lambda: bool(seen)


# --- the pid file and `mailflow reload` -------------------------------------------------------


def pid_file(config: Config) -> Path:
    return Path(config.queue.directory) / PID_FILE_NAME


def write_pid_file(config: Config) -> Path:
    path = pid_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{PID_FILE_NAME}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n", "ascii")
    os.replace(tmp, path)
    return path


def remove_pid_file(config: Config) -> None:
    path = pid_file(config)
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text("ascii").strip()) == os.getpid():
            path.unlink()


class NotRunning(Exception):
    """No ``mailflow serve`` runs for this config (no pid file, or a stale one)."""


def running_pid(config: Config) -> int:
    """The pid of the ``serve`` process using this config's queue directory."""
    path = pid_file(config)
    try:
        pid = int(path.read_text("ascii").strip())
    except FileNotFoundError:
        raise NotRunning(f"no {path}: is `mailflow serve` running with this config?") from None
    except (OSError, ValueError) as exc:
        raise NotRunning(f"cannot read a pid from {path}: {exc}") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise NotRunning(f"{path} names pid {pid}, which is not running (stale)") from None
    except PermissionError:
        pass  # it exists; the real signal below says whether we may signal it
    return pid
