"""Relay to a smarthost: two real servers chained on loopback (mailflow -> aiosmtpd sink)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import Callable
from pathlib import Path

from aiosmtpd.smtp import AuthResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailflow.delivery.relay import RelayTransport, relay_pool
from mailflow.delivery.spool import QueueEntry, RecipientState, Spool
from mailflow.testing import SinkBehaviour, free_port, make_message, running_server, smtp_sink
from mailflow.verdict import Route, RouteKind
from tests.smtp_support import relay_config as shared_relay_config

SENDER = "alice@example.org"  # local: bounces land in its Maildir


def relay_config(
    make_config, port: int, target: str = "tls: none", extra: str = "", pool_idle: float = 5
):
    return shared_relay_config(make_config, port, target=target, extra=extra, pool_idle=pool_idle)


async def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def first_entry(spool: Spool) -> QueueEntry | None:
    entries = list(spool.entries())
    return entries[0] if entries else None


# --- plain relay -------------------------------------------------------------------------------


async def test_relayed_message_arrives_with_envelope_and_content_intact(make_config):
    async with smtp_sink() as sink, running_server(relay_config(make_config, sink.port)) as srv:
        body = "line one\r\n.leading dot survives\r\nlast line\r\n"
        msg = make_message(subject="relay me", body=body)
        refused = await srv_send(srv, ["bob@remote.test", "carol@remote.test"], msg)
        assert refused == {}
        [got] = await sink.wait_messages(1)
        await srv.wait_queue_empty()
    assert got.mail_from == SENDER
    assert got.rcpt_tos == ["bob@remote.test", "carol@remote.test"]
    assert got.tls is False
    # Our trace header is prepended; everything the client sent follows unchanged.
    assert got.data.startswith(b"Received: ")
    assert got.data.endswith(msg)


async def test_temporary_failure_is_retried_and_attempts_are_counted(make_config):
    behaviour = SinkBehaviour(data_replies=["451 4.3.0 busy, try later", None])
    async with smtp_sink(behaviour) as sink:
        config = relay_config(make_config, sink.port)
        async with running_server(config) as srv:
            await srv_send(srv, ["bob@remote.test"], make_message())
            [got] = await sink.wait_messages(1)
            await srv.wait_queue_empty()
    assert sink.handler.transactions == 2
    assert got.rcpt_tos == ["bob@remote.test"]


async def test_deferred_state_is_recorded_in_the_spool(make_config, tmp_path):
    behaviour = SinkBehaviour(data_replies=["451 4.3.0 busy, try later", None])
    async with smtp_sink(behaviour) as sink:
        config = relay_config(
            make_config,
            sink.port,
            extra=f"""
        queue:
          directory: {tmp_path / "spool"}
          scan_interval: 0.05
          retry_schedule: [2]
        """,
        )
        async with running_server(config) as srv:
            await srv_send(srv, ["bob@remote.test"], make_message())
            await wait_for(lambda: (e := first_entry(srv.app.spool)) and e.recipients[0].attempts)
            [r] = first_entry(srv.app.spool).recipients
            assert r.status == "pending"
            assert r.last_reply.startswith("451 4.3.0")
            assert sink.messages == []
            await sink.wait_messages(1)
            await srv.wait_queue_empty()


async def test_upstream_down_then_up_is_deferred_then_delivered(make_config):
    port = free_port()  # nothing listens here yet: connection refused
    async with running_server(relay_config(make_config, port)) as srv:
        await srv_send(srv, ["bob@remote.test"], make_message(subject="patience"))
        await wait_for(lambda: (e := first_entry(srv.app.spool)) and e.recipients[0].attempts)
        [r] = first_entry(srv.app.spool).recipients
        assert r.status == "pending"
        assert r.last_reply.startswith("451 4.4.1")
        async with smtp_sink(port=port) as sink:
            [got] = await sink.wait_messages(1)
            await srv.wait_queue_empty()
    assert b"Subject: patience" in got.data


async def test_connections_are_reused_across_messages(make_config):
    async with smtp_sink() as sink, running_server(relay_config(make_config, sink.port)) as srv:
        for i in range(4):
            await srv_send(srv, ["bob@remote.test"], make_message(subject=f"m{i}"))
            await sink.wait_messages(i + 1)
        await srv.wait_queue_empty()
    assert len(sink.messages) == 4
    assert sink.handler.connections == 1


async def test_idle_connections_are_closed_after_pool_idle(make_config):
    async with smtp_sink() as sink:
        config = relay_config(make_config, sink.port, pool_idle=0.2)
        async with running_server(config) as srv:
            await srv_send(srv, ["bob@remote.test"], make_message())
            await sink.wait_messages(1)
            await asyncio.sleep(0.6)  # longer than pool_idle: the session got QUIT
            await srv_send(srv, ["bob@remote.test"], make_message())
            await sink.wait_messages(2)
    assert sink.handler.connections == 2


async def test_a_pooled_session_closed_by_the_server_is_replaced(make_config):
    # aiosmtpd drops sessions idle for `timeout` seconds, while our pool keeps them 5 s.
    async with (
        smtp_sink(factory_kwargs={"timeout": 0.2}) as sink,
        running_server(relay_config(make_config, sink.port)) as srv,
    ):
        await srv_send(srv, ["bob@remote.test"], make_message())
        await sink.wait_messages(1)
        await asyncio.sleep(0.6)
        await srv_send(srv, ["bob@remote.test"], make_message())
        await sink.wait_messages(2)
        await srv.wait_queue_empty()
    assert sink.handler.connections == 2
    assert sink.handler.transactions == 2  # no failed attempt in between


async def test_route_to_target_none_fails_permanently(make_config):
    config = make_config()
    transport = RelayTransport(config, relay_pool(config))
    entry = QueueEntry("Q1", SENDER, [], created=0.0)
    rcpt = RecipientState("bob@remote.test", {"kind": "relay", "target": "none"})
    outcomes = await transport(entry, b"x", [rcpt], Route(RouteKind.RELAY, target="none"))
    assert outcomes["bob@remote.test"].code == 550
    assert "5.7.1 relaying not configured" in outcomes["bob@remote.test"].text
    await transport.pool.aclose()


async def test_unknown_relay_target_is_deferred_not_bounced(make_config):
    config = make_config()
    transport = RelayTransport(config, relay_pool(config))
    entry = QueueEntry("Q1", SENDER, [], created=0.0)
    rcpt = RecipientState("bob@remote.test", {"kind": "relay", "target": "gone"})
    outcomes = await transport(entry, b"x", [rcpt], Route(RouteKind.RELAY, target="gone"))
    assert outcomes["bob@remote.test"].temporary
    await transport.pool.aclose()


# --- TLS policies ------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        # Python >= 3.13 checks certificates strictly (VERIFY_X509_STRICT): RFC 5280
        # wants key identifiers.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def server_tls(tmp_path: Path, ca_cn: str = "Test CA") -> tuple[ssl.SSLContext, Path]:
    """A server context with a cert for 127.0.0.1/localhost, and the CA file that signs it."""
    ca_cert, ca_key = make_ca(ca_cn)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    safe = ca_cn.replace(" ", "_")
    cert_file = tmp_path / f"{safe}-server.pem"
    key_file = tmp_path / f"{safe}-server.key"
    ca_file = tmp_path / f"{safe}-ca.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx, ca_file


async def test_opportunistic_tls_is_used_when_offered(make_config, tmp_path):
    ctx, _ = server_tls(tmp_path)
    async with smtp_sink(factory_kwargs={"tls_context": ctx}) as sink:
        config = relay_config(make_config, sink.port, target="tls: opportunistic")
        async with running_server(config) as srv:
            await srv_send(srv, ["bob@remote.test"], make_message())
            [got] = await sink.wait_messages(1)
            await srv.wait_queue_empty()
    assert got.tls is True


async def test_opportunistic_tls_falls_back_to_clear_text_when_not_offered(make_config):
    async with smtp_sink() as sink:
        config = relay_config(make_config, sink.port, target="tls: opportunistic")
        async with running_server(config) as srv:
            await srv_send(srv, ["bob@remote.test"], make_message())
            [got] = await sink.wait_messages(1)
    assert got.tls is False


async def test_required_tls_without_starttls_defers_and_sends_nothing(make_config):
    async with smtp_sink() as sink:
        config = relay_config(make_config, sink.port, target="tls: required")
        async with running_server(config) as srv:
            await srv_send(srv, ["bob@remote.test"], make_message())
            await wait_for(lambda: (e := first_entry(srv.app.spool)) and e.recipients[0].attempts)
            [r] = first_entry(srv.app.spool).recipients
    assert r.status == "pending"
    assert "4.7.5" in r.last_reply and "STARTTLS" in r.last_reply
    assert sink.messages == [] and sink.handler.transactions == 0


async def test_verify_rejects_a_certificate_from_an_unknown_ca(make_config, tmp_path):
    ctx, _ = server_tls(tmp_path, "Server CA")
    _, other_ca = server_tls(tmp_path, "Other CA")
    async with smtp_sink(factory_kwargs={"tls_context": ctx}) as sink:
        config = relay_config(make_config, sink.port, target=f"tls: verify, ca_file: {other_ca}")
        async with running_server(config) as srv:
            await srv_send(srv, ["bob@remote.test"], make_message())
            await wait_for(lambda: (e := first_entry(srv.app.spool)) and e.recipients[0].attempts)
            [r] = first_entry(srv.app.spool).recipients
    assert r.status == "pending"
    assert "4.7.5" in r.last_reply and "certificate" in r.last_reply.lower()
    assert sink.messages == []


async def test_verify_accepts_a_certificate_from_the_configured_ca(make_config, tmp_path):
    ctx, ca_file = server_tls(tmp_path)
    async with smtp_sink(factory_kwargs={"tls_context": ctx}) as sink:
        config = relay_config(make_config, sink.port, target=f"tls: verify, ca_file: {ca_file}")
        async with running_server(config) as srv:
            await srv_send(srv, ["bob@remote.test"], make_message())
            [got] = await sink.wait_messages(1)
    assert got.tls is True


def _authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = auth_data.login == b"relayuser" and auth_data.password == b"s3cret"
    return AuthResult(success=ok, auth_data=auth_data)


async def test_auth_is_sent_over_tls_and_the_sink_sees_the_user(make_config, tmp_path):
    ctx, _ = server_tls(tmp_path)
    kwargs = {"tls_context": ctx, "authenticator": _authenticator, "auth_require_tls": True}
    async with smtp_sink(factory_kwargs=kwargs) as sink:
        target = "tls: required, username: relayuser, password: s3cret"
        async with running_server(relay_config(make_config, sink.port, target=target)) as srv:
            await srv_send(srv, ["bob@remote.test"], make_message())
            [got] = await sink.wait_messages(1)
    assert got.tls is True
    assert got.auth_user == "relayuser"


async def test_credentials_are_never_sent_in_clear_text(make_config):
    async with smtp_sink() as sink:
        target = "tls: none, username: relayuser, password: s3cret"
        async with running_server(relay_config(make_config, sink.port, target=target)) as srv:
            await srv_send(srv, ["bob@remote.test"], make_message())
            await wait_for(lambda: (e := first_entry(srv.app.spool)) and e.recipients[0].attempts)
            [r] = first_entry(srv.app.spool).recipients
    assert "4.7.0" in r.last_reply
    assert sink.messages == []


async def srv_send(srv, rcpts: list[str], message: bytes) -> dict[str, tuple[int, str]]:
    from mailflow.testing import send

    return await send(srv.port, SENDER, rcpts, message)


# --- direct MX delivery, against a real DNS server on loopback ---------------------------------


@contextlib.asynccontextmanager
async def mx_setup(make_config, zone: dict, servfail: tuple[str, ...] = ()):
    """A loopback DNS server with ``zone``, a sink as every MX, and mailflow with
    relay.default: mx pointed at both."""
    from mailflow.testing_dns import dns_server

    async with dns_server(zone) as dns, smtp_sink() as sink:
        dns.servfail_names.update(servfail)
        config = make_config(
            f"""
            local_domains: [example.org]
            relay_networks: ["127.0.0.0/8"]
            relay: {{default: mx, mx_port: {sink.port}, mx_tls: none, mx_timeout: 5}}
            {dns.config_yaml(timeout=1.0)}
            """
        )
        async with running_server(config) as srv:
            yield dns, sink, srv


async def test_mx_delivery_uses_the_domains_mx_host(make_config):
    zone = {
        "remote.test": [("MX", "10 mx.remote.test.")],
        "mx.remote.test": [("A", "127.0.0.1")],
    }
    async with mx_setup(make_config, zone) as (dns, sink, srv):
        await srv_send(srv, ["bob@remote.test"], make_message(subject="by mx"))
        [got] = await sink.wait_messages(1)
        await srv.wait_queue_empty()
    assert got.rcpt_tos == ["bob@remote.test"]
    assert b"Subject: by mx" in got.data
    assert dns.queried("remote.test", "MX") >= 1


async def test_mx_hosts_are_tried_in_preference_order(make_config):
    # The preferred MX resolves to an address where nothing listens (refused), so the
    # backup at preference 20 must take the message.
    zone = {
        "remote.test": [("MX", "20 backup.remote.test."), ("MX", "10 dead.remote.test.")],
        "dead.remote.test": [("A", "127.0.0.2")],
        "backup.remote.test": [("A", "127.0.0.1")],
    }
    async with mx_setup(make_config, zone) as (dns, sink, srv):
        await srv_send(srv, ["bob@remote.test"], make_message())
        await sink.wait_messages(1)
        await srv.wait_queue_empty()
    assert dns.queried("dead.remote.test", "A") >= 1
    assert dns.queried("backup.remote.test", "A") >= 1
    assert len(sink.messages) == 1


async def test_null_mx_bounces_with_5_1_10(make_config):
    async with mx_setup(make_config, {"remote.test": [("MX", "0 .")]}) as (_, sink, srv):
        await srv_send(srv, ["bob@remote.test"], make_message())
        [bounce] = await srv.wait_delivered(SENDER)
        await srv.wait_queue_empty()
    assert sink.messages == []
    assert b"Status: 5.1.10" in bounce
    assert b"null MX" in bounce


async def test_dns_failure_defers_the_message(make_config):
    zone = {"remote.test": [("MX", "10 mx.remote.test.")]}
    async with mx_setup(make_config, zone, servfail=("remote.test",)) as (_, sink, srv):
        await srv_send(srv, ["bob@remote.test"], make_message())
        await wait_for(lambda: (e := first_entry(srv.app.spool)) and e.recipients[0].attempts)
        [r] = first_entry(srv.app.spool).recipients
    assert r.status == "pending"
    assert r.last_reply.startswith("451 4.4.3")
    assert sink.messages == []
