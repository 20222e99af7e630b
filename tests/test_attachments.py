"""The attachments plugin through `serve` on loopback, and its rule conditions.

Real server (``running_server``), real SMTP client (``send``); attachments, archives
and bombs are built in memory by tests/attachment_support.py.
"""

from __future__ import annotations

import base64
import bz2
import email
import email.policy
import gzip
import io
import json
import lzma
import struct
import textwrap
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from mailflow_plugins.attachments.archive import Budget, Limits, inspect

from mailflow import mime
from mailflow.api import Result, Symbol, hookimpl
from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.testing import running_server, send
from tests.attachment_support import (
    ELF,
    PDF,
    PE,
    PNG,
    encrypted_zip,
    message,
    nested_zip,
    patched_zip,
    tar_of,
    zip_bomb,
    zip_of,
)

RCPT = "bob@example.org"


def _config(make_config: Any, settings: str = "", rules: Path | None = None) -> Any:
    plugins = "  - name: attachments\n"
    if settings:
        plugins += "    settings:\n" + textwrap.indent(textwrap.dedent(settings), "      ")
    if rules is not None:
        plugins += f"  - name: rules\n    settings: {{files: [{rules}]}}\n"
    return make_config(f"local_domains: [example.org]\nplugins:\n{plugins}")


def quarantined(srv: Any) -> list[dict[str, Any]]:
    directory = srv.app.config.quarantine.directory
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


async def _refused(srv: Any, raw: bytes) -> aiosmtplib.SMTPDataError:
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await send(srv.port, "alice@example.net", [RCPT], raw)
    return info.value


async def _check(config: Any, raw: bytes) -> dict[str, Any]:
    app = App(config)
    await app.startup()
    try:
        return report(await check_message(app, raw, sender="a@example.net", recipients=[RCPT]))
    finally:
        await app.shutdown()


# --- detection in the MIME layer ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "name", "kind"),
    [
        (PE, "invoice.pdf", "executable"),
        (ELF, "", "executable"),
        (b"\xcf\xfa\xed\xfe" + b"\x00" * 28, "", "executable"),
        (
            b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
            + b"\x84\x10\x0c\x00"
            + b"\x00" * 4
            + b"\xc0"
            + b"\x00" * 6
            + b"\x46",
            "setup.msi",
            "executable",
        ),
        (b"L\x00\x00\x00\x01\x14\x02\x00" + b"\x00" * 60, "a.lnk", "shortcut"),
        (b"\x00" * 0x8001 + b"CD001" + b"\x00" * 100, "x.iso", "disk-image"),
        (b"var x = new ActiveXObject('WScript.Shell');", "a.js", "script"),
        (b"<html><hta:application id=x>", "a.hta", "script"),
        (b"#!/bin/sh\necho hi\n", "", "script"),
        (PDF, "a.pdf", "pdf"),
        (PNG, "a.png", "image"),
        (zip_of(("a.txt", b"x")), "a.zip", "archive"),
        (b"plain words", "notes.txt", "text"),
    ],
)
def test_detect_kinds(data: bytes, name: str, kind: str) -> None:
    assert mime.detect(data, name).kind == kind


def test_detect_office_macros() -> None:
    vba = "_VBA_PROJECT".encode("utf-16-le")
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100 + vba
    assert mime.detect(ole).labels == ("office", "application/x-ole-storage", "office-macro")
    docm = zip_of(("[Content_Types].xml", b"<Types/>"), ("word/vbaProject.bin", b"\x00" * 10))
    assert mime.detect(docm).macros
    docx = zip_of(("[Content_Types].xml", b"<Types/>"), ("word/document.xml", b"<w/>"))
    assert mime.detect(docx) == mime.FileType(
        "application/vnd.openxmlformats-officedocument", "office"
    )


# --- through serve ------------------------------------------------------------------------


