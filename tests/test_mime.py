"""mailflow.mime: the MIME walker (leaf parts, names, text), its limits and its cache.

The walker is compared with the stdlib parser on the message fixtures; malformed
input must never raise, and each case below says what is returned for it.
"""

from __future__ import annotations

import base64
import email
import email.policy
import email.utils
import html as html_module
import random
import re
import time
from email.message import Message
from pathlib import Path

import pytest

from benchmarks.sample import message_template
from mailflow import mime
from mailflow.message import Connection, Envelope, MessageContext
from mailflow.verdict import AddHeader, ChangeHeader, RemoveHeader, ReplaceBody

FIXTURES = sorted((Path(__file__).parent / "messages" / "corpus").glob("*/*"))


def ctx_for(raw: bytes) -> MessageContext:
    return MessageContext(
        raw, Envelope("a@example.org", ["b@example.com"]), Connection("192.0.2.1")
    )


def multipart(*parts: bytes, boundary: str = "b1", kind: str = "mixed", head: bytes = b"") -> bytes:
    """A CRLF multipart message (or body part) with the given parts and a close line."""
    out = head + f'Content-Type: multipart/{kind}; boundary="{boundary}"\r\n\r\n'.encode()
    out += b"preamble\r\n"
    for part in parts:
        out += f"--{boundary}\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--\r\nepilogue\r\n".encode()


def leaf(ctype: str, body: bytes, *headers: str) -> bytes:
    lines = [f"Content-Type: {ctype}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def summary(raw: bytes) -> list[tuple[str, str, bool, int]]:
    return [(p.content_type, p.filename, p.is_attachment, p.size) for p in mime.parse(raw).parts]


# --- agreement with the stdlib parser ---------------------------------------------------


def _stdlib_leaves(raw: bytes) -> list[Message]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [p for p in msg.walk() if not p.is_multipart()]


def _stdlib_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return mime.decode_charset(payload, part.get_content_charset() or "")


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name[:40])
def test_leaves_match_the_stdlib_parser(path: Path):
    raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    theirs = _stdlib_leaves(raw)
    ours = mime.parse(raw).parts
    assert [p.content_type for p in ours] == [p.get_content_type() for p in theirs]
    for mine, std in zip(ours, theirs, strict=True):
        assert mine.filename == mime.decode_words(std.get_filename() or "").strip()
        assert mine.disposition == (std.get_content_disposition() or "")
        payload = std.get_payload()
        assert isinstance(payload, str)
        if payload.isascii():  # compat32 turns 8-bit payloads into characters
            assert mine.size == len(payload)
        if mine.content_type.startswith("text/"):
            assert mine.text() == _stdlib_text(std)


def test_fixtures_body_text_and_headers_match_the_stdlib_helpers():
    for path in FIXTURES:
        raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        ctx = ctx_for(raw)
        chunks = []
        for part in _stdlib_leaves(raw):
            if part.get_content_maintype() != "text":
                continue
            if part.get_content_disposition() == "attachment":
                continue
            text = _stdlib_text(part)
            if part.get_content_type() == "text/html":
                text = mime.html_to_text(text)
            chunks.append(text)
        assert mime.body_text(ctx) == "\n".join(chunks), path.name
        for name in {k.lower() for k in ctx.headers}:
            want = [str(v) for v in ctx.headers.get_all(name, [])]
            assert mime.header_values(ctx, name) == want, (path.name, name)


def test_benchmark_message():
    raw = message_template()
    structure = mime.parse(raw)
    assert [(p.content_type, p.filename, p.is_attachment) for p in structure.parts] == [
        ("text/plain", "", False),
        ("text/html", "", False),
        ("application/octet-stream", "report.bin", True),
    ]
    assert [p.depth for p in structure.parts] == [2, 2, 1]
    assert structure.truncated is False
    text = structure.body_text()
    assert "<" not in text and "\n" in text
    assert structure.parts[2].payload() == base64.b64decode(structure.parts[2].raw())


