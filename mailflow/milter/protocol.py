"""Sans-IO codec for the milter protocol, version 6 (what Postfix 3.x and Sendmail 8.14+ speak).

No sockets here: :class:`Decoder` turns received bytes into :class:`Command` objects and
the ``encode_*`` / ``reply_*`` functions turn replies into bytes. The session and the
asyncio server sit on top.

Facts relied on (libmilter's ``include/libmilter/mfdef.h`` and Postfix's
``MILTER_README`` / ``src/milter/milter8.c``):

* Every packet is ``uint32 length`` (network order, counts the command byte and the
  data) + one command byte + data. Strings in the data are NUL-terminated.
* ``SMFIC_OPTNEG`` carries three uint32: protocol version, the modification actions
  the MTA allows (``SMFIF_*``), and the protocol steps it can skip (``SMFIP_*``). The
  filter answers with the same layout, keeping the subset it wants.
* ``SMFIC_CONNECT``: hostname NUL, family byte (``4``, ``6``, ``L`` unix, ``U``
  unknown), then for known families a uint16 port and the address NUL.
* ``SMFIC_MAIL`` / ``SMFIC_RCPT``: NUL-separated argv, the address in angle brackets
  first, then ESMTP parameters.
* ``SMFIC_MACRO``: the command byte the macros belong to, then NUL-separated
  name/value pairs.
* Body chunks are at most 65535 bytes unless the ``SMFIP_MDS_*`` flags were agreed
  (we never ask for them).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# --- limits -----------------------------------------------------------------------------------

MILTER_VERSION = 6
MILTER_CHUNK_SIZE = 65535  # MILTER_CHUNK_SIZE in mfdef.h: largest body chunk, both ways
# A header can be up to Postfix's header_size_limit (100 KiB by default), a macro list a
# few KiB; nothing legitimate comes near this, so a larger length is a broken peer.
MAX_PACKET_SIZE = 4 * 1024 * 1024
_LEN = struct.Struct("!I")

# --- commands, MTA -> filter (SMFIC_*) -------------------------------------------------------

SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"  # quit this conversation, a new one follows on the same socket
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

COMMAND_NAMES = {
    SMFIC_ABORT: "abort",
    SMFIC_BODY: "body",
    SMFIC_CONNECT: "connect",
    SMFIC_MACRO: "macro",
    SMFIC_BODYEOB: "eom",
    SMFIC_HELO: "helo",
    SMFIC_QUIT_NC: "quit_nc",
    SMFIC_HEADER: "header",
    SMFIC_MAIL: "mail",
    SMFIC_EOH: "eoh",
    SMFIC_OPTNEG: "optneg",
    SMFIC_QUIT: "quit",
    SMFIC_RCPT: "rcpt",
    SMFIC_DATA: "data",
    SMFIC_UNKNOWN: "unknown",
}

# --- replies, filter -> MTA (SMFIR_*) --------------------------------------------------------

SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# --- modification actions the filter may use (SMFIF_*) ---------------------------------------

SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40

# Everything mailflow's mutations and verdicts can need; SETSYMLIST/ADDRCPT_PAR are not.
WANTED_ACTIONS = (
    SMFIF_ADDHDRS
    | SMFIF_CHGBODY
    | SMFIF_ADDRCPT
    | SMFIF_DELRCPT
    | SMFIF_CHGHDRS
    | SMFIF_QUARANTINE
    | SMFIF_CHGFROM
)

# --- protocol steps (SMFIP_*) ----------------------------------------------------------------

SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80  # no reply to each header
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400  # the MTA understands SMFIR_SKIP
SMFIP_RCPT_REJ = 0x800  # also send recipients the MTA rejected
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000  # header values keep the space after the colon, both ways

# We need every event, so none of the SMFIP_NO* flags. Replies to headers, EOH and body
# chunks carry no decision for us (plugins decide at end of message), so we ask the MTA
# not to wait for them: Postfix then sends the whole content, headers to end of message,
# in one write. We do answer DATA and unknown commands, although there is nothing to
# decide there either: the MTA writes them on their own, and if it did not wait for our
# answer its next write would sit in its socket (Nagle's algorithm: a small segment waits
# for the ACK of the previous one) until our kernel's delayed ACK, 40 ms on Linux. Our
# answer carries that ACK at once. (Measured behind Postfix 3.7: a 40-44 ms gap after
# every SMFIC_DATA while SMFIP_NR_DATA was agreed; docs/milter.md, "Round trips".)
# HDR_LEADSPC makes reconstructed headers byte-exact.
WANTED_PROTOCOL = SMFIP_NR_HDR | SMFIP_NR_EOH | SMFIP_NR_BODY | SMFIP_HDR_LEADSPC

# Which "no reply" flag silences the reply to which command.
NO_REPLY_FLAG = {
    SMFIC_CONNECT: SMFIP_NR_CONN,
    SMFIC_HELO: SMFIP_NR_HELO,
    SMFIC_MAIL: SMFIP_NR_MAIL,
    SMFIC_RCPT: SMFIP_NR_RCPT,
    SMFIC_DATA: SMFIP_NR_DATA,
    SMFIC_UNKNOWN: SMFIP_NR_UNKN,
    SMFIC_EOH: SMFIP_NR_EOH,
    SMFIC_BODY: SMFIP_NR_BODY,
    SMFIC_HEADER: SMFIP_NR_HDR,
}

# Connection families in SMFIC_CONNECT.
FAMILY_INET = "4"
FAMILY_INET6 = "6"
FAMILY_UNIX = "L"
FAMILY_UNKNOWN = "U"


class ProtocolError(Exception):
    """The peer sent something that is not valid milter protocol; close the connection."""


# --- decoded commands ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """One packet from the MTA: the command byte and its raw data."""

    code: bytes
    data: bytes

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.code, f"unknown command {self.code!r}")


@dataclass(frozen=True, slots=True)
class OptNeg:
    version: int
    actions: int
    protocol: int


@dataclass(frozen=True, slots=True)
class ConnectInfo:
    hostname: str
    family: str  # FAMILY_*
    port: int = 0
    address: str = ""  # IPv4/IPv6 literal (any "IPv6:" prefix removed) or a socket path


@dataclass(frozen=True, slots=True)
class Macros:
    stage: bytes  # the SMFIC_* command these macros come with
    values: dict[str, str] = field(default_factory=dict)


class Decoder:
    """Incremental packet framing: feed it bytes in any split, take whole commands out."""

    def __init__(self, max_size: int = MAX_PACKET_SIZE) -> None:
        self._buffer = bytearray()
        self._max = max_size

    def feed(self, data: bytes) -> list[Command]:
        """Add received bytes; return every complete command now available.

        Raises :class:`ProtocolError` for a zero or oversized length, before buffering
        the oversized body (so a bogus length cannot make us allocate it).
        """
        self._buffer += data
        out: list[Command] = []
        while len(self._buffer) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._buffer)
            if length == 0:
                raise ProtocolError("zero-length packet (no command byte)")
            if length > self._max:
                raise ProtocolError(f"packet length {length} exceeds limit {self._max}")
            if len(self._buffer) < _LEN.size + length:
                break
            start = _LEN.size
            code = bytes(self._buffer[start : start + 1])
            payload = bytes(self._buffer[start + 1 : start + length])
            del self._buffer[: start + length]
            out.append(Command(code, payload))
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet held back (non-zero at EOF means truncation)."""
        return len(self._buffer)


