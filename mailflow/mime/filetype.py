"""What a file really is: its type told from the content (magic bytes), not its name.

A small signature table for the types that matter to mail filtering (executables,
scripts, archives, Office documents and their macros, PDF, images, audio/video, disk
images, shortcuts) rather than libmagic: it is pure Python, has no system library to
install, answers in about a microsecond from the first bytes (and one bounded search
for the Office macro and MSI markers), and it names each type with one of the
*kinds* below, the vocabulary rules and the ``attachments`` plugin share
(``attachment: {real_type: executable}``; docs/rules.md).

Kinds: ``executable`` (PE/MZ, ELF, Mach-O, MSI), ``script`` (a ``#!`` file, an HTA,
or text whose file name makes it run as one: .js, .vbs, .ps1, .bat ...), ``shortcut``
(Windows .lnk), ``disk-image`` (ISO 9660, or a .img/.vhd name), ``archive`` (zip, gzip,
bzip2, xz, tar, 7z, rar, cab), ``office`` (OLE2 and OOXML documents), ``pdf``, ``rtf``,
``image``, ``audio``, ``video``, ``html``, ``text``, ``unknown``. An Office document
with a VBA project (OLE ``_VBA_PROJECT`` stream, OOXML ``vbaProject.bin``) has
``macros`` set, and rules see it as ``office-macro`` too.

Every function here reads at most a bounded prefix of the data, except the searches
for the macro/MSI markers, which are single linear ``bytes.find`` passes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from mailflow.mime.walk import Part

KINDS = (
    "executable",
    "script",
    "shortcut",
    "disk-image",
    "archive",
    "office",
    "pdf",
    "rtf",
    "image",
    "audio",
    "video",
    "html",
    "text",
    "unknown",
)
# The kinds that run code when opened (blocked by default in the attachments plugin).
DANGEROUS_KINDS = frozenset({"executable", "script", "shortcut", "disk-image"})


class FileType(NamedTuple):
    """A detected type: ``mime`` (e.g. ``application/x-dosexec``), ``kind`` (one of
    :data:`KINDS`) and whether it is an Office document with macros."""

    mime: str
    kind: str
    macros: bool = False

    @property
    def labels(self) -> tuple[str, ...]:
        """What a rule's ``real_type`` is matched against: kind, MIME type and, for a
        document with macros, ``office-macro``."""
        if self.macros:
            return (self.kind, self.mime, "office-macro")
        return (self.kind, self.mime)


UNKNOWN = FileType("application/octet-stream", "unknown")
EMPTY = FileType("application/x-empty", "unknown")

# File name extension -> the kind a reader expects from it.
EXTENSION_KINDS: dict[str, str] = {}
for _kind, _exts in (
    ("executable", "exe dll scr com pif cpl sys msi msp msc drv ocx elf app dmg appx"),
    ("script", "js jse vbs vbe wsf wsh wsc ps1 psm1 bat cmd sh hta vb jar reg sct inf"),
    ("shortcut", "lnk url scf"),
    ("disk-image", "iso img vhd vhdx udf"),
    ("archive", "zip gz tgz tar bz2 tbz xz txz 7z rar cab arj lz lzh ace z"),
    (
        "office",
        "doc docx docm dot dotx dotm xls xlsx xlsm xlsb xlt xltm ppt pptx pptm pps "
        "ppsm odt ods odp",
    ),
    ("pdf", "pdf"),
    ("rtf", "rtf"),
    ("image", "jpg jpeg png gif bmp tif tiff webp ico heic svg"),
    ("audio", "mp3 wav ogg m4a flac aac"),
    ("video", "mp4 mov avi mkv webm mpg mpeg"),
    ("html", "htm html xhtml"),
    ("text", "txt csv log ics vcf xml json md eml"),
):
    for _ext in _exts.split():
        EXTENSION_KINDS[_ext] = _kind
# A text file with one of these names runs as a script when opened.
_SCRIPT_EXTS = frozenset(e for e, k in EXTENSION_KINDS.items() if k == "script")

_OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_MSI_CLSID = b"\x84\x10\x0c\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"
_VBA_OLE = "_VBA_PROJECT".encode("utf-16-le")
_VBA_OOXML = b"vbaProject.bin"
_MACHO = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe")
_SIMPLE: tuple[tuple[bytes, FileType], ...] = (
    (b"\x7fELF", FileType("application/x-executable", "executable")),
    (b"\xca\xfe\xba\xbe", FileType("application/x-mach-binary", "executable")),  # fat
    (b"\x4c\x00\x00\x00\x01\x14\x02\x00", FileType("application/x-ms-shortcut", "shortcut")),
    (b"%PDF-", FileType("application/pdf", "pdf")),
    (b"{\\rtf", FileType("application/rtf", "rtf")),
    (b"\x1f\x8b", FileType("application/gzip", "archive")),
    (b"BZh", FileType("application/x-bzip2", "archive")),
    (b"\xfd7zXZ\x00", FileType("application/x-xz", "archive")),
    (b"7z\xbc\xaf\x27\x1c", FileType("application/x-7z-compressed", "archive")),
    (b"Rar!\x1a\x07", FileType("application/vnd.rar", "archive")),
    (b"MSCF\x00\x00\x00\x00", FileType("application/vnd.ms-cab-compressed", "archive")),
    (b"\x89PNG\r\n\x1a\n", FileType("image/png", "image")),
    (b"\xff\xd8\xff", FileType("image/jpeg", "image")),
    (b"GIF87a", FileType("image/gif", "image")),
    (b"GIF89a", FileType("image/gif", "image")),
    (b"II*\x00", FileType("image/tiff", "image")),
    (b"MM\x00*", FileType("image/tiff", "image")),
    (b"ID3", FileType("audio/mpeg", "audio")),
    (b"OggS", FileType("audio/ogg", "audio")),
    (b"fLaC", FileType("audio/flac", "audio")),
    (b"\x1a\x45\xdf\xa3", FileType("video/x-matroska", "video")),
)
_ZIP_HEADS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
HEAD = 4096  # bytes looked at for text/HTML sniffing


def detect(data: bytes, filename: str = "") -> FileType:
    """The type of ``data`` from its content; ``filename`` only decides what plain
    text is (a ``.js`` or ``.bat`` text is a script) and what an unrecognised
    ``.img``/``.vhd`` is (a disk image). Never raises."""
    if not data:
        return EMPTY
    if data.startswith(b"MZ"):
        return FileType("application/x-dosexec", "executable")
    if data[:4] in _MACHO:
        return FileType("application/x-mach-binary", "executable")
    if data.startswith(_ZIP_HEADS):
        return _zip_type(data)
    if data.startswith(_OLE):
        return _ole_type(data)
    for magic, found in _SIMPLE:
        if data.startswith(magic):
            return found
    if data.startswith(b"RIFF") and len(data) >= 12:
        form = data[8:12]
        if form == b"WAVE":
            return FileType("audio/wav", "audio")
        if form == b"AVI ":
            return FileType("video/x-msvideo", "video")
        if form == b"WEBP":
            return FileType("image/webp", "image")
    if data[4:8] == b"ftyp":
        return FileType("video/mp4", "video")
    if data[257:262] == b"ustar":
        return FileType("application/x-tar", "archive")
    if data[0x8001:0x8006] == b"CD001" or data[0x9001:0x9006] == b"CD001":
        return FileType("application/x-iso9660-image", "disk-image")
    ext = extension(filename)
    if data.startswith(b"#!"):
        return FileType("text/x-script", "script")
    head = data[:HEAD]
    if b"\x00" in head:
        if EXTENSION_KINDS.get(ext) == "disk-image":
            return FileType("application/x-raw-disk-image", "disk-image")
        return UNKNOWN
    lower = head.lstrip().lower()
    if b"<hta:application" in lower:
        return FileType("application/hta", "script")
    if lower.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return FileType("text/html", "html")
    if ext in _SCRIPT_EXTS:
        return FileType("text/x-script", "script")
    if EXTENSION_KINDS.get(ext) == "disk-image":
        return FileType("application/x-raw-disk-image", "disk-image")
    return FileType("text/plain", "text")


def _zip_type(data: bytes) -> FileType:
    # OOXML: a zip whose parts include [Content_Types].xml (the first member, as
    # Office writes it, or named in the central directory at the end).
    tail = data[-65536:]
    if b"[Content_Types].xml" in data[:512] or b"[Content_Types].xml" in tail:
        macros = _VBA_OOXML in tail or _VBA_OOXML in data[:512]
        return FileType("application/vnd.openxmlformats-officedocument", "office", macros)
    if b"mimetypeapplication/vnd.oasis.opendocument" in data[:512]:
        return FileType("application/vnd.oasis.opendocument", "office")
    if b"META-INF/MANIFEST.MF" in data[:512] or b"META-INF/MANIFEST.MF" in tail:
        return FileType("application/java-archive", "executable")
    return FileType("application/zip", "archive")


def _ole_type(data: bytes) -> FileType:
    if data.find(_MSI_CLSID, 0, 1 << 20) >= 0:
        return FileType("application/x-msi", "executable")
    return FileType("application/x-ole-storage", "office", _VBA_OLE in data)


def extension(filename: str) -> str:
    """The last extension of a file name, lower case, without the dot ("" if none);
    blanks and dots a name ends in are ignored, as Windows does."""
    name = filename.rstrip(" .\t").rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    if "." not in name:
        return ""
    return name.rsplit(".", 1)[1].strip().lower()


def part_type(part: Part) -> FileType:
    """The :class:`FileType` of a MIME part's decoded content (cached on the part)."""
    found = part._filetype
    if found is None:
        found = part._filetype = UNKNOWN if part.opaque else detect(part.payload(), part.filename)
    return found