# --- structure --------------------------------------------------------------------------


def test_nested_multiparts_in_document_order():
    related = multipart(
        leaf("text/html", b"<p>hi</p>"),
        leaf(
            "image/png",
            b"PNG",
            "Content-ID: <logo>",
            'Content-Disposition: inline; filename="l.png"',
        ),
        boundary="r",
        kind="related",
    )
    alternative = multipart(leaf("text/plain", b"hi"), related, boundary="a", kind="alternative")
    raw = multipart(
        alternative, leaf("application/pdf", b"%PDF", "Content-Disposition: attachment")
    )
    structure = mime.parse(raw)
    assert [(p.content_type, p.depth) for p in structure.parts] == [
        ("text/plain", 2),
        ("text/html", 3),
        ("image/png", 3),
        ("application/pdf", 1),
    ]
    assert [p.is_attachment for p in structure.parts] == [False, False, True, True]
    assert structure.body_text() == "hi\n hi "
    assert structure.parts[2].fields.get("content-id") == "<logo>"


def test_message_rfc822_inner_parts_are_walked_like_the_stdlib_tree():
    inner = multipart(
        leaf("text/plain", b"forwarded text"),
        leaf(
            "application/x-msdownload", b"MZ", 'Content-Disposition: attachment; filename="a.exe"'
        ),
        boundary="in",
        head=b"Subject: inner\r\n",
    )
    raw = multipart(
        leaf("text/plain", b"see below"),
        leaf("message/rfc822", inner, 'Content-Disposition: attachment; filename="fwd.eml"'),
    )
    assert summary(raw) == summary_from_stdlib(raw)
    assert [p.filename for p in mime.parse(raw).parts] == ["", "", "a.exe"]
    assert mime.parse(raw).body_text() == "see below\nforwarded text"


def summary_from_stdlib(raw: bytes) -> list[tuple[str, str, bool, int]]:
    out = []
    for p in _stdlib_leaves(raw):
        name = p.get_filename() or ""
        payload = p.get_payload()
        assert isinstance(payload, str)
        attachment = p.get_content_disposition() == "attachment" or bool(name)
        out.append((p.get_content_type(), name, attachment, len(payload)))
    return out


def test_base64_encoded_message_part_is_decoded_before_walking():
    inner = leaf(
        "application/x-msdownload", b"MZ", 'Content-Disposition: attachment; filename="x.exe"'
    )
    body = base64.encodebytes(b"Subject: inner\r\n" + inner).replace(b"\n", b"\r\n")
    raw = multipart(leaf("message/rfc822", body, "Content-Transfer-Encoding: base64"))
    assert [p.filename for p in mime.parse(raw).parts] == ["x.exe"]


def test_digest_parts_default_to_message_rfc822():
    raw = multipart(
        b"Subject: one\r\n\r\nfirst",
        b"Content-Type: text/plain\r\n\r\nsecond",
        boundary="d",
        kind="digest",
    )
    assert [(p.content_type, p.text()) for p in mime.parse(raw).parts] == [
        ("text/plain", "first"),  # a message/rfc822 part holding a plain message
        ("text/plain", "second"),
    ]
    assert summary(raw) == summary_from_stdlib(raw)


def test_delivery_status_is_one_leaf():
    raw = multipart(
        leaf("text/plain", b"failed"),
        leaf("message/delivery-status", b"Reporting-MTA: dns; mx\r\n\r\nAction: failed\r\n"),
        kind="report",
    )
    parts = mime.parse(raw).parts
    assert [p.content_type for p in parts] == ["text/plain", "message/delivery-status"]
    assert mime.parse(raw).body_text() == "failed"