# --- field decoders ---------------------------------------------------------------------------


def _text(raw: bytes) -> str:
    # Addresses and header values may carry UTF-8 (RFC 6531/6532) or, from broken
    # clients, anything: keep undecodable bytes round-trippable.
    return raw.decode("utf-8", "surrogateescape")


def split_strings(data: bytes) -> list[str]:
    """NUL-terminated strings; a missing final NUL is tolerated, an empty tail dropped."""
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [_text(p) for p in parts]


def decode_optneg(data: bytes) -> OptNeg:
    if len(data) < 12:
        raise ProtocolError(f"SMFIC_OPTNEG needs 12 bytes, got {len(data)}")
    version, actions, protocol = struct.unpack_from("!III", data)
    return OptNeg(version, actions, protocol)


def decode_connect(data: bytes) -> ConnectInfo:
    end = data.find(b"\0")
    if end < 0 or len(data) < end + 2:
        raise ProtocolError("SMFIC_CONNECT truncated")
    hostname = _text(data[:end])
    family = chr(data[end + 1])
    rest = data[end + 2 :]
    if family == FAMILY_UNKNOWN:
        return ConnectInfo(hostname, family)
    if family not in (FAMILY_INET, FAMILY_INET6, FAMILY_UNIX) or len(rest) < 3:
        raise ProtocolError(f"SMFIC_CONNECT: bad family {family!r} or truncated address")
    (port,) = struct.unpack_from("!H", rest)
    address = _text(rest[2:].split(b"\0", 1)[0])
    if family == FAMILY_INET6 and address[:5].lower() == "ipv6:":
        address = address[5:]  # Sendmail's "IPv6:" literal prefix (RFC 5321 4.1.3)
    return ConnectInfo(hostname, family, port, address)


