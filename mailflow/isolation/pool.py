"""The server side of content-analysis isolation: a pool of worker processes.

A plugin whose data hook is isolated (``isolate`` in its config entry, or the
plugin's own ``isolate`` attribute) runs in one of ``isolation.processes`` worker
processes instead of on the server's event loop. The server waits for each hook's
answer for at most the plugin's ``timeout``; past it the worker is killed (SIGKILL:
pure Python or regular-expression work that never yields cannot be interrupted any
other way), a new one is started in the background, and the message is answered as
the plugin's ``on_error`` says. A worker that dies (a crash in a C extension, the
kernel's OOM killer) is noticed at once, even while idle, and replaced.

Each worker runs one job at a time. A message's next isolated hooks go to the worker
that already holds that message when it is free (no second copy of the bytes, one
MIME walk for bayes and rules); otherwise to any free worker, which is then sent the
bytes. Waiting for a free worker is not the plugin's time: it has its own limit
(``isolation.queue_timeout``), and running out of it (or a server that is shutting
down) is a :class:`PluginFailure` of kind ``busy`` (``shutdown``), which the
pipeline answers with a temporary failure whatever the plugin's ``on_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mailflow.isolation.wire import (
    HEADER,
    Init,
    Job,
    Ready,
    Reply,
    decode_header,
    encode,
    without_details,
)
from mailflow.message import MessageContext, PluginRun

log = logging.getLogger("mailflow.isolation")

_tokens = itertools.count(1)
SEND_CHUNK = 1024 * 1024  # message bytes handed to the transport at a time
STOP_GRACE = 5.0  # seconds running jobs get to finish, then workers to exit, at shutdown
RESPAWN_DELAYS = (0.0, 1.0, 5.0, 30.0)  # between failed attempts to start a replacement
_FRAME_ERRORS = (asyncio.IncompleteReadError, ConnectionError, pickle.UnpicklingError, EOFError)

Take = Callable[[MessageContext, str, PluginRun], bool]


class IsolationError(Exception):
    """The worker processes could not be started (names the plugins and why)."""


class PluginFailure(Exception):
    """An isolated hook gave no run; ``str()`` says why, as the log and
    ``PluginRun.error`` show it. ``kind``: ``timeout`` and ``died`` are the
    plugin's (its ``on_error`` applies); ``busy`` (no free worker in time) and
    ``shutdown`` are the server's (a temporary failure)."""

    def __init__(self, what: str, kind: str) -> None:
        super().__init__(what)
        self.kind = kind

    @property
    def plugins_fault(self) -> bool:
        return self.kind in ("timeout", "died")


class _Disagreement(Exception):
    """The worker's replies do not fit the job (a bug): the worker is not trusted."""


class _Worker:
    """One worker process and the socket to it."""

    __slots__ = ("expired", "holds", "pid", "process", "reader", "watcher", "writer")

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.process = process
        self.reader = reader
        self.writer = writer
        self.pid = process.pid
        self.holds: tuple[int, int] | None = None  # (message token, raw version)
        self.expired = False  # killed because a hook ran past its timeout
        self.watcher: asyncio.Task[None] | None = None  # notices the process's exit

    async def send(self, obj: object, raw: bytes | None = None) -> None:
        await self.send_frame(encode(obj, raw))

    async def send_frame(self, pieces: list[bytes]) -> None:
        writer = self.writer
        for piece in pieces:
            if len(piece) <= SEND_CHUNK:
                writer.write(piece)
                continue
            # A large message goes out a slice at a time: the transport copies what the
            # socket does not take at once, and one copy of many megabytes would hold
            # up the event loop (and every client's replies) for milliseconds.
            view = memoryview(piece)
            for start in range(0, len(piece), SEND_CHUNK):
                writer.write(view[start : start + SEND_CHUNK])
                await writer.drain()
        await writer.drain()

    async def receive(self) -> Any:
        head = await self.reader.readexactly(HEADER.size)
        meta_len, raw_len = decode_header(head)
        meta = await self.reader.readexactly(meta_len)
        if raw_len:
            await self.reader.readexactly(raw_len)  # workers send none; keep the framing
        return pickle.loads(meta)

    def answer_arriving(self) -> bool:
        """Part of an answer is already buffered (StreamReader keeps it in ``_buffer``,
        which aiosmtpd and mailflow's SMTP reader use too)."""
        return bool(getattr(self.reader, "_buffer", b""))

    def expire(self) -> None:
        """A hook's timeout ran out. Unless its answer is already arriving (it came in
        the same turn of the event loop as the timer), kill the process: an answer
        that is not there now will never come from a hook that does not yield."""
        if self.answer_arriving():
            return
        self.expired = True
        self.kill()

    def kill(self) -> None:
        """SIGKILL the worker and whatever its plugins started (its process group)."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        self.writer.close()

    def status(self) -> str:
        code = self.process.returncode
        if code is None:
            return "exit status unknown"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


async def _reap(process: asyncio.subprocess.Process) -> None:
    """SIGKILL a worker that never became one (its process group too) and wait for it,
    even when the task doing this is being cancelled."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(process.wait())


