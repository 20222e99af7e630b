"""Reload without restart (mailflow.reload): a real `mailflow serve` process, SIGHUP
and `mailflow reload`, real SMTP clients and a real STARTTLS handshake."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import sys
from email import message_from_bytes
from pathlib import Path

import aiosmtplib

from mailflow.reload import RESTART_KEYS
from mailflow.testing import make_message
from tests.serve_support import ServeProcess
from tests.smtp_support import self_signed_cert

RULES = """\
rules:
  - name: tag
    when: {{subject: {{contains: hello}}}}
    then: {{add_headers: {{X-Rule: {tag}}}}}
"""


def write_config(root: Path, extra: str = "", rules: str = "one", tls: bool = False) -> Path:
    (root / "rules.yaml").write_text(RULES.format(tag=rules))
    tls_block = ""
    if tls:
        tls_block = f"  tls: {{cert: {root / 'cert.pem'}, key: {root / 'key.pem'}}}\n"
    path = root / "mailflow.yaml"
    path.write_text(
        "server:\n"
        "  listen: ['127.0.0.1:0']\n"
        "  hostname: mx.test\n"
        f"{tls_block}"
        f"delivery: {{maildir: {{root: {root / 'mail'}}}}}\n"
        f"queue: {{directory: {root / 'spool'}}}\n"
        f"quarantine: {{directory: {root / 'quarantine'}}}\n"
        "isolation: {processes: 1}\n"
        "plugins:\n"
        "  - name: rules\n"
        f"    settings: {{files: [{root / 'rules.yaml'}]}}\n"
        f"{extra}"
    )
    return path


def delivered(root: Path) -> dict[str, str]:
    """Subject -> X-Rule header of every message in bob's Maildir."""
    out = {}
    for path in (root / "mail" / "bob@example.com" / "new").glob("*"):
        msg = message_from_bytes(path.read_bytes())
        out[str(msg["Subject"])] = str(msg["X-Rule"])
    return out


async def serve(root: Path, *args: str) -> ServeProcess:
    return await ServeProcess.start("--config", str(root / "mailflow.yaml"), *args, cwd=root)


async def test_sighup_reloads_a_rule_file_under_load_without_a_failed_message(tmp_path):
    write_config(tmp_path)
    server = await serve(tmp_path)
    sent: list[str] = []  # subjects, in the order their 250 came
    failures: list[BaseException] = []
    stop = asyncio.Event()
    limit = 400  # bounded, whatever happens

    async def client(name: str) -> None:
        n = 0
        while not stop.is_set() and len(sent) < limit:
            subject = f"hello {name}{n}"
            n += 1
            try:
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=server.port, timeout=30
                ) as smtp:
                    refused, _ = await smtp.sendmail(
                        "a@example.org", ["bob@example.com"], make_message(subject)
                    )
                assert refused == {}
            except Exception as exc:
                failures.append(exc)
                return
            sent.append(subject)

    async def until(count: int) -> None:
        while len(sent) < count and not failures:
            await asyncio.sleep(0.01)

    try:
        # One connection open across the reload: it started on the old rules, it ends on them.
        held = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, timeout=30)
        await held.connect()
        await held.sendmail("a@example.org", ["bob@example.com"], make_message("hello held0"))
        clients = [asyncio.create_task(client(name)) for name in "ab"]
        await until(6)
        (tmp_path / "rules.yaml").write_text(RULES.format(tag="two"))
        text = await server.reload()
        after_reload = len(sent)
        await until(after_reload + 6)
        await held.sendmail("a@example.org", ["bob@example.com"], make_message("hello held1"))
        await held.quit()
        stop.set()
        await asyncio.gather(*clients)
        # Its last connection ended: the old generation's plugins and workers stop.
        await server.wait_for(r"configuration 1 closed \(its last connection ended\)")
    finally:
        assert await server.stop() == 0
    assert failures == []
    assert "reloaded " in text and "configuration 2 serves new connections" in text
    assert f"changed files: {tmp_path / 'rules.yaml'}" in text
    assert "no key" not in text
    tags = delivered(tmp_path)
    assert len(tags) == len(sent) + 2  # every 250 is a delivered message
    assert tags["hello held0"] == tags["hello held1"] == "one"  # its generation's rules
    assert {tags[s] for s in sent[:6]} == {"one"}
    assert {tags[s] for s in sent[after_reload + 2 :]} == {"two"}  # +2: in flight at the swap


