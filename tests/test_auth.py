"""SMTP AUTH (RFC 4954) against a users file of argon2 hashes, and `mailflow users`."""

from __future__ import annotations

import base64
import os

import aiosmtplib
import pytest
from click.testing import CliRunner

from mailflow.auth import UsersFileAuthenticator, UsersFileError, parse_users
from mailflow.cli import main
from mailflow.config import ConfigError
from mailflow.smtp import MailflowSMTP
from mailflow.testing import SMTPDialog, make_message, running_server
from tests.smtp_support import TEST_PASSWORD_HASH, Recorder, client_context

HASH = TEST_PASSWORD_HASH


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"# SMTP users\n\nalice:{HASH}\n")
    return path


@pytest.fixture
def auth_config(make_config, tls_files, users_file):
    cert, key = tls_files
    return make_config(f"""
        server:
          listen: ["127.0.0.1:0"]
          hostname: mx.test
          tls: {{cert: {cert}, key: {key}}}
          auth: {{users_file: {users_file}, failure_delay: 0}}
        local_domains: [example.com]
        relay:
          default: upstream
          targets: {{upstream: {{host: 127.0.0.1, port: 9, tls: none}}}}
        """)


async def tls_session(port: int, cert) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, tls_context=client_context(cert)
    )
    await client.connect()
    await client.starttls()
    await client.ehlo()
    return client


async def tls_dialog(port: int, cert) -> SMTPDialog:
    """A raw dialog already past STARTTLS and EHLO."""
    dialog, _ = await SMTPDialog.open(port)
    await dialog.command("EHLO client.test")
    assert (await dialog.command("STARTTLS")).startswith("220")
    await dialog.writer.start_tls(client_context(cert))
    assert "AUTH LOGIN PLAIN" in await dialog.command("EHLO client.test")
    return dialog


def plain(user: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


# --- the users file --------------------------------------------------------------------------


def test_users_file_allows_comments_and_blank_lines(tmp_path):
    users = parse_users(f"# a comment\n\n  bob:{HASH}  \n", tmp_path / "u")
    assert users == {"bob": HASH}


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("# ok\nnocolon\n", 2, "expected 'user:<argon2 hash>'"),
        (":" + HASH + "\n", 1, "expected"),
        ("bob:plaintext\n", 1, "not an argon2 hash"),
        (f"bob:{HASH}\n\nbob:{HASH}\n", 3, "listed twice"),
        (f"b ob:{HASH}\n", 1, "whitespace"),
    ],
)
def test_malformed_users_file_names_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "users"
    path.write_text(text)
    with pytest.raises(UsersFileError) as info:
        UsersFileAuthenticator(path)
    assert f"{path}:{line}:" in str(info.value)
    assert words in str(info.value)


def test_missing_users_file_is_a_clear_error(tmp_path):
    with pytest.raises(UsersFileError, match="cannot read users file"):
        UsersFileAuthenticator(tmp_path / "nope")


async def test_server_refuses_to_start_with_a_malformed_users_file(make_config, tmp_path):
    bad = tmp_path / "users"
    bad.write_text("alice:not-a-hash\n")
    config = make_config(f"server: {{listen: ['127.0.0.1:0'], auth: {{users_file: {bad}}}}}")
    with pytest.raises(ConfigError, match=f"{bad}:1:"):
        async with running_server(config):
            pass