class WorkerPool:
    """``processes`` workers running the data hooks of ``plugins``."""

    def __init__(
        self,
        config: Any,
        plugins: list[str],
        available: dict[str, Any] | None,
        *,
        processes: int,
        start_timeout: float,
        queue_timeout: float,
        on_restart: Callable[[str], None] | None = None,
        app_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.plugins = list(plugins)
        self.processes = processes
        self.start_timeout = start_timeout
        self.queue_timeout = queue_timeout
        self._init = Init(
            config=config,
            plugins=self.plugins,
            available=available,
            log_level=logging.getLogger().getEffectiveLevel(),
            log_file=str(config.log.file) if config.log.file else None,
            app_factory=app_factory,
        )
        self._on_restart = on_restart
        self._workers: set[_Worker] = set()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._waiters: deque[asyncio.Future[_Worker]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raise IsolationError when one cannot start."""
        results = await asyncio.gather(
            *(self._spawn() for _ in range(self.processes)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        for result in results:
            if isinstance(result, _Worker):
                self._add(result)
                self._idle.append(result)
        if errors:
            await self.stop()
            raise IsolationError(
                f"content-analysis workers for {', '.join(self.plugins)} failed to start: "
                f"{errors[0]}"
            ) from errors[0]
        log.info(
            "%d content-analysis worker process(es) for %s: pids %s",
            len(self._workers),
            ", ".join(self.plugins),
            " ".join(str(w.pid) for w in self._workers),
        )

    async def stop(self) -> None:
        """Take no new jobs, let the running ones finish (for STOP_GRACE at most), then
        close every worker (they exit when their socket closes) and reap them."""
        self._stopping = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # A replacement that was starting kills and reaps its process as it is
        # cancelled: wait for that, or the process outlives the pool.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_GRACE):
                await asyncio.gather(*tasks, return_exceptions=True)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(PluginFailure("the server is shutting down", "shutdown"))
        self._waiters.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_GRACE):
                while self._busy:
                    await asyncio.sleep(0.05)
        workers, self._workers, self._idle = list(self._workers), set(), []
        for worker in workers:
            if worker.watcher is not None:
                worker.watcher.cancel()
            worker.writer.close()
        for worker in workers:
            try:
                async with asyncio.timeout(STOP_GRACE):
                    await worker.process.wait()
            except TimeoutError:
                worker.kill()
                await worker.process.wait()

    @property
    def size(self) -> int:
        """Workers running now (fewer than ``processes`` while replacements start)."""
        return len(self._workers)

    async def _spawn(self) -> _Worker:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        # The worker imports what this process imports (tests, embedding: plugins and
        # factories may live outside site-packages), and nothing else: -P keeps the
        # current directory off its path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",
                "-m",
                "mailflow.isolation.worker",
                str(child.fileno()),
                str(os.getpid()),
                pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C and job control go to the server only
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        try:
            reader, writer = await asyncio.open_connection(sock=parent)
        except BaseException:
            parent.close()
            await _reap(process)
            raise
        worker = _Worker(process, reader, writer)
        try:
            async with asyncio.timeout(self.start_timeout):
                await worker.send(self._init)
                ready = await worker.receive()
        except (TimeoutError, *_FRAME_ERRORS) as exc:
            worker.kill()
            await process.wait()
            why = "no answer" if isinstance(exc, TimeoutError) else worker.status()
            raise IsolationError(f"worker process {process.pid}: {why}") from None
        except BaseException:  # cancelled (the pool stops while this one starts)
            worker.kill()
            await _reap(process)
            raise
        if not isinstance(ready, Ready) or ready.error:
            worker.kill()
            await process.wait()
            raise IsolationError(getattr(ready, "error", "") or "unexpected answer")
        return worker

    def _add(self, worker: _Worker) -> None:
        self._workers.add(worker)
        worker.watcher = self._background(self._watch(worker))

    async def _watch(self, worker: _Worker) -> None:
        """Replace a worker as soon as its process ends, even while it is idle (the OOM
        killer, a signal): the next message must not be the one to find out."""
        await worker.process.wait()
        if worker in self._workers:
            self._replace(worker, "died")

    def _background(self, coroutine: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _replace(self, worker: _Worker, why: str) -> None:
        """Kill ``worker`` and start a new one in the background (once per worker)."""
        if worker not in self._workers:
            return
        worker.kill()
        self._workers.discard(worker)
        self._busy.discard(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        if self._stopping:
            return
        log.warning("content-analysis worker %d stopped (%s); starting a new one", worker.pid, why)
        if self._on_restart is not None:
            self._on_restart(why)
        self._background(self._respawn(worker))

    async def _respawn(self, old: _Worker) -> None:
        with contextlib.suppress(ProcessLookupError):
            await old.process.wait()  # reap it
        for delay in itertools.chain(RESPAWN_DELAYS, itertools.repeat(RESPAWN_DELAYS[-1])):
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                worker = await self._spawn()
            except Exception as exc:
                # Each worker loads its plugins afresh (rule files, models): a file
                # broken since start-up keeps it from starting, and isolated hooks
                # then wait for a worker until isolation.queue_timeout (451).
                log.error(
                    "content-analysis worker could not be restarted (%d of %d running): %s",
                    len(self._workers),
                    self.processes,
                    exc,
                )
                continue
            if self._stopping:
                worker.writer.close()
                await worker.process.wait()
                return
            self._add(worker)
            self._release(worker)
            return

    # --- running --------------------------------------------------------------------------

    async def run(
        self,
        plugins: list[tuple[str, float]],
        ctx: MessageContext,
        take: Take,
        keep: bool = False,
    ) -> tuple[bool, int, PluginFailure | None]:
        """Run the data hooks of ``plugins`` ((name, timeout) pairs, in order) on
        ``ctx`` in one worker; each run is handed to ``take`` as it arrives, which
        records it on ``ctx`` and says whether the data stage ends there. ``keep``:
        the message has isolated hooks after these (the worker keeps its copy).

        Each hook gets its own timeout (0: none), counted from when the job was sent or
        the previous hook answered. Returns (stopped, index, failure): ``take`` ended
        the stage at ``index``; or ``failure`` is why the hook at ``index`` gave no
        run; or every hook ran (failure None, index = len(plugins)).
        """
        token = ctx.isolation_token
        if not token:
            token = ctx.isolation_token = next(_tokens)
        for attempt in (1, 2):
            worker = await self._acquire(token)
            if isinstance(worker, PluginFailure):
                return False, 0, worker
            job = Job(
                token,
                ctx.raw_version,
                [name for name, _ in plugins],
                ctx.queue_id,
                ctx.envelope,
                _portable(ctx),
                ctx.score,
                ctx.runs,
                ctx.routes,
                ctx.action,
                ctx.received_at,
                keep,
            )
            raw = None if worker.holds == (token, ctx.raw_version) else ctx.raw
            frame = _encode_job(job, raw)
            sent = False
            try:
                await worker.send_frame(frame)
                sent = True
            except (ConnectionError, OSError):
                # Gone before this job started (it is not this message's doing): once
                # more with another worker.
                self._replace(worker, "died")
                if attempt == 1:
                    continue
                return False, 0, PluginFailure("no worker process could take the job", "busy")
            except BaseException:  # cancelled half-way through the frame: state unknown
                self._replace(worker, "cancelled")
                raise
            finally:
                if not sent and worker in self._busy:
                    self._busy.discard(worker)
            return await self._replies(worker, plugins, ctx, take, token)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _replies(
        self,
        worker: _Worker,
        plugins: list[tuple[str, float]],
        ctx: MessageContext,
        take: Take,
        token: int,
    ) -> tuple[bool, int, PluginFailure | None]:
        """Read the job's replies as the hooks finish, each within its timeout."""
        loop = asyncio.get_running_loop()
        index = 0
        stopped = False
        started = time.perf_counter()
        # One timer per hook: when it fires, the worker is killed, which ends the wait
        # for its answer (cheaper than a timeout context around each await).
        expiry: asyncio.TimerHandle | None = None
        try:
            while True:
                name, timeout = plugins[index]
                if timeout:
                    expiry = loop.call_at(loop.time() + timeout, worker.expire)
                reply = await worker.receive()
                if expiry is not None:
                    expiry.cancel()
                    expiry = None
                if not isinstance(reply, Reply) or reply.run.plugin != name:
                    raise _Disagreement(f"unexpected answer {reply!r}")
                now = time.perf_counter()
                reply.run.elapsed_ms = (now - started) * 1000
                started = now
                stopped = take(ctx, name, reply.run)
                index += 1
                if reply.version != ctx.raw_version:
                    # A hook changed its copy of the message other than by returning
                    # mutations: what the worker holds is not what the server has.
                    log.warning("plugin %s changed the message in place; ignored", name)
                    worker.holds = None
                else:
                    worker.holds = (token, ctx.raw_version)
                if stopped or reply.last:
                    if reply.last != (stopped or index == len(plugins)):
                        raise _Disagreement("the worker and the server stopped apart")
                    break
        except _FRAME_ERRORS:
            if worker.expired:
                self._replace(worker, "timeout")
                return (
                    False,
                    index,
                    PluginFailure(
                        f"timed out after {plugins[index][1]:g}s "
                        f"(worker process {worker.pid} stopped)",
                        "timeout",
                    ),
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await worker.process.wait()
            status = worker.status()
            self._replace(worker, "died")
            return (
                False,
                index,
                PluginFailure(f"worker process {worker.pid} died ({status})", "died"),
            )
        except _Disagreement as exc:
            log.error("content-analysis worker %d: %s", worker.pid, exc)
            self._replace(worker, "died")
            if stopped:
                return True, index - 1, None  # the server's verdict stands
            return False, index, PluginFailure(f"worker process {worker.pid}: {exc}", "died")
        except asyncio.CancelledError:
            # The message is abandoned (its client hung up, say), not the worker: read
            # what it still sends for this job in the background, then free it.
            self._background(self._drain(worker, plugins[index:]))
            raise
        finally:
            if expiry is not None:
                expiry.cancel()
        if worker.expired:  # its last answer arrived as its timer fired: use it, not it
            self._replace(worker, "timeout")
        else:
            self._release(worker)
        return stopped, index - 1 if stopped else len(plugins), None

    async def _drain(self, worker: _Worker, plugins: list[tuple[str, float]]) -> None:
        """Read and drop the rest of an abandoned job's replies, each within its hook's
        timeout, then give the worker back (holding nothing); kill it if one overruns."""
        loop = asyncio.get_running_loop()
        worker.holds = None
        try:
            for _, timeout in plugins:
                expiry = loop.call_at(loop.time() + timeout, worker.expire) if timeout else None
                try:
                    reply = await worker.receive()
                finally:
                    if expiry is not None:
                        expiry.cancel()
                if not isinstance(reply, Reply) or reply.last:
                    break
        except _FRAME_ERRORS:
            self._replace(worker, "timeout" if worker.expired else "died")
            return
        except asyncio.CancelledError:  # the pool is stopping
            worker.kill()
            raise
        if worker.expired:
            self._replace(worker, "timeout")
        else:
            self._release(worker)

    async def _acquire(self, token: int) -> _Worker | PluginFailure:
        """A free worker, the one holding message ``token`` if it is free; waits up to
        ``queue_timeout`` when every worker is busy (or being replaced)."""
        if self._stopping:
            return PluginFailure("the server is shutting down", "shutdown")
        idle = self._idle
        if idle:
            for i, candidate in enumerate(idle):
                if candidate.holds is not None and candidate.holds[0] == token:
                    worker = idle.pop(i)
                    break
            else:
                worker = idle.pop()
            self._busy.add(worker)
            return worker
        waiter: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout or None):
                worker = await waiter
        except TimeoutError:
            return PluginFailure(
                f"no content-analysis worker free within {self.queue_timeout:g}s", "busy"
            )
        except PluginFailure as failure:
            return failure
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed over just as we gave up
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        self._busy.add(worker)
        return worker

    def _release(self, worker: _Worker) -> None:
        self._busy.discard(worker)
        if worker not in self._workers or self._stopping:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)


def _portable(ctx: MessageContext) -> Any:
    """The connection without what only lives in this process (the PTR resolver)."""
    conn = ctx.connection
    return dataclasses.replace(conn, _resolver=None) if conn._resolver is not None else conn


def _encode_job(job: Job, raw: bytes | None) -> list[bytes]:
    """The frame of ``job``; the earlier runs' details are dropped if a plugin left
    something in them that cannot be pickled (they are for logs; results and scores
    stay)."""
    try:
        return encode(job, raw)
    except Exception:
        job.runs = [without_details(run) for run in job.runs]
        return encode(job, raw)
