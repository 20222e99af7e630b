"""No milter command that the MTA writes on its own goes unanswered (the 40 ms stall).

Postfix writes each milter event with its own write() and, with Nagle's algorithm on
its socket, a small write waits until the previous one is acknowledged. When the filter
agrees not to answer a command that Postfix writes alone (SMFIC_DATA was one), nothing
carries that ACK: the next write (the whole message content) waited for the filter's
kernel's delayed ACK, 40 ms on Linux, on every message. Behind Postfix the filter must
therefore answer every write that ends in a command, and may stay silent only for
commands that Postfix writes together with more (headers, EOH, body chunks: all in the
one write that ends with SMFIC_BODYEOB). See docs/milter.md, "Round trips".

The write groups below are those strace showed Postfix 3.7 making (smtpd for the
envelope, cleanup for the content). Nothing here is timed: a missing answer is a
reply that never comes, and the 10 s guard is only there to end the test.
"""

from __future__ import annotations

import struct

from mailflow.milter import protocol as p
from tests.test_milter_session import MTA, Recorder, frame, milter

# What Postfix 3.x offers in SMFIC_OPTNEG (strace: version 6, actions 0x1ff, 0x1fffff).
POSTFIX_VERSION = 6
POSTFIX_ACTIONS = 0x1FF
POSTFIX_PROTOCOL = 0x1FFFFF

# The commands Postfix writes alone and then waits on: each needs an answer.
WRITTEN_ALONE = (
    p.SMFIC_CONNECT,
    p.SMFIC_HELO,
    p.SMFIC_MAIL,
    p.SMFIC_RCPT,
    p.SMFIC_DATA,
    p.SMFIC_UNKNOWN,
)


def _postfix_writes() -> list[bytes]:
    """One transaction as Postfix writes it; each item is one write() on the socket."""
    connect = b"client.example.org\x004" + struct.pack("!H", 40000) + b"192.0.2.7\0"
    content = b"".join(
        [
            frame(b"D", b"Li\0QID1\0"),
            frame(b"L", b"From\0 alice@example.org\0"),
            frame(b"L", b"Subject\0 round trips\0"),
            frame(b"N"),
            frame(b"B", b"hello\r\n"),
            frame(b"E"),
        ]
    )
    return [
        frame(b"D", b"Cj\0mx.test\0v\0Postfix 3.7.11\0") + frame(b"C", connect),
        frame(b"H", b"client.example.org\0"),
        frame(b"D", b"M{mail_addr}\0alice@example.org\0") + frame(b"M", b"<alice@example.org>\0"),
        frame(b"U", b"XFOO bar\0"),
        frame(b"D", b"R{rcpt_addr}\0bob@example.com\0") + frame(b"R", b"<bob@example.com>\0"),
        frame(b"D", b"Ti\0QID1\0") + frame(b"T"),
        content,
    ]


def test_what_postfix_writes_alone_is_never_agreed_silent():
    agreed = POSTFIX_PROTOCOL & p.WANTED_PROTOCOL
    for command in WRITTEN_ALONE:
        flag = p.NO_REPLY_FLAG[command]
        assert not agreed & flag, f"{p.COMMAND_NAMES[command]} would go unanswered"
    # The content write carries several commands; only its last one is answered.
    assert agreed & p.SMFIP_NR_HDR and agreed & p.SMFIP_NR_EOH and agreed & p.SMFIP_NR_BODY


async def test_every_write_postfix_makes_gets_an_answer(make_config):
    rec = Recorder()
    async with milter(make_config, rec) as (_, server):
        mta = await MTA.open(server.port)
        version, _actions, protocol = await mta.negotiate(protocol=POSTFIX_PROTOCOL)
        assert version == POSTFIX_VERSION
        for write in _postfix_writes():
            mta.writer.write(write)
            await mta.writer.drain()
            # Exactly one stage's answer per write; a silent stage leaves this waiting.
            replies = await mta.until_final()
            assert replies[-1][0] == p.SMFIR_CONTINUE
        assert rec.seen and rec.seen[0].raw.endswith(b"hello\r\n")
        # Nothing else is owed: the next packet is the answer to the next question.
        mta.writer.write(frame(b"A") + frame(b"D", b"M{i}\0QID2\0"))
        assert await mta.ask(b"M", b"<carol@example.org>\0") == [(b"c", b"")]
        await mta.close()
    assert protocol == POSTFIX_PROTOCOL & p.WANTED_PROTOCOL
