"""Doubling the input at most about doubles the time (issue 11, findings 1 and 2, and the
other superlinear spots found with ``benchmarks/bench_mime.py``).

Each test times a step at n and 2n (best of three runs, CPU time) and allows a ratio
of 3 plus a small absolute slack for timer noise on fast steps. Each failed on the
code before the one MIME/text layer (the quadratic steps are named in the test);
sizes are chosen so that a test takes well under a second now.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mailflow_plugins.bayes.features import extract_tokens

from benchmarks import hostile
from mailflow import mime
from mailflow.message import Connection, Envelope, MessageContext
from mailflow.verdict import AddHeader, RemoveHeader
from tests import growth


def assert_linear(fn: Callable[[bytes], object], build: Callable[[int], bytes], n: int) -> None:
    """``fn`` on ``build(2n)`` takes at most about twice its time on ``build(n)``."""
    growth.assert_linear(build, fn, n)


def ctx_for(raw: bytes) -> MessageContext:
    return MessageContext(raw, Envelope("a@example.org", ["b@example.com"]), Connection("::1"))


# --- finding 1: header splitting (was `fields[-1] += line`) --------------------------------


def test_split_header_fields_is_linear_in_continuation_lines():
    def split(raw: bytes) -> None:
        mime.split_header_fields(raw.split(b"\r\n\r\n", 1)[0])

    assert_linear(split, hostile.folded_header, 50_000)


def test_header_mutations_are_linear_in_continuation_lines():
    def mutate(raw: bytes) -> None:
        ctx_for(raw).apply([RemoveHeader("X-Spam-Status"), AddHeader("X-Spam-Status", "No")])

    assert_linear(mutate, hostile.folded_header, 50_000)


def test_header_access_is_linear_in_fields_and_folds():
    def read(raw: bytes) -> None:
        ctx = ctx_for(raw)
        ctx.fields.get_all("x-fold")
        ctx.fields.names()
        _ = ctx.headers

    assert_linear(read, hostile.folded_header, 50_000)
    assert_linear(read, hostile.many_fields, 20_000)


# --- finding 2: the bayes plugin's HTML to text and From parsing ----------------------------


def test_bayes_html_is_linear_in_unclosed_tags():
    """``<[^>]*>`` rescanned the rest of the text from every unclosed "<"."""
    assert_linear(extract_tokens, hostile.html_open_tags, 8_000)


def test_bayes_html_is_linear_in_unclosed_scripts_and_comments():
    """The lazy ``<script.*?</script>`` and ``<!--.*?-->`` scanned to the end each time."""
    assert_linear(extract_tokens, hostile.html_unclosed_script, 2_000)
    assert_linear(extract_tokens, hostile.html_unclosed_comment, 2_000)


def test_shared_html_to_text_is_linear():
    shapes = [
        (hostile.html_open_tags, 100_000),
        (hostile.html_unclosed_script, 20_000),
        (hostile.html_unclosed_comment, 20_000),
        (lambda n: b"<!-- x --><p>" * n + b"<script>", 20_000),
        (lambda n: b"<script><!--" * n + b"</script>", 20_000),
        (lambda n: b"<script>x</script>" * n + b"<style>", 20_000),  # the slow path
        (lambda n: b"<style><p>" + b"<script>x</script><!-- c -->" * n, 20_000),
    ]
    for build, n in shapes:
        assert_linear(lambda raw: mime.html_to_text(raw.decode()), build, n)


def test_bayes_from_is_linear_in_addresses():
    assert_linear(extract_tokens, hostile.from_addresses, 10_000)
    assert_linear(extract_tokens, hostile.from_bare_addresses, 10_000)


def test_bayes_from_without_an_address_is_linear():
    """``[\\w.+-]+@`` tried every start of a long run of word characters."""
    assert_linear(extract_tokens, hostile.from_no_at, 20_000)


def test_bayes_received_hop_with_a_long_reverse_name_is_linear():
    """The dynamic-address pattern ``\\d+[-.]\\d+...`` backtracked over long digit runs."""

    def received(n: int) -> bytes:
        hop = b"Received: from mx.example.net (" + b"1" * n + b" [192.0.2.1]) by x; now\r\n"
        return hop + b"From: a@example.org\r\n\r\nbody\r\n"

    assert_linear(extract_tokens, received, 6_000)


# --- the layer on the other hostile shapes --------------------------------------------------


def test_addresses_are_linear():
    def parse(raw: bytes) -> None:
        mime.parse_addresses(raw.decode("latin-1"), limit=10**9)

    assert_linear(
        parse, lambda n: b", ".join(b'"U %d" <u%d@h.example>' % (i, i) for i in range(n)), 5_000
    )
    assert_linear(parse, lambda n: b'"<(' * n, 20_000)
    assert_linear(parse, lambda n: b"(" * n + b"a@b", 20_000)
    # A display name followed by a long run of blanks (unfolded continuation lines):
    # the one-mailbox fast path had a lazy name that rescanned the blanks per length.
    assert_linear(parse, lambda n: b"a" + b" \t" * n + b" x@example.org", 20_000)


def test_made_up_charset_labels_cost_a_bounded_lookup_and_no_memory():
    """Each unknown label went to codecs.lookup, whose standard-library cache keeps
    every miss forever; labels no codec has are now ruled out before that."""
    import encodings

    before = len(encodings._cache)  # type: ignore[attr-defined]
    words = " ".join(f"=?x-made-up-{i}?q?a?=" for i in range(3000))
    assert mime.decode_words(words) == "a" * 3000
    assert len(encodings._cache) == before  # type: ignore[attr-defined]
    assert_linear(
        lambda raw: mime.decode_words(raw.decode()),
        lambda n: b" ".join(b"=?y%d?q?a?=" % i for i in range(n)),
        3_000,
    )


def test_encoded_words_and_parameters_are_linear():
    assert_linear(
        lambda raw: mime.decode_words(raw.decode()), lambda n: b"=?utf-8?q?w=C3=B6?= " * n, 10_000
    )
    assert_linear(lambda raw: mime.decode_words(raw.decode()), lambda n: b"=?utf-8?q?" * n, 20_000)
    assert_linear(
        lambda raw: mime.parse(raw).parts[0].filenames, hostile.rfc2231_continuations, 5_000
    )
    assert_linear(lambda raw: mime.parse(raw).parts[0].params, hostile.many_params, 5_000)


def test_walk_is_linear_in_parts_and_nesting():
    def walk(raw: bytes) -> None:
        mime.parse(raw).body_text()

    assert_linear(walk, hostile.many_parts, 500)
    assert_linear(walk, hostile.nested_multiparts, 2_000)


def _nested_encoded_messages(depth: int, body: bytes) -> bytes:
    """message/rfc822 parts sent quoted-printable, one inside the other: each decodes
    to about its own size (no "=" in the text)."""
    raw = b"Subject: inner\r\n\r\n" + body
    for _ in range(depth):
        raw = (
            b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: quoted-printable"
            b"\r\n\r\n" + raw
        )
    return b"Subject: outer\r\n" + raw


def test_nested_encoded_messages_decode_at_most_one_message_size():
    """Every level's decoded copy stayed alive through the walk (29 copies of a 25 MB
    message would be 750 MB); past one message size of decoding the rest is opaque."""
    import tracemalloc

    raw = _nested_encoded_messages(25, b"plain text line\r\n" * 20_000)  # ~340 KB
    tracemalloc.start()
    try:
        structure = mime.parse(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert structure.truncated and structure.parts[-1].opaque
    assert peak < 4 * len(raw)  # before: a decoded copy per level, 25 here
    shallow = mime.parse(_nested_encoded_messages(1, b"text\r\n"))
    assert not shallow.truncated and shallow.parts[0].text() == "text\r\n"


def test_undeclared_8bit_text_is_linear():
    assert_linear(lambda raw: mime.decode_charset(raw, ""), hostile.eight_bit_body, 20_000)
    sparse = lambda n: "é".encode() + b"caf\xe9 plain ascii words here and there\r\n" * n  # noqa: E731
    assert_linear(lambda raw: mime.decode_charset(raw, ""), sparse, 5_000)


def test_check_is_linear_on_a_folded_header(tmp_path):
    """The whole chain (header mutations by bayes and authres included): 14.7 s at
    300,000 continuation lines before, quadratic."""
    from mailflow.app import App
    from mailflow.check import check_message
    from tests.test_mime_hostile import hostile_chain_config

    async def run() -> tuple[float, float]:
        app = App(hostile_chain_config(tmp_path))
        await app.startup()
        try:

            async def one(raw: bytes) -> float:
                start = time.process_time()
                ctx = await check_message(
                    app, raw, sender="a@example.org", recipients=["b@example.com"]
                )
                assert not [r for r in ctx.runs if r.error]
                return time.process_time() - start

            small, large = hostile.folded_header(20_000), hostile.folded_header(40_000)
            await one(small)
            measurements = []
            for _ in range(growth.ATTEMPTS):  # the same retries as growth.check_growth
                a = min([await one(small) for _ in range(growth.REPEAT)])
                b = min([await one(large) for _ in range(growth.REPEAT)])
                measurements.append((a, b))
                if b < growth.MAX_RATIO * a + growth.SLACK:
                    break
            return measurements
        finally:
            await app.shutdown()

    measurements = iter(asyncio.run(run()))
    growth.check_growth(lambda: next(measurements), "(folded header through check) ")
