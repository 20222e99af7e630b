"""A content-analysis worker process: ``python -m mailflow.isolation.worker FD``.

Started by :class:`mailflow.isolation.pool.WorkerPool` with one end of a socket
pair as file descriptor ``FD``. It reads an :class:`~mailflow.isolation.wire.Init`
frame, loads and starts the plugins it names exactly as the server does (same
config, same entry points or factories), answers
:class:`~mailflow.isolation.wire.Ready`, then runs one
:class:`~mailflow.isolation.wire.Job` at a time until the socket closes.

The worker keeps the last message it was sent, with the mutations of its own runs
applied, so consecutive plugins of one message (bayes, then rules) share one copy
of the bytes and one MIME walk. A plugin that raises is reported like in the
server (the pipeline's own error handling runs here); a plugin that never returns
is the server's to deal with: it kills this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys

from mailflow.isolation.wire import Init, Job, Ready, Reply, encode, read_frame, without_details
from mailflow.message import MessageContext

WORKER_NICENESS = 10  # added to the server's nice value; the kernel caps it at 19
PR_SET_PDEATHSIG = 1  # prctl(2)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fd, server_pid = int(args[0]), int(args[1])
    # Ctrl-C on `mailflow serve`, or systemd stopping the whole control group, must
    # not kill a worker half-way through a job: the server finishes the running jobs
    # and then closes its workers' sockets, which ends them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with(server_pid)
    # The server process answers SMTP commands; bulk content analysis may wait for the
    # CPU when both want it, so one core busy with a large message does not slow every
    # client's replies (docs/performance.md, "Hostile mix").
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    sock = socket.socket(fileno=fd)
    stream = sock.makefile("rb")
    try:
        first = read_frame(stream)
        if first is None:
            return 1
        init, _ = first
        assert isinstance(init, Init)
        _configure_logging(init)
        runner = _Runner(init)
    except BaseException as exc:  # report why, then exit: the server names the plugin
        _send(sock, Ready(error=f"{type(exc).__name__}: {exc}", pid=os.getpid()))
        return 1
    _send(sock, Ready(pid=os.getpid()))
    while True:
        frame = read_frame(stream)
        if frame is None:
            runner.close()
            return 0
        job, raw = frame
        runner.run(job, raw, sock)


def _die_with(server_pid: int) -> None:
    """Get SIGKILL when the server dies (Linux ``PR_SET_PDEATHSIG``): a hook that never
    yields would otherwise run on forever after a ``kill -9`` of the server, as the
    socket is only looked at between jobs."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server_pid:  # the server was gone before the call above
        os._exit(1)


def _configure_logging(init: Init) -> None:
    handler: logging.Handler
    if init.log_file:
        handler = logging.FileHandler(init.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[worker {os.getpid()}]: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(init.log_level)


def _send(sock: socket.socket, obj: object) -> None:
    try:
        frame = encode(obj)
    except Exception:
        if not isinstance(obj, Reply):
            raise
        # Details a plugin put in its result that cannot be pickled are for the log
        # only: send the verdict, score and mutations without them.
        frame = encode(Reply(without_details(obj.run), obj.version, obj.last))
    sock.sendall(b"".join(frame))


class _Runner:
    """The plugins of one worker and the message it holds."""

    def __init__(self, init: Init) -> None:
        if init.app_factory is None:
            raise RuntimeError("no application factory in the Init frame")
        config = init.config
        wanted = set(init.plugins)
        restricted = config.model_copy(
            update={"plugins": [p for p in config.plugins if p.name in wanted]}
        )
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.app = init.app_factory(restricted, available_plugins=init.available)
        self.loop.run_until_complete(self.app.startup())
        self.impls = {impl.plugin: impl for impl in self.app.pipeline.data_impls()}
        self.held: tuple[int, MessageContext] | None = None  # the last message

    def run(self, job: Job, raw: bytes | None, sock: socket.socket) -> None:
        """Run the job's hooks, sending each one's Reply as soon as it is known."""
        if raw is not None:
            ctx = MessageContext(raw, job.envelope, job.connection, queue_id=job.queue_id)
            ctx.raw_version = job.version
            self.held = (job.token, ctx)
        else:
            if self.held is None or self.held[0] != job.token:
                raise RuntimeError("worker asked for a message it does not hold")
            ctx = self.held[1]
            if ctx.raw_version != job.version:
                raise RuntimeError("worker asked for a message version it does not hold")
            ctx.envelope = job.envelope
            ctx.connection = job.connection
        ctx.runs = job.runs
        ctx.score = job.score
        ctx.routes = job.routes
        ctx.action = job.action
        ctx.received_at = job.received_at
        self.loop.run_until_complete(self._segment(job.plugins, ctx, sock, job.keep))

    async def _segment(
        self, names: list[str], ctx: MessageContext, sock: socket.socket, keep: bool
    ) -> None:
        pipeline = self.app.pipeline
        for index, name in enumerate(names):
            run = await pipeline.run_hook(self.impls[name], "data", ctx)
            stop = pipeline.take_data_run(ctx, name, run)
            last = stop or index == len(names) - 1
            _send(sock, Reply(run, ctx.raw_version, last))
            if last:
                break
        if not keep:
            self.held = None  # a large message is not kept in memory while idle

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.app.shutdown())
        finally:
            self.loop.close()


if __name__ == "__main__":
    sys.exit(main())
