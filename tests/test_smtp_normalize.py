"""Unit tests for mailflow.normalize (line endings; the SMTP smuggling defence)."""

from __future__ import annotations

import pytest

from mailflow.normalize import BareNewlineError, has_bare_newline, normalize_newlines

SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb"),  # CR CR LF: the first CR is bare
        (b"a\n\r\nb", b"a\r\n\r\nb"),
        (b"a\n\rb", b"a\r\n\r\nb"),  # LF then CR: two bare ones, not one CRLF
        (b"", b""),
        (b"\n", b"\r\n"),
        (b"\r", b"\r\n"),
    ],
)
def test_normalize_turns_every_bare_cr_or_lf_into_crlf(raw, expected):
    assert normalize_newlines(raw) == expected
    assert not has_bare_newline(normalize_newlines(raw))


@pytest.mark.parametrize("payload", SMUGGLING)
def test_smuggling_sequences_are_normalized_or_refused(payload):
    raw = b"Subject: x\r\n\r\nbody" + payload + b"MAIL FROM:<e@evil.test>\r\n"
    assert has_bare_newline(raw)
    fixed = normalize_newlines(raw)
    assert not has_bare_newline(fixed)
    # Nothing is lost: only line endings change.
    assert fixed.replace(b"\r\n", b"") == raw.replace(b"\r\n", b"").replace(b"\r", b"").replace(
        b"\n", b""
    )
    with pytest.raises(BareNewlineError):
        normalize_newlines(raw, "reject")


def test_clean_data_is_returned_unchanged_in_both_modes():
    raw = b"Subject: x\r\n\r\n\xe9t\xe9 8-bit \xff\r\n.\r\n"
    assert normalize_newlines(raw) is raw
    assert normalize_newlines(raw, "reject") is raw