# --- file names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "names"),
    [
        (['Content-Disposition: attachment; filename="a.pdf"'], ("a.pdf",)),
        (['Content-Type: application/pdf; name="b.pdf"'], ("b.pdf",)),
        (["Content-Disposition: attachment; FILENAME=c.pdf"], ("c.pdf",)),
        # RFC 2231: continuations, then percent-encoding with a charset
        (['Content-Disposition: attachment; filename*0="lo"; filename*1="ng.exe"'], ("long.exe",)),
        (["Content-Disposition: attachment; filename*=UTF-8''%E2%82%AC.exe"], ("€.exe",)),
        (
            [
                "Content-Disposition: attachment;\r\n filename*0*=iso-8859-1'en'caf%E9;"
                "\r\n filename*1=.exe"
            ],
            ("café.exe",),
        ),
        (["Content-Disposition: attachment; filename*=nosuch''x%41.exe"], ("xA.exe",)),
        # RFC 2047 encoded words (not standard in parameters, but what mailers send)
        (['Content-Type: application/x; name="=?utf-8?B?w6kuZXhl?="'], ("é.exe",)),
        (
            ['Content-Type: application/x; name="=?iso-8859-1?Q?caf=E9?= =?utf-8?q?_2.exe?="'],
            ("café 2.exe",),
        ),
        (['Content-Type: application/x; name="=?bogus?X?abc?="'], ("=?bogus?X?abc?=",)),
        # every name a part carries is kept, in this order
        (
            [
                'Content-Type: text/plain; name="shown.txt"',
                "Content-Disposition: attachment; filename=real.exe; filename*=UTF-8''other.scr",
            ],
            ("real.exe", "other.scr", "shown.txt"),
        ),
        (['Content-Disposition: inline; filename="  "'], ()),
    ],
)
def test_file_names(headers: list[str], names: tuple[str, ...]):
    part = "\r\n".join(headers).encode() + b"\r\n\r\ndata"
    [found] = mime.parse(multipart(part)).parts
    assert found.filenames == names
    assert found.filename == (names[0] if names else "")
    assert found.is_attachment == (bool(names) or found.disposition == "attachment")


def test_raw_8bit_file_name_is_read_by_the_charset_policy():
    part = 'Content-Disposition: attachment; filename="résumé.exe"\r\n\r\nx'.encode()
    [found] = mime.parse(multipart(part)).parts
    assert found.filename == "résumé.exe"
    bad = b'Content-Disposition: attachment; filename="r\xe9sum\xe9.exe"\r\n\r\nx'
    [found] = mime.parse(multipart(bad)).parts
    assert found.filename == "résumé.exe"  # not UTF-8: Windows-1252 (mailflow.mime.decode)


def test_parameters():
    assert mime.parse_params('text/plain; charset="utf-8"; format=flowed') == {
        "charset": "utf-8",
        "format": "flowed",
    }
    assert mime.parse_params('multipart/mixed; boundary="a;b"; x="q\\"uote"') == {
        "boundary": "a;b",
        "x": 'q"uote',
    }
    assert mime.parse_params("text/plain") == {}
    assert mime.parse_params("text/plain; ; =x; charset") == {"charset": ""}
    assert mime.parse_params("text/plain; charset=a; charset=b") == {"charset": "a"}
    assert mime.parse_params('x; name="unterminated') == {"name": '"unterminated'}


# --- malformed input: never raises, and says what it returns ----------------------------


def test_broken_base64_is_salvaged():
    assert mime.decode_base64(b"aGVsbG8gd29ybGQ=") == b"hello world"
    assert mime.decode_base64(b"aGVsbG8gd29ybGQ") == b"hello world"  # padding missing
    assert mime.decode_base64(b"aGVs\r\nbG8g*d29y!bGQ=") == b"hello world"  # junk ignored
    assert mime.decode_base64(b"aGVsbG8gd29ybGQhZ") == b"hello world!"  # stray last char
    assert mime.decode_base64(b"") == b""
    assert mime.decode_base64(b"!!!") == b""


