"""Feature extraction: decoding, email-aware tokens, and robustness on bad input."""

from __future__ import annotations

import base64
import quopri

import pytest
from mailflow_plugins.bayes.features import extract_tokens, strip_list_footer

from mailflow import mime
from mailflow.mime import decode_charset, html_to_text, parse
from mailflow.testing import make_message
from tests.bayes_support import mime_message


def test_base64_body_in_a_legacy_charset_is_decoded_to_words():
    text = "Привет, дешёвые часы сегодня".encode("koi8-r")
    raw = mime_message(
        [
            (
                "text/plain; charset=koi8-r",
                base64.encodebytes(text),
                {"Content-Transfer-Encoding": "base64"},
            )
        ]
    )
    tokens = extract_tokens(raw)
    assert {"привет", "дешёвые", "часы", "cs:koi8-r"} <= set(tokens)
    # Transfer encodings told the mail client's era, not spam: no longer features.
    assert not any(t.startswith("cte:") for t in tokens)


def test_quoted_printable_latin1_is_decoded():
    body = quopri.encodestring("Voilà un café très spécial".encode("latin-1"))
    raw = mime_message(
        [("text/plain; charset=latin-1", body, {"Content-Transfer-Encoding": "quoted-printable"})]
    )
    tokens = set(extract_tokens(raw))
    assert {"voilà", "café", "très", "spécial"} <= tokens
    assert not any("=" in t and t.startswith("caf") for t in tokens)  # no "caf=e9" leftovers


def test_html_becomes_text_and_link_domains_become_features():
    html = (
        b"<html><head><style>p {color: red}</style><script>var hidden=1</script></head>"
        b'<body><p>Cheap <b>pills</b> &amp; more</p><a href="http://shop.pills.example.net/x">'
        b"click</a><!-- comment words --></body></html>"
    )
    tokens = set(extract_tokens(mime_message([("text/html; charset=us-ascii", html, {})])))
    assert {"cheap", "pills", "more", "click", "u:example.net", "u:tld:net"} <= tokens
    assert {"tag:a", "tag:b", "m:=html-only"} <= tokens
    assert not {"color", "hidden", "comment", "var"} & tokens  # style/script/comments dropped
    assert "Cheap pills & more" in html_to_text(html.decode())


def test_attachments_and_mime_structure_are_features():
    raw = mime_message(
        [
            ("text/plain", b"see attached", {}),
            (
                'application/octet-stream; name="invoice.EXE"',
                base64.encodebytes(b"MZ" + bytes(100)),
                {"Content-Transfer-Encoding": "base64", "Content-Disposition": "attachment"},
            ),
        ]
    )
    tokens = set(extract_tokens(raw))
    assert {"att:.exe", "att:application/octet-stream", "m:parts2"} <= tokens
    # MIME tree paths and the top-level type described the corpus' era, not spam
    # (docs/plugins/bayes.md, "How the model was chosen"): no longer features.
    assert not any(t.startswith(("ct:", "mime:")) for t in tokens)
    assert not any(t.startswith("mz") for t in tokens)  # attachments are not read as text


def test_subject_is_decoded_and_list_tags_are_not_features():
    raw = make_message(subject="[ILUG] =?utf-8?b?w5xiZXJyYXNjaHVuZw==?= FREE money!!")
    tokens = set(extract_tokens(raw))
    assert {"s:überraschung", "s:free", "s:money", "s:=bang", "s:=encoded"} <= tokens
    assert "s:ilug" not in tokens


def test_corpus_specific_details_are_not_features():
    raw = make_message(
        body="Meeting on 2002-08-23 at 10:30, ticket 123456.\r\n",
        extra_headers={
            "Received": "from mail.lists.example.org (mail.lists.example.org [192.0.2.7]) "
            "by mx.example.com; Fri, 23 Aug 2002 10:30:00 +0100",
            "List-Id": "<ilug.linux.ie>",
        },
    )
    tokens = set(extract_tokens(raw))
    assert not any(t.isdigit() or t.startswith(("2002", "10", "123")) for t in tokens)
    assert not any("lists.example.org" in t or "ilug" in t or "192.0.2" in t for t in tokens)
    assert not any(t.startswith("rcv:") for t in tokens)  # no relay-path tokens at all


def test_mailing_list_footer_is_cut():
    text = "real content\n_______________________________________________\nILUG mailing list\n"
    assert strip_list_footer(text) == "real content"
    assert strip_list_footer("no footer here\n") == "no footer here\n"


def test_unknown_and_wrong_charsets_fall_back_without_failing():
    assert decode_charset("héllo".encode("latin-1"), "utf-8") == "héllo"
    assert decode_charset(b"plain", "x-no-such-charset") == "plain"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"no headers at all, just text",
        b"Subject: \xff\xfe\xfa broken bytes\r\nFrom: \xe9\xe8 <x@\xff.com>\r\n\r\n\xff\xfe body",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain",
        b"Content-Type: multipart/mixed\r\n\r\nmultipart without a boundary",
        b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64 at all===\r\n",
        b'Content-Type: text/plain; charset="\r\n\r\nempty charset',
        b"Subject: =?bogus?Q?=ZZ?=\r\n\r\nbroken encoded word",
        b"Content-Type: message/rfc822\r\n\r\n" * 50,  # deep nesting
    ],
)
def test_malformed_messages_give_tokens_not_errors(raw):
    tokens = extract_tokens(raw)
    assert isinstance(tokens, list)
    assert all(isinstance(t, str) and t for t in tokens)


def test_huge_message_is_read_only_up_to_the_cap():
    raw = make_message(body="buy now " * 1_000_000)  # ~8 MB
    tokens = set(extract_tokens(raw))
    assert {"buy", "now", "m:=huge"} <= tokens


def test_many_parts_are_capped():
    parts = [("text/plain", f"part {i}".encode(), {}) for i in range(mime.MAX_PARTS + 10)]
    raw = mime_message(parts)
    parsed = parse(raw)
    assert parsed.truncated
    assert 0 < len(parsed.parts) <= mime.MAX_PARTS
    assert "m:=truncated" in extract_tokens(raw)  # the limit is a feature, not a blind spot
