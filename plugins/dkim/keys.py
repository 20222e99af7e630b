"""DKIM key material: generate key pairs, load private keys, format the DNS record.

Two algorithms are supported, the ones RFC 8301 and RFC 8463 leave standing:

* ``rsa-sha256``: a PEM private key (PKCS#1 or PKCS#8); the public key is published
  as base64 DER SubjectPublicKeyInfo in ``p=`` (RFC 6376 3.6.1).
* ``ed25519-sha256``: the file holds the base64 32-byte private seed, the format
  dkimpy's signer reads; ``p=`` is the base64 raw 32-byte public key (RFC 8463 4).

Nothing here does network I/O; it is shared by the ``dkim_sign`` plugin and the
``mailflow dkim keygen`` command.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
KeyType = Literal["rsa", "ed25519"]

# RFC 8301 3.2: signers MUST use RSA keys of at least 1024 bits and SHOULD use 2048.
MIN_RSA_BITS = 1024
DEFAULT_RSA_BITS = 2048
MAX_RSA_BITS = 4096  # larger keys no longer fit a DNS answer comfortably
RSA_PUBLIC_EXPONENT = 65537
# RFC 1035 3.3.14: one TXT character-string holds at most 255 octets; zone files
# write long records as several quoted strings, which resolvers join.
TXT_STRING_LIMIT = 255
ZONE_CHUNK = 250  # a little under the limit, as zone-file tools conventionally do
KEY_FILE_MODE = 0o600


class DKIMKeyError(Exception):
    """A private key file is missing, unreadable or not a key of the expected type."""


def key_type(algorithm: Algorithm) -> KeyType:
    return "ed25519" if algorithm == "ed25519-sha256" else "rsa"


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A freshly generated key: the file contents and the DNS ``p=`` value."""

    type: KeyType
    private: bytes  # file contents, as dkimpy's signer expects them
    public_b64: str  # the p= tag value


def generate(kind: KeyType, bits: int = DEFAULT_RSA_BITS) -> KeyPair:
    """Generate a new key pair of ``kind`` (RSA of ``bits`` bits, or Ed25519)."""
    if kind == "ed25519":
        signing = nacl.signing.SigningKey.generate()
        return KeyPair(
            "ed25519",
            base64.b64encode(bytes(signing)) + b"\n",
            base64.b64encode(bytes(signing.verify_key)).decode(),
        )
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise ValueError(f"RSA key size must be {MIN_RSA_BITS}..{MAX_RSA_BITS} bits, got {bits}")
    key = rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1, which every DKIM tool reads
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair("rsa", pem, base64.b64encode(der).decode())


def txt_record(pair_type: KeyType, public_b64: str) -> str:
    """The DKIM key record value (RFC 6376 3.6.1), e.g. ``v=DKIM1; k=rsa; p=...``."""
    return f"v=DKIM1; k={pair_type}; p={public_b64}"


def zone_strings(value: str) -> str:
    """``value`` as one or more quoted zone-file strings, each within RFC 1035 limits."""
    chunks = [value[i : i + ZONE_CHUNK] for i in range(0, len(value), ZONE_CHUNK)] or [""]
    return " ".join(f'"{c}"' for c in chunks)


def record_name(domain: str, selector: str) -> str:
    """Where the key record lives (RFC 6376 3.6.2.1)."""
    return f"{selector}._domainkey.{domain}"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` created with mode 0600, refusing to overwrite."""
    # O_EXCL: never silently replace a key that may already be published in DNS.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def load_private(path: Path, algorithm: Algorithm) -> bytes:
    """Read and check a private key file; returns the bytes dkimpy's signer takes.

    Raises :class:`DKIMKeyError` naming the file and what is wrong with it.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DKIMKeyError(f"{path}: cannot read DKIM key: {exc.strerror}") from None
    if algorithm == "ed25519-sha256":
        try:
            seed = base64.b64decode(data.strip(), validate=True)
            nacl.signing.SigningKey(seed)
        except (binascii.Error, ValueError, nacl.exceptions.ValueError, TypeError):
            raise DKIMKeyError(
                f"{path}: not an ed25519 DKIM key (expected the base64 32-byte private "
                "seed written by `mailflow dkim keygen --type ed25519`)"
            ) from None
        return base64.b64encode(seed)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise DKIMKeyError(f"{path}: not an unencrypted PEM RSA private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DKIMKeyError(f"{path}: the key is not RSA but algorithm is rsa-sha256")
    if key.key_size < MIN_RSA_BITS:
        raise DKIMKeyError(f"{path}: RSA key has {key.key_size} bits; RFC 8301 requires >= 1024")
    # dkimpy parses PKCS#1 PEM; normalise PKCS#8 input to it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def public_b64_of(private: bytes, algorithm: Algorithm) -> str:
    """The ``p=`` value matching a key loaded by :func:`load_private`."""
    if algorithm == "ed25519-sha256":
        signing = nacl.signing.SigningKey(base64.b64decode(private))
        return base64.b64encode(bytes(signing.verify_key)).decode()
    key = serialization.load_pem_private_key(private, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()
