"""One structured log line per message (text or JSON lines, by config)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from mailflow.message import MessageContext

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
