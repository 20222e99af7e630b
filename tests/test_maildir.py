"""Local Maildir delivery: layout, Maildir++ folders, quotas, hostile recipient names."""

from __future__ import annotations

import mailbox
from pathlib import Path

import aiosmtplib
import pytest

from mailflow.config import MaildirConfig
from mailflow.delivery.maildir import (
    MailboxError,
    MaildirDelivery,
    QuotaExceeded,
    safe_mailbox_name,
)
from mailflow.testing import make_message, running_server, send


def test_delivery_lands_in_new_and_leaves_tmp_empty(tmp_path: Path):
    md = MaildirDelivery(MaildirConfig(root=tmp_path))
    path = md.deliver("Bob@Example.com", b"Subject: x\r\n\r\nbody\r\n")
    assert path.parent == tmp_path / "bob@example.com" / "new"
    assert path.read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    assert path.name.endswith(",S=20")
    assert list((tmp_path / "bob@example.com" / "tmp").iterdir()) == []
    [msg] = list(mailbox.Maildir(tmp_path / "bob@example.com", create=False))
    assert msg["Subject"] == "x"


def test_junk_folder_is_a_maildirplusplus_subfolder(tmp_path: Path):
    md = MaildirDelivery(MaildirConfig(root=tmp_path))
    md.deliver("bob@example.com", b"Subject: spam\r\n\r\n", folder=".Junk")
    box = mailbox.Maildir(tmp_path / "bob@example.com", create=False)
    assert "Junk" in box.list_folders()
    [msg] = list(box.get_folder("Junk"))
    assert msg["Subject"] == "spam"


@pytest.mark.parametrize("folder", ["Junk", "../.Junk", ".", "..", ".a/b", ""])
def test_bad_folder_names_are_refused(tmp_path: Path, folder: str):
    md = MaildirDelivery(MaildirConfig(root=tmp_path))
    if folder == "":
        md.deliver("bob@example.com", b"x\r\n", folder=folder)  # empty = INBOX
        return
    with pytest.raises(MailboxError):
        md.deliver("bob@example.com", b"x\r\n", folder=folder)


@pytest.mark.parametrize("rcpt", ["../../etc/passwd@x", "/abs@x", "..@x", "a/b@c", ".hidden@x"])
def test_hostile_recipient_names_stay_inside_the_root(tmp_path: Path, rcpt: str):
    root = tmp_path / "mail"
    md = MaildirDelivery(MaildirConfig(root=root))
    path = md.deliver(rcpt, b"x\r\n")
    assert root.resolve() in path.resolve().parents
    assert "/" not in safe_mailbox_name(rcpt)


def test_layout_template_by_domain_and_local_part(tmp_path: Path):
    md = MaildirDelivery(MaildirConfig(root=tmp_path, layout="{domain}/{local}"))
    path = md.deliver("bob@example.com", b"x\r\n")
    assert path.parent == tmp_path / "example.com" / "bob" / "new"


def test_quota_counts_all_folders(tmp_path: Path):
    md = MaildirDelivery(MaildirConfig(root=tmp_path, quota=100))
    md.deliver("bob@example.com", b"x" * 60)
    md.deliver("bob@example.com", b"y" * 30, folder=".Junk")
    assert md.usage("bob@example.com") == 90
    with pytest.raises(QuotaExceeded):
        md.deliver("bob@example.com", b"z" * 20)


@pytest.mark.parametrize(("code", "status"), [(452, "4.2.2"), (552, "5.2.2")])
async def test_full_mailbox_is_refused_at_rcpt_with_configured_code(make_config, code, status):
    root = Path(make_config().delivery.maildir.root)
    config = make_config(f"""
        delivery:
          maildir:
            root: {root}
            quota: 2000
            over_quota_code: {code}
        """)
    async with running_server(config) as srv:
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
        await srv.wait_delivered("bob@example.com")
        # Another client (an IMAP APPEND, say) fills the mailbox past its quota.
        filler = srv.mailbox("bob@example.com") / "cur" / "filler:2,S"
        filler.write_bytes(b"x" * 2500)
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as info:
            await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
        [err] = info.value.recipients
        assert err.code == code
        assert status in err.message
        # Other recipients are unaffected.
        assert await send(srv.port, "a@example.org", ["carol@example.com"], make_message()) == {}


async def test_a_mailbox_that_cannot_be_read_is_a_temporary_error_at_rcpt(make_config):
    """The quota check failing (an I/O error, here a ``new`` that is no directory) is
    no full mailbox: 451, never the permanent over_quota_code."""
    root = Path(make_config().delivery.maildir.root)
    config = make_config(f"""
        delivery:
          maildir:
            root: {root}
            quota: 2000
            over_quota_code: 552
        """)
    broken = root / "bob@example.com"
    broken.mkdir(parents=True)
    (broken / "new").write_bytes(b"not a directory")
    async with running_server(config) as srv:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as info:
            await send(srv.port, "a@example.org", ["bob@example.com"], make_message())
    [err] = info.value.recipients
    assert err.code == 451, err
