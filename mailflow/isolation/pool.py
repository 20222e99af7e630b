"""The server side of content-analysis isolation: a pool of worker processes.

A plugin whose data hook is isolated (``isolate`` in its config entry, or the
plugin's own ``isolate = True``) runs in one of ``isolation.processes`` worker
processes instead of on the server's event loop. The server waits for the answer
for at most the plugin's ``timeout``; past it the worker is killed (SIGKILL: pure
Python or regular-expression work that never yields cannot be interrupted any
other way), a new one is started in the background, and the message is answered
as the plugin's ``on_error`` says. A worker that dies (a crash in a C extension,
the kernel's OOM killer) is treated the same way.

Each worker runs one job at a time. A message's next isolated plugin goes to the
worker that already holds that message when it is free (no second copy of the
bytes, one MIME walk for bayes and rules); otherwise to any free worker, which
is then sent the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mailflow.isolation.wire import HEADER, Init, Job, Ready, Reply, decode_header, encode
from mailflow.message import MessageContext, PluginRun

log = logging.getLogger("mailflow.isolation")

_TOKEN_KEY = "isolation.token"  # ctx.extra: which message this is, for the workers
_tokens = itertools.count(1)
SEND_CHUNK = 1024 * 1024  # message bytes handed to the transport at a time
STOP_GRACE = 5.0  # seconds a worker gets to exit after its socket closes
RESPAWN_DELAYS = (0.0, 1.0, 5.0, 30.0)  # between failed attempts to start a replacement


class IsolationError(Exception):
    """The worker processes could not be started (names the plugins and why)."""


class PluginFailure(Exception):
    """An isolated run gave no result; ``str()`` says why, as the log and
    ``PluginRun.error`` show it (``timed_out`` for a deadline)."""

    def __init__(self, what: str, timed_out: bool = False) -> None:
        super().__init__(what)
        self.timed_out = timed_out


class _Worker:
    """One worker process and the socket to it."""

    __slots__ = ("expired", "holds", "pid", "process", "reader", "writer")

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

    def expire(self) -> None:
        """A hook ran past its timeout: kill the process (its answer will never come)."""
        self.expired = True
        self.kill()

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

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.writer.close()

    def status(self) -> str:
        code = self.process.returncode
        if code is None:
            return "exit status unknown"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


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
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.plugins = list(plugins)
        self.processes = processes
        self.start_timeout = start_timeout
        self._init = Init(
            config=config,
            plugins=self.plugins,
            available=available,
            log_level=logging.getLogger().getEffectiveLevel(),
            json_log=False,
        )
        self._on_restart = on_restart
        self._workers: set[_Worker] = set()
        self._idle: list[_Worker] = []
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
                self._workers.add(result)
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
        """Close every worker (they exit when their socket closes), then reap them."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        workers, self._workers, self._idle = list(self._workers), set(), []
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(PluginFailure("the worker pool is shutting down"))
        self._waiters.clear()
        for worker in workers:
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
        # factories may live outside site-packages).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mailflow.isolation.worker",
                str(child.fileno()),
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
        reader, writer = await asyncio.open_connection(sock=parent)
        worker = _Worker(process, reader, writer)
        try:
            async with asyncio.timeout(self.start_timeout):
                await worker.send(self._init)
                ready = await worker.receive()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            worker.kill()
            await process.wait()
            why = "no answer" if isinstance(exc, TimeoutError) else worker.status()
            raise IsolationError(f"worker process {process.pid}: {why}") from None
        except BaseException:
            worker.kill()
            raise
        if not isinstance(ready, Ready) or ready.error:
            worker.kill()
            await process.wait()
            raise IsolationError(getattr(ready, "error", "") or "unexpected answer")
        return worker

    def _replace(self, worker: _Worker, why: str) -> None:
        """Kill ``worker`` and start a new one in the background."""
        worker.kill()
        self._workers.discard(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        log.warning("content-analysis worker %d stopped (%s); starting a new one", worker.pid, why)
        if self._on_restart is not None:
            self._on_restart(why)
        if not self._stopping:
            task = asyncio.get_running_loop().create_task(self._respawn(worker))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

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
                log.error("content-analysis worker could not be restarted: %s", exc)
                continue
            if self._stopping:
                worker.writer.close()
                await worker.process.wait()
                return
            self._workers.add(worker)
            self._release(worker)
            return

    # --- running --------------------------------------------------------------------------

    async def run(
        self,
        plugins: list[tuple[str, float]],
        ctx: MessageContext,
        take: Callable[[MessageContext, str, PluginRun], bool],
    ) -> tuple[bool, int, PluginFailure | None]:
        """Run the data hooks of ``plugins`` ((name, timeout) pairs, in order) on
        ``ctx`` in one worker; each run is handed to ``take`` as it arrives, which
        records it on ``ctx`` and says whether the data stage ends there.

        Each hook gets its own timeout (0: none), counted from when the previous one
        answered; the first one's includes waiting for a free worker. Returns
        (stopped, index, failure): ``take`` ended the stage at ``index``; or
        ``failure`` is why the hook at ``index`` gave no run (its worker is gone);
        or every hook ran (failure None, index = len(plugins)).
        """
        loop = asyncio.get_running_loop()
        timeout = plugins[0][1]
        token = ctx.extra.get(_TOKEN_KEY)
        if token is None:
            token = ctx.extra[_TOKEN_KEY] = next(_tokens)
        started = time.perf_counter()
        try:
            worker = await self._acquire(token, loop.time() + timeout if timeout else None)
        except TimeoutError:
            return (
                False,
                0,
                PluginFailure(
                    f"timed out after {timeout:g}s waiting for a free worker process", True
                ),
            )
        names = [name for name, _ in plugins]
        job = Job(
            token,
            ctx.raw_version,
            names,
            ctx.queue_id,
            ctx.envelope,
            _portable(ctx),
            ctx.score,
            ctx.runs,
            ctx.routes,
            ctx.action,
            ctx.received_at,
        )
        raw = None if worker.holds == (token, ctx.raw_version) else ctx.raw
        index = 0
        stopped = False
        # One timer per hook: when it fires, the worker is killed, which ends the wait
        # for its answer (cheaper than a timeout context around each await).
        expiry: asyncio.TimerHandle | None = None
        try:
            if timeout:
                expiry = loop.call_at(started_at(loop, started) + timeout, worker.expire)
            await worker.send_frame(_encode_job(job, raw))
            while True:
                name, timeout = plugins[index]
                reply = await worker.receive()
                if expiry is not None:
                    expiry.cancel()
                    expiry = None
                if not isinstance(reply, Reply) or reply.run.plugin != name:
                    raise pickle.UnpicklingError(f"unexpected answer {reply!r}")
                now = time.perf_counter()
                reply.run.elapsed_ms = (now - started) * 1000
                stopped = take(ctx, name, reply.run)
                index += 1
                if reply.last or stopped:
                    if reply.last != (stopped or index == len(plugins)):
                        raise pickle.UnpicklingError("the worker and the server disagree")
                    break
                started = now
                next_timeout = plugins[index][1]
                if next_timeout:
                    expiry = loop.call_at(loop.time() + next_timeout, worker.expire)
        except (asyncio.IncompleteReadError, ConnectionError, pickle.UnpicklingError, EOFError):
            if worker.expired:
                self._replace(worker, "timeout")
                return (
                    False,
                    index,
                    PluginFailure(
                        f"timed out after {plugins[index][1]:g}s "
                        f"(worker process {worker.pid} stopped)",
                        True,
                    ),
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await worker.process.wait()
            status = worker.status()
            self._replace(worker, "died")
            return False, index, PluginFailure(f"worker process {worker.pid} died ({status})")
        except BaseException:  # cancelled half-way: the worker's state is unknown
            self._replace(worker, "cancelled")
            raise
        finally:
            if expiry is not None:
                expiry.cancel()
        worker.holds = (token, ctx.raw_version)
        self._release(worker)
        return stopped, index if stopped else len(plugins), None

    async def _acquire(self, token: int, deadline: float | None) -> _Worker:
        """A free worker, the one holding message ``token`` if it is free; waits (until
        loop time ``deadline``, then TimeoutError) when every worker is busy."""
        idle = self._idle
        if idle:
            for i, worker in enumerate(idle):
                if worker.holds is not None and worker.holds[0] == token:
                    return idle.pop(i)
            return idle.pop()
        waiter: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed over just as we gave up
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _release(self, worker: _Worker) -> None:
        if worker not in self._workers:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)


def started_at(loop: asyncio.AbstractEventLoop, perf_start: float) -> float:
    """The loop time of a ``time.perf_counter()`` reading taken a moment ago."""
    return loop.time() - (time.perf_counter() - perf_start)


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
        job.runs = [_without_details(run) for run in job.runs]
        return encode(job, raw)


def _without_details(run: PluginRun) -> PluginRun:
    result = run.result
    if result is not None:
        result = dataclasses.replace(result, details={})
    return dataclasses.replace(run, result=result)
