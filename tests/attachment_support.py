"""Test material for the attachments plugin: messages with attachments, archives, bombs.

Everything is built here, in memory: a tiny PE ("MZ" + "PE" header), an ELF header,
zips (nested, encrypted-flagged, bombs of nested zips of zeros), tar, gzip.
"""

from __future__ import annotations

import email.policy
import io
import struct
import tarfile
import zipfile
from email.message import EmailMessage

PE = b"MZ\x90\x00" + b"\x00" * 56 + struct.pack("<I", 64) + b"PE\x00\x00" + b"\x00" * 200
ELF = b"\x7fELF\x02\x01\x01" + b"\x00" * 200
PDF = b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def message(
    *attachments: tuple[str, bytes, str], subject: str = "files", text: str = "See attached.\n"
) -> bytes:
    """A multipart/mixed message with a text part and the given (name, data, type)."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = "alice@example.net"
    msg["To"] = "bob@example.org"
    msg["Subject"] = subject
    msg["Message-ID"] = "<t@example.net>"
    msg.set_content(text)
    for name, data, ctype in attachments:
        main, sub = ctype.split("/", 1)
        msg.add_attachment(data, maintype=main, subtype=sub, filename=name)
    return msg.as_bytes()


def zip_of(*members: tuple[str, bytes], level: int = 6) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def tar_of(*members: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def encrypted_zip(name: str, data: bytes) -> bytes:
    """A zip whose one member has the 'encrypted' flag (bit 0) set: the stdlib cannot
    write ZipCrypto, but the flag is what an inspector sees."""
    plain = zip_of((name, data))
    out = bytearray(plain)
    local = out.find(b"PK\x03\x04")
    central = out.find(b"PK\x01\x02")
    out[local + 6] |= 1
    out[central + 8] |= 1
    return bytes(out)


def zip_bomb(layers: int = 3, width: int = 10, size: int = 8 << 20) -> bytes:
    """Nested zips of zeros: ``width`` copies of the layer below per layer; the
    innermost member is ``size`` zero bytes. 3 layers x 10 x 8 MiB expand to 8 GiB
    from a few tens of KB."""
    inner = zip_of(("zeros.bin", b"\x00" * size), level=9)
    for layer in range(layers):
        inner = zip_of(*((f"l{layer}-{i}.zip", inner) for i in range(width)), level=9)
    return inner


def nested_zip(depth: int, payload: tuple[str, bytes]) -> bytes:
    data = zip_of(payload)
    for i in range(depth - 1):
        data = zip_of((f"level{i}.zip", data))
    return data


def patched_zip(data: bytes, local: int | None, central: int | None, value: int) -> bytes:
    """``data`` (a one-member zip) with the byte at offset ``local`` of the local
    header and ``central`` of the central directory entry set to ``value``."""
    out = bytearray(data)
    if local is not None:
        out[out.find(b"PK\x03\x04") + local] = value
    if central is not None:
        out[out.find(b"PK\x01\x02") + central] = value
    return bytes(out)
