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
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailflow.app import App
from mailflow.check import check_message
from mailflow.config import ConfigError
from mailflow.isolation import IsolationError
from mailflow.testing import SMTPDialog, make_message, running_server, send
from tests.isolation_plugins import (
    Crasher,
    First,
    InPlace,
    Marker,
    Middle,
    Runaway,
    Sleeper,
    Spinner,
    Unpicklable,
)

POLICY = Path(__file__).resolve().parent.parent / "rules" / "content-policy.yaml"
FACTORIES: dict[str, Any] = {
    "marker": Marker,
    "first": First,
    "middle": Middle,
    "runaway": Runaway,
    "spinner": Spinner,
    "crasher": Crasher,
    "sleeper": Sleeper,
    "unpicklable": Unpicklable,
    "in_place": InPlace,
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
    corpus = sorted((messages_dir / "corpus").glob("*/*"))[::40]
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
            assert _without_pid(_without_trace(a.raw)) == _without_pid(_without_trace(b.raw))
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
            assert b.isolation_token and not a.isolation_token
            assert (a.score, a.action, _without_trace(a.raw)) == (
                b.score,
                b.action,
                _without_trace(b.raw),
            )
            for name in ("bayes", "rules"):
                ran_a, ran_b = a.plugin_report()[name], b.plugin_report()[name]
                for key in ("probability", "tokens", "matched"):
                    assert ran_a.get(key) == ran_b.get(key)
    finally:
        await isolated.pipeline.stop_isolation()
        await inline.shutdown()
        await isolated.shutdown()


# The Received field `check` adds, as `serve` does: it carries the message's queue id.
_TRACE = re.compile(rb"Received: from [^\r]* \(mailflow\) [^\r]*\r\n(?:[ \t][^\r]*\r\n)*")


def _without_trace(raw: bytes) -> bytes:
    return _TRACE.sub(b"", raw, count=1)


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


# --- what the review of the pool found ----------------------------------------------------


async def test_waiting_for_a_busy_worker_is_not_the_plugins_time(make_config):
    """One worker, a hook of 1 s with a 1.5 s timeout, two messages at once: the second
    waits ~1 s for the worker, then runs its full second; nobody is killed."""
    config = make_config(plugins_yaml("{name: sleeper, timeout: 1.5s, on_error: tempfail}"))
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        results = await asyncio.gather(
            *(
                send(srv.port, "a@example.org", ["bob@example.com"], make_message(f"m{i}"))
                for i in range(2)
            )
        )
        assert results == [{}, {}]
        assert restarts(srv, "timeout") == 0
        await srv.wait_delivered("bob@example.com", count=2)


async def test_no_free_worker_in_time_is_a_temporary_failure(make_config):
    config = make_config(
        "isolation: {processes: 1, queue_timeout: 0.3s}\n"
        "plugins:\n  - {name: sleeper, timeout: 5s}\n"
    )
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        first = asyncio.create_task(
            send(srv.port, "a@example.org", ["bob@example.com"], make_message("first"))
        )
        await asyncio.sleep(0.2)
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(srv.port, "a@example.org", ["bob@example.com"], make_message("second"))
        assert refused.value.code == 451  # not quarantined: the default on_error is not used
        assert "4.3.2" in refused.value.message
        assert await first == {}
        assert quarantined(srv) == [] and restarts(srv, "timeout") == 0


async def test_a_client_that_hangs_up_does_not_cost_a_worker(make_config):
    config = make_config(plugins_yaml("{name: sleeper, timeout: 5s}"))
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        pool = srv.app.pipeline.isolation
        assert pool is not None
        [pid] = [w.pid for w in pool._workers]
        dialog, _ = await SMTPDialog.open(srv.port)
        for line in (
            "EHLO client.example",
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<bob@example.com>",
        ):
            assert (await dialog.command(line)).startswith("250")
        assert (await dialog.command("DATA")).startswith("354")
        await dialog.write_raw(make_message("abandoned") + b".\r\n")
        await asyncio.sleep(0.3)  # the job is in the worker
        dialog.writer.transport.abort()
        await send(srv.port, "a@example.org", ["carol@example.com"], make_message("next"))
        await srv.wait_delivered("carol@example.com")
        assert srv.delivered("bob@example.com") == []  # the hang-up abandoned it
        assert [w.pid for w in pool._workers] == [pid]
        assert restarts(srv, "cancelled") == 0 and restarts(srv, "died") == 0


async def test_a_worker_killed_while_idle_is_replaced_before_the_next_message(make_config):
    config = make_config(plugins_yaml("{name: marker}"))
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        pool = srv.app.pipeline.isolation
        assert pool is not None
        [old] = [w.pid for w in pool._workers]
        os.kill(old, signal.SIGKILL)
        async with asyncio.timeout(30):
            while restarts(srv, "died") < 1 or pool.size < 1:
                await asyncio.sleep(0.05)
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
        [msg] = await srv.wait_delivered("bob@example.com")
        assert quarantined(srv) == []
    assert f"X-Worker-Pid: {old}".encode() not in msg


async def test_unpicklable_details_do_not_kill_the_worker(make_config):
    config = make_config(plugins_yaml("{name: unpicklable}"))
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        for subject in ("one", "two"):
            await send(srv.port, "a@example.org", ["bob@example.com"], make_message(subject))
        await srv.wait_delivered("bob@example.com", count=2)
        assert restarts(srv, "died") == 0 and quarantined(srv) == []


async def test_a_hook_that_changes_the_message_in_place_does_not_desynchronise(make_config):
    """The worker's copy changed, the server's did not: the next job is sent the bytes."""
    config = make_config(plugins_yaml("{name: in_place}", "{name: middle}", "{name: marker}"))
    async with running_server(config, plugin_factories=FACTORIES) as srv:
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
        [msg] = await srv.wait_delivered("bob@example.com")
        assert restarts(srv, "died") == 0
    assert b"X-In-Place" not in msg  # only returned mutations count
    assert b"X-Middle: 1" in msg and b"X-Worker-Pid: " in msg


async def test_a_stopped_pool_answers_shutdown_at_once(make_config):
    app = App(make_config(plugins_yaml("{name: marker}")), available_plugins=FACTORIES)
    await app.startup()
    await app.pipeline.start_isolation()
    pool = app.pipeline.isolation
    assert pool is not None
    await app.pipeline.stop_isolation()
    ctx = await check_message(App(make_config()), make_message())
    stopped, index, failure = await pool.run([("marker", 0)], ctx, lambda *a: False)
    assert (stopped, index) == (False, 0)
    assert failure is not None and failure.kind == "shutdown" and not failure.plugins_fault
    await app.shutdown()


def test_a_runaway_worker_dies_with_a_killed_server(tmp_path):
    """PR_SET_PDEATHSIG: after kill -9 of the server, a hook that never yields does not
    go on burning a CPU."""
    script = tmp_path / "server.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
            from mailflow.app import App
            from mailflow.check import check_message
            from mailflow.testing import config_for, make_message
            from pathlib import Path
            from tests.isolation_plugins import Spinner

            async def main():
                config = config_for(Path({str(tmp_path)!r}),
                    "isolation: {{processes: 1}}\\nplugins: [{{name: spinner, timeout: 0}}]\\n")
                app = App(config, available_plugins={{"spinner": Spinner}})
                await app.startup()
                await app.pipeline.start_isolation()
                [worker] = app.pipeline.isolation._workers
                print(worker.pid, flush=True)
                await check_message(app, make_message("evil"))

            asyncio.run(main())
            """
        )
    )
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        worker = int(server.stdout.readline())
        time.sleep(0.5)  # the job is spinning in the worker
        os.kill(worker, 0)
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived the server")


def _worker_children() -> set[int]:
    """Pids of this process' worker children (zombies included: not yet reaped)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and (b"mailflow.isolation.worker" in cmdline or " Z " in stat):
            found.add(int(entry.name))
    return found


def _still_there(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
async def test_a_worker_cancelled_while_starting_is_killed_and_reaped(make_config):
    """The pool stops while a replacement is starting: that process must not outlive it
    (it used to be killed but never reaped: a zombie, and a ResourceWarning later)."""
    app = App(make_config(plugins_yaml("{name: marker}")), available_plugins=FACTORIES)
    await app.pipeline.start_isolation()
    pool = app.pipeline.isolation
    assert pool is not None
    try:
        before = _worker_children()
        task = asyncio.get_running_loop().create_task(pool._spawn())
        new: set[int] = set()
        for _ in range(200):  # until the process exists (it then loads its plugins)
            await asyncio.sleep(0.01)
            new = _worker_children() - before
            if new:
                break
        assert new, "the worker process never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not _still_there(new)
    finally:
        await app.pipeline.stop_isolation()
