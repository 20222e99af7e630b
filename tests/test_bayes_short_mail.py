"""Ordinary short business mail, sent through a real ``serve`` with the embedded
default config, is delivered to the inbox: none of it lands in ``.Junk``.

The messages were written for this test: meetings, replies, invoices and delivery
notes with a PDF, notifications, plain text, HTML only and multipart/alternative.
``short_business/`` was looked at while the model's block floors were chosen;
``short_business_heldout/`` was written afterwards and never used to choose anything.
The embedded default config files mail with a score of 8 or more (bayes probability
>= 0.9) into ``.Junk``. Each message arrives as mail from outside does, with a hop
of the sender's own site above mailflow's: from a named relay, or submitted from a
home address (an IP-literal HELO, a dynamic-looking reverse name).
"""

from __future__ import annotations

from pathlib import Path

import yaml

import mailflow
from mailflow.config import parse_config
from mailflow.testing import running_server, send

UPSTREAM_HOPS = [
    b"Received: from mail.example.net (mail.example.net [192.0.2.1])\r\n"
    b"\tby relay.example.net (Postfix) with ESMTPS id 4XyZ1; Mon, 2 Dec 2024 10:00:00 +0000\r\n",
    b"Received: from [192.0.2.55] (dsl-192-0-2-55.dyn.example.de [192.0.2.55])\r\n"
    b"\tby mail.example.de with ESMTPSA id 7Ab; Mon, 2 Dec 2024 10:00:00 +0000\r\n",
]
MESSAGE_DIRS = [
    Path(__file__).parent / "messages" / "short_business",
    Path(__file__).parent / "messages" / "short_business_heldout",
]


def _default_config(tmp_path: Path):
    """The embedded default config, listening on a free port, writing under tmp_path."""
    data = yaml.safe_load((Path(mailflow.__file__).parent / "default.yaml").read_text())
    data["server"]["listen"] = ["127.0.0.1:0"]
    data["delivery"]["maildir"]["root"] = str(tmp_path / "mail")
    data["queue"]["directory"] = str(tmp_path / "spool")
    data.setdefault("quarantine", {})["directory"] = str(tmp_path / "quarantine")
    return parse_config(yaml.safe_dump(data), "default.yaml")


def test_the_set_covers_plain_html_and_attachments():
    raws = [p.read_bytes() for d in MESSAGE_DIRS for p in d.glob("*.eml")]
    assert len(raws) >= 25
    assert any(b"text/html" in r and b"multipart/alternative" not in r for r in raws)
    assert any(b"multipart/alternative" in r for r in raws)
    assert any(b"application/pdf" in r for r in raws)
    assert any(b"text/html" not in r and b"multipart" not in r for r in raws)


async def test_short_business_mail_is_not_filed_as_junk(tmp_path):
    config = _default_config(tmp_path)
    default_chain = ["attachments", "bayes", "phishing"]
    assert [p.name for p in config.plugins] == default_chain
    files = [
        (path, hop)
        for path in sorted(p for d in MESSAGE_DIRS for p in d.glob("*.eml"))
        for hop in UPSTREAM_HOPS
    ]
    async with running_server(config) as srv:
        for i, (path, hop) in enumerate(files):
            # CRLF line ends, whatever the file has (the files are written with CRLF).
            raw = hop + path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            # One mailbox per message, so each copy is found where it was filed.
            assert await send(srv.port, "sender@example.net", [f"u{i}@example.org"], raw) == {}
    statuses = {}
    for i, (path, hop) in enumerate(files):
        box = tmp_path / "mail" / f"u{i}@example.org"
        inbox = [f for sub in ("new", "cur") for f in (box / sub).glob("*")]
        junk = [f for sub in ("new", "cur") for f in (box / ".Junk" / sub).glob("*")]
        assert len(inbox) + len(junk) == 1, (path.name, inbox, junk)
        copy = (inbox or junk)[0].read_bytes()
        status = next(x for x in copy.splitlines() if x.startswith(b"X-Spam-Status:"))
        key = f"{path.parent.name}/{path.name} via {hop.split()[2].decode()}"
        statuses[key] = ("junk" if junk else "inbox", status.decode())
    filed_as_junk = {name: s for name, s in statuses.items() if s[0] == "junk"}
    assert not filed_as_junk
    assert all(s[1].startswith("X-Spam-Status: No") for s in statuses.values()), statuses
