"""The sans-IO milter codec, with byte strings as the MTA (libmilter mfdef.h) spells them."""

from __future__ import annotations

import struct

import pytest

from mailflow.milter import protocol as p
from mailflow.milter.diff import Field, header_edits, parse_fields, recipient_edits


def frame(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + code + data


# --- framing ----------------------------------------------------------------------------------


def test_decoder_reassembles_packets_split_at_every_byte():
    stream = frame(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)) + frame(b"H", b"client.test\0")
    decoder = p.Decoder()
    commands = []
    for i in range(len(stream)):
        commands += decoder.feed(stream[i : i + 1])
    assert [(c.code, c.name) for c in commands] == [(b"O", "optneg"), (b"H", "helo")]
    assert commands[1].data == b"client.test\0"
    assert decoder.pending == 0


def test_decoder_returns_several_packets_from_one_read_and_keeps_the_rest():
    stream = frame(b"A") + frame(b"Q") + frame(b"B", b"partial body")[:7]
    decoder = p.Decoder()
    assert [c.code for c in decoder.feed(stream)] == [b"A", b"Q"]
    assert decoder.pending == 7  # a truncated packet is visible at EOF


def test_oversized_length_is_refused_before_reading_the_data():
    decoder = p.Decoder(max_size=1024)
    with pytest.raises(p.ProtocolError, match="exceeds limit"):
        decoder.feed(struct.pack("!I", 1025) + b"B")
    with pytest.raises(p.ProtocolError, match="exceeds limit"):
        p.Decoder().feed(b"\xff\xff\xff\xffB")


def test_zero_length_packet_is_a_protocol_error():
    with pytest.raises(p.ProtocolError, match="zero-length"):
        p.Decoder().feed(b"\0\0\0\0")


# --- command decoders -------------------------------------------------------------------------


