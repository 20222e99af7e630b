"""Data hooks in content-analysis worker processes (mailflow.isolation).

Real servers on loopback, real worker processes: a plugin over its timeout is
stopped for real (regex or pure Python that never yields), a dead worker is
replaced, and what a plugin computes does not depend on where it runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailflow.app import App
from mailflow.check import check_message
from mailflow.config import ConfigError
from mailflow.isolation import IsolationError
from mailflow.testing import make_message, running_server, send
from tests.isolation_plugins import Crasher, First, Marker, Middle, Runaway, Spinner

POLICY = Path(__file__).resolve().parent.parent / "rules" / "content-policy.yaml"
FACTORIES: dict[str, Any] = {
    "marker": Marker,
    "first": First,
    "middle": Middle,
    "runaway": Runaway,
    "spinner": Spinner,
    "crasher": Crasher,
}


def plugins_yaml(*entries: str, processes: int = 1) -> str:
    return f"isolation: {{processes: {processes}}}\nplugins:\n" + "".join(
        f"  - {e}\n" for e in entries
    )


def quarantined(srv: Any) -> list[dict[str, Any]]:
    directory = srv.app.config.quarantine.directory
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


def restarts(srv: Any, reason: str) -> float:
    value = srv.app.metrics.registry.get_sample_value(
        "mailflow_isolation_restarts_total", {"reason": reason}
    )
    return value or 0.0


async def test_an_isolated_data_hook_runs_in_a_worker_process(make_config):
    config = make_config(plugins_yaml("{name: marker}"))
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        assert srv.app.pipeline.isolation is not None
        assert srv.app.pipeline.isolation.size == 1
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
        [msg] = await srv.wait_delivered("bob@example.com")
    pid = int(msg.split(b"X-Worker-Pid: ", 1)[1].split(b"\r\n", 1)[0])
    assert pid != os.getpid()


async def test_isolate_false_in_the_config_keeps_the_hook_in_the_server(make_config):
    config = make_config(plugins_yaml("{name: marker, isolate: false}"))
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        assert srv.app.pipeline.isolation is None  # nothing asked for a worker
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
        [msg] = await srv.wait_delivered("bob@example.com")
    assert f"X-Worker-Pid: {os.getpid()}\r\n".encode() in msg


@pytest.mark.parametrize("plugin", ["runaway", "spinner"])
async def test_a_runaway_hook_is_stopped_at_its_timeout_and_the_worker_replaced(
    make_config, plugin
):
    config = make_config(plugins_yaml(f"{{name: {plugin}, timeout: 1s, on_error: tempfail}}"))
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        pool = srv.app.pipeline.isolation
        assert pool is not None
        first_pid = next(iter(pool._workers)).pid
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(srv.port, "a@example.org", ["bob@example.com"], make_message("evil"))
        assert refused.value.code == 451  # on_error: tempfail
        assert restarts(srv, "timeout") == 1
        # The stuck process is gone for good (SIGKILL), and a fresh one serves the next.
        async with asyncio.timeout(30):
            while pool.size < 1:
                await asyncio.sleep(0.05)
        assert next(iter(pool._workers)).pid != first_pid
        with pytest.raises(ProcessLookupError):
            os.kill(first_pid, 0)
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message("fine"))
        [msg] = await srv.wait_delivered("bob@example.com", timeout=30)
    assert b"Subject: fine" in msg


async def test_another_client_is_answered_while_a_hook_runs_away(make_config):
    """Two workers: one is stuck on the hostile message, the other serves everyone else."""
    config = make_config(
        plugins_yaml("{name: runaway, timeout: 5s, on_error: tempfail}", processes=2)
    )
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        order: list[str] = []

        async def hostile() -> None:
            with pytest.raises(aiosmtplib.SMTPDataError):
                await send(srv.port, "a@example.org", ["bob@example.com"], make_message("evil"))
            order.append("hostile")

        async def probe() -> None:
            await asyncio.sleep(0.3)  # the hostile message is in its worker by now
            for _ in range(3):
                await send(srv.port, "a@example.org", ["carol@example.com"], make_message("hi"))
            order.append("probe")

        await asyncio.gather(hostile(), probe())
        assert order == ["probe", "hostile"]
        assert len(srv.delivered("carol@example.com")) == 3


async def test_a_worker_that_dies_quarantines_the_message_by_default(make_config, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.message")
    config = make_config(plugins_yaml("{name: crasher}"))
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message("evil"))
        [meta] = quarantined(srv)
        assert meta["reason"].startswith("plugin crasher failed: worker process ")
        assert "exit status 3" in meta["reason"]
        assert restarts(srv, "died") == 1
        errors = srv.app.metrics.registry.get_sample_value(
            "mailflow_plugin_errors_total", {"plugin": "crasher"}
        )
        assert errors == 1
        [line] = [r.getMessage() for r in caplog.records if r.name == "mailflow.message"]
        assert " action=quarantine " in line and " errors=crasher " in line
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message("fine"))
        await srv.wait_delivered("bob@example.com", timeout=30)


async def test_consecutive_isolated_hooks_see_each_others_changes(make_config):
    """first (worker) -> middle (server) -> marker (worker): each sees what came before,
    whether the worker reuses the copy it holds or is sent the changed message."""
    config = make_config(plugins_yaml("{name: first}", "{name: middle}", "{name: marker}"))
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        app = srv.app
        ctx = await check_message(app, make_message(), recipients=["bob@example.com"])
    report = ctx.plugin_report()
    assert report["marker"]["saw_first"] == "1"
    assert report["marker"]["saw_middle"] == "1"
    assert report["marker"]["score_before"] == 0.5
    assert ctx.score == 2.0
    assert ctx.header("X-First") == "1" and ctx.header("X-Worker-Pid")


async def test_results_do_not_depend_on_where_a_hook_runs(make_config, messages_dir):
    """The same plugins on the same messages: in this process and in a worker."""
    yaml = plugins_yaml("{name: first}", "{name: middle}", "{name: marker}")
    corpus = sorted((messages_dir / "corpus").glob("*/*"))[:: 40]
    messages = [make_message(), *(p.read_bytes() for p in corpus if p.name != "README.md")]
    assert len(messages) > 5
    inline = App(make_config(yaml), available_plugins=FACTORIES)
    isolated = App(make_config(yaml), available_plugins=FACTORIES)
    await inline.startup()
    await isolated.startup()
    await isolated.pipeline.start_isolation()
    try:
        for raw in messages:
            a = await check_message(inline, raw, recipients=["bob@example.com"])
            b = await check_message(isolated, raw, recipients=["bob@example.com"])
            assert a.score == b.score
            assert _without_pid(a.raw) == _without_pid(b.raw)
            for name in ("first", "middle"):
                assert a.plugin_report()[name]["action"] == b.plugin_report()[name]["action"]
    finally:
        await isolated.pipeline.stop_isolation()


async def test_builtin_content_plugins_give_the_same_verdicts_in_a_worker(
    make_config, messages_dir
):
    """bayes and rules on corpus messages: `check` (this process) and a worker agree."""
    policy = POLICY
    yaml = (
        "isolation: {processes: 1}\nplugins:\n  - {name: bayes, isolate: true}\n"
        f"  - {{name: rules, isolate: true, settings: {{files: ['{policy}']}}}}\n"
    )
    paths = sorted((messages_dir / "corpus").glob("*/*"))[::10]
    messages = [p.read_bytes() for p in paths if p.name != "README.md"]
    inline, isolated = App(make_config(yaml)), App(make_config(yaml))
    await inline.startup()
    await isolated.startup()
    await isolated.pipeline.start_isolation()
    try:
        for raw in messages:
            a = await check_message(inline, raw, recipients=["bob@example.com"])
            b = await check_message(isolated, raw, recipients=["bob@example.com"])
            assert "isolation.token" in b.extra and "isolation.token" not in a.extra
            assert (a.score, a.action, a.raw) == (b.score, b.action, b.raw)
            for name in ("bayes", "rules"):
                ran_a, ran_b = a.plugin_report()[name], b.plugin_report()[name]
                for key in ("probability", "tokens", "matched"):
                    assert ran_a.get(key) == ran_b.get(key)
    finally:
        await isolated.pipeline.stop_isolation()
        await inline.shutdown()
        await isolated.shutdown()


def _without_pid(raw: bytes) -> bytes:
    return re.sub(rb"X-Worker-Pid: \d+\r\n", b"", raw, count=1)


async def test_a_message_of_megabytes_reaches_the_worker_intact(make_config):
    """Sent to the worker a slice at a time (SEND_CHUNK); the worker reads it whole."""
    body = "".join(f"line {i:07d} of a long message\r\n" for i in range(100_000))  # 3.4 MB
    config = make_config(plugins_yaml("{name: marker}"))
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        sent = make_message("big", body=body)
        await send(srv.port, "a@example.org", ["bob@example.com"], sent)
        [msg] = await srv.wait_delivered("bob@example.com", timeout=30)
    pid, _, rest = msg.partition(b"X-Worker-Pid: ")[2].partition(b"\r\n")
    assert int(pid) != os.getpid()
    assert rest.endswith(sent.split(b"\r\n\r\n", 1)[1]) and len(msg) > 3_000_000


async def test_isolate_large_keeps_small_messages_in_the_server(make_config):
    config = make_config(
        "isolation: {processes: 1, large_message: 2000}\n"
        "plugins:\n  - {name: marker, isolate: large}\n"
    )
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message("small"))
        big = make_message("big", body="a line of words\r\n" * 200)
        await send(srv.port, "a@example.org", ["bob@example.com"], big)
        small_msg, big_msg = await srv.wait_delivered("bob@example.com", count=2)
    assert f"X-Worker-Pid: {os.getpid()}\r\n".encode() in small_msg
    assert b"X-Worker-Pid: " in big_msg
    assert f"X-Worker-Pid: {os.getpid()}\r\n".encode() not in big_msg


async def test_processes_zero_runs_every_hook_in_the_server(make_config):
    config = make_config(plugins_yaml("{name: marker}", processes=0))
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        assert srv.app.pipeline.isolation is None
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
        [msg] = await srv.wait_delivered("bob@example.com")
    assert f"X-Worker-Pid: {os.getpid()}\r\n".encode() in msg


class _FailsInWorkers(Marker):
    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        super().__init__(settings)
        if os.environ.get("MAILFLOW_TEST_PARENT") != str(os.getpid()):
            raise RuntimeError("cannot start here")


async def test_a_worker_that_cannot_start_stops_start_up_with_the_reason(make_config, monkeypatch):
    monkeypatch.setenv("MAILFLOW_TEST_PARENT", str(os.getpid()))
    config = make_config(plugins_yaml("{name: picky}"))
    factories = {"picky": _FailsInWorkers}
    with pytest.raises((IsolationError, ConfigError)) as failed:
        async with running_server(config, plugin_factories=factories):
            pass
    assert "cannot start here" in str(failed.value)
