"""message.py fast paths: the MIME tree and header view match the stdlib parser's (or the
stdlib builds them), and batched header mutations give the same bytes as single ones."""

from __future__ import annotations

import email
import email.parser
import email.policy
from email.message import Message

import pytest

from benchmarks.sample import message_template
from mailflow.message import (
    Connection,
    Envelope,
    MessageContext,
    fast_header_message,
    fast_mime_tree,
)
from mailflow.verdict import AddHeader, ChangeHeader, RemoveHeader, ReplaceBody


def assert_same(ours: Message, theirs: Message, path: str = "root") -> None:
    for attr in ("_headers", "_unixfrom", "preamble", "epilogue", "_default_type", "_charset"):
        assert getattr(ours, attr) == getattr(theirs, attr), f"{path}.{attr}"
    assert theirs.defects == [] and ours.defects == []
    a, b = ours.get_payload(), theirs.get_payload()
    if isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def stdlib(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


NESTED = (
    b"From: a@example.org\r\nSubject: nested\r\n  folded\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
    b"preamble line\r\n\r\n--outer\r\n"
    b'Content-Type: multipart/alternative; boundary="inner"\r\n\r\n'
    b"--inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain\r\n\r\n"
    b"--inner  \r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--inner--\r\n"
    b"inner epilogue\r\n\r\n--outer\r\nContent-Type: application/octet-stream\r\n"
    b'Content-Disposition: attachment; filename="a.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--outer--\r\nepilogue\r\n"
)

CASES = [
    b"Subject: plain\r\n\r\nbody\r\n",
    b"Subject: no final newline\r\n\r\nbody",
    b"Subject: t\r\nX-Empty:\r\nX-Spaces:   v  \r\n\r\n\r\nbody after blank\r\n",
    NESTED,
    NESTED.replace(b"preamble line\r\n\r\n", b""),
    NESTED.replace(b"--outer--\r\nepilogue\r\n", b"--outer--"),
]


@pytest.mark.parametrize("raw", CASES)
def test_same_tree_as_the_stdlib(raw):
    ours = fast_mime_tree(raw)
    assert ours is not None
    assert_same(ours, stdlib(raw))


def test_benchmark_message():
    raw = message_template()
    ours = fast_mime_tree(raw)
    assert ours is not None
    assert_same(ours, stdlib(raw))


DECLINED = [
    b"From someone Mon Jan 1 00:00:00 2024\r\nSubject: mbox\r\n\r\nx\r\n",  # envelope line
    b"Subject: bare\nlf\r\n\r\nx\r\n",  # bare LF
    b" continuation first\r\nSubject: x\r\n\r\nbody\r\n",
    b"Subject: x\r\nnot a header line\r\n\r\nbody\r\n",
    b"\r\nno headers\r\n",
    b"Subject: only headers\r\n",
    b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n",  # no boundary parameter
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\nx\r\n',  # no close
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n--b\r\nA: b\r\n\r\nx\r\n--b--\r\n',
    b'Content-Type: multipart/digest; boundary="b"\r\n\r\n--b\r\nA: b\r\n\r\nx\r\n--b--\r\n',
    b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nx\r\n",
]


@pytest.mark.parametrize("raw", DECLINED)
def test_unusual_messages_go_to_the_stdlib_parser(raw):
    assert fast_mime_tree(raw) is None


def context(raw: bytes) -> MessageContext:
    envelope = Envelope("a@example.org", ["b@example.com"])
    return MessageContext(raw, envelope, Connection("127.0.0.1"))


# --- ctx.headers: the same header Message as BytesHeaderParser, or the stdlib builds it ----

HEADER_CASES = [
    b"Subject: plain\r\n\r\nbody\r\n",
    b"Received: from a\r\n\tby b; date\r\nSubject: folded\r\n  twice\r\n\r\nbody\r\n",
    b"X-Empty:\r\nX-Spaces:   v  \r\nFrom: a@example.org\r\n\r\n\xff 8-bit body\r\n",
    NESTED,
]


@pytest.mark.parametrize("raw", HEADER_CASES)
def test_fast_header_message_matches_the_stdlib_header_parser(raw):
    ours = fast_header_message(raw)
    assert ours is not None
    theirs = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    assert ours.items() == theirs.items()
    assert ours.get_payload() == theirs.get_payload()


@pytest.mark.parametrize("raw", DECLINED[:5])
def test_unusual_header_blocks_go_to_the_stdlib_parser(raw):
    assert fast_header_message(raw) is None
    ctx = context(raw)
    theirs = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    assert ctx.headers.items() == theirs.items()


# --- ctx.apply: header mutations in a row are applied with one rebuild ----------------------


def test_header_mutations_in_a_row_give_the_same_bytes_as_one_at_a_time():
    raw = b"Subject: s\r\nX-Spam: old\r\nX-Spam: older\r\nFrom: a@example.org\r\n\r\nbody\r\n"
    mutations = [
        RemoveHeader("x-spam"),
        AddHeader("X-Spam", "new"),
        AddHeader("X-Last", "appended", index=-1),
        ChangeHeader("Subject", "changed"),
        ChangeHeader("X-Missing", "added at the end", occurrence=2),
        ReplaceBody(b"new body\r\n"),
        AddHeader("X-After-Body", "yes"),
    ]
    together = context(raw)
    together.apply(mutations)
    assert together.raw == (
        b"X-After-Body: yes\r\nX-Spam: new\r\nSubject: changed\r\nFrom: a@example.org\r\n"
        b"X-Last: appended\r\nX-Missing: added at the end\r\n\r\nnew body\r\n"
    )
    singly = context(raw)
    for m in mutations:
        singly.apply([m])
    assert singly.raw == together.raw
    assert (
        together.headers_added
        == singly.headers_added
        == [
            ("X-Spam", "new"),
            ("X-Last", "appended"),
            ("X-After-Body", "yes"),
        ]
    )
    assert together.headers["X-Spam"] == "new"  # the cached header view was dropped


def test_header_mutation_of_a_message_without_headers_keeps_the_body():
    ctx = context(b"\r\nonly body\r\n")
    ctx.apply([AddHeader("X-A", "1"), RemoveHeader("X-B")])
    assert ctx.raw == b"X-A: 1\r\n\r\nonly body\r\n"