def test_broken_quoted_printable_keeps_what_it_cannot_decode():
    assert mime.decode_transfer(b"caf=E9 =ZZ end=", "quoted-printable") == b"caf\xe9 =ZZ end"
    assert mime.decode_transfer(b"soft=\r\nbreak", "Quoted-Printable ") == b"softbreak"


def test_uuencode_and_unknown_encodings():
    uu = b"begin 644 x\r\n%:&5L;&\\`\r\n`\r\nend\r\n"
    assert mime.decode_transfer(uu, "x-uuencode") == b"hello"
    assert mime.decode_transfer(b"no begin line", "uuencode") == b"no begin line"
    assert mime.decode_transfer(b"as is", "x-made-up") == b"as is"


@pytest.mark.parametrize(
    ("charset", "data", "text"),
    [
        ("utf-8", "é".encode(), "é"),
        ("ISO-8859-1", b"\xe9", "é"),
        ('"windows-1252"', b"\x80", "€"),
        # Unknown, none, or not a charset: UTF-8 where valid, each other byte as
        # Windows-1252 (the charset policy, mailflow.mime.decode).
        ("no-such-charset", b"\xc3\xa9\xff", "éÿ"),
        ("rot13", b"abc", "abc"),  # a codec that is not a text encoding
        ("base64", b"\xff", "ÿ"),
        ("unicode_escape", b"\\ud800", "\\ud800"),  # not a charset: never a lone surrogate
        ("punycode", b"abc-", "abc-"),
        ("", b"plain \xff", "plain ÿ"),
        ("", b"caf\xe9 \x93quoted\x94 \x81", "café \u201cquoted\u201d \x81"),
        ("utf-8", b"\xff\xfe", "ÿþ"),  # declared UTF-8 that is not: the same
        ("us-ascii", "naïve".encode(), "naïve"),  # 8-bit "ASCII": UTF-8 when valid
        ("us-ascii", b"na\xefve", "naïve"),
        ("iso-8859-1", b"\x96", "\u2013"),  # Latin-1 labels read as Windows-1252
        ("koi8-r", "привет".encode("koi8-r"), "привет"),
        ("big5", "中文".encode(), "中文"),  # declared charset does not fit, UTF-8 does
        ("big5", b"\xa4\xa4\xff", "中\ufffd"),  # neither fits: the declared one, U+FFFD
        ("utf-7", b"+2AA-", "\ufffd"),  # a lone surrogate in UTF-7 becomes U+FFFD
        ("\udcff\udcfe", b"\xe9", "é"),  # 8-bit bytes in the charset name (finding 4)
        ("x" * 5000, b"\xe9", "é"),
    ],
)
def test_charsets_never_raise(charset: str, data: bytes, text: str):
    decoded = mime.decode_charset(data, charset)
    assert decoded == text
    decoded.encode("utf-8")  # no lone surrogate, whatever the input


def test_multipart_without_boundary_is_one_leaf():
    raw = b"Content-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
    assert summary(raw) == [("multipart/mixed", "", False, 37)]
    assert summary(raw) == summary_from_stdlib(raw)


def test_boundary_that_never_occurs_is_one_leaf():
    raw = b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n--x\r\n\r\nhi\r\n'
    assert summary(raw) == summary_from_stdlib(raw) == [("multipart/mixed", "", False, 11)]


def test_missing_close_delimiter_last_part_runs_to_the_end():
    raw = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\none\r\n--b\r\n'
        b'Content-Disposition: attachment; filename="tail.exe"\r\n\r\nMZ\r\n'
    )
    assert summary(raw) == summary_from_stdlib(raw)
    assert [p.raw() for p in mime.parse(raw).parts] == [b"one", b"MZ"]


def test_delimiter_lines_must_be_whole_lines():
    raw = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\n'
        b"text --b inside\r\n--bx not a delimiter\r\n--b-- \t\r\n--b\r\n\r\nepilogue"
    )
    [part] = mime.parse(raw).parts
    assert part.raw() == b"text --b inside\r\n--bx not a delimiter"
    assert summary(raw) == summary_from_stdlib(raw)


