"""MessageContext's stdlib views: ``headers`` is built from the one MIME/text layer and
has the items ``BytesHeaderParser`` gives; ``message`` is the stdlib tree (bounded on deep
nesting); batched header mutations give the same bytes as single ones."""

from __future__ import annotations

import email
import email.parser
import email.policy
from email.message import Message
from pathlib import Path

import pytest

from benchmarks.hostile import nested_multiparts
from benchmarks.sample import message_template
from mailflow import mime
from mailflow.message import Connection, Envelope, MessageContext
from mailflow.verdict import AddHeader, ChangeHeader, RemoveHeader, ReplaceBody

FIXTURES = sorted((Path(__file__).parent / "messages" / "corpus").glob("*/*"))


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


UNUSUAL = [
    b"From someone Mon Jan 1 00:00:00 2024\r\nSubject: mbox\r\n\r\nx\r\n",  # envelope line
    b"Subject: bare\nlf\r\n\r\nx\r\n",  # bare LF
    b" continuation first\r\nSubject: x\r\n\r\nbody\r\n",
    b"Subject: x\r\nnot a header line\r\n\r\nbody\r\n",
    b"\r\nno headers\r\n",
    b"Subject: only headers\r\n",
    b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n",  # no boundary parameter
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\nx\r\n',  # no close
    b'Content-Type: multipart/digest; boundary="b"\r\n\r\n--b\r\nA: b\r\n\r\nx\r\n--b--\r\n',
    b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nx\r\n",
]


def context(raw: bytes) -> MessageContext:
    envelope = Envelope("a@example.org", ["b@example.com"])
    return MessageContext(raw, envelope, Connection("127.0.0.1"))


# --- ctx.message: the stdlib tree, bounded on deep nesting ----------------------------------


@pytest.mark.parametrize("raw", [*CASES, *UNUSUAL, message_template()])
def test_message_is_the_stdlib_tree(raw):
    ours, theirs = context(raw).message, stdlib(raw)
    assert ours.as_bytes() == theirs.as_bytes()
    assert [p.get_content_type() for p in ours.walk()] == [
        p.get_content_type() for p in theirs.walk()
    ]


def test_message_of_a_message_nested_past_the_walk_limit_is_headers_only():
    raw = nested_multiparts(mime.MAX_DEPTH + 5)
    ctx = context(raw)
    assert ctx.mime.truncated
    tree = ctx.message
    assert tree["Subject"] == "hostile"
    assert isinstance(tree.get_payload(), str)  # the body as text, not a deep tree


def test_message_cost_stays_linear_on_deep_nesting():
    from tests.growth import assert_linear

    assert_linear(nested_multiparts, lambda raw: context(raw).message, 1500)


# --- ctx.headers: the header fields as a compat32 Message, from the fields layer -----------

HEADER_CASES = [
    b"Subject: plain\r\n\r\nbody\r\n",
    b"Received: from a\r\n\tby b; date\r\nSubject: folded\r\n  twice\r\n\r\nbody\r\n",
    b"X-Empty:\r\nX-Spaces:   v  \r\nFrom: a@example.org\r\n\r\n\xff 8-bit body\r\n",
    NESTED,
]


@pytest.mark.parametrize("raw", [*HEADER_CASES, *UNUSUAL])
def test_headers_have_the_items_of_the_stdlib_header_parser(raw):
    theirs = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    ours = context(raw).headers
    assert ours.items() == theirs.items()
    assert list(ours) == list(theirs)
    assert ours.get_payload() is None  # headers only: ctx.body and ctx.mime hold the body


def test_headers_match_the_stdlib_on_the_fixtures():
    for path in FIXTURES:
        raw = path.read_bytes()
        for version in (raw, raw.replace(b"\n", b"\r\n")):
            theirs = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
                version
            )
            ours = context(version).headers
            assert list(ours) == list(theirs), path
            for name, value in theirs.items():
                if isinstance(value, str):  # 8-bit values: see the next test
                    assert ours.get_all(name) == theirs.get_all(name), (path, name)


def test_headers_decode_8bit_values_by_the_charset_policy():
    raw = b"Subject: caf\xc3\xa9 \xe9t\xe9\r\nFrom: J\xe9r\xf4me <j@example.org>\r\n\r\nx\r\n"
    ctx = context(raw)
    assert ctx.headers["Subject"] == "café été"  # UTF-8 where valid, else Windows-1252
    assert ctx.header("From") == "Jérôme <j@example.org>"
    assert ctx.fields.get_all("subject") == ["café été"]
    ctx.headers["Subject"].encode()  # no surrogate escapes reach plugins


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


def _reference_apply(raw: bytes, mutations: list) -> bytes:
    """Header mutations the plain way: split the block into fields, edit, rebuild."""
    from mailflow.message import _change_field, format_header

    ctx = context(raw)
    head, body = ctx.split()
    fields = mime.split_header_fields(head)
    for m in mutations:
        if isinstance(m, AddHeader):
            line = format_header(m.name, m.value)
            fields.insert(0, line) if m.index == 0 else fields.append(line)
        elif isinstance(m, ChangeHeader):
            fields = _change_field(fields, m.name, m.value, m.occurrence)
        elif isinstance(m, RemoveHeader):
            fields = _change_field(fields, m.name, None, 0)
        else:
            body = m.body
    return b"".join(fields) + b"\r\n" + body


def test_header_mutations_match_the_plain_rebuild_on_random_batches():
    """The prepend-only fast path (no field split) gives the bytes a full rebuild gives."""
    import random

    rng = random.Random(4)
    raws = [
        b"Subject: s\r\nX-Spam-Status: old\r\n\r\nbody\r\n",
        b"\r\nno header section\r\n",
        b"Subject: no blank line\r\n",
        b"Subject: no final CRLF",
        b"X-Note: mentions x-spam-status in a value\r\n\r\nb",
        message_template(),
    ]
    names = ["X-Spam-Status", "X-Spam-Score", "Subject", "X-New"]
    for _ in range(2000):
        raw = rng.choice(raws)
        batch = []
        for _ in range(rng.randint(1, 4)):
            kind, name = rng.randrange(5), rng.choice(names)
            if kind == 0:
                batch.append(RemoveHeader(name))
            elif kind == 1:
                batch.append(AddHeader(name, "v", index=rng.choice([0, 0, -1])))
            elif kind == 2:
                batch.append(ChangeHeader(name, "c", occurrence=rng.randint(0, 2)))
            elif kind == 3:
                batch.append(AddHeader(name, "w"))
            else:
                batch.append(RemoveHeader(name.lower()))
        ctx = context(raw)
        ctx.apply(batch)
        head = context(raw).split()[0].lower()
        if all(isinstance(m, RemoveHeader) and m.name.lower().encode() not in head for m in batch):
            assert ctx.raw == raw  # removing what is not there changes no byte
        else:
            assert ctx.raw == _reference_apply(raw, batch), (raw, batch)
