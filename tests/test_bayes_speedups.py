"""The fast paths of feature extraction and scoring give what the plain code gives."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
from mailflow_plugins.bayes import features
from mailflow_plugins.bayes.features import Hasher, _words
from mailflow_plugins.bayes.model import Model
from sklearn.utils import murmurhash3_32

from mailflow import mime
from mailflow.mime import HeaderBlock, parse
from tests.bayes_support import corpus_files, mime_message

_HEADER_NAMES = ("subject", "from", "received", "a", "x", "to", "content-type", "b")


def _header_views(raw: bytes) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """A header block read per name with bytes.find (the fast path) and with the
    field regex over the whole block (the general path)."""
    fast, general = HeaderBlock(raw), HeaderBlock(raw)
    general._plain = False  # force the general path
    return (
        {name: fast.raw_values(name) for name in _HEADER_NAMES},
        {name: general.raw_values(name) for name in _HEADER_NAMES},
    )


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii words, x1 ab c3po 1999abc a_b_c " + "z" * 60 + "9" + "y" * 30,
        "unicode: café ÉTÉ straße ǅungla ½half ²sq x٣y ab_cd " + "é" * 40,
        "latin-1 only: café ÉTÉ straße ½half ²sq µm ªb º1 ab_cd ÿÿ\xd7\xf7 " + "ß" * 30,
        "",
        "a b c 12 __ --",
    ],
)
def test_word_fast_path_matches_the_unicode_pattern(text):
    lowered = text.lower()
    assert _words(lowered) == features._WORD.findall(lowered)


@pytest.mark.parametrize(
    "block",
    [
        b"Subject: a\r\n b\r\n\tc\r\nFrom: x@y\r\n",
        b"a: b\r\n\tc\r\nd: e\r\n \r\n\t\tf\n\r\n g",
        b"a:b\n c\nx: y\r\n\r\n",
        b"From someone  Mon Jan 1\nX-A\t: tab\n : empty\nA B: no\n\x85Foo: bar",
        b"a: \r\n\r\n b\na:b\r\n\r\n\tc: d\n\n",
        b"",
        b":",
    ],
)
def test_header_fast_path_matches_the_field_regex(block):
    fast, general = _header_views(block)
    assert fast == general


def test_header_paths_match_on_the_corpus_slice():
    for label in ("ham", "spam"):
        for path in corpus_files(label):
            raw = path.read_bytes()
            fast, general = _header_views(raw)
            assert fast == general, path
            crlf = raw.replace(b"\n", b"\r\n")
            fast_crlf, general_crlf = _header_views(crlf)
            assert fast_crlf == general_crlf, path


def test_hasher_columns_with_and_without_cache_misses():
    hasher = Hasher(n_features=2**10)
    tokens = ["a", "b", "s:c", "a", "ünï"]
    # Body words in the lower half of the columns, prefixed tokens in the upper half.
    expected = [
        (murmurhash3_32(t, 0, positive=True) & (2**9 - 1)) + (2**9 if ":" in t else 0)
        for t in tokens
    ]
    assert hasher.columns(tokens) == expected  # all misses
    assert hasher.columns(tokens) == expected  # all cached
    zz = murmurhash3_32("zz", 0, positive=True) & (2**9 - 1)
    assert hasher.columns(iter(["zz", *tokens])) == [zz, *expected]  # one miss, an iterator


def test_score_counts_a_repeated_column_once():
    rng = np.random.default_rng(0)
    model = Model(rng.normal(size=64).astype(np.float32), bias=0.1, scale=1.5, n_features=64)
    for _ in range(50):
        columns = rng.integers(0, 64, size=int(rng.integers(0, 30)))  # repeats likely
        tokens = [f"t{c}" for c in columns]
        log_odds, _ = model.score(tokens, columns, 5)  # repeats count once
        assert log_odds == pytest.approx(model.log_odds(np.unique(columns)), abs=1e-9)


def test_column_array_matches_columns():
    hasher = Hasher()
    tokens = ["x", "y", "s:z"]
    assert hasher.column_array(tokens).tolist() == Hasher().columns(tokens)  # misses
    assert hasher.column_array(tokens).tolist() == Hasher().columns(tokens)  # cached


def test_hash_cache_stays_bounded_and_correct_under_threads(monkeypatch):
    import threading

    monkeypatch.setattr(features, "_HASH_CACHE_MAX", 50)
    hasher = Hasher(n_features=2**12)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(300):
                tokens = [f"t{k}-{i}-{j}" for j in range(20)] + ["shared", "s:common"]
                expected = [
                    (murmurhash3_32(t, 0, positive=True) & (2**11 - 1)) + (2**11 if ":" in t else 0)
                    for t in tokens
                ]
                assert hasher.columns(tokens) == expected
                assert hasher.column_array(tokens).tolist() == expected
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(hasher._cache) <= 50 + 4 * 22


def _reference_split_fields(head: bytes) -> list[bytes]:
    """The original field splitter (quadratic: ``fields[-1] += line``)."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def test_header_paths_and_field_splitting_agree_on_random_blocks():
    """Random mixes of CR, LF, CRLF, folds and other line breaks: the per-name fast path
    (taken for blocks without a bare CR) and the field regex give the same values, and
    the linear field splitter gives what the original one gave, losing no byte; the
    block unfolded once reads as each value unfolded."""
    rng = random.Random(1)
    pieces = [b"\r", b"\n", b"\r\n", b" ", b"\t", b"a", b"B", b":", b"\x0b", b"\xc2\x85"]
    pieces += [b"\x1c", b"x: y", b"\r\n ", b"\n\t", b"\r\r\n", b" To :", b"From ", b"\xff"]
    blocks = [
        b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 14))) for _ in range(10_000)
    ]
    for block in blocks:
        fast, general = _header_views(block.replace(b"\r", b""))  # no bare CR: both paths
        assert fast == general, block
        head = HeaderBlock(block)
        unfolded = {k: [mime.unfold(v).lstrip(" \t") for v in vs] for k, vs in head.index().items()}
        assert HeaderBlock(block).unfolded_index() == unfolded, block
        split = mime.split_header_fields(block)
        assert split == _reference_split_fields(block), block
        assert b"".join(split) == block