def test_adjacent_delimiters_give_no_empty_part():
    raw = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n--b\r\n\r\nonly\r\n--b--\r\n'
    assert [p.raw() for p in mime.parse(raw).parts] == [b"only"]
    assert summary(raw) == summary_from_stdlib(raw)


def test_part_without_blank_line_starts_its_body_at_the_first_non_header_line():
    raw = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nhello world\r\n--b--\r\n'
    [part] = mime.parse(raw).parts
    assert (part.content_type, part.text()) == ("text/plain", "hello world")
    assert summary(raw) == summary_from_stdlib(raw)


def test_bare_lf_message():
    raw = multipart(
        leaf("text/plain", b"plain"),
        leaf("text/html", b"<b>bold</b>", 'Content-Disposition: inline; filename="x.htm"'),
    ).replace(b"\r\n", b"\n")
    assert summary(raw) == summary_from_stdlib(raw)
    assert mime.parse(raw).body_text() == "plain\n bold "


def test_garbage_never_raises():
    junk = [
        b"",
        b"\r\n",
        b"no colon here\r\n\r\nbody",
        b":\r\n\r\n",
        b"\x00\xff\xfe" * 50,
        b"Content-Type: multipart/mixed; boundary=\xff\xfe\r\n\r\n--\xff\xfe\r\n\r\nx\r\n",
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!",
        b"Content-Type: text/plain; charset=\xff\r\nContent-Transfer-Encoding: base64\r\n\r\n@@@",
        b"Content-Type: /\r\nContent-Disposition: ;;;; filename*=''\r\n\r\n",
        b"Content-Type: text/html\r\n\r\n<script <style <<<<< &#xZZ; &amp",
        b"From nobody\r\n continuation first\r\nX: y\r\n\r\n",
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n--b\r\n--b--",
    ]
    for raw in junk:
        structure = mime.parse(raw)
        assert isinstance(structure.body_text(), str)
        for part in structure.parts:
            part.text()
        ctx = ctx_for(raw)
        assert mime.parts(ctx) is not None
        assert isinstance(mime.body_text(ctx), str)


def test_huge_header_line():
    raw = b"Subject: " + b"x" * 2_000_000 + b"\r\nContent-Type: text/plain\r\n\r\nbody"
    ctx = ctx_for(raw)
    assert mime.body_text(ctx) == "body"
    assert len(mime.header_values(ctx, "Subject")[0]) == 2_000_000


def test_invalid_content_types_are_text_plain():
    for value in ("text", "a/b/c", "", "text/plain/"):
        raw = f"Content-Type: {value}\r\n\r\nbody".encode()
        assert mime.parse(raw).parts[0].content_type == "text/plain", value
        assert summary(raw) == summary_from_stdlib(raw)
    assert summary(b"Content-Type: TEXT/HTML ; x=y\r\n\r\n") == [("text/html", "", False, 0)]


# --- limits -----------------------------------------------------------------------------


def test_parts_past_the_limit_are_one_opaque_attachment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(mime.walk, "MAX_PARTS", 10)
    filler = [leaf("text/plain", f"part {i}".encode()) for i in range(12)]
    exe = leaf(
        "application/octet-stream", b"MZ", 'Content-Disposition: attachment; filename="x.exe"'
    )
    structure = mime.parse(multipart(*filler, exe))
    assert structure.truncated is True
    walked, rest = structure.parts[:-1], structure.parts[-1]
    assert len(walked) == 9  # the container counts as one of the ten
    assert (rest.content_type, rest.opaque, rest.is_attachment) == (mime.OPAQUE_TYPE, True, True)
    assert b"x.exe" in rest.raw()  # what was not walked is kept, undecoded
    assert "part 9" not in structure.body_text()