def starttls_peer_cert(port: int, held: socket.socket | None = None) -> bytes:
    """STARTTLS on a new connection (or on ``held``, already greeted); the server's
    certificate (DER)."""
    sock = held or socket.create_connection(("127.0.0.1", port), timeout=30)
    with sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            while True:
                line = reader.readline()
                if line[3:4] != b"-":
                    return line

        if held is None:
            assert reply().startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        assert b"STARTTLS" in b"".join(iter_ehlo(reader))
        sock.sendall(b"STARTTLS\r\n")
        assert reply().startswith(b"220")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(sock, server_hostname="mx.test") as tls:
            der = tls.getpeercert(binary_form=True)
            tls.sendall(b"QUIT\r\n")
    assert der is not None
    return der


def iter_ehlo(reader) -> list[bytes]:
    lines = []
    while True:
        line = reader.readline()
        lines.append(line)
        if line[3:4] != b"-":
            return lines


def der_of(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


async def test_a_new_certificate_is_served_after_sighup(tmp_path):
    old_cert, _ = self_signed_cert(tmp_path, "old.test")
    write_config(tmp_path, tls=True)
    old_der = der_of(old_cert)
    server = await serve(tmp_path)
    try:
        assert await asyncio.to_thread(starttls_peer_cert, server.port) == old_der
        held = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        assert held.recv(1024).startswith(b"220")  # greeted before the reload
        new_dir = tmp_path / "new"
        new_dir.mkdir()
        new_cert, new_key = self_signed_cert(new_dir, "new.test")
        shutil.copy(new_key, tmp_path / "key.pem")
        shutil.copy(new_cert, tmp_path / "cert.pem")
        text = await server.reload()
        assert "reloaded " in text
        assert str(tmp_path / "cert.pem") in text and str(tmp_path / "key.pem") in text
        new_der = await asyncio.to_thread(starttls_peer_cert, server.port)
        # The connection that was open keeps the certificate it started with.
        held_der = await asyncio.to_thread(starttls_peer_cert, server.port, held)
    finally:
        assert await server.stop() == 0
    assert new_der == der_of(new_cert) != old_der
    assert held_der == old_der


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("config", "validate", str(config), cwd=config.parent)


async def test_a_bad_config_is_refused_with_its_errors_and_the_old_one_keeps_running(tmp_path):
    config = write_config(tmp_path)
    server = await serve(tmp_path)
    good = config.read_text()
    try:
        config.write_text(
            good.replace("  hostname: mx.test\n", "  hostname: mx.test\n  max_recipients: lots\n")
        )
        text = await server.reload()
        assert "reload refused; configuration 1" in text
        expected = f"{config}:4: server.max_recipients: expected a whole number (got 'lots')"
        assert expected in text
        assert expected in validate(config).stderr  # the same words as `config validate`
        # A broken rule file is refused too, naming its file and line.
        config.write_text(good)
        (tmp_path / "rules.yaml").write_text(RULES.format(tag="two").replace("when:", "wenn:"))
        text = await server.reload()
        assert "reload refused" in text and f"{tmp_path / 'rules.yaml'}:3" in text
        # Still the old rules (and the old process) for new connections.
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, timeout=30) as smtp:
            await smtp.sendmail("a@example.org", ["bob@example.com"], make_message("hello 1"))
    finally:
        assert await server.stop() == 0
    assert delivered(tmp_path) == {"hello 1": "one"}


async def test_a_restart_only_change_is_reported_and_the_rest_applied(tmp_path):
    config = write_config(tmp_path)
    server = await serve(tmp_path)
    try:
        text = (
            config.read_text()
            .replace("queue: {", "queue: {workers: 3, ")
            .replace("  hostname: mx.test\n", "  hostname: mx.test\n  max_recipients: 1\n")
        )
        config.write_text(text)
        start = len(server.lines)
        log = await server.reload()
        assert "changed keys: server.max_recipients" in log
        assert "queue.workers" not in log.partition("changed keys:")[2].splitlines()[0]
        await server.wait_for(r"queue\.workers changed but only take effect at a restart", start)
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, timeout=30) as smtp:
            refused, _ = await smtp.sendmail(
                "a@example.org", ["bob@example.com", "carol@example.com"], make_message("x")
            )
    finally:
        assert await server.stop() == 0
    assert list(refused) == ["carol@example.com"]  # max_recipients: 1 applies now


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from mailflow.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


