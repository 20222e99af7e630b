"""Plugin manager (builtins and third-party alike, via entry points) and the async runner.

pluggy registers plugins and validates hook signatures; calling is done here, in
the order the config lists the plugins, awaiting coroutine hooks and stopping at
the first final verdict (pluggy itself cannot await: pluggy issue 320).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import logging
import time
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from mailflow import hookspecs
from mailflow.batching import DataBatch
from mailflow.config import (
    Config,
    ConfigError,
    ConfigIssue,
    PluginEntry,
    issues_from_validation,
    resolve_paths,
)
from mailflow.dns import current_budget, start_budget
from mailflow.isolation.pool import WorkerPool
from mailflow.message import MessageContext, PluginRun
from mailflow.verdict import Action, AddHeader, Result, Route, RouteKind, SMTPReply

ENTRY_POINT_GROUP = "mailflow.plugins"
log = logging.getLogger("mailflow.pipeline")
# After a quarantine verdict at the data stage, these later verdicts change nothing
# (reject, tempfail and discard still replace it).
_NO_STRONGER = (Action.ACCEPT, Action.QUARANTINE)

PLUGIN_FAILURE_REPLY = SMTPReply(451, "Temporary local problem, please try again later", "4.3.0")
# No content-analysis worker free in time, or the server is stopping (RFC 3463 4.3.2).
BUSY_REPLY = SMTPReply(451, "Too busy to check this message now, please try again later", "4.3.2")


def available_plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Every installed plugin (builtin or third-party), by entry-point name."""
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep for ep in eps}


def register_plugin_commands(cli: Any) -> list[str]:
    """Let every installed plugin add its commands to ``cli``, enabled or not.

    The plugins are registered as their entry points name them (a class or a module,
    not built: there is no config yet) with a plugin manager for this hook alone, and
    ``pm.hook.mailflow_register_commands(cli=cli)`` is called. Returns what went wrong,
    one line per plugin that could not be loaded or whose hook raised; a failing
    plugin does not keep the others from adding theirs.
    """
    hook_name = "mailflow_register_commands"
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    problems: list[str] = []
    for name, ep in sorted(available_plugins().items()):
        try:
            pm.register(ep.load(), name=name)
        except Exception as exc:  # a broken install must not take the CLI down
            problems.append(f"plugin {name} failed to load: {exc}")
            continue
        plugin = pm.get_plugin(name)
        marked = {i.plugin_name for i in pm.hook.mailflow_register_commands.get_hookimpls()}
        if name not in marked:
            if hasattr(plugin, hook_name):
                problems.append(f"plugin {name}: {hook_name} is not marked @hookimpl, ignored")
        elif inspect.isclass(plugin) and not isinstance(
            inspect.getattr_static(plugin, hook_name), staticmethod
        ):
            # Called on the class: an instance method would get ``cli`` as ``self``.
            problems.append(f"plugin {name}: {hook_name} must be a @staticmethod, ignored")
            pm.unregister(plugin)
    hook = pm.hook.mailflow_register_commands
    while True:
        try:
            hook(cli=cli)
            return problems
        except Exception as exc:
            impls = pm.hook.mailflow_register_commands.get_hookimpls()  # called last first
            code = {i.function.__code__: n for n, i in enumerate(impls)}
            tb, failed = exc.__traceback__, None
            while tb is not None and failed is None:
                failed, tb = code.get(tb.tb_frame.f_code), tb.tb_next
            if failed is None:
                return [*problems, f"a plugin failed to add its commands: {exc}"]
            problems.append(f"plugin {impls[failed].plugin_name} failed to add its commands: {exc}")
            # pluggy stopped at the failing plugin: call the ones it had not reached.
            reached = [pm.get_plugin(i.plugin_name) for i in impls[failed:]]
            hook = pm.subset_hook_caller(hook_name, reached)