def test_nesting_past_the_limit_is_opaque(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(mime.walk, "MAX_DEPTH", 3)
    raw = leaf(
        "application/x-msdownload", b"MZ", 'Content-Disposition: attachment; filename="x.exe"'
    )
    for level in range(5):
        raw = multipart(raw, boundary=f"level{level}")
    structure = mime.parse(raw)
    assert structure.truncated is True
    [part] = structure.parts
    assert (part.content_type, part.opaque, part.is_attachment, part.depth) == (
        "multipart/mixed",
        True,
        True,
        3,
    )


def test_a_mime_bomb_costs_bounded_time():
    head = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    many = head + b"--b\r\n\r\nx\r\n" * 200_000 + b"--b--\r\n"  # 200,000 tiny parts
    started = time.process_time()
    structure = mime.parse(many)
    assert time.process_time() - started < 2.0
    assert structure.truncated and len(structure.parts) == mime.MAX_PARTS
    lookalikes = head + b"--b--b" * 1_000_000  # the boundary everywhere, never as a line
    started = time.process_time()
    assert [p.content_type for p in mime.parse(lookalikes).parts] == ["multipart/mixed"]
    assert time.process_time() - started < 1.0
    deep = b"x"
    for level in range(200):
        deep = multipart(deep, boundary=f"d{level}")
    structure = mime.parse(deep)
    assert structure.truncated and [p.depth for p in structure.parts] == [mime.MAX_DEPTH]


# --- per-message cache ------------------------------------------------------------------


def test_header_changes_do_not_walk_the_body_again(monkeypatch: pytest.MonkeyPatch):
    ctx = ctx_for(message_template())
    first = mime.structure(ctx)
    text = mime.body_text(ctx)
    walks = []
    monkeypatch.setattr(mime.context, "parse_body", lambda *a: walks.append(a) or first)
    ctx.apply([AddHeader("X-Spam-Score", "1.5"), ChangeHeader("Subject", "changed")])
    ctx.apply([RemoveHeader("Date"), AddHeader("Received", "from x by y", index=-1)])
    assert mime.structure(ctx) is first
    assert mime.body_text(ctx) is text
    assert mime.header_values(ctx, "subject") == ["changed"]
    assert walks == []


def test_body_or_content_type_changes_walk_again():
    ctx = ctx_for(message_template())
    first = mime.structure(ctx)
    ctx.apply([ReplaceBody(b"new body\r\n")])
    second = mime.structure(ctx)
    assert second is not first
    # the boundary is gone from the new body: the multipart is one leaf
    assert [(p.content_type, p.raw()) for p in second.parts] == [
        ("multipart/mixed", b"new body\r\n")
    ]
    ctx.apply([ChangeHeader("Content-Type", "text/html")])
    third = mime.structure(ctx)
    assert third is not second and third.parts[0].content_type == "text/html"


def test_header_values_fall_back_to_the_stdlib_for_unusual_blocks():
    raw = b"Subject: caf\xc3\xa9\r\nX-A: one\rX-B: two\r\n\r\nbody"
    ctx = ctx_for(raw)
    for name in ("subject", "x-a", "x-b"):
        assert mime.header_values(ctx, name) == [str(v) for v in ctx.headers.get_all(name, [])]
    folded = ctx_for(b"Subject: a\r\n  b\r\nsubject:\tc\r\n\r\n")
    assert mime.header_values(folded, "SUBJECT") == ["a\r\n  b", "c"]
    assert mime.header_values(folded, "missing") == []


# --- HTML to text -----------------------------------------------------------------------

_OLD_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.IGNORECASE | re.DOTALL)
_OLD_SPACE = re.compile(r"[ \t\r\f\v]+")


def _old_html_to_text(markup: str) -> str:
    return _OLD_SPACE.sub(" ", html_module.unescape(_OLD_TAG.sub(" ", markup)))


