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
import functools
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mailflow_plugins.dkim import keys as dkim_keys

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


# OpenDKIM's verifier asks the system resolver (port 53, /etc/resolv.conf), which
# cannot be pointed elsewhere. So it runs in a private network + mount namespace
# (``unshare``): only a loopback interface exists there, a resolv.conf naming
# 127.0.0.1 is bind-mounted over the real one (private to the namespace), and this
# script answers the one key record on 127.0.0.1:53 before running the tool.
_OPENDKIM_NAMESPACE_SCRIPT = textwrap.dedent("""\
    import os, socket, subprocess, sys, tempfile, threading
    import dns.message, dns.rcode, dns.rdataclass, dns.rdatatype, dns.rrset
    import dns.rdtypes.ANY.TXT
    name, txt, tool = sys.argv[1:4]
    message = sys.stdin.buffer.read()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    conf = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
    conf.write("nameserver 127.0.0.1\\noptions timeout:2 attempts:1\\n")
    conf.close()
    subprocess.run(["mount", "--bind", conf.name, "/etc/resolv.conf"], check=True)
    os.unlink(conf.name)  # the bind mount keeps it alive; nothing is left behind
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))
    strings = [txt[i:i + 255].encode() for i in range(0, len(txt), 255)]
    def serve():
        while True:
            data, addr = sock.recvfrom(4096)
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            q = query.question[0]
            if str(q.name).rstrip(".").lower() == name and q.rdtype == dns.rdatatype.TXT:
                rrset = dns.rrset.RRset(q.name, dns.rdataclass.IN, dns.rdatatype.TXT)
                rdata = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)
                rrset.add(rdata, 300)
                response.answer.append(rrset)
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            sock.sendto(response.to_wire(), addr)
    threading.Thread(target=serve, daemon=True).start()
    proc = subprocess.run([tool], input=message, capture_output=True, timeout=20)
    sys.stdout.write(f"{proc.returncode}\\n{proc.stdout.decode()}{proc.stderr.decode()}")
    """)


def opendkim_testmsg() -> str | None:
    """Path of OpenDKIM's ``opendkim-testmsg`` (Debian: opendkim-tools), if installed."""
    found = shutil.which("opendkim-testmsg")
    if found is None and Path("/usr/sbin/opendkim-testmsg").exists():
        found = "/usr/sbin/opendkim-testmsg"
    return found


@functools.cache
def can_use_namespaces() -> bool:
    """True when ``unshare --net --mount`` works here (root or user namespaces)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    try:
        done = subprocess.run(
            ["unshare", "--net", "--mount", "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


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


async def run_opendkim_verify(message: bytes, key: KeyFixture) -> tuple[int, str]:
    """Verify with OpenDKIM (``opendkim-testmsg``); (its exit code, its output)."""
    tool = opendkim_testmsg()
    assert tool is not None
    argv = ["unshare", "--net", "--mount", sys.executable, "-c", _OPENDKIM_NAMESPACE_SCRIPT]
    code, out, err = await _run([*argv, key.name, key.txt, tool], message)
    assert code == 0, err.decode("utf-8", "replace")
    status, _, output = out.decode("utf-8", "replace").partition("\n")
    return int(status), output.strip()


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