@pytest.mark.parametrize(
    "markup",
    [
        "<HTML><Body><P>x</p>",
        "< table ><TD>",
        "<\u212aBD>kelvin</\u212abd><İmg>",
        "<é><a1b2c3d4e5f6>",
    ],
)
def test_element_names_match_the_plain_pattern(markup):
    expected = {t.lower() for t in re.findall(r"<\s*([a-zA-Z][a-zA-Z0-9]{0,9})", markup)}
    assert mime.element_names(markup) == expected


def test_cached_header_tokens_equal_uncached_ones():
    subjects = ["FREE $$$ money!!!", "=?utf-8?b?w6lsw6k=?= ete", "[ILUG] list tag", "", "x" * 300]
    senders = ['"Bob 123" <bob123@Mail.Example.COM>', "nobody", "=?utf-8?q?J=C3=BCrgen?= <j@x.de>"]
    for _ in range(2):  # the second round comes from the caches
        for value in subjects:
            cached = features._cached(features._subject_tokens, value)
            assert cached == features._subject_tokens.__wrapped__(value)
        for value in senders:
            cached = features._cached(features._sender_tokens, value)
            assert cached == features._sender_tokens.__wrapped__(value)
    assert features._cached(features._mailer_tokens, "Microsoft Outlook 6.0") == ("xm:microsoft",)


