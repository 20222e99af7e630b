"""Hostile input that made the message path raise (issue 11): each case failed before the
one MIME/text layer, and now gives a result with no plugin error."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_mime import CHAIN, REPO
from benchmarks.hostile import SHAPES, eight_bit_headers, from_open_quotes
from mailflow import mime
from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.config import Config, load_config
from mailflow.testing import make_message
from tests.test_bayes_plugin import SPAM_TEXT

MULTIPART = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n%s\r\n\r\nx\r\n--b--\r\n'


async def _check(raw: bytes, config=None) -> dict:
    app = App(config or load_config(None))
    await app.startup()
    try:
        return report(await check_message(app, raw))
    finally:
        await app.shutdown()


def _errors(result: dict) -> dict[str, str]:
    return {name: run["error"] for name, run in result["plugins"].items() if "error" in run}


# --- finding 4: one 8-bit byte in Content-Type must not turn spam into "clean" -------------


@pytest.mark.parametrize(
    "content_type",
    [
        b'text/plain; charset="\xff"',
        b"text/plain; charset=utf-8\xe9",
        b"text/pl\xe9in; charset=us-ascii",
        b'text/plain; charset=us-ascii; format="fl\xe9wed"',
        b"text/plain; charset=us-ascii (caf\xe9)",
    ],
)
async def test_8bit_byte_in_content_type_still_scores_as_spam(content_type: bytes):
    clean = make_message(subject="FREE money!!!", body=SPAM_TEXT)
    ours = b"Content-Type: text/plain; charset=utf-8\r\n"
    assert clean.count(ours) == 1
    dirty = clean.replace(ours, b"Content-Type: " + content_type + b"\r\n")
    before, after = await _check(clean), await _check(dirty)
    assert _errors(after) == {}  # the embedded default: on_error continue would hide it
    assert before["plugins"]["bayes"]["probability"] > 0.9
    assert after["plugins"]["bayes"]["probability"] > 0.9
    assert abs(after["score"] - before["score"]) < 1.0
    status = dict(after["headers_added"])["X-Spam-Status"]
    assert status.startswith("Yes")


# --- bytes and numbers no parser may choke on --------------------------------------------


@pytest.mark.parametrize(
    "part",
    [
        # RFC 2231 section number of 5,000 digits: int() refuses more than 4,300
        b"Content-Disposition: attachment; filename*" + b"9" * 5000 + b"*=x.exe",
        # a raw 8-bit byte in an RFC 2231 encoded value: urllib's unquote encodes as UTF-8
        b"Content-Disposition: attachment; filename*=utf-8''caf\xe9.exe",
        # a numeric character reference of 5,000 digits: html.unescape raised ValueError
        b"Content-Type: text/html\r\n\r\n<p>&#" + b"1" * 5000 + b";</p>&#x" + b"f" * 5000,
        b"Content-Type: text/html\r\n\r\n&#" + b"0" * 6000 + b"65;",
    ],
)
def test_parts_that_made_the_layer_raise(part: bytes):
    structure = mime.parse(MULTIPART % part)
    text = structure.body_text()
    text.encode()
    for found in structure.parts:
        for name in found.filenames:
            name.encode()


def test_rfc2231_names_with_8bit_bytes_are_decoded():
    [part] = mime.parse(
        MULTIPART % b"Content-Disposition: attachment; filename*=utf-8''caf\xe9.exe"
    ).parts
    assert part.filename == "café.exe"
    [part] = mime.parse(
        MULTIPART % b"Content-Disposition: attachment; filename*0*=utf-8''a%41; filename*1=b.exe"
    ).parts
    assert part.filename == "aAb.exe"


def test_long_character_references_unescape_like_the_stdlib():
    assert mime.html_to_text("&#" + "0" * 20 + "65;") == "A"
    assert mime.html_to_text("&#x" + "0" * 20 + "41") == "A"
    assert mime.html_to_text("&#" + "9" * 20 + ";x") == "\ufffdx"
    assert mime.html_to_text("&#65;&#x42;&amp;") == "AB&"


async def test_unbalanced_comments_in_from_do_not_crash_dmarc():
    """getaddresses recursed once per "(": RecursionError in the DMARC plugin."""
    config = load_config(None)
    result = await _check(from_open_quotes(3000), config)
    assert _errors(result) == {}


def test_dmarc_reads_at_most_max_addresses():
    from mailflow_plugins.dmarc.record import author_domains

    many = ", ".join(f"u{i}@d{i}.example" for i in range(mime.MAX_ADDRESSES + 5))
    domains, problem = author_domains([many])
    assert domains == [] and f"more than {mime.MAX_ADDRESSES} addresses" in problem
    few = ", ".join(f"u{i}@d{i % 3}.example" for i in range(500))
    assert author_domains([few]) == (["d0.example", "d1.example", "d2.example"], "")


# --- every hostile shape through the whole chain: a verdict, no plugin error ---------------


def hostile_chain_config(tmp: Path) -> Config:
    """The builtin chain that works offline, as ``benchmarks/bench_mime.py`` runs it:
    dkim, arc, dmarc, bayes, rules (rules/content-policy.yaml), authres; DNS goes
    to a closed local port."""
    plugins: list[dict] = []
    for name in CHAIN:
        entry: dict = {"name": name}
        if name == "rules":
            entry["settings"] = {"files": [str(REPO / "rules" / "content-policy.yaml")]}
        plugins.append(entry)
    return Config.model_validate(
        {
            "local_domains": ["example.com"],
            "queue": {"directory": str(tmp / "spool")},
            "delivery": {"maildir": {"root": str(tmp / "mail")}},
            "dns": {"nameservers": ["127.0.0.1"], "port": 9, "timeout": 0.2},
            "plugins": plugins,
        }
    )


async def test_every_hostile_shape_gets_a_verdict_without_plugin_errors(tmp_path):
    app = App(hostile_chain_config(tmp_path))
    await app.startup()
    try:
        for name, (build, size) in SHAPES.items():
            raw = build(max(1, size // 50))
            ctx = await check_message(
                app, raw, sender="a@example.org", recipients=["b@example.com"]
            )
            assert [r.plugin for r in ctx.runs if r.error] == [], name
            assert report(ctx)["action"] in ("accept", "reject", "quarantine", "tempfail")
    finally:
        await app.shutdown()


def test_8bit_headers_read_as_text_everywhere():
    from mailflow.message import Connection, Envelope, MessageContext

    ctx = MessageContext(eight_bit_headers(3), Envelope("a@x", ["b@y"]), Connection("::1"))
    assert ctx.header("From") == "Jérôme <a@example.org>"
    assert ctx.fields.get_all("x-b0") == ["café ÿþ naïve"]
    for name, value in ctx.headers.items():
        (name + str(value)).encode()
    assert ctx.mime.parts[0].charset == "ÿþ"
    assert ctx.mime.body_text() == "café\r\n"
