"""Learning from a user's Junk folder, end to end with a real Dovecot (Debian's
dovecot-lmtpd and dovecot-imapd) on loopback: mailflow delivers by LMTP with the
bayes plugin's headers, the user moves a message into Junk over IMAP as a mail
client would, and ``mailflow learn --maildir`` learns exactly that move, once."""

from __future__ import annotations

import asyncio
import imaplib
import os

import pytest
from click.testing import CliRunner
from mailflow_plugins.bayes import shipped_model_path
from mailflow_plugins.bayes.features import Hasher, extract_tokens
from mailflow_plugins.bayes.model import Model

from mailflow.cli import main
from mailflow.testing import free_port, make_message, running_server, send
from tests.dovecot_instance import create_instance, destroy, dovecot_imap_available

pytestmark = pytest.mark.slow

if not dovecot_imap_available():
    if os.environ.get("CI"):
        pytest.fail("CI must run the Dovecot IMAP tests: .ci/run installs dovecot-imapd")
    pytest.skip(
        "needs Debian's dovecot-core, dovecot-lmtpd and dovecot-imapd", allow_module_level=True
    )

PASSWORD = "s3cret-imap"
UNWANTED = make_message(
    subject="Exclusive partner webinar for you",
    body="Join our exclusive partner webinar next week and learn about our products.\r\n",
)
WANTED = make_message(
    subject="Minutes of the team meeting",
    body="Hi all,\r\nattached are the minutes of yesterday's meeting.\r\nAnna\r\n",
)


@pytest.fixture
async def dovecot():
    instance = create_instance(free_port(), {"alice": ""}, imap_port=free_port(), password=PASSWORD)
    await asyncio.to_thread(instance.start)
    yield instance
    await asyncio.to_thread(destroy, instance)


def _move_to_junk(port: int, subject: str) -> None:
    """What a user's mail client does when they drag a message into Junk."""
    with imaplib.IMAP4("127.0.0.1", port, timeout=20) as imap:
        imap.login("alice", PASSWORD)
        imap.create("Junk")
        imap.select("INBOX")
        status, found = imap.uid("SEARCH", "SUBJECT", f'"{subject}"')
        assert status == "OK" and len(found[0].split()) == 1, found
        status, _ = imap.uid("MOVE", found[0].decode(), "Junk")
        assert status == "OK"
        imap.logout()


def _log_odds(model_path, raw: bytes) -> float:
    return Model.load(model_path).log_odds(Hasher().index(extract_tokens(raw)))


async def test_a_message_the_user_moves_into_junk_is_learned_as_spam_once(
    make_config, dovecot, tmp_path
):
    config = make_config(f"""
        local_domains: [example.com]
        delivery:
          method: lmtp
          lmtp: {{host: 127.0.0.1, port: {dovecot.port}}}
        plugins: [{{name: bayes}}]
        """)
    async with running_server(config) as srv:
        for message in (UNWANTED, WANTED):
            assert (
                await send(srv.port, "news@partner.example", ["alice@example.com"], message) == {}
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(dovecot.messages("alice")) < 2:
            assert loop.time() < deadline, dovecot.log()
            await asyncio.sleep(0.05)
    delivered = dovecot.messages("alice")
    assert all(m["X-Spam-Status"].startswith("No") for m in delivered)  # both filed in the inbox

    await asyncio.to_thread(_move_to_junk, dovecot.imap_port, "Exclusive partner webinar")
    maildir = dovecot.root / "mail" / "alice"
    # Dovecot's Maildir++ layout: the folder is .Junk; the message is in new/ or cur/.
    assert [p for sub in ("new", "cur") for p in (maildir / ".Junk" / sub).iterdir()]

    model = tmp_path / "model.npz"
    unwanted_copy = next(m for m in delivered if "webinar" in m["Subject"]).as_bytes()
    before = _log_odds(shipped_model_path(), unwanted_copy)
    args = ["learn", "--maildir", str(maildir), "--model", str(model)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    after = Model.load(model)
    assert list(after.class_counts - Model.load(shipped_model_path()).class_counts) == [0, 1]
    assert _log_odds(model, unwanted_copy) > before  # the user's move was learned as spam

    # Nothing changed since: nothing is learned again and the file is not rewritten.
    mtime = model.stat().st_mtime_ns
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert model.stat().st_mtime_ns == mtime
    assert list(Model.load(model).class_counts) == list(after.class_counts)