def test_parts_sharing_a_header_block_parse_alike():
    parts = [
        ("text/plain; charset=us-ascii", b"first body", {}),
        ("application/pdf; name=a.pdf", b"JVBERi0=", {"Content-Disposition": "attachment"}),
        ("text/plain; charset=us-ascii", b"second body", {}),
    ]
    one, two = parse(mime_message(parts)), parse(mime_message(parts[::-1]))
    for parsed in (one, two):  # the part order is symmetric: the same lists
        types = [p.content_type for p in parsed.parts]
        assert types == ["text/plain", "application/pdf", "text/plain"]
        assert [p.filename for p in parsed.parts] == ["", "a.pdf", ""]
    assert one.parts[0].text() == "first body" and two.parts[0].text() == "second body"


def test_body_words_from_runs_equal_the_regex_words(monkeypatch):
    """_add_words (distinct runs, a set of runs known to be words) finds what the regex
    finds: cold, warm, and while the bounded set of known words keeps starting over."""
    rng = random.Random(2)
    alphabet = "ab9_ é²ª\xa0\x85-0zßK\u0130ǅ\u212a٣ab   "
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90))) for _ in range(3000)]
    texts += [
        "plain ascii words, x1 ab c3po 1999abc a_b_c " + "z" * 60 + "9" + "y" * 30,
        "latin-1 only: café ÉTÉ straße ½half ²sq µm ªb º1 ab_cd ÿÿ\xd7\xf7 " + "ß" * 30,
        "unicode: Привет café x٣y " + "é" * 40,
    ]
    texts += [path.read_bytes().decode("latin-1") for path in corpus_files("ham")[:40]]
    for max_known in (100_000, 50):
        monkeypatch.setattr(features, "_KNOWN_WORDS", set())
        monkeypatch.setattr(features, "_KNOWN_WORDS_MAX", max_known)
        for _ in range(2):
            for text in texts:
                lowered = text.lower()
                out: set[str] = set()
                features._add_words(lowered, out)
                assert out == set(_words(lowered)), lowered
        assert all(_words(w) == [w] for w in features._KNOWN_WORDS)
        assert len(features._KNOWN_WORDS) <= max_known + 200


def _reference_url_tokens(lowered: str) -> set[str]:
    """The plain URL scan: substring tests, then each pattern over the whole text."""
    out: set[str] = set()
    if "://" in lowered:
        for m in re.finditer(r"://([^/\s\"'<>?#\\]+)", lowered):
            if lowered[max(0, m.start() - 5) : m.start()].endswith(("http", "https", "ftp")):
                out.update(features._domain_tokens(m.group(1), "u:"))
    if "www." in lowered:
        for m in re.finditer(r"www\.([a-z0-9-]+(?:\.[a-z0-9-]+)+)", lowered):
            out.update(features._domain_tokens("www." + m.group(1), "u:"))
    return out


def test_url_tokens_match_the_plain_scan():
    """The memchr pre-check (first ":") changes what is scanned, not what is found."""
    rng = random.Random(3)
    pieces = [
        "http://a.example.com/x",
        "https://b.example.org",
        "ftp://c.net",
        "xhttp://d.io",
        "://e.com",
        ":",
        "www.f.co.uk",
        "www.",
        "wwww.g.com",
        "<p>",
        "&amp;",
        " ",
        "word",
        "é",
        "tél:",
        "mailto:x@y.z",
    ]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    texts += [path.read_bytes().decode("latin-1") for path in corpus_files("spam")[:40]]
    for text in texts:
        lowered = text.lower()
        out: set[str] = set()
        features._url_tokens(lowered, out)
        assert out == _reference_url_tokens(lowered), lowered


def test_hasher_hashes_misses_inside_one_lookup_pass():
    hasher = Hasher(n_features=2**10)
    tokens = ["new", "b", "new", "ünï", "s:c"]
    # Body words in the lower half of the columns, prefixed tokens in the upper half.
    expected = [
        (murmurhash3_32(t, 0, positive=True) & (2**9 - 1)) + (2**9 if ":" in t else 0)
        for t in tokens
    ]
    hasher.columns(["b"])
    assert hasher.column_array(tokens).tolist() == expected  # hits and misses mixed
    assert hasher.column_array(tokens).tolist() == expected  # all cached
    assert set(hasher._cache) == set(tokens)