def decode_macros(data: bytes) -> Macros:
    if not data:
        raise ProtocolError("SMFIC_MACRO without a command byte")
    strings = split_strings(data[1:])
    if len(strings) % 2:
        strings.append("")  # a name without value: keep the name, empty value
    values = {strings[i]: strings[i + 1] for i in range(0, len(strings), 2)}
    return Macros(data[:1], values)


def decode_args(data: bytes, what: str) -> tuple[str, list[str]]:
    """MAIL/RCPT argv -> (address without angle brackets, ESMTP parameters)."""
    strings = split_strings(data)
    if not strings:
        raise ProtocolError(f"SMFIC_{what} without an address")
    address = strings[0].strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address, strings[1:]


def decode_header(data: bytes) -> tuple[str, bytes]:
    """(name, value bytes); the value keeps its bytes exactly (folding, leading space)."""
    end = data.find(b"\0")
    if end <= 0:
        raise ProtocolError("SMFIC_HEADER without a name")
    value = data[end + 1 :]
    if value.endswith(b"\0"):
        value = value[:-1]
    return _text(data[:end]), value


# --- encoders ---------------------------------------------------------------------------------


def packet(code: bytes, data: bytes = b"") -> bytes:
    """Frame one packet: length (command byte + data), command byte, data."""
    return _LEN.pack(len(data) + 1) + code + data


def _z(text: str | bytes) -> bytes:
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    if b"\0" in raw:
        raise ValueError("milter strings cannot contain NUL")
    return raw + b"\0"


def encode_optneg(version: int, actions: int, protocol: int) -> bytes:
    return packet(SMFIC_OPTNEG, struct.pack("!III", version, actions, protocol))


def reply_simple(code: bytes) -> bytes:
    """ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, PROGRESS: no data."""
    return packet(code)


def reply_code(smtp_code: int, status: str, text: str) -> bytes:
    """SMFIR_REPLYCODE: "550 5.7.1 text". The MTA only accepts 4xx and 5xx codes.

    CR, LF and NUL are removed from the text so a plugin's reason cannot break the
    MTA's reply into several (or into a packet it refuses). "%" is doubled: the MTA
    expands %-sequences in milter reply text (libmilter's smfi_setreply; Postfix 3.7
    was seen to turn "100% spam" into "100 spam").
    """
    if not 400 <= smtp_code <= 599:
        raise ValueError(f"milter reply code must be 4xx or 5xx, got {smtp_code}")
    clean = " ".join(text.replace("\0", " ").split()).replace("%", "%%")
    if status and status[:1] != str(smtp_code)[0]:
        status = ""  # RFC 3463: the class must match the reply code's first digit
    line = f"{smtp_code} {status + ' ' if status else ''}{clean}".rstrip()
    return packet(SMFIR_REPLYCODE, _z(line))


def reply_addheader(name: str, value: bytes) -> bytes:
    return packet(SMFIR_ADDHEADER, _z(name) + _z(value))


def reply_insheader(index: int, name: str, value: bytes) -> bytes:
    return packet(SMFIR_INSHEADER, struct.pack("!I", index) + _z(name) + _z(value))


def reply_chgheader(index: int, name: str, value: bytes) -> bytes:
    """Change the ``index``-th (1-based) header called ``name``; empty value deletes it."""
    return packet(SMFIR_CHGHEADER, struct.pack("!I", index) + _z(name) + _z(value))


def reply_replbody(body: bytes) -> list[bytes]:
    """SMFIR_REPLBODY packets of at most MILTER_CHUNK_SIZE bytes each (one for empty)."""
    if not body:
        return [packet(SMFIR_REPLBODY)]
    return [
        packet(SMFIR_REPLBODY, body[i : i + MILTER_CHUNK_SIZE])
        for i in range(0, len(body), MILTER_CHUNK_SIZE)
    ]


def reply_addrcpt(address: str) -> bytes:
    return packet(SMFIR_ADDRCPT, _z(f"<{address}>"))


def reply_delrcpt(address: str) -> bytes:
    return packet(SMFIR_DELRCPT, _z(f"<{address}>"))


def reply_chgfrom(address: str, args: str = "") -> bytes:
    data = _z(f"<{address}>") + (_z(args) if args else b"")
    return packet(SMFIR_CHGFROM, data)


def reply_quarantine(reason: str) -> bytes:
    clean = " ".join(reason.replace("\0", " ").split()) or "quarantined"
    return packet(SMFIR_QUARANTINE, _z(clean))