async def test_exe_renamed_pdf_is_rejected(make_config: Any) -> None:
    async with running_server(_config(make_config)) as srv:
        err = await _refused(srv, message(("invoice.pdf", PE, "application/pdf")))
        assert err.code == 550
        assert "invoice.pdf: executable" in err.message
        await send(
            srv.port, "alice@example.net", [RCPT], message(("a.pdf", PDF, "application/pdf"))
        )
        [delivered] = await srv.wait_delivered(RCPT)
        assert b"a.pdf" in delivered
        assert srv.delivered(RCPT) == [delivered]  # the exe was never delivered


async def test_exe_inside_zip_inside_zip_is_rejected(make_config: Any) -> None:
    inner = nested_zip(2, ("setup.exe", PE))
    async with running_server(_config(make_config)) as srv:
        err = await _refused(srv, message(("docs.zip", inner, "application/zip")))
        assert "docs.zip/level0.zip/setup.exe" in err.message
        tgz = tar_of(("bin/tool", ELF))
        err = await _refused(srv, message(("logs.tar.gz", tgz, "application/gzip")))
        assert "logs.tar.gz/logs.tar/bin/tool" in err.message


async def test_check_json_shows_each_attachment(make_config: Any) -> None:
    raw = message(
        ("invoice.pdf", PE, "application/pdf"),
        ("photo.png", PNG, "image/png"),
        ("a.zip", zip_of(("x/readme.txt", b"hello")), "application/zip"),
    )
    out = await _check(_config(make_config), raw)
    details = out["plugins"]["attachments"]
    first, second, third = details["attachments"]
    assert first == {
        "name": "invoice.pdf",
        "declared_type": "application/pdf",
        "real_type": "executable",
        "real_mime": "application/x-dosexec",
        "size": len(PE),
    }
    assert (second["real_type"], third["real_type"]) == ("image", "archive")
    assert third["members"] == [
        {"path": "a.zip/x/readme.txt", "real_type": "text", "real_mime": "text/plain"}
    ]
    names = {s["name"] for s in details["symbols"]}
    assert names == {"ATTACHMENT_EXECUTABLE", "ATTACHMENT_TYPE_MISMATCH"}
    assert out["action"] == "reject"