@pytest.mark.parametrize(
    "markup",
    [
        "<p>Hello <b>world</b></p>\r\n<br>\r\n",
        "<script>var a = '<p>';</script>after<style>p {}</STYLE >x",
        "<SCRIPT>unclosed <b>bold</b> tail",
        "<script>one</script> mid <script>unclosed",
        "a < b and c > d <",
        "<<<>>> <a href='x'>link</a> &amp; &lt;tag&gt; &nbsp;x",
        "<\u017fcript>long s</\u017fcript>gone?",
        "<scripts>not a script</scripts>",
        "tabs\t\tand\x0bspaces \x0c\r\n  here",
        "no tags at all",
        "",
        "<style>a</style><style>b",
        "x<script\n>y</script\t>z",
    ],
)
def test_html_to_text_matches_the_plain_regex_version(markup: str):
    assert mime.html_to_text(markup) == _old_html_to_text(markup)


@pytest.mark.parametrize(
    ("markup", "text"),
    [
        ("a<!-- hidden words -->b", "a b"),
        ("a<!-- x > still hidden -->b", "a b"),  # a ">" inside does not end a comment
        ("a<!-->b<!--->c", "a b c"),  # empty comments, as browsers read them
        ("a<!-- never closed <p>b</p>", "a "),  # hides the rest, as in a browser
        ("a<p>b<!-- never closed", "a b "),
        ("<script>if (a<!--b) x()</script>c<!--d-->e", " c e"),  # not a comment in a script
        ("<!-- <script> -->t<script>x</script>u", " t u"),
        ("a<!--x-->b<script>y", "a b y"),
    ],
)
def test_html_comments_are_removed_with_their_text(markup: str, text: str):
    """Words hidden in comments (a hash-buster against spam filters) are not text."""
    assert mime.html_to_text(markup) == text


def test_html_to_text_is_linear_on_unclosed_tags():
    hostile = "<script>" * 20_000 + "<" * 20_000 + "</script" * 1000
    started = time.process_time()
    mime.html_to_text(hostile)
    assert time.process_time() - started < 1.0


def test_collapse_blanks():
    assert mime.collapse_blanks(" a \t\t b\r\n\x0b\x0cc  ") == " a b \n c "


def _char_loop_strip(markup: str) -> tuple[str, bool]:
    """The plain reference for markup with unclosed blocks: one step per "<"."""
    out: list[str] = []
    pos = 0
    unclosed: set[str] = set()
    while True:
        lt = markup.find("<", pos)
        if lt < 0:
            break
        out.append(markup[pos:lt])
        if markup.startswith("<!--", lt):
            out.append(" ")
            end = markup.find("-->", lt + 2)
            if end < 0:
                return "".join(out), True
            pos = end + 3
            continue
        opening = re.compile(r"<(script|style)\b", re.IGNORECASE).match(markup, lt)
        name = "style" if opening is not None and opening.group(1)[-1] in "eE" else "script"
        if opening is not None and name not in unclosed:
            closing = re.compile(rf"</{name}\s*>", re.IGNORECASE).search(markup, opening.end())
            if closing is not None:
                out.append(" ")
                pos = closing.end()
                continue
            unclosed.add(name)
        gt = markup.find(">", lt)
        if gt < 0:
            out.append(markup[lt:])
            return "".join(out), False
        out.append(" ")
        pos = gt + 1
    out.append(markup[pos:])
    return "".join(out), False


def test_html_slow_path_matches_a_step_per_tag_on_random_markup():
    """The slow path steps only at comment and script/style openings and strips the
    plain tags between them in C: the same text as one step per "<"."""
    from mailflow.mime.text import _strip_tags_slowly

    rng = random.Random(11)
    pieces = ["<script>", "</script>", "<style>", "</STYLE >", "<!--", "-->", "<!-->", "<a "]
    pieces += [">", "<", "x", " ", "<p>", "<scripts>", "</script", "<\u017fcript>", "<SCRIPT\n>"]
    for _ in range(20_000):
        markup = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        head = markup[: markup.rfind(">") + 1]
        assert _strip_tags_slowly(head) == _char_loop_strip(head), head
