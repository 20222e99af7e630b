"""Logging: one structured log line per message (text or JSON lines, by config), and
the writer thread that puts every log line on stderr or in ``log.file``."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import logging.handlers
import queue
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mailflow.message import MessageContext

if TYPE_CHECKING:
    from mailflow.config import Config

log = logging.getLogger("mailflow.message")
_json_mode = False


def configure(json_lines: bool) -> None:
    global _json_mode
    _json_mode = json_lines


def message_record(ctx: MessageContext, reply: str, elapsed_ms: float) -> dict[str, Any]:
    action = ctx.action.value if ctx.action.value != "continue" else "accept"
    return {
        "queue_id": ctx.queue_id,
        "client": ctx.connection.ip,
        "helo": ctx.connection.helo,
        "user": ctx.connection.authenticated_user or None,
        "from": ctx.envelope.mail_from,
        "rcpts": ctx.envelope.rcpt_tos,
        "size": ctx.size,
        "action": action,
        "score": round(ctx.score, 3),
        "reply": reply,
        "reason": ctx.reason or None,
        "delivery": ctx.delivery.value if ctx.delivery is not None else "",
        "plugins": plugin_summary(ctx),
        "time_ms": round(elapsed_ms, 2),
    }


def plugin_summary(ctx: MessageContext) -> dict[str, dict[str, Any]]:
    """Per plugin: the latest action, score and error, and the total time over stages.

    The same fields as :meth:`MessageContext.plugin_report` gives, without copying
    every plugin's details (which the log line does not show).
    """
    out: dict[str, dict[str, Any]] = {}
    for run in ctx.runs:
        entry = out.get(run.plugin)
        ms = round(run.elapsed_ms, 3)
        if entry is None:
            entry = out[run.plugin] = {"time_ms": ms}
        else:
            entry["time_ms"] = round(entry["time_ms"] + ms, 3)
        entry.pop("error", None)  # an error belongs to its own stage
        if run.error:
            entry["error"] = run.error
        result = run.result
        entry["action"] = result.action.value if result is not None else "continue"
        if result is not None and result.score:
            entry["score"] = result.score
    return out


def log_message(ctx: MessageContext, reply: str, elapsed_ms: float) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    record = message_record(ctx, reply, elapsed_ms)
    if _json_mode:
        log.info(json.dumps(record, separators=(",", ":"), default=str))
        return
    plugins = " ".join(
        f"{name}={p.get('action')}/{p.get('time_ms')}ms" for name, p in record["plugins"].items()
    )
    # A plugin that failed is named on the line itself: its on_error decided the outcome.
    failed = ",".join(name for name, p in record["plugins"].items() if "error" in p)
    log.info(
        "%s client=%s from=<%s> rcpts=%s size=%d action=%s score=%.2f delivery=%s reply=%r%s%s",
        record["queue_id"],
        record["client"],
        record["from"],
        ",".join(f"<{r}>" for r in record["rcpts"]),
        record["size"],
        record["action"],
        record["score"],
        record["delivery"],
        reply,
        f" errors={failed}" if failed else "",
        f" plugins: {plugins}" if plugins else "",
    )


def record_after_reply(
    ctx: MessageContext,
    reply: str,
    elapsed_s: float,
    observe: Callable[[MessageContext, float], None],
) -> None:
    """Log the message's line and ``observe`` it (metrics) once its reply is on its way.

    Called just before the front end sends the reply; the work runs at the event
    loop's next turn, after the reply was written. A client sending one message
    after another then waits for neither the log line (~50 us) nor the metrics
    (~25 us) on every message.
    """

    def record() -> None:
        log_message(ctx, reply, elapsed_s * 1000)
        observe(ctx, elapsed_s)

    asyncio.get_running_loop().call_soon(record)


# --- the log writer ---------------------------------------------------------------------------


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
    """Log to ``log.file`` or stderr at ``log.level`` (DEBUG with ``verbose``), written
    by a thread of its own; the per-message line as ``log.format`` says."""
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
    configure(config.log.format == "json")
