"""Hostile message shapes for growth checks: each builder takes a size ``n`` and returns
a whole CRLF message whose cost should grow linearly with ``n``.

Shared by ``benchmarks/bench_mime.py`` (times the MIME/text layer, bayes feature
extraction and ``mailflow check`` at n and 2n) and the growth tests in
``tests/test_mime_growth.py``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

CRLF = b"\r\n"
HEAD = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hostile\r\n"


def _message(head: bytes, body: bytes = b"body\r\n", ctype: bytes = b"") -> bytes:
    if ctype:
        head += b"MIME-Version: 1.0\r\nContent-Type: " + ctype + CRLF
    return head + CRLF + body


def folded_header(n: int) -> bytes:
    """One header field folded into ``n`` continuation lines (issue 11, finding 1)."""
    return _message(HEAD + b"X-Fold: start\r\n" + b" fold\r\n" * n)


def many_fields(n: int) -> bytes:
    """``n`` short header fields."""
    return _message(HEAD + b"".join(b"X-F%d: v\r\n" % i for i in range(n)))


def long_line(n: int) -> bytes:
    """One unfolded header line of ``n`` bytes (words with no blank between)."""
    return _message(HEAD + b"X-Long: " + b"a" * n + CRLF)


def many_received(n: int) -> bytes:
    """``n`` Received fields (hop tokens, loop counting)."""
    hop = b"Received: from mx%d.example.net (dsl-1-2-3.isp.example [192.0.2.1]) by x; now\r\n"
    return _message(b"".join(hop % i for i in range(n)) + HEAD)


def from_addresses(n: int) -> bytes:
    """A From field with ``n`` addresses, display names included (finding 2)."""
    addrs = b", ".join(b'"User %d" <user%d@host%d.example.com>' % (i, i, i) for i in range(n))
    return _message(b"From: " + addrs + b"\r\nTo: b@example.com\r\nSubject: many\r\n")


def from_bare_addresses(n: int) -> bytes:
    """A From field with ``n`` bare addresses."""
    addrs = b", ".join(b"user%d@host%d.example.com" % (i, i) for i in range(n))
    return _message(b"From: " + addrs + b"\r\nTo: b@example.com\r\nSubject: many\r\n")


def from_no_at(n: int) -> bytes:
    """A From field of ``n`` bytes of word characters with no "@"."""
    return _message(b"From: " + b"a" * n + b"\r\nTo: b@example.com\r\nSubject: x\r\n")


def from_open_quotes(n: int) -> bytes:
    """A From field of ``n`` unbalanced quotes, angle brackets and comments."""
    return _message(b"From: " + b'"<(' * n + b"\r\nTo: b@example.com\r\nSubject: x\r\n")


def encoded_words(n: int) -> bytes:
    """A Subject of ``n`` RFC 2047 encoded words."""
    words = b" ".join(b"=?utf-8?q?w=C3=B6rd%d?=" % i for i in range(n))
    return _message(b"From: a@example.org\r\nTo: b@example.com\r\nSubject: " + words + CRLF)


def broken_encoded_words(n: int) -> bytes:
    """A Subject of ``n`` encoded-word openings that never close."""
    return _message(
        b"From: a@example.org\r\nTo: b@example.com\r\nSubject: " + b"=?utf-8?q?" * n + CRLF
    )


def html_open_tags(n: int) -> bytes:
    """``'<a ' * n`` as a text/html body (finding 2)."""
    return _message(HEAD, b"<a " * n + CRLF, b"text/html; charset=us-ascii")


def html_unclosed_script(n: int) -> bytes:
    """``<script>`` openings with no closing tag, then text."""
    return _message(HEAD, b"<script>x " * n + b"<p>tail</p>\r\n", b"text/html")


def html_unclosed_comment(n: int) -> bytes:
    """``<!--`` openings that never close."""
    return _message(HEAD, b"<!-- x " * n + b"<p>tail</p>\r\n", b"text/html")


def html_entities(n: int) -> bytes:
    """Unterminated character references."""
    return _message(HEAD, b"&amp" * n + b"&#12345678" * (n // 4) + CRLF, b"text/html")


def nested_multiparts(n: int) -> bytes:
    """``n`` multiparts nested in each other (the walk stops at MAX_DEPTH)."""
    head = b"".join(
        b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
        for i in range(n)
    )
    body = head + b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeep\r\n" % n
    return _message(HEAD, body, b'multipart/mixed; boundary="b0"')


def many_parts(n: int) -> bytes:
    """``n`` small parts (the walk stops at MAX_PARTS)."""
    part = b"--b\r\nContent-Type: text/plain\r\n\r\nword%d\r\n"
    body = b"".join(part % i for i in range(n)) + b"--b--\r\n"
    return _message(HEAD, body, b'multipart/mixed; boundary="b"')


def rfc2231_continuations(n: int) -> bytes:
    """A file name in ``n`` RFC 2231 continuations (sections 3 and 4)."""
    pieces = b"".join(b"; filename*%d*=%%41b" % i for i in range(n))
    part = (
        b"--b\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment" + pieces + b"\r\n\r\nAAAA\r\n--b--\r\n"
    )
    return _message(HEAD, part, b'multipart/mixed; boundary="b"')


def many_params(n: int) -> bytes:
    """A Content-Type with ``n`` parameters, half of them quoted with escapes."""
    params = b"".join(b'; p%d="v\\"%d;"; q%d=w' % (i, i, i) for i in range(n))
    return _message(HEAD, b"body\r\n", b"text/plain" + params)


def base64_junk(n: int) -> bytes:
    """A base64 text part of ``n`` lines with junk characters between the groups."""
    line = base64.b64encode(b"spam words here " * 3) + b"!!*\r\n"
    return _message(
        HEAD + b"Content-Transfer-Encoding: base64\r\n", line * n, b"text/plain; charset=utf-8"
    )


def one_word(n: int) -> bytes:
    """A body that is one ``n``-byte word."""
    return _message(HEAD, b"a" * n + CRLF)


def many_urls(n: int) -> bytes:
    """``n`` URLs (and www. names) in plain text."""
    return _message(
        HEAD,
        b"".join(b"http://h%d.example.com/x www.w%d.example.org\r\n" % (i, i) for i in range(n)),
    )


def url_no_host_end(n: int) -> bytes:
    """ "://" followed by ``n`` host characters, and "www." runs with no dot after."""
    return _message(HEAD, b"http://" + b"a" * n + b" www." + b"b-" * n + CRLF)


def eight_bit_headers(n: int) -> bytes:
    """8-bit bytes (invalid UTF-8) in ``n`` header fields, Content-Type included (finding 4)."""
    fields = b"".join(b"X-B%d: caf\xe9 \xff\xfe na\xefve\r\n" % i for i in range(n))
    head = b"From: J\xe9r\xf4me <a@example.org>\r\nTo: b@example.com\r\nSubject: \xe9t\xe9\r\n"
    return _message(head + fields, b"caf\xe9\r\n", b"text/plain; charset=\xff\xfe")


def eight_bit_body(n: int) -> bytes:
    """``n`` lines of Latin-1 text mixed with UTF-8, with no charset declared."""
    line = b"caf\xe9 na\xefve caf\xc3\xa9 \x81\x8d \xff\r\n"
    return _message(HEAD, line * n, b"text/plain")


def money_runs(n: int) -> bytes:
    """Currency signs not followed by digits."""
    return _message(HEAD, b"$ " * n + b"\r\n")


def bare_cr_lf(n: int) -> bytes:
    """Header and body lines ended by bare CR and bare LF."""
    return b"From: a@example.org\rX-A: b\nSubject: x\r\n" + b"X-C: c\r" * n + CRLF + b"x\ry\n" * n


SHAPES: dict[str, tuple[Callable[[int], bytes], int]] = {
    # name: (builder, a size n at which the layer takes some milliseconds)
    "folded_header": (folded_header, 100_000),
    "many_fields": (many_fields, 30_000),
    "long_line": (long_line, 1_000_000),
    "many_received": (many_received, 5_000),
    "from_addresses": (from_addresses, 5_000),
    "from_bare_addresses": (from_bare_addresses, 5_000),
    "from_no_at": (from_no_at, 500_000),
    "from_open_quotes": (from_open_quotes, 50_000),
    "encoded_words": (encoded_words, 20_000),
    "broken_encoded_words": (broken_encoded_words, 50_000),
    "html_open_tags": (html_open_tags, 50_000),
    "html_unclosed_script": (html_unclosed_script, 50_000),
    "html_unclosed_comment": (html_unclosed_comment, 50_000),
    "html_entities": (html_entities, 100_000),
    "nested_multiparts": (nested_multiparts, 5_000),
    "many_parts": (many_parts, 5_000),
    "rfc2231_continuations": (rfc2231_continuations, 10_000),
    "many_params": (many_params, 10_000),
    "base64_junk": (base64_junk, 10_000),
    "one_word": (one_word, 1_000_000),
    "many_urls": (many_urls, 10_000),
    "url_no_host_end": (url_no_host_end, 200_000),
    "eight_bit_headers": (eight_bit_headers, 10_000),
    "eight_bit_body": (eight_bit_body, 20_000),
    "money_runs": (money_runs, 200_000),
    "bare_cr_lf": (bare_cr_lf, 20_000),
}