async def test_mailflow_reload_signals_the_server_of_that_config(tmp_path):
    config = write_config(tmp_path)
    result = await asyncio.to_thread(run_cli, "reload", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1 and "is `mailflow serve` running" in result.stderr
    server = await serve(tmp_path)
    try:
        start = len(server.lines)
        result = await asyncio.to_thread(run_cli, "reload", "-c", str(config), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"(pid {server.proc.pid})" in result.stdout
        await server.wait_for(r"reloaded .*no key or file changed", start)
        # A bad config is reported by the command and not sent.
        config.write_text(config.read_text() + "bogus: 1\n")
        start = len(server.lines)
        result = await asyncio.to_thread(run_cli, "reload", "-c", str(config), cwd=tmp_path)
        assert result.returncode == 2 and "bogus: unknown key" in result.stderr
    finally:
        assert await server.stop() == 0
    assert "reload requested" not in "".join(server.lines[start:])
    assert not (tmp_path / "spool" / "mailflow.pid").exists()


def test_docs_name_every_key_that_needs_a_restart():
    docs = (Path(__file__).parent.parent / "docs" / "reload.md").read_text()
    for key in RESTART_KEYS:
        assert f"`{key}`" in docs


async def test_milter_connections_switch_at_a_reload_and_open_ones_finish_on_theirs(
    tmp_path, caplog
):
    """In process, with the milter front end: a conversation open across the reload
    keeps the old rules; a new one gets the new rules."""
    import logging

    from mailflow.app import App
    from mailflow.reload import Reloader
    from mailflow.server import Server
    from mailflow.testing import config_for
    from tests.test_milter_session import MTA

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(tag="one"))
    text = f"""
        server: {{listen: []}}
        milter: {{listen: "127.0.0.1:0"}}
        isolation: {{processes: 0}}
        plugins: [{{name: rules, settings: {{files: [{rules}]}}}}]
        """
    server = Server(App(config_for(tmp_path, text)))
    await server.start()
    reloader = Reloader(server, lambda: config_for(tmp_path, text), "test.yaml")
    caplog.set_level(logging.INFO, "mailflow.reload")
    try:
        assert server.milter is not None
        held = await MTA.open(server.milter.port)
        await held.negotiate()
        await held.connect_and_mail()
        rules.write_text(RULES.format(tag="two"))
        assert await reloader.reload()
        fresh = await MTA.open(server.milter.port)
        await fresh.negotiate()
        await fresh.connect_and_mail()
        replies = {}
        for name, mta in (("held", held), ("fresh", fresh)):
            await mta.ask(b"R", b"<bob@example.com>\0")
            replies[name] = await mta.message([(b"Subject", b" hello")], b"x\r\n")
            await mta.close()
        async with asyncio.timeout(30):
            while reloader._retiring:
                await asyncio.sleep(0.05)
    finally:
        await server.stop()
        await reloader.close()
    # SMFIR_INSHEADER at index 0: the header the rule added.
    assert (b"i", b"\0\0\0\0X-Rule\0 one\0") in replies["held"]
    assert (b"i", b"\0\0\0\0X-Rule\0 two\0") in replies["fresh"]
    assert "configuration 1 closed (its last connection ended)" in caplog.text


async def test_a_reload_reads_a_new_users_file_and_refuses_a_broken_one(
    tmp_path, tls_files, caplog
):
    """In process: ``server.auth.users_file`` pointed elsewhere by a reload takes effect
    for new connections; a broken one is refused with its file and line."""
    from mailflow.app import App
    from mailflow.reload import Reloader
    from mailflow.server import Server
    from mailflow.testing import config_for
    from tests.smtp_support import TEST_PASSWORD_HASH

    cert, key = tls_files
    (tmp_path / "old").write_text(f"alice:{TEST_PASSWORD_HASH}\n")
    (tmp_path / "new").write_text(f"bob:{TEST_PASSWORD_HASH}\n")

    def text(users: str) -> str:
        return f"""
            server:
              tls: {{cert: {cert}, key: {key}}}
              auth: {{users_file: {tmp_path / users}}}
            isolation: {{processes: 0}}
            """

    current = {"users": "old"}
    server = Server(App(config_for(tmp_path, text("old"))))
    await server.start()
    reloader = Reloader(server, lambda: config_for(tmp_path, text(current["users"])), "t.yaml")
    try:
        first = server.authenticator
        assert await reloader.reload()
        assert server.authenticator is first  # same file: the running one re-reads it
        current["users"] = "new"
        assert await reloader.reload()
        assert server.authenticator is not first
        assert server.authenticator.users == ["bob"]  # type: ignore[attr-defined]
        (tmp_path / "broken").write_text("carol\n")
        current["users"] = "broken"
        assert not await reloader.reload()
        assert f"{tmp_path / 'broken'}:1: server.auth.users_file: expected" in caplog.text
        assert server.authenticator.users == ["bob"]  # type: ignore[attr-defined]
    finally:
        await server.stop()
        await reloader.close()


async def test_connections_open_across_a_reload_still_count_against_max_connections(tmp_path):
    """In process: connections of the old configuration count toward
    ``server.max_connections`` and the connections gauge after a reload."""
    from mailflow.app import App
    from mailflow.reload import Reloader
    from mailflow.server import Server
    from mailflow.testing import config_for

    text = "server: {max_connections: 2}\nisolation: {processes: 0}\n"
    server = Server(App(config_for(tmp_path, text)))
    [(host, port)] = await server.start()
    reloader = Reloader(server, lambda: config_for(tmp_path, text), "test.yaml")

    async def connect() -> tuple[asyncio.StreamWriter, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        return writer, await asyncio.wait_for(reader.readline(), 10)

    held = []
    try:
        for _ in range(2):
            writer, greeting = await connect()
            assert greeting.startswith(b"220")
            held.append(writer)
        assert await reloader.reload()
        server._refresh_gauges()
        gauge = server.app.metrics.connections._value.get()
        writer, greeting = await connect()
        held.append(writer)
    finally:
        for writer in held:
            writer.close()
        await server.stop()
        await reloader.close()
    assert greeting.startswith(b"421"), greeting
    assert gauge == 2


async def test_a_reload_sends_relayed_mail_to_a_changed_relay_target(tmp_path, caplog):
    """In process: relay targets apply at a reload (the dispatcher is reconfigured);
    the relay pool's own settings are the ones that need a restart."""
    import logging

    from mailflow.app import App
    from mailflow.reload import Reloader
    from mailflow.server import Server
    from mailflow.testing import config_for, send, smtp_sink

    def text(port: int, pool_size: int) -> str:
        return (
            "isolation: {processes: 0}\n"
            "local_domains: [example.com]\n"
            "relay_networks: ['127.0.0.0/8']\n"
            f"relay: {{default: up, pool_size: {pool_size},"
            f" targets: {{up: {{host: 127.0.0.1, port: {port}, tls: none, timeout: 5}}}}}}\n"
        )

    caplog.set_level(logging.INFO, "mailflow.reload")
    async with smtp_sink() as old_sink, smtp_sink() as new_sink:
        current = text(old_sink.port, 8)
        server = Server(App(config_for(tmp_path, current)))
        [(_, port)] = await server.start()
        reloader = Reloader(server, lambda: config_for(tmp_path, current), "test.yaml")
        try:
            await send(port, "a@example.com", ["carol@remote.test"], make_message("one"))
            current = text(new_sink.port, 3)
            assert await reloader.reload()
            await send(port, "a@example.com", ["dave@remote.test"], make_message("two"))
            await new_sink.wait_messages(1)
        finally:
            await server.stop()
            await reloader.close()
    assert [m.rcpt_tos for m in old_sink.messages] == [["carol@remote.test"]]
    assert [m.rcpt_tos for m in new_sink.messages] == [["dave@remote.test"]]
    assert "relay.targets.up.port" in caplog.text  # a changed key, applied
    assert "relay.pool_size changed but only take effect at a restart" in caplog.text