def test_verify_and_reload_on_change(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"alice:{HASH}\n")
    auth = UsersFileAuthenticator(path)
    assert auth.verify("alice", b"s3cret")
    assert not auth.verify("alice", b"wrong")
    assert not auth.verify("mallory", b"s3cret")
    path.write_text(f"carol:{HASH}\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert auth.verify("carol", b"s3cret")
    assert not auth.verify("alice", b"s3cret")
    # A broken edit keeps the previous users rather than locking everyone out.
    path.write_text("carol:garbage\n")
    os.utime(path, ns=(2, 2))
    assert auth.verify("carol", b"s3cret")


# --- AUTH over SMTP --------------------------------------------------------------------------


async def test_auth_is_offered_only_after_starttls(auth_config):
    async with running_server(auth_config) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        assert "AUTH" not in await dialog.command("EHLO client.test")
        reply = await dialog.command("AUTH PLAIN " + plain("alice", "s3cret"))
        assert reply.startswith("538 5.7.11"), reply
        await dialog.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_authenticated_user_may_relay(auth_config, tls_files, mechanism):
    rec = Recorder()
    async with running_server(auth_config, extra_plugins={"rec": rec}) as srv:
        client = await tls_session(srv.port, tls_files[0])
        if mechanism == "PLAIN":
            await client.auth_plain("alice", "s3cret")
        else:
            await client.auth_login("alice", "s3cret")
        errors, reply = await client.sendmail(
            "alice@example.com", ["someone@elsewhere.test"], make_message()
        )
        assert errors == {}
        assert reply.startswith("2.0.0 Ok: queued as")
        await client.quit()
    assert [s.user for s in rec.stages["rcpt"]] == ["alice"]
    assert [s.user for s in rec.stages["data"]] == ["alice"]
    # RFC 3848: ESMTPSA = STARTTLS + AUTH.
    assert b"with ESMTPSA id" in rec.messages[0].replace(b"\r\n\t", b" ")


async def test_unauthenticated_client_may_not_relay(auth_config, tls_files):
    async with running_server(auth_config) as srv:
        client = await tls_session(srv.port, tls_files[0])
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as info:
            await client.sendmail("a@example.org", ["someone@elsewhere.test"], make_message())
        assert info.value.recipients[0].code == 554
        await client.quit()


async def test_plain_with_initial_response_and_challenge(auth_config, tls_files):
    async with running_server(auth_config) as srv:
        dialog = await tls_dialog(srv.port, tls_files[0])
        assert (await dialog.command("AUTH PLAIN")).startswith("334")
        assert (await dialog.command(plain("alice", "s3cret"))).startswith("235 2.7.0")
        assert (await dialog.command("AUTH PLAIN x")).startswith("503")  # already done
        await dialog.close()


@pytest.mark.parametrize(
    "line",
    [
        "AUTH PLAIN " + plain("alice", "wrong"),
        "AUTH PLAIN " + plain("mallory", "s3cret"),
        # An authorization identity other than the user (RFC 4616 2) is not granted.
        "AUTH PLAIN " + plain("alice", "s3cret", authzid="root"),
    ],
)
async def test_bad_credentials_get_535(auth_config, tls_files, line):
    async with running_server(auth_config) as srv:
        dialog = await tls_dialog(srv.port, tls_files[0])
        assert (await dialog.command(line)).startswith("535 5.7.8")
        # Still unauthenticated: relaying is refused.
        await dialog.command("MAIL FROM:<a@example.org>")
        assert (await dialog.command("RCPT TO:<x@elsewhere.test>")).startswith("554 5.7.1")
        await dialog.close()


async def test_malformed_auth_input_gets_501(auth_config, tls_files):
    async with running_server(auth_config) as srv:
        dialog = await tls_dialog(srv.port, tls_files[0])
        assert (await dialog.command("AUTH PLAIN !!!notbase64")).startswith("501")
        no_nuls = base64.b64encode(b"alice-s3cret").decode()
        assert (await dialog.command("AUTH PLAIN " + no_nuls)).startswith("501")
        assert (await dialog.command("AUTH LOGIN")).startswith("334")
        assert (await dialog.command("*")).startswith("501")  # client cancels (RFC 4954 4)
        assert (await dialog.command("AUTH CRAM-MD5")).startswith("504")
        assert (await dialog.command("NOOP")).startswith("250")
        await dialog.close()


async def test_repeated_failures_close_the_connection(auth_config, tls_files):
    async with running_server(auth_config) as srv:
        dialog = await tls_dialog(srv.port, tls_files[0])
        for _ in range(MailflowSMTP.MAX_AUTH_FAILURES - 1):
            assert (await dialog.command("AUTH PLAIN " + plain("alice", "x"))).startswith("535")
        reply = await dialog.command("AUTH PLAIN " + plain("alice", "x"))
        assert reply.startswith("421 4.7.0"), reply
        assert await dialog.reader.read() == b""
        await dialog.close()
        # A fresh connection can still log in.
        client = await tls_session(srv.port, tls_files[0])
        await client.auth_plain("alice", "s3cret")
        await client.quit()


async def test_user_added_while_running_can_log_in(auth_config, tls_files, users_file):
    async with running_server(auth_config) as srv:
        result = CliRunner().invoke(
            main, ["users", "add", "dave", "--file", str(users_file), "--password-stdin"],
            input="hunter2\n",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        client = await tls_session(srv.port, tls_files[0])
        await client.auth_login("dave", "hunter2")
        await client.quit()


# --- `mailflow users` ------------------------------------------------------------------------


def test_users_cli_add_list_update_remove(tmp_path):
    path = tmp_path / "users"
    path.write_text("# keep this comment\n")
    runner = CliRunner()

    def run(*args: str, stdin: str | None = None):
        return runner.invoke(main, ["users", *args, "--file", str(path)], input=stdin)

    assert run("add", "bob", "--password-stdin", stdin="pw1\n").exit_code == 0
    assert run("add", "amy", "--password-stdin", stdin="pw2\n").exit_code == 0
    assert run("list").output.split() == ["amy", "bob"]
    updated = run("add", "bob", "--password-stdin", stdin="pw3\n")
    assert "updated bob" in updated.output
    auth = UsersFileAuthenticator(path)
    assert auth.verify("bob", b"pw3") and not auth.verify("bob", b"pw1")
    assert run("remove", "amy").exit_code == 0
    assert run("list").output.split() == ["bob"]
    assert run("remove", "amy").exit_code == 1
    assert path.read_text().startswith("# keep this comment\n")
    assert (path.stat().st_mode & 0o777) == 0o600


def test_users_cli_prompts_for_the_password(tmp_path):
    path = tmp_path / "users"
    result = CliRunner().invoke(
        main, ["users", "add", "eve", "--file", str(path)], input="pw\npw\n"
    )
    assert result.exit_code == 0, result.output
    assert UsersFileAuthenticator(path).verify("eve", b"pw")


@pytest.mark.parametrize("user", ["a:b", "with space"])
def test_users_cli_rejects_bad_names(tmp_path, user):
    result = CliRunner().invoke(
        main, ["users", "add", user, "--file", str(tmp_path / "u"), "--password-stdin"], input="x\n"
    )
    assert result.exit_code == 2
    assert "USER" in result.output


def test_users_cli_uses_the_config_file(tmp_path):
    users = tmp_path / "users"
    config = tmp_path / "mailflow.yaml"
    config.write_text(f"server:\n  auth:\n    users_file: {users}\n")
    result = CliRunner().invoke(
        main, ["users", "add", "zed", "-c", str(config), "--password-stdin"], input="pw\n"
    )
    assert result.exit_code == 0, result.output
    assert users.read_text().startswith("zed:$argon2")
    no_auth = tmp_path / "plain.yaml"
    no_auth.write_text("server: {hostname: x}\n")
    result = CliRunner().invoke(main, ["users", "list", "-c", str(no_auth)])
    assert result.exit_code == 2 and "--file" in result.output


async def test_mechanisms_setting_limits_what_is_offered(make_config, tls_files, users_file):
    cert, key = tls_files
    config = make_config(f"""
        server:
          listen: ["127.0.0.1:0"]
          tls: {{cert: {cert}, key: {key}}}
          auth: {{users_file: {users_file}, mechanisms: [PLAIN], failure_delay: 0}}
        """)
    async with running_server(config) as srv:
        dialog, _ = await SMTPDialog.open(srv.port)
        await dialog.command("EHLO client.test")
        await dialog.command("STARTTLS")
        await dialog.writer.start_tls(client_context(cert))
        ehlo = await dialog.command("EHLO client.test")
        assert "AUTH PLAIN" in ehlo and "LOGIN" not in ehlo
        assert (await dialog.command("AUTH LOGIN")).startswith("504")
        assert (await dialog.command("AUTH PLAIN " + plain("alice", "s3cret"))).startswith("235")
        await dialog.close()


async def test_custom_authenticator_without_auth_data_still_names_the_user(make_config, tls_files):
    from aiosmtpd.smtp import AuthResult

    def allow_all(server, session, envelope, mechanism, data):
        return AuthResult(success=True)

    rec = Recorder()
    cert, key = tls_files
    config = make_config(f"""
        server: {{listen: ["127.0.0.1:0"], tls: {{cert: {cert}, key: {key}}}}}
        local_domains: [example.com]
        relay: {{default: up, targets: {{up: {{host: 127.0.0.1, port: 9, tls: none}}}}}}
        """)
    async with running_server(config, authenticator=allow_all, extra_plugins={"rec": rec}) as srv:
        client = await tls_session(srv.port, cert)
        await client.auth_plain("anyone", "x")
        errors, _ = await client.sendmail("a@example.com", ["r@elsewhere.test"], make_message())
        assert errors == {}
        await client.quit()
    assert [s.user for s in rec.stages["rcpt"]] == ["anyone"]
