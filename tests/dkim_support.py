"""Helpers shared by the DKIM and ARC tests: keys, DNS zones, independent tools.

The "independent" side of the interop tests is dkimpy's own command-line tools
(``dkimsign``, ``dkimverify``) run in a separate process. ``dkimverify`` has no
option to pass a key and always asks DNS; we run its ``main()`` with dkimpy's DNS
hook pointed at the loopback test server, so the key still travels over real DNS
and nothing ever queries the system resolver or the internet.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mailflow_plugins import dkim_keys

SUBPROCESS_TIMEOUT = 30  # seconds: a bound, never a timing assertion

# Runs a dkimpy CLI entry point (`dkimverify`, `arcverify`) with DNS answered by
# 127.0.0.1:<port>.
_VERIFY_WRAPPER = textwrap.dedent("""\
    import importlib, sys
    import dns.resolver, dns.rdatatype
    import dkim.dnsplug
    main = importlib.import_module(sys.argv.pop(1)).main
    port = int(sys.argv.pop(1))
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = port
    def get_txt(name, timeout=5):
        try:
            answer = res.resolve(name, "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)
    dkim.dnsplug._get_txt = get_txt
    main()
    """)


@dataclass
class KeyFixture:
    domain: str
    selector: str
    algorithm: str  # rsa-sha256 | ed25519-sha256
    path: Path
    txt: str  # the DNS record value

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def zone(self) -> dict[str, list[tuple[str, str]]]:
        return {self.name: [("TXT", self.txt)]}

    def settings_yaml(self) -> str:
        return (
            f"{{domain: {self.domain}, selector: {self.selector}, "
            f"key_file: '{self.path}', algorithm: {self.algorithm}}}"
        )


def mailflow_key(tmp_path: Path, domain: str, selector: str, kind: str) -> KeyFixture:
    """A key made by mailflow's own generator."""
    pair = dkim_keys.generate("ed25519" if kind == "ed25519" else "rsa", 2048)
    path = tmp_path / f"{selector}.{domain}.{kind}.key"
    dkim_keys.write_private(path, pair.private)
    algorithm = "ed25519-sha256" if kind == "ed25519" else "rsa-sha256"
    return KeyFixture(
        domain, selector, algorithm, path, dkim_keys.txt_record(pair.type, pair.public_b64)
    )


def foreign_key(tmp_path: Path, domain: str, selector: str, kind: str) -> KeyFixture:
    """A key made without mailflow's code (PKCS#8 PEM for RSA, raw seed for ed25519)."""
    path = tmp_path / f"foreign.{selector}.{domain}.key"
    if kind == "ed25519":
        signing = nacl.signing.SigningKey.generate()
        path.write_bytes(base64.b64encode(bytes(signing)))
        public = base64.b64encode(bytes(signing.verify_key)).decode()
        return KeyFixture(
            domain, selector, "ed25519-sha256", path, f"v=DKIM1; k=ed25519; p={public}"
        )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyFixture(
        domain, selector, "rsa-sha256", path, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    )


async def _run(argv: list[str], data: bytes) -> tuple[int, bytes, bytes]:
    """Run a command without blocking the loop (the DNS test server lives in it)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(SUBPROCESS_TIMEOUT):
            out, err = await proc.communicate(data)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


async def run_dkimverify(message: bytes, dns_port: int, index: int = 0) -> tuple[int, str]:
    """Verify signature ``index`` with dkimpy's ``dkimverify``; (exit code, output)."""
    argv = [sys.executable, "-c", _VERIFY_WRAPPER, "dkim.dkimverify", str(dns_port)]
    code, out, err = await _run([*argv, "--index", str(index)], message)
    return code, (out + err).decode("utf-8", "replace")


async def run_arcverify(message: bytes, dns_port: int) -> str:
    """dkimpy's ``arcverify`` output, e.g. ``arc verification: cv=b'pass' success``."""
    argv = [sys.executable, "-c", _VERIFY_WRAPPER, "dkim.arcverify", str(dns_port)]
    code, out, err = await _run(argv, message)
    assert code == 0, err.decode("utf-8", "replace")
    return out.decode("utf-8", "replace").strip()


def _dkimsign_command() -> list[str]:
    """The installed ``dkimsign`` script; the same code via ``-m`` if it is not on PATH."""
    found = shutil.which("dkimsign")
    return [found] if found else [sys.executable, "-m", "dkim.dkimsign"]


async def run_dkimsign(message: bytes, key: KeyFixture) -> bytes:
    """Sign with dkimpy's ``dkimsign`` command; returns the signed message."""
    argv = [*_dkimsign_command(), "--signalg", key.algorithm, key.selector, key.domain]
    code, out, err = await _run([*argv, str(key.path)], message)
    assert code == 0, err.decode("utf-8", "replace")
    return out