def instantiate(factory: Any, settings: dict[str, Any], config: Config, index: int) -> Any:
    """Build a plugin object from what its entry point names.

    * a module: registered as is (hook functions at module level); takes no settings;
    * a class or callable: called with its settings. If it has a ``Settings`` attribute
      (a pydantic model), the settings are validated against it first, so mistakes are
      reported with file, key and line like the rest of the config, and its relative
      ``Path`` fields are made relative to the config file's directory.
    """
    if inspect.ismodule(factory):
        if settings:
            raise ConfigError(
                [
                    ConfigIssue(
                        config._source,
                        f"plugins[{index}].settings",
                        config._lines.get(("plugins", index, "settings")),
                        "this plugin takes no settings",
                    )
                ]
            )
        return factory
    model = getattr(factory, "Settings", None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        try:
            validated: Any = model.model_validate(settings)
        except ValidationError as exc:
            raise issues_from_validation(
                config, ("plugins", index, "settings"), exc, model
            ) from None
        if config._base_dir is not None:  # relative paths: beside the config file
            validated = resolve_paths(validated, config._base_dir)
        return _build(factory, (validated,), config, index)
    return _build(factory, (settings,) if settings else (), config, index)


def _build(factory: Any, args: tuple[Any, ...], config: Config, index: int) -> Any:
    """Call a plugin's constructor; a failure there is reported against its config entry."""
    try:
        return factory(*args)
    except Exception as exc:
        log.debug("plugin %s failed to initialise", config.plugins[index].name, exc_info=True)
        raise ConfigError(
            [
                ConfigIssue(
                    config._source,
                    f"plugins[{index}]",
                    config._lines.get(("plugins", index)),
                    f"plugin {config.plugins[index].name!r} failed to initialise: {exc}",
                )
            ]
        ) from exc


@dataclass(slots=True)
class _Impl:
    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    entry: PluginEntry
    # Where the data hook runs (mailflow.isolation): "never" (this process), "always" (a
    # worker process), "large" (a worker for messages of isolation.large_message bytes).
    isolate: str = "never"

    def isolated_for(self, size: int, large: int) -> bool:
        return self.isolate == "always" or (self.isolate == "large" and size >= large)


class _Resumed:
    """Awaiting this continues a coroutine whose first step has already run.

    ``pending`` is what that step yielded (the future it waits for); it is passed up
    to the running task, and from then on the task drives the coroutine exactly as
    ``await coroutine`` would: results are sent in, cancellation is thrown in.
    """

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self._coro, self._pending
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # e.g. CancelledError from the timeout
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as done:
                    return done.value


class Pipeline:
    """One per application instance: the loaded plugins and how to run them."""

    def __init__(
        self,
        config: Config,
        extra: dict[str, Any] | None = None,
        available: dict[str, Any] | None = None,
        app_factory: Callable[..., Any] | None = None,
    ) -> None:
        """Load the plugins the config enables.

        ``extra`` maps names to already-built plugin objects (tests, embedding);
        ``available`` overrides entry-point discovery (name -> factory);
        ``app_factory`` builds a worker process's application
        (:class:`mailflow.app.App`, which passes itself: see :meth:`start_isolation`).
        """
        self.config = config
        self._available = available
        self._app_factory = app_factory
        self.isolation: WorkerPool | None = None  # started by start_isolation()
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.entries: dict[str, PluginEntry] = {}
        factories: dict[str, Any] = dict(available) if available is not None else {}
        eps = available_plugins() if available is None else {}
        extra = extra or {}
        # Plugins a worker process can build for itself (from an entry point or a
        # factory), whose data hook asks to run in one: name -> "always" or "large".
        isolated: dict[str, str] = {}
        for index, entry in enumerate(config.plugins):
            if not entry.enabled:
                continue
            if entry.name in extra:
                obj = extra[entry.name]
                if entry.isolate:
                    log.warning(
                        "plugin %s is given as an object (not built from an entry point): "
                        "its data hook runs in the server process, isolate is ignored",
                        entry.name,
                    )
            else:
                factory = factories.get(entry.name)
                if factory is None:
                    ep = eps.get(entry.name)
                    if ep is None:
                        known = sorted(set(eps) | set(factories) | set(extra))
                        raise ConfigError(
                            [
                                ConfigIssue(
                                    config._source,
                                    f"plugins[{index}].name",
                                    config._lines.get(("plugins", index, "name")),
                                    f"no installed plugin {entry.name!r}; installed: {known}",
                                )
                            ]
                        )
                    try:
                        factory = ep.load()
                    except Exception as exc:  # a broken install must not be a traceback
                        raise ConfigError(
                            [
                                ConfigIssue(
                                    config._source,
                                    f"plugins[{index}].name",
                                    config._lines.get(("plugins", index, "name")),
                                    f"plugin {entry.name!r} ({ep.value}) cannot be loaded: "
                                    f"{type(exc).__name__}: {exc}",
                                )
                            ]
                        ) from exc
                obj = instantiate(factory, entry.settings, config, index)
                wants = getattr(obj, "isolate", False) if entry.isolate is None else entry.isolate
                if wants is True or wants == "large":
                    isolated[entry.name] = "always" if wants is True else "large"
                elif wants is not False:
                    log.warning(
                        "plugin %s: isolate = %r is not True, 'large' or False; not isolated",
                        entry.name,
                        wants,
                    )
            self.pm.register(obj, name=entry.name)
            self.entries[entry.name] = entry
        # Objects handed in directly but not listed in the config run last, with defaults.
        for name, obj in extra.items():
            if name not in self.entries and not any(p.name == name for p in config.plugins):
                self.pm.register(obj, name=name)
                self.entries[name] = PluginEntry(name=name)
        self.pm.check_pending()  # a misspelt hook name fails here, at start-up
        self.order = list(self.entries)
        self._impls: dict[str, list[_Impl]] = {}
        for hook_name in hookspecs.hook_names():
            if hook_name in hookspecs.CLI_HOOKS:
                continue  # called on the installed plugins by the CLI, not on these
            caller = getattr(self.pm.hook, hook_name)
            impls = [
                _Impl(
                    i.plugin_name,
                    i.function,
                    tuple(i.argnames),
                    self.entries[i.plugin_name],
                    isolated.get(i.plugin_name, "never")
                    if hook_name == "mailflow_data"
                    else "never",
                )
                for i in caller.get_hookimpls()
            ]
            impls.sort(key=lambda i: self.order.index(i.plugin))
            self._impls[hook_name] = impls
        # Messages that finish DATA close together run the data stage back to back (see
        # mailflow.batching); a message whose plugins wait (DNS) simply leaves the batch.
        # Front ends count the messages they are receiving in it.
        self.batch = DataBatch(config.server.data_batch_rounds)

    # --- introspection --------------------------------------------------------------------

    def plugins_for(self, hook_name: str) -> list[str]:
        """Plugin names implementing ``hook_name``, in calling order."""
        return [i.plugin for i in self._impls.get(hook_name, [])]

    def has(self, hook_name: str) -> bool:
        return bool(self._impls.get(hook_name))

    def data_impls(self) -> list[_Impl]:
        """The data-stage hook implementations, in calling order."""
        return list(self._impls["mailflow_data"])

    def isolated_plugins(self) -> list[str]:
        """Plugins whose data hook asks for a worker process, in calling order."""
        return [i.plugin for i in self._impls["mailflow_data"] if i.isolate != "never"]

    # --- worker processes -----------------------------------------------------------------

    async def start_isolation(self, on_restart: Callable[[str], None] | None = None) -> None:
        """Start the content-analysis workers (``serve``); without them, isolated hooks
        run in this process like any other (``check``, ``isolation.processes: 0``)."""
        names = self.isolated_plugins()
        processes = self.config.isolation.process_count()
        if self.isolation is not None or not names or processes == 0:
            return
        if self._app_factory is None:
            raise RuntimeError("worker processes need the pipeline's app_factory")
        pool = WorkerPool(
            self.config,
            names,
            self._available,
            processes=processes,
            start_timeout=self.config.isolation.start_timeout,
            queue_timeout=self.config.isolation.queue_timeout,
            on_restart=on_restart,
            app_factory=self._app_factory,
        )
        await pool.start()
        self.isolation = pool

    async def stop_isolation(self) -> None:
        pool, self.isolation = self.isolation, None
        if pool is not None:
            await pool.stop()

    # --- running --------------------------------------------------------------------------

    async def _call(self, impl: _Impl, kwargs: dict[str, Any]) -> Any:
        args = {name: kwargs[name] for name in impl.argnames}
        value = impl.function(**args)
        if inspect.iscoroutine(value):
            # Most async hooks finish without ever waiting (unsigned mail, small
            # messages): run the first step here and pay for a timeout only when the
            # coroutine really suspends. Nothing can interrupt a step that does not
            # suspend, so the timeout loses nothing.
            try:
                pending = value.send(None)
            except StopIteration as done:
                return done.value
            async with asyncio.timeout(impl.entry.timeout or None):
                return await _Resumed(value, pending)
        if inspect.isawaitable(value):
            async with asyncio.timeout(impl.entry.timeout or None):
                value = await value
        return value

    async def _guarded(self, impl: _Impl, stage: str, kwargs: dict[str, Any]) -> PluginRun:
        start = time.perf_counter()
        try:
            value = await self._call(impl, kwargs)
        except Exception as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else f"raised {exc!r}"
            log.error(
                "plugin %s %s at %s (on_error=%s)",
                impl.plugin,
                what,
                stage,
                impl.entry.on_error,
                exc_info=not isinstance(exc, TimeoutError),
            )
            return self._failed(impl, stage, what, start)
        elapsed = (time.perf_counter() - start) * 1000
        if value is not None and not isinstance(value, Result):
            log.error(
                "plugin %s returned %r at %s; expected Result or None",
                impl.plugin,
                type(value).__name__,
                stage,
            )
            value = None
        return PluginRun(impl.plugin, stage, value, elapsed)

    def _failed(self, impl: _Impl, stage: str, what: str, start: float) -> PluginRun:
        """The run of a plugin that failed, with the verdict its ``on_error`` asks for.

        ``quarantine`` holds the message (at an earlier stage the data stage does,
        see :meth:`run_data`), ``tempfail`` answers 451, ``continue`` goes on as if
        the plugin had returned nothing: it adds no score.
        """
        elapsed = (time.perf_counter() - start) * 1000
        result = None
        on_error = impl.entry.on_error
        if on_error == "tempfail":
            result = Result(
                Action.TEMPFAIL, PLUGIN_FAILURE_REPLY, reason=f"plugin {impl.plugin} failed"
            )
        elif on_error == "quarantine" and stage == "data":
            result = Result.quarantine(f"plugin {impl.plugin} failed: {what}")
        return PluginRun(impl.plugin, stage, result, elapsed, error=what)

    async def run_hook(self, impl: _Impl, stage: str, ctx: MessageContext) -> PluginRun:
        """One data-stage hook on ``ctx`` in this process, failures handled (workers)."""
        return await self._guarded(impl, stage, {"message": ctx})

    async def _run_isolated(
        self, pool: WorkerPool, segment: list[_Impl], ctx: MessageContext, keep: bool
    ) -> bool:
        """Run ``segment`` in a worker; True when a verdict ends the data stage.

        A hook that fails there (timeout, dead worker) is answered per its
        ``on_error``; the hooks after it then run in another worker. No free worker in
        time, or a server shutting down, is no plugin's fault: 451, whatever
        ``on_error`` says (the sender retries).
        """
        while segment:
            start = time.perf_counter()
            plugins = [(impl.plugin, impl.entry.timeout) for impl in segment]
            stopped, done, failure = await pool.run(plugins, ctx, self.take_data_run, keep)
            if stopped:
                return True
            if failure is None:
                return False
            impl = segment[done]
            if not failure.plugins_fault:
                log.warning("plugin %s not run: %s; answering 451", impl.plugin, failure)
                run = PluginRun(
                    impl.plugin,
                    "data",
                    Result(Action.TEMPFAIL, BUSY_REPLY, reason=str(failure)),
                    (time.perf_counter() - start) * 1000,
                    error=str(failure),
                )
                return self.take_data_run(ctx, impl.plugin, run)
            log.error(
                "plugin %s %s at data (on_error=%s)", impl.plugin, failure, impl.entry.on_error
            )
            if self.take_data_run(
                ctx, impl.plugin, self._failed(impl, "data", str(failure), start)
            ):
                return True
            segment = segment[done + 1 :]
        return False

    def take_data_run(self, ctx: MessageContext, plugin: str, run: PluginRun) -> bool:
        """Record a data hook's run on ``ctx``: its score, its mutations, its verdict.

        True when the verdict ends the data stage. Workers do the same with their copy
        of the message, so both stop at the same hook and hold the same bytes.
        """
        ctx.record(run)
        result = run.result
        if result is None:
            return False
        if result.mutations:
            ctx.apply(result.mutations)
        if not result.action.is_final:
            return False
        if ctx.action is Action.QUARANTINE and result.action in _NO_STRONGER:
            return False  # the first quarantine stands
        ctx.action = result.action
        ctx.reply = result.smtp_reply()
        ctx.reason = result.reason
        ctx.decided_by = plugin
        # A quarantined copy still gets the later plugins' headers (an admin reviewing
        # it wants Authentication-Results, say); they may refuse it.
        return result.action is not Action.QUARANTINE

    async def run_stage(self, stage: str, **kwargs: Any) -> tuple[Result | None, list[PluginRun]]:
        """Run one SMTP-phase hook (connect/helo/mail/rcpt) through all plugins in order.

        Returns the final result (or None) and every plugin run, for the record.
        """
        hook_name = hookspecs.STAGE_HOOKS[stage]
        if stage == "mail":
            start_budget(self.config.dns.budget)  # one DNS time budget per transaction
        runs: list[PluginRun] = []
        for impl in self._impls[hook_name]:
            run = await self._guarded(impl, stage, kwargs)
            runs.append(run)
            if run.result is not None and run.result.action.is_final:
                return run.result, runs
        return None, runs

    async def run_data(self, ctx: MessageContext) -> MessageContext:
        """Run end-of-message hooks, apply mutations, then map the score to an action.

        Waits first for the messages whose data is still arriving, and afterwards for
        their hooks, so that the hooks of a batch run back to back (``mailflow.batching``).
        """
        if current_budget() is None:
            start_budget(self.config.dns.budget)  # front ends that skip the mail stage
        batched = await self.batch.gather()
        if ctx.action is Action.CONTINUE:
            self._quarantine_for_earlier_failure(ctx)
        impls = self._impls["mailflow_data"]
        pool = self.isolation
        size, large = ctx.size, self.config.isolation.large_message
        at = 0
        while at < len(impls):
            impl = impls[at]
            if pool is not None and impl.isolated_for(size, large):
                # A run of consecutive isolated hooks is one job for one worker.
                end = at + 1
                while end < len(impls) and impls[end].isolated_for(size, large):
                    end += 1
                keep = any(i.isolated_for(size, large) for i in impls[end:])
                if await self._run_isolated(pool, impls[at:end], ctx, keep):
                    break
                at = end
                continue
            run = await self._guarded(impl, "data", {"message": ctx})
            if self.take_data_run(ctx, impl.plugin, run):
                break
            at += 1
        if ctx.action is Action.CONTINUE:
            apply_thresholds(ctx, self.config)
        if ctx.action in (Action.CONTINUE, Action.ACCEPT):
            await self.assign_routes(ctx)
        if batched:
            await self.batch.regroup()
        return ctx

    def _quarantine_for_earlier_failure(self, ctx: MessageContext) -> None:
        """A plugin with ``on_error: quarantine`` that failed before DATA (when there
        was nothing to quarantine yet) quarantines the message now."""
        for run in ctx.runs:
            entry = self.entries.get(run.plugin)
            if run.error and entry is not None and entry.on_error == "quarantine":
                ctx.action = Action.QUARANTINE
                ctx.reason = f"plugin {run.plugin} failed at {run.stage}: {run.error}"
                ctx.decided_by = run.plugin
                return

    async def assign_routes(self, ctx: MessageContext) -> None:
        for rcpt in ctx.envelope.rcpt_tos:
            if rcpt in ctx.routes:
                continue
            route = None
            for impl in self._impls["mailflow_route"]:
                run = await self._guarded_route(impl, ctx, rcpt)
                if run is not None:
                    route = run
                    break
            ctx.routes[rcpt] = route or default_route(self.config, rcpt, ctx)

    async def _guarded_route(self, impl: _Impl, ctx: MessageContext, rcpt: str) -> Route | None:
        try:
            value = await self._call(impl, {"message": ctx, "recipient": rcpt})
        except Exception:
            log.exception("plugin %s failed in mailflow_route for %s", impl.plugin, rcpt)
            return None
        return value if isinstance(value, Route) else None

    async def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an informational hook (startup, shutdown, delivered) on every plugin."""
        for impl in self._impls[hook_name]:
            try:
                await self._call(impl, kwargs)
            except Exception as exc:
                if hook_name == "mailflow_startup":
                    # Keep the plugin's own exception (callers may expect its type) but
                    # make sure whoever reads it learns which plugin could not start.
                    log.error("plugin %s failed to start: %s", impl.plugin, exc)
                    exc.add_note(f"while starting plugin {impl.plugin!r}")
                    raise
                log.exception("plugin %s failed in %s", impl.plugin, hook_name)

    async def notify_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Exception]]:
        """Call an informational hook on every plugin, like ``notify``, but return the
        failures as (plugin name, exception) instead of logging them, for a caller
        that reports them itself (the CLI: ``mailflow_learn``)."""
        failures: list[tuple[str, Exception]] = []
        for impl in self._impls[hook_name]:
            try:
                await self._call(impl, kwargs)
            except Exception as exc:
                failures.append((impl.plugin, exc))
        return failures


def apply_thresholds(ctx: MessageContext, config: Config) -> None:
    """rspamd-style: the one place where the total score becomes an action."""
    t = config.actions
    score = ctx.score
    if t.reject is not None and score >= t.reject:
        ctx.action = Action.REJECT
        ctx.reply = SMTPReply(550, f"Message rejected as spam (score {score:.1f})", "5.7.1")
        ctx.reason = f"score {score:.2f} >= reject {t.reject}"
    elif t.quarantine is not None and score >= t.quarantine:
        ctx.action = Action.QUARANTINE
        ctx.reason = f"score {score:.2f} >= quarantine {t.quarantine}"
    elif t.junk is not None and score >= t.junk:
        ctx.junk = True
        ctx.reason = f"score {score:.2f} >= junk {t.junk}"
    if t.add_header is not None and score >= t.add_header and ctx.action is Action.CONTINUE:
        ctx.apply([AddHeader("X-Spam-Flag", "YES")])


def default_route(config: Config, rcpt: str, ctx: MessageContext | None = None) -> Route:
    """Route from config alone: local domains -> local delivery, else relay rules."""
    domain = rcpt.rpartition("@")[2].lower()
    folder = ".Junk" if ctx is not None and ctx.junk else ""
    if config.is_local_domain(domain):
        kind = RouteKind.LMTP if config.delivery.method == "lmtp" else RouteKind.MAILDIR
        return Route(kind, folder=folder if kind is RouteKind.MAILDIR else "")
    target = config.relay.routes.get(domain, config.relay.default)
    if target == "mx":
        return Route(RouteKind.MX)
    if target == "none":
        # Only reachable when relay control let it through (e.g. a plugin added it).
        return Route(RouteKind.RELAY, target="none")
    return Route(RouteKind.RELAY, target=target)


def load_plugin_objects(names: Iterable[str]) -> dict[str, Any]:
    """Load installed plugins by name without a config (for `mailflow plugins`)."""
    eps = available_plugins()
    return {name: eps[name].load() for name in names if name in eps}
