"""The Prometheus endpoint reports real traffic."""

from __future__ import annotations

import asyncio

from mailflow.testing import make_message, running_server, send


async def _get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = (await reader.read()).decode()
    writer.close()
    head, _, body = data.partition("\r\n\r\n")
    return head.split("\r\n")[0], body


async def test_metrics_endpoint_counts_messages_and_deliveries(make_config):
    config = make_config('metrics: {listen: "127.0.0.1:0"}\n')
    async with running_server(config) as srv:
        await send(srv.port, "a@example.org", ["b@example.com"], make_message())
        await srv.wait_delivered("b@example.com")
        await srv.wait_queue_empty()
        assert srv.server.metrics_server is not None
        port = srv.server.metrics_server.sockets[0].getsockname()[1]
        status, body = await _get(port, "/metrics")
        assert status == "HTTP/1.1 200 OK"
        assert 'mailflow_deliveries_total{outcome="delivered",route="maildir"} 1.0' in body
        assert 'mailflow_messages_total{action="accept"} 1.0' in body
        assert "mailflow_queue_messages 0.0" in body
        status, _ = await _get(port, "/other")
        assert status.startswith("HTTP/1.1 404")