def test_optneg_decodes_and_short_optneg_is_an_error():
    offer = p.decode_optneg(struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
    assert offer == p.OptNeg(6, 0x1FF, 0x1FFFFF)
    with pytest.raises(p.ProtocolError):
        p.decode_optneg(b"\0\0\0\6")


def test_connect_inet_inet6_unix_and_unknown():
    inet = p.decode_connect(b"mail.example.org\x004" + struct.pack("!H", 41234) + b"192.0.2.7\0")
    assert inet == p.ConnectInfo("mail.example.org", "4", 41234, "192.0.2.7")
    inet6 = p.decode_connect(b"[2001:db8::1]\x006" + struct.pack("!H", 25) + b"IPv6:2001:db8::1\0")
    assert (inet6.family, inet6.port, inet6.address) == ("6", 25, "2001:db8::1")
    unix = p.decode_connect(b"localhost\x00L\0\0/run/x.sock\0")
    assert (unix.family, unix.address) == ("L", "/run/x.sock")
    assert p.decode_connect(b"localhost\0U") == p.ConnectInfo("localhost", "U")


@pytest.mark.parametrize(
    "data",
    [b"no-nul-terminator", b"host\0", b"host\x004\x00", b"host\x00X\0\0addr\0"],
)
def test_truncated_or_bad_connect_is_an_error(data):
    with pytest.raises(p.ProtocolError):
        p.decode_connect(data)


def test_macros_keep_names_as_sent():
    macros = p.decode_macros(b"Cj\0mx.test\0{daemon_name}\0smtpd\0_\0client [192.0.2.7]\0")
    assert macros.stage == b"C"
    assert macros.values == {"j": "mx.test", "{daemon_name}": "smtpd", "_": "client [192.0.2.7]"}
    assert p.decode_macros(b"M{i}\0").values == {"{i}": ""}
    with pytest.raises(p.ProtocolError):
        p.decode_macros(b"")


def test_mail_and_rcpt_args():
    assert p.decode_args(b"<alice@example.org>\0SIZE=1234\0BODY=8BITMIME\0", "MAIL") == (
        "alice@example.org",
        ["SIZE=1234", "BODY=8BITMIME"],
    )
    assert p.decode_args(b"<>\0", "MAIL") == ("", [])
    assert p.decode_args(b"<bob@example.com>\0NOTIFY=NEVER\0", "RCPT")[1] == ["NOTIFY=NEVER"]
    with pytest.raises(p.ProtocolError):
        p.decode_args(b"", "RCPT")


def test_header_keeps_value_bytes_and_helo_and_unknown_strings():
    assert p.decode_header(b"Subject\0 hello\n\tworld\0") == ("Subject", b" hello\n\tworld")
    assert p.split_strings(b"client.test\0") == ["client.test"]
    assert p.split_strings(b"XFOO bar\0") == ["XFOO bar"]
    with pytest.raises(p.ProtocolError):
        p.decode_header(b"\0value\0")


# --- encoders ---------------------------------------------------------------------------------


def test_optneg_reply_and_wanted_flags():
    assert p.encode_optneg(6, 0x7F, 0x1F0080) == frame(b"O", struct.pack("!III", 6, 0x7F, 0x1F0080))
    # We must not ask the MTA to skip any event, nor for rejected recipients.
    for flag in (p.SMFIP_NOCONNECT, p.SMFIP_NOHDRS, p.SMFIP_NOBODY, p.SMFIP_RCPT_REJ, p.SMFIP_SKIP):
        assert not p.WANTED_PROTOCOL & flag
    # ... nor to stay silent where we decide.
    for flag in (p.SMFIP_NR_CONN, p.SMFIP_NR_HELO, p.SMFIP_NR_MAIL, p.SMFIP_NR_RCPT):
        assert not p.WANTED_PROTOCOL & flag


@pytest.mark.parametrize(
    "code", [p.SMFIR_ACCEPT, p.SMFIR_CONTINUE, p.SMFIR_DISCARD, p.SMFIR_REJECT, p.SMFIR_TEMPFAIL]
)
def test_simple_replies_are_one_byte_packets(code):
    assert p.reply_simple(code) == b"\0\0\0\1" + code


def test_replycode_text_is_one_line_and_status_matches_the_code():
    assert p.reply_code(550, "5.7.1", "no thanks") == frame(b"y", b"550 5.7.1 no thanks\0")
    assert p.reply_code(451, "5.7.1", "later\r\n250 fake") == frame(b"y", b"451 later 250 fake\0")
    assert p.reply_code(554, "5.7.1", "100% spam") == frame(b"y", b"554 5.7.1 100%% spam\0")
    with pytest.raises(ValueError):
        p.reply_code(250, "", "ok")


def test_modification_replies():
    assert p.reply_addheader("X-A", b" 1") == frame(b"h", b"X-A\0 1\0")
    assert p.reply_insheader(2, "X-A", b" 1") == frame(b"i", b"\0\0\0\2X-A\0 1\0")
    assert p.reply_chgheader(1, "X-A", b"") == frame(b"m", b"\0\0\0\1X-A\0\0")
    assert p.reply_addrcpt("c@example.com") == frame(b"+", b"<c@example.com>\0")
    assert p.reply_delrcpt("c@example.com") == frame(b"-", b"<c@example.com>\0")
    assert p.reply_chgfrom("") == frame(b"e", b"<>\0")
    assert p.reply_quarantine("bad\nthing") == frame(b"q", b"bad thing\0")
    assert p.reply_simple(p.SMFIR_PROGRESS) == frame(b"p")
    with pytest.raises(ValueError):
        p.reply_addheader("X-A", b"nul\0inside")


def test_replbody_is_chunked_at_65535():
    body = bytes(range(256)) * 600  # 153600 bytes
    packets = p.reply_replbody(body)
    assert [len(x) - 5 for x in packets] == [65535, 65535, 153600 - 2 * 65535]
    assert b"".join(x[5:] for x in packets) == body
    assert all(x[4:5] == b"b" for x in packets)
    assert p.reply_replbody(b"") == [frame(b"b")]


# --- diff -> modification actions -------------------------------------------------------------


def _decode(packets):
    decoder = p.Decoder()
    out = []
    for c in decoder.feed(b"".join(packets)):
        if c.code in (b"i", b"m"):
            (index,) = struct.unpack_from("!I", c.data)
            name, value = c.data[4:].split(b"\0")[:2]
            out.append((c.code.decode(), index, name.decode(), value))
        else:
            out.append((c.code.decode(), *c.data.split(b"\0")[:-1]))
    return out


def test_header_diff_prepend_append_change_delete():
    original = parse_fields(b"Received: x\r\nSubject: a\r\nX-Tag: 1\r\nX-Tag: 2\r\nTo: b\r\n")
    final = parse_fields(
        b"X-New: top\r\nReceived: x\r\nSubject: changed\r\nX-Tag: 2\r\nTo: b\r\nX-End: e\r\n"
    )
    edits = _decode(header_edits(original, final, leading_space=True))
    assert edits == [
        ("m", 1, "X-Tag", b""),  # the first X-Tag is gone
        ("m", 1, "Subject", b" changed"),
        ("i", 0, "X-New", b" top"),
        ("h", b"X-End", b" e"),
    ]


def test_header_diff_deletes_last_occurrence_first_and_strips_space_without_leadspc():
    original = parse_fields(b"X-Spam: a\r\nX-Spam: b\r\nX-Spam: c\r\nSubject: s\r\n")
    final = parse_fields(b"X-Flag: YES\r\nSubject: s\r\n")
    edits = _decode(header_edits(original, final, leading_space=False))
    assert edits == [
        ("m", 3, "X-Spam", b""),
        ("m", 2, "X-Spam", b""),
        ("m", 1, "X-Spam", b""),
        ("i", 0, "X-Flag", b"YES"),
    ]


def test_header_diff_sends_folded_values_with_bare_lf_and_ignores_refolding():
    original = [Field("Subject", b" one\r\n two")]
    assert header_edits(original, [Field("Subject", b" one two")], True) == []
    edits = _decode(header_edits([], [Field("X-Long", b" a\r\n\tb")], True))
    assert edits == [("h", b"X-Long", b" a\n\tb")]


def test_recipient_diff_is_case_insensitive():
    edits = _decode(recipient_edits(["a@x.test", "B@x.test"], ["b@x.test", "c@x.test"]))
    assert edits == [("-", b"<a@x.test>"), ("+", b"<c@x.test>")]


def test_middle_insert_counts_headers_the_mta_hid_but_top_stays_top():
    original = parse_fields(b"From: a\r\nTo: b\r\n")
    final = parse_fields(b"X-Top: t\r\nFrom: a\r\nX-Mid: m\r\nTo: b\r\n")
    assert _decode(header_edits(original, final, True)) == [
        ("i", 0, "X-Top", b" t"),
        ("i", 2, "X-Mid", b" m"),
    ]
    assert _decode(header_edits(original, final, True, insert_offset=1)) == [
        ("i", 0, "X-Top", b" t"),
        ("i", 3, "X-Mid", b" m"),
    ]
