"""Property-based fuzzing (hypothesis) of the MIME/text layer and of ``mailflow check`` on
mutated corpus messages: byte flips, truncation, inserted bare CR/LF/NUL/8-bit bytes,
duplicated and deleted boundary lines, huge folds.

Properties: nothing raises; every text the layer returns can be encoded (no lone
surrogate); ``check`` always reaches a verdict and no plugin ran with an error (an
error would be a silent pass under ``on_error: continue``).

Bounded and reproducible: a fixed number of examples, ``derandomize`` (the seed comes
from the test), no example database on disk, no deadline (the shared CI machine).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.sample import message_template
from mailflow import mime
from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.message import Connection, Envelope, MessageContext
from tests.test_mime_hostile import hostile_chain_config

CORPUS = Path(__file__).parent / "messages" / "corpus"
SEED_COUNT = 8  # the smallest messages of each class in the slice, plus the benchmark one
SEEDS = [
    *sorted((CORPUS / "ham").iterdir(), key=lambda p: p.stat().st_size)[:SEED_COUNT],
    *sorted((CORPUS / "spam").iterdir(), key=lambda p: p.stat().st_size)[:SEED_COUNT],
]
INSERTS = [b"\r", b"\n", b"\x00", b"\xff", b"\xe9", b"\xc3", b"\r\n ", b"\r\n\r\n", b"=?", b"<"]
INSERTS += [b"&#", b"--", b'"', b"(", b";", b"*0*=", b"\x1b$B", b"Content-Type: multipart/x\r\n"]
MAX_FOLD_LINES = 5_000
FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def seed_messages() -> list[bytes]:
    raws = [path.read_bytes() for path in SEEDS]
    # The SMTP front end hands over CRLF: fuzz both line-end forms.
    return [message_template()] + raws + [raw.replace(b"\n", b"\r\n") for raw in raws[:4]]


SEED_MESSAGES = seed_messages()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(SEED_MESSAGES)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "boundary", "fold", "8bit"]))
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "flip" and raw:
            raw[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del raw[at:]
        elif kind == "insert":
            raw[at:at] = draw(st.sampled_from(INSERTS))
        elif kind == "boundary":
            lines = bytes(raw).split(b"\n")
            marks = [i for i, line in enumerate(lines) if line.startswith(b"--")]
            if marks:
                i = draw(st.sampled_from(marks))
                if draw(st.booleans()):
                    lines.insert(i, lines[i])  # a duplicated delimiter line
                else:
                    del lines[i]
                raw = bytearray(b"\n".join(lines))
        elif kind == "fold":
            line_end = raw.find(b"\n", 0, max(at, 1))
            where = line_end + 1 if line_end >= 0 else 0
            raw[where:where] = b" x\r\n" * draw(st.integers(1, MAX_FOLD_LINES))
        else:
            raw[at:at] = bytes(draw(st.lists(st.integers(0x80, 0xFF), min_size=1, max_size=8)))
    return bytes(raw)


def _texts(ctx: MessageContext) -> Iterator[str]:
    """Every text the layer gives plugins for one message."""
    fields = ctx.fields
    for name in set(fields.names()):
        yield name
        yield from fields.get_all(name)
        yield ctx.view.header_text(name)
    for name in ("from", "to", "cc", "reply-to"):
        for mailbox in ctx.view.addresses(name):
            yield mailbox.name
            yield mailbox.address
    for name, value in ctx.headers.items():
        yield f"{name}: {value}"
    structure = ctx.mime
    yield structure.body_text()
    for part in structure.parts:
        yield part.content_type
        yield part.disposition
        yield part.charset
        yield part.transfer_encoding
        yield part.path
        yield from part.filenames
        yield from part.params
        yield from part.params.values()
        if not part.opaque and part.size < 1 << 20:
            yield part.text()
            yield part.plain_text()


@FUZZ
@given(raw=mutated())
def test_layer_never_raises_and_gives_encodable_text(raw: bytes):
    ctx = MessageContext(raw, Envelope("a@example.org", ["b@example.com"]), Connection("::1"))
    for text in _texts(ctx):
        assert isinstance(text, str)
        text.encode("utf-8")  # no lone surrogate reaches a plugin
    mime.split_header_fields(ctx.split()[0])
    assert b"".join(mime.split_header_fields(ctx.split()[0])) == ctx.split()[0]
    _ = ctx.message  # the stdlib tree stays reachable (and bounded)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The builtin offline chain, started once, with its own event loop."""
    loop = asyncio.new_event_loop()
    app = App(hostile_chain_config(tmp_path_factory.mktemp("fuzz")))
    loop.run_until_complete(app.startup())
    yield loop, app
    loop.run_until_complete(app.shutdown())
    loop.close()


@settings(FUZZ, max_examples=40)
@given(raw=mutated())
def test_check_always_reaches_a_verdict_without_plugin_errors(chain, raw: bytes):
    loop, app = chain
    ctx = loop.run_until_complete(
        check_message(app, raw, sender="a@example.org", recipients=["b@example.com"])
    )
    assert [f"{r.plugin}: {r.error}" for r in ctx.runs if r.error] == []
    result = report(ctx)
    assert result["action"] in ("accept", "reject", "tempfail", "quarantine", "discard")
    if result["decided_by"] is None and result["action"] == "reject":
        # Refused before the data plugins, as serve refuses it (a NUL, a mail loop).
        assert result["smtp_reply"]["code"] in (550, 554)
        assert not any(run.stage == "data" for run in ctx.runs)
    elif result["decided_by"] is None:  # no plugin decided: every one of them ran
        assert {"bayes", "rules", "authres"} <= set(result["plugins"])
    else:  # a plugin's verdict ended the chain, with its reason
        assert result["reason"]
