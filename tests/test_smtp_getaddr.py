"""MailflowSMTP._getaddr: the fast path for plain <local@domain> answers as aiosmtpd's parser."""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP

from mailflow.smtp.protocol import _PLAIN_ADDRESS, MailflowSMTP

SAMPLES = [
    "<a@b.c>",
    "<a@b.c> SIZE=100 BODY=8BITMIME",
    "<a@b.c>\t SIZE=1",
    "<a@b.c> SIZE=1 ",
    "<a@b.c> (comment) SIZE=1",
    "<a@b.c> \r",
    "<a@b.c>x y",
    " <bob.smith+x@example.com>",
    "<A.B@EXAMPLE.COM>",
    "<{x}@b-c.d>",
    "<a..b@c.d>",
    "<.a@b.c>",
    "<a@b.c",
    "<a@[1.2.3.4]>",
    '<"q"@b.c>',
    "<>",
    "",
    "a@b.c",
    "<a@-b.c>",
    "<a@b.c.>",
    "<@x:a@b.c>",
    "<abcdefgh@b.c>",
]


@pytest.mark.parametrize("limit", [0, 4])
@pytest.mark.parametrize("arg", SAMPLES)
def test_same_answer_as_aiosmtpd(arg, limit):
    ours = MailflowSMTP.__new__(MailflowSMTP)
    theirs = SMTP.__new__(SMTP)
    ours.local_part_limit = theirs.local_part_limit = limit
    assert ours._getaddr(arg) == SMTP._getaddr(theirs, arg)


def test_the_common_forms_take_the_fast_path():
    assert _PLAIN_ADDRESS.match("<bob.smith+x@example.com> SIZE=100")
    assert not _PLAIN_ADDRESS.match("<a@[1.2.3.4]>")
    assert not _PLAIN_ADDRESS.match('<"q"@b.c>')
