"""Prometheus metrics: per-message actions, per-plugin time, deliveries, queue size.

Each :class:`Metrics` owns its registry (no global state), so several app
instances (tests, embedding) never collide. ``serve`` exposes it over HTTP when
``metrics.listen`` is set; the endpoint is a few lines of asyncio, not a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from mailflow.config import parse_listen
from mailflow.message import MessageContext

_SIZE_BUCKETS = (1e3, 5e3, 2e4, 1e5, 5e5, 2e6, 1e7, 5e7)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_MAX_REQUEST = 8192


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "mailflow_messages", "Messages by final action", ["action"], registry=r
        )
        self.message_size = Histogram(
            "mailflow_message_size_bytes",
            "Size of received messages",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.message_time = Histogram(
            "mailflow_message_seconds",
            "End-of-DATA to reply (pipeline + spool)",
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.spam_score = Histogram(
            "mailflow_spam_score",
            "Total spam score per message",
            buckets=(-5, 0, 2, 4, 6, 8, 10, 15, 20),
            registry=r,
        )
        self.plugin_time = Histogram(
            "mailflow_plugin_seconds",
            "Time spent in each plugin hook",
            ["plugin", "stage"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.plugin_errors = Counter(
            "mailflow_plugin_errors", "Plugin exceptions and timeouts", ["plugin"], registry=r
        )
        self.deliveries = Counter(
            "mailflow_deliveries", "Delivery attempts by outcome", ["outcome", "route"], registry=r
        )
        self.queue_size = Gauge(
            "mailflow_queue_messages", "Messages in the delivery queue", registry=r
        )
        self.connections = Gauge("mailflow_smtp_connections", "Open SMTP connections", registry=r)
        self.isolation_workers = Gauge(
            "mailflow_isolation_workers", "Content-analysis worker processes running", registry=r
        )
        self.isolation_restarts = Counter(
            "mailflow_isolation_restarts",
            "Content-analysis workers stopped and replaced, by why (timeout, died, cancelled)",
            ["reason"],
            registry=r,
        )
        self.smtp_timeouts = Counter(
            "mailflow_smtp_timeouts",
            "SMTP connections closed with 421 4.4.2, by the limit that ran out",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "mailflow_auth_failures", "Failed SMTP AUTH attempts (wrong credentials)", registry=r
        )
        self.auth_lockouts = Counter(
            "mailflow_auth_lockouts",
            "Client addresses or user names locked out after failed SMTP AUTH attempts",
            ["scope"],
            registry=r,
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def observe_message(self, ctx: MessageContext, elapsed_s: float) -> None:
        action = ctx.action.value if ctx.action.value != "continue" else "accept"
        self._child(self.messages, action).inc()
        self.message_size.observe(ctx.size)
        self.message_time.observe(elapsed_s)
        self.spam_score.observe(ctx.score)
        for run in ctx.runs:
            self._child(self.plugin_time, run.plugin, run.stage).observe(run.elapsed_ms / 1000)
            if run.error:
                self._child(self.plugin_errors, run.plugin).inc()

    def observe_worker_restart(self, reason: str) -> None:
        self._child(self.isolation_restarts, reason).inc()

    def observe_delivery(self, outcome: str, route: str) -> None:
        self._child(self.deliveries, outcome, route).inc()

    def observe_timeout(self, reason: str) -> None:
        self._child(self.smtp_timeouts, reason).inc()

    def observe_auth_failure(self) -> None:
        self.auth_failures.inc()

    def observe_auth_lockout(self, scope: str) -> None:
        self._child(self.auth_lockouts, scope).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered (prometheus_client re-validates each call)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def start_metrics_server(
    listen: str, metrics: Metrics, refresh: Callable[[], None] | None = None
) -> asyncio.Server:
    """Serve ``GET /metrics`` (Prometheus text format) on ``listen`` (HOST:PORT)."""
    host, port = parse_listen(listen)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        line = request[:_MAX_REQUEST].split(b"\r\n", 1)[0].split()
        if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
            if refresh is not None:
                refresh()
            body = metrics.exposition()
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
        else:
            body = b"not found: try /metrics\n"
            head = (
                f"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
        writer.write(head.encode() + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST)