async def test_names_double_extension_and_rtlo(make_config: Any) -> None:
    config = _config(make_config, "actions: {ATTACHMENT_EXECUTABLE: score}\n")
    out = await _check(config, message(("invoice.pdf.exe", PE, "application/octet-stream")))
    names = {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
    assert "ATTACHMENT_DOUBLE_EXTENSION" in names
    out = await _check(config, message(("invoice.pdf     .exe", PE, "application/pdf")))
    assert "ATTACHMENT_DOUBLE_EXTENSION" in {
        s["name"] for s in out["plugins"]["attachments"]["symbols"]
    }
    rtlo = message(("report\u202efdp.exe", PDF, "application/pdf"))
    out = await _check(config, rtlo)
    syms = out["plugins"]["attachments"]["symbols"]
    assert "ATTACHMENT_RTLO" in {s["name"] for s in syms}
    assert out["action"] == "reject"
    assert "\\u202e" in out["smtp_reply"]["text"]  # shown escaped, never raw


async def test_zip_bomb_is_flagged_within_bounds(make_config: Any) -> None:
    bomb = zip_bomb(layers=3, width=16, size=8 << 20)  # 16^3 x 8 MiB = 32 GiB inside
    assert len(bomb) < 64 * 1024
    async with running_server(_config(make_config)) as srv:
        err = await _refused(srv, message(("files.zip", bomb, "application/zip")))
        assert "max_ratio" in err.message
    # The counters: what was read stays within the limits, whatever the bomb holds.
    limits = "archives: {max_ratio: 100000, max_expanded: 4MiB}\n"
    tracemalloc.start()
    try:
        out = await _check(
            _config(make_config, limits), message(("f.zip", bomb, "application/zip"))
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    archives = out["plugins"]["attachments"]["archives"]
    assert archives["expanded_bytes"] <= 4 * 1024 * 1024 + 64 * 1024
    assert archives["limits_hit"] and archives["limits_hit"][0].startswith("max_expanded")
    assert peak < 64 * 1024 * 1024
    assert out["action"] == "reject"


async def test_hostile_archives_give_a_symbol(make_config: Any) -> None:
    config = _config(make_config)
    good = zip_of(("a.txt", b"hello"), ("b.txt", b"world"))
    broken_directory = good.replace(b"PK\x01\x02", b"PK\x01\x09")
    out = await _check(config, message(("a.zip", broken_directory, "application/zip")))
    assert "ARCHIVE_MALFORMED" in {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
    truncated = good[: len(good) // 2]
    out = await _check(config, message(("t.zip", truncated, "application/zip")))
    assert "ARCHIVE_MALFORMED" in {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
    many = zip_of(*((f"f{i}.txt", b"") for i in range(3000)))
    out = await _check(config, message(("many.zip", many, "application/zip")))
    attach = out["plugins"]["attachments"]
    assert "ARCHIVE_BOMB" in {s["name"] for s in attach["symbols"]}
    assert attach["archives"]["members"] == 0  # refused from the end record, unread
    assert "max_members 1000" in attach["archives"]["limits_hit"][0]
    deep = nested_zip(12, ("a.txt", b"x"))
    out = await _check(config, message(("deep.zip", deep, "application/zip")))
    attach = out["plugins"]["attachments"]
    assert attach["archives"]["max_depth"] == 4
    assert "max_depth 4" in attach["archives"]["limits_hit"][0]
    garbage = b"\x1f\x8b" + b"\xff" * 500
    out = await _check(config, message(("x.gz", garbage, "application/gzip")))
    assert "ARCHIVE_MALFORMED" in {s["name"] for s in out["plugins"]["attachments"]["symbols"]}


@pytest.mark.parametrize(
    ("policy", "action"), [("allow", "accept"), ("quarantine", "quarantine"), ("reject", "reject")]
)
async def test_encrypted_zip_policy(make_config: Any, policy: str, action: str) -> None:
    raw = message(("secret.zip", encrypted_zip("a.pdf", PDF), "application/zip"))
    out = await _check(_config(make_config, f"encrypted: {policy}\n"), raw)
    assert out["action"] == action
    assert "ARCHIVE_ENCRYPTED" in {s["name"] for s in out["plugins"]["attachments"]["symbols"]}


async def test_encrypted_zip_quarantined_through_serve(make_config: Any) -> None:
    raw = message(("secret.zip", encrypted_zip("a.pdf", PDF), "application/zip"))
    async with running_server(_config(make_config)) as srv:
        await send(srv.port, "alice@example.net", [RCPT], raw)
        [held] = quarantined(srv)
        assert "encrypted" in held["reason"]
        assert srv.delivered(RCPT) == []


async def test_strip_keeps_a_valid_structure(make_config: Any) -> None:
    settings = "actions: {ATTACHMENT_EXECUTABLE: strip, ATTACHMENT_TYPE_MISMATCH: score}\n"
    raw = message(
        ("invoice.pdf", PE, "application/pdf"),
        ("photo.png", PNG, "image/png"),
        text="Hello Bob,\nthe files.\n",
    )
    before = mime.parse(raw)
    async with running_server(_config(make_config, settings)) as srv:
        await send(srv.port, "alice@example.net", [RCPT], raw)
        [delivered] = await srv.wait_delivered(RCPT)
    after = mime.parse(delivered)
    assert not after.truncated
    assert [p.content_type for p in after.parts] == ["text/plain", "text/plain", "image/png"]
    note = after.parts[1]
    assert not note.is_attachment
    assert "'invoice.pdf' (application/x-dosexec) was removed" in note.text()
    # The other parts are byte for byte what was sent.
    assert after.parts[0].raw() == before.parts[0].raw()
    assert after.parts[2].raw() == before.parts[2].raw()
    assert after.parts[2].payload() == PNG
    # The stdlib reads it as a valid multipart too.
    parsed = email.message_from_bytes(delivered, policy=email.policy.default)
    assert parsed.is_multipart() and not parsed.defects
    assert [p.get_content_type() for p in parsed.iter_parts()] == [
        "text/plain",
        "text/plain",
        "image/png",
    ]


async def test_strip_falls_back_to_quarantine_for_a_single_part(make_config: Any) -> None:
    raw = (
        b"From: a@example.net\r\nTo: bob@example.org\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: application/octet-stream; name=run.exe\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAA\r\n"
    )
    out = await _check(_config(make_config, "actions: {ATTACHMENT_EXECUTABLE: strip}\n"), raw)
    assert out["action"] == "quarantine"
    assert out["plugins"]["attachments"]["strip_failed"] is True


async def test_size_and_count_limits(make_config: Any) -> None:
    config = _config(make_config, "max_size: 1K\nmax_count: 2\n")
    out = await _check(config, message(("big.pdf", PDF + b"x" * 2000, "application/pdf")))
    assert out["smtp_reply"]["code"] == 552
    assert "ATTACHMENT_TOO_BIG" in {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
    three = message(*((f"{i}.png", PNG, "image/png") for i in range(3)))
    out = await _check(config, three)
    assert "ATTACHMENTS_TOO_MANY" in {s["name"] for s in out["plugins"]["attachments"]["symbols"]}


async def test_macro_document_quarantined(make_config: Any) -> None:
    docm = zip_of(("[Content_Types].xml", b"<Types/>"), ("word/vbaProject.bin", b"\x00" * 10))
    out = await _check(_config(make_config), message(("q3.docm", docm, "application/msword")))
    assert out["action"] == "quarantine"
    assert "ATTACHMENT_MACRO" in {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
    inside = zip_of(("q3.docm", docm))
    out = await _check(_config(make_config), message(("q.zip", inside, "application/zip")))
    assert "ATTACHMENT_MACRO" in {s["name"] for s in out["plugins"]["attachments"]["symbols"]}


# --- rules --------------------------------------------------------------------------------


async def test_rule_conditions_real_type_and_symbol(make_config: Any, tmp_path: Path) -> None:
    rules = tmp_path / "r.yaml"
    rules.write_text(
        textwrap.dedent("""\
        rules:
          - name: no-executables
            when: {attachment: {real_type: executable}}
            then: {action: reject, message: "No programs, please"}
          - name: images-tagged
            when:
              attachment:
                real_type: {one_of: [image/png, image/jpeg]}
                filename: {matches: '\\.png$'}
            then: {add_headers: {X-Has-Image: "yes"}}
          - name: mismatch-seen
            when: {symbol: {name: ATTACHMENT_TYPE_MISMATCH, min_score: 2}}
            then: {add_headers: {X-Mismatch: "yes"}}
          - name: never-too-high
            when: {symbol: {name: ATTACHMENT_TYPE_MISMATCH, min_score: 50}}
            then: {action: reject}
        """)
    )
    # The plugin only scores here; the rules decide.
    settings = "blocked_kinds: []\nactions: {ATTACHMENT_EXECUTABLE: score}\n"
    config = _config(make_config, settings, rules)
    async with running_server(config) as srv:
        err = await _refused(srv, message(("invoice.pdf", PE, "application/pdf")))
        assert "No programs, please" in err.message
        png_as_pdf = message(("scan.pdf", PNG, "application/pdf"), ("x.png", PNG, "image/png"))
        await send(srv.port, "alice@example.net", [RCPT], png_as_pdf)
        [delivered] = await srv.wait_delivered(RCPT)
    assert b"X-Mismatch: yes" in delivered
    assert b"X-Has-Image: yes" in delivered


async def test_rules_real_type_without_the_plugin(make_config: Any, tmp_path: Path) -> None:
    rules = tmp_path / "r.yaml"
    rules.write_text(
        "rules:\n  - name: macros\n    when: {attachment: {real_type: office-macro}}\n"
        "    then: {action: quarantine}\n"
    )
    config = make_config(f"plugins:\n  - name: rules\n    settings: {{files: [{rules}]}}\n")
    docm = zip_of(("[Content_Types].xml", b"<Types/>"), ("word/vbaProject.bin", b"\x00"))
    out = await _check(config, message(("a.docx", docm, "application/octet-stream")))
    assert out["plugins"]["rules"]["matched"] == ["macros"]
    out = await _check(
        config,
        message(("a.docx", zip_of(("[Content_Types].xml", b"x")), "application/octet-stream")),
    )
    assert out["plugins"]["rules"]["matched"] == []


def test_zipfile_never_extractall() -> None:
    source = Path(__file__).resolve().parent.parent / "plugins" / "attachments"
    for path in source.glob("*.py"):
        assert "extractall" not in path.read_text()
        assert zipfile  # the stdlib module the plugin reads archives with


async def test_in_a_worker_process(make_config: Any) -> None:
    """isolate: true runs the data hook in a content-analysis worker: the findings,
    details and the strip mutation come back from there."""
    config = make_config(
        "local_domains: [example.org]\nplugins:\n  - name: attachments\n    isolate: true\n"
        "    settings: {actions: {ATTACHMENT_EXECUTABLE: strip}}\n"
    )
    async with running_server(config) as srv:
        inner = nested_zip(2, ("setup.exe", PE))
        await send(
            srv.port, "alice@example.net", [RCPT], message(("d.zip", inner, "application/zip"))
        )
        [delivered] = await srv.wait_delivered(RCPT)
        err = await _refused(srv, message(("b.zip", zip_bomb(2, 4), "application/zip")))
        assert "ARCHIVE_BOMB" not in err.message and "max_ratio" in err.message
    after = mime.parse(delivered)
    assert [p.content_type for p in after.parts] == ["text/plain", "text/plain"]
    assert "'d.zip'" in after.parts[1].text()


class _Phish:
    """Stands for any earlier plugin: emits a symbol the rules match by name."""

    @hookimpl
    def mailflow_data(self, message: Any) -> Any:
        if "paypal" in message.header("Subject").lower():
            return Result(score=4.0, symbols=[Symbol("PHISHING_LINK_MISMATCH", 4.0, "x")])
        return None


async def test_symbol_condition_sees_any_earlier_plugin(make_config: Any, tmp_path: Path) -> None:
    rules = tmp_path / "r.yaml"
    rules.write_text(
        "rules:\n  - name: phish\n    when: {symbol: {name: PHISHING_LINK_MISMATCH}}\n"
        "    then: {action: quarantine, message: phishing}\n"
    )
    config = make_config(
        f"plugins:\n  - name: phish\n  - name: rules\n    settings: {{files: [{rules}]}}\n"
    )
    app = App(config, extra_plugins={"phish": _Phish()})
    await app.startup()
    try:
        hit = report(await check_message(app, message(subject="Your PayPal account")))
        miss = report(await check_message(app, message(subject="Lunch")))
    finally:
        await app.shutdown()
    assert hit["plugins"]["rules"]["matched"] == ["phish"]
    assert hit["action"] == "quarantine"
    assert miss["plugins"]["rules"]["matched"] == []


async def test_whole_message_finding_set_to_strip_rejects(make_config: Any) -> None:
    config = _config(make_config, "max_count: 1\nactions: {ATTACHMENTS_TOO_MANY: strip}\n")
    out = await _check(config, message(("a.png", PNG, "image/png"), ("b.png", PNG, "image/png")))
    assert out["action"] == "reject"
    assert "2 attachments > 1" in out["smtp_reply"]["text"]


async def test_gzip_bomb_stops_at_the_ratio(make_config: Any) -> None:
    import gzip

    bomb = gzip.compress(b"\x00" * (20 << 20), compresslevel=9)
    assert len(bomb) < 64 * 1024
    out = await _check(_config(make_config), message(("data.gz", bomb, "application/gzip")))
    archives = out["plugins"]["attachments"]["archives"]
    assert archives["limits_hit"][0].startswith("max_ratio 200 at data.gz")
    assert archives["expanded_bytes"] <= 200 * len(bomb) + 1
    assert out["action"] == "reject"


def test_replace_parts_in_nested_structures() -> None:
    inner = message(("run.exe", PE, "application/octet-stream"), subject="inner")
    raw = (
        b"From: a@example.net\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="out"\r\n\r\npreamble\r\n--out\r\n'
        b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n--alt\r\n'
        b"Content-Type: text/plain\r\n\r\nhello\r\n--alt\r\nContent-Type: text/html\r\n\r\n"
        b"<p>hello</p>\r\n--alt--\r\n--out\r\nContent-Type: message/rfc822\r\n\r\n"
        + inner
        + b"\r\n--out--\r\nepilogue\r\n"
    )
    parts = mime.parse(raw).parts
    exe = next(p for p in parts if p.filename == "run.exe")
    assert mime.can_replace(raw, exe)
    new = mime.replace_parts(raw, [(exe, mime.note_entity("--out\nremoved"))])
    assert new is not None
    after = mime.parse(new).parts
    assert len(after) == len(parts)
    assert [p.raw() for p in after if p.filename != "run.exe" and "removed" not in p.text()] == [
        p.raw() for p in parts if p.filename != "run.exe"
    ]
    assert " --out\r\nremoved" in after[-1].text()  # a note line cannot be a delimiter
    assert new.startswith(raw[: raw.index(b"--out")]) and new.endswith(b"--out--\r\nepilogue\r\n")
    # A part only inside a base64-encoded forwarded message cannot be cut out.
    import base64

    encoded = raw.replace(
        b"Content-Type: message/rfc822\r\n\r\n" + inner,
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(inner).replace(b"\n", b"\r\n"),
    )
    hidden = next(p for p in mime.parse(encoded).parts if p.filename == "run.exe")
    assert not mime.can_replace(encoded, hidden)
    assert mime.replace_parts(encoded, [(hidden, b"x")]) is None


async def test_hostile_archives_through_serve(make_config: Any) -> None:
    """Malformed, huge-listing and deep archives through SMTP: each is held with its
    symbol in the reason, and the server goes on delivering ordinary mail."""
    settings = "actions: {ARCHIVE_MALFORMED: quarantine, ARCHIVE_BOMB: quarantine}\n"
    good = zip_of(("a.txt", b"hello"), ("b.txt", b"world"))
    hostile = [
        ("broken.zip", good.replace(b"PK\x01\x02", b"PK\x01\x09")),
        ("many.zip", zip_of(*((f"f{i}.txt", b"") for i in range(3000)))),
        ("deep.zip", nested_zip(12, ("a.txt", b"x"))),
        ("bomb.zip", zip_bomb(3, 16)),
    ]
    async with running_server(_config(make_config, settings)) as srv:
        for name, data in hostile:
            raw = message((name, data, "application/zip"), subject=name)
            await send(srv.port, "alice@example.net", [RCPT], raw)
        await send(
            srv.port, "alice@example.net", [RCPT], message(("a.pdf", PDF, "application/pdf"))
        )
        [delivered] = await srv.wait_delivered(RCPT)
        reasons = [held["reason"] for held in quarantined(srv)]
    assert b"a.pdf" in delivered
    assert len(reasons) == 4
    assert any("broken.zip" in r and "BadZipFile" in r for r in reasons)
    assert any("max_members 1000 at many.zip" in r for r in reasons)
    assert any("max_depth 4 at deep.zip" in r for r in reasons)
    assert any("max_ratio 200 at bomb.zip" in r for r in reasons)


async def test_encrypted_member_judged_by_its_name(make_config: Any) -> None:
    raw = message(("pay.zip", encrypted_zip("setup.exe", PE), "application/zip"))
    out = await _check(_config(make_config, "encrypted: allow\n"), raw)
    names = {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
    assert names == {"ARCHIVE_ENCRYPTED", "ATTACHMENT_BLOCKED_TYPE"}
    assert out["action"] == "reject"


async def test_unreadable_zip_members_are_still_judged(make_config: Any) -> None:
    # Deflate64 (method 9): zipfile cannot read it, 7-Zip and Windows can; a wrong
    # CRC-32: unzip tools warn and extract. Neither hides an executable.
    plain = zip_of(("setup.exe", PE))
    deflate64 = patched_zip(plain, 8, 10, 9)
    crc = bytearray(plain)
    crc[crc.find(b"PK\x01\x02") + 16] ^= 0xFF
    renamed = bytearray(zip_of(("invoice.pdf", PE)))
    renamed[renamed.find(b"PK\x01\x02") + 16] ^= 0xFF
    for data, symbol in (
        (deflate64, "ATTACHMENT_BLOCKED_TYPE"),
        (bytes(crc), "ATTACHMENT_EXECUTABLE"),
        (bytes(renamed), "ATTACHMENT_EXECUTABLE"),
    ):
        raw = message(("pay.zip", data, "application/zip"))
        out = await _check(_config(make_config), raw)
        names = {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
        assert symbol in names, names
        assert out["action"] == "reject"


def test_zip_end_record_understating_its_entries_is_refused_unread() -> None:
    # The end record says 1 entry; the central directory holds 20,000. zipfile would
    # build them all (several times the zip in memory): the directory's size counts.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(20_000):
            z.writestr(zipfile.ZipInfo(f"{i:x}"), b"")
    data = bytearray(buf.getvalue())
    end = data.rfind(b"PK\x05\x06")
    data[end + 8 : end + 12] = struct.pack("<HH", 1, 1)
    raw = bytes(data)
    budget = Budget(Limits())
    tracemalloc.start()
    try:
        inspect(raw, mime.detect(raw, "many.zip"), "many.zip", budget)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert budget.hits and "entries" in budget.hits[0]
    assert budget.members == 0
    assert peak < len(raw) // 4


async def test_bidi_control_in_an_archive_member_name(make_config: Any) -> None:
    # "invoice\u202etxt.pdf" shows as "invoicefdp.txt": a trick inside a zip as outside.
    raw = message(("docs.zip", zip_of(("invoice\u202etxt.pdf", PDF)), "application/zip"))
    out = await _check(_config(make_config), raw)
    symbols = out["plugins"]["attachments"]["symbols"]
    assert "ATTACHMENT_RTLO" in {s["name"] for s in symbols}
    reason = next(s["reason"] for s in symbols if s["name"] == "ATTACHMENT_RTLO")
    assert "\u202e" not in reason and "\\u202e" in reason
    assert out["action"] == "reject"


async def test_encrypted_by_the_local_header_only(make_config: Any) -> None:
    # The central directory says "not encrypted", the local header says "encrypted":
    # a tool believing the local header asks for a password. Still ARCHIVE_ENCRYPTED.
    data = patched_zip(zip_of(("invoice.pdf", PDF)), 6, None, 1)
    out = await _check(_config(make_config), message(("pay.zip", data, "application/zip")))
    names = {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
    assert "ARCHIVE_ENCRYPTED" in names
    assert out["action"] == "quarantine"


async def test_reply_stays_short_for_a_long_non_ascii_name(make_config: Any) -> None:
    # Each non-ASCII character is shown as a 6-character escape: the cut must count
    # those, or a 200-character Cyrillic name makes a reply line of 2,400 bytes.
    name = "\u0441\u0447\u0435\u0442" * 60 + ".exe"
    async with running_server(_config(make_config)) as srv:
        error = await _refused(srv, message((name, PE, "application/octet-stream")))
    line = f"{error.code} {error.message}"
    assert len(line) <= 512, len(line)
    assert "\\u0441" in line


async def test_tar_member_after_a_broken_header_is_seen(make_config: Any) -> None:
    # GNU tar skips a header with a bad checksum and extracts what follows.
    data = bytearray(gzip.decompress(tar_of(("a.pdf", PDF), ("b.pdf", PDF), ("evil.exe", PE))))
    at = data.find(b"b.pdf")
    data[at + 148] = ord("9")  # the checksum field of b.pdf's header
    raw = message(("files.tar", bytes(data), "application/x-tar"))
    out = await _check(_config(make_config), raw)
    names = {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
    assert "ATTACHMENT_EXECUTABLE" in names
    assert out["action"] == "reject"


@pytest.mark.parametrize("prefix", [b"stub of a self-extractor\n", b"\x00" * 300])
async def test_zip_behind_a_prefix_is_inspected(make_config: Any, prefix: bytes) -> None:
    # unzip, 7-Zip and Windows find a zip by its end record: data before it is no
    # disguise. Also one level down, inside an ordinary zip.
    hidden = prefix + zip_of(("evil.exe", PE))
    for data in (hidden, zip_of(("inner.zip", hidden))):
        out = await _check(_config(make_config), message(("invoice.zip", data, "application/zip")))
        names = {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
        assert "ATTACHMENT_EXECUTABLE" in names
        assert out["action"] == "reject"


def _tar_bytes(*members: tuple[str, bytes]) -> bytes:
    return gzip.decompress(tar_of(*members))


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
async def test_member_in_a_second_concatenated_stream_is_seen(
    make_config: Any, compress: Any
) -> None:
    # A .tar.gz of two gzip members end to end: tar -xzf reads both (bzip2, xz alike).
    tar = _tar_bytes(("a.pdf", PDF), ("evil.exe", PE))
    data = compress(tar[:1024]) + compress(tar[1024:])
    out = await _check(_config(make_config), message(("a.tar.gz", data, "application/gzip")))
    names = {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
    assert "ATTACHMENT_EXECUTABLE" in names
    assert out["action"] == "reject"


def test_concatenated_streams_are_bounded() -> None:
    data = gzip.compress(b"x") * 5000 + b"\0" * 1000
    budget = Budget(Limits())
    inspect(data, mime.detect(data, "many.gz"), "many.gz", budget)
    assert budget.hits and "concatenated streams" in budget.hits[0]
    one = gzip.compress(b"%PDF-1.4 ") + gzip.compress(b"hello") + b"\0" * 512 + b"junk"
    budget = Budget(Limits())
    inspect(one, mime.detect(one, "doc.pdf.gz"), "doc.pdf.gz", budget)
    assert not budget.hits and not budget.malformed
    assert budget.found[0].size == len(b"%PDF-1.4 hello")


@pytest.mark.parametrize("dangerous", ["evil.js", "evil.exe"])
async def test_a_part_s_second_name_is_judged_too(make_config: Any, dangerous: str) -> None:
    # name= on Content-Type says evil.js, filename= on Content-Disposition notes.txt:
    # which one the recipient's client saves it under is the client's choice.
    raw = (
        "From: a@example.net\r\nTo: bob@example.org\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
        "Content-Type: text/plain\r\n\r\nhi\r\n--B\r\n"
        f'Content-Type: application/octet-stream; name="{dangerous}"\r\n'
        'Content-Disposition: attachment; filename="notes.txt"\r\n\r\n'
        "WScript.Shell.Run('calc')\r\n--B--\r\n"
    ).encode()
    out = await _check(_config(make_config), raw)
    names = {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
    assert "ATTACHMENT_BLOCKED_TYPE" in names
    assert out["action"] == "reject"


async def test_attachment_past_the_mime_walk_limits_is_held(make_config: Any) -> None:
    # 1,000 small text parts, then the executable: past MAX_PARTS the rest of the
    # message is one opaque part, never decoded. Unseen is not clean.
    padding = "".join("--B\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(1000))
    raw = (
        "From: a@example.net\r\nTo: bob@example.org\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="B"\r\n\r\n' + padding + "--B\r\n"
        'Content-Type: application/octet-stream; name="evil.exe"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(PE).decode() + "\r\n--B--\r\n"
    ).encode()
    out = await _check(_config(make_config), raw)
    names = {s["name"] for s in out["plugins"]["attachments"]["symbols"]}
    assert names == {"ATTACHMENT_UNINSPECTED"}
    assert out["action"] == "quarantine"


def test_stray_end_record_bytes_are_no_zip() -> None:
    data = b"\x01" * 5000 + b"PK\x05\x06" + b"\x00" * 30
    budget = Budget(Limits())
    inspect(data, mime.detect(data, "blob.bin"), "blob.bin", budget)
    assert not budget.malformed and not budget.found
