"""DKIM signing of outbound mail (RFC 6376 5, RFC 8463), plugin name ``dkim_sign``.

Mail from a trusted client (SMTP AUTH user or a ``relay_networks`` address) whose
From domain, or failing that envelope sender domain, has a configured key is
signed with every key configured for that domain (so ``rsa-sha256`` and
``ed25519-sha256`` can be used side by side, as RFC 8463 3 suggests).

The signature covers the message exactly as the pipeline holds it at this
plugin's turn: mutations of the plugins listed before it (disclaimers, footers,
header edits) are already applied. List ``dkim_sign`` last, so nothing changes the
signed headers or body afterwards. Headers the core adds after the chain
(``X-Spam-Flag``) and the ``Received`` trace header are not signed.

Only *relaxed* header canonicalization is offered: the core re-folds the header
value when it inserts the ``DKIM-Signature`` field, which ``simple`` header
canonicalization (RFC 6376 3.4.1) would not survive.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Literal

import click
import dkim
from mailflow_plugins.dkim import keys as dkim_keys
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailflow.api import AddHeader, App, MessageContext, Mutation, Result, hookimpl, mime

log = logging.getLogger("mailflow.plugins.dkim_sign")

# Signed by default: RFC 6376 5.4.1's list of fields a signer SHOULD sign that
# matter for display and threading.
DEFAULT_HEADERS = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
]
# Signed once more than present, so a second copy cannot be added without breaking
# the signature (RFC 6376 8.15, "oversigning").
DEFAULT_OVERSIGN = ["From", "Subject", "Date", "To", "Cc", "Reply-To"]
_FORBIDDEN = {h.decode() for h in dkim.DKIM.SHOULD_NOT}


class KeySettings(BaseModel):
    """One signing key: ``d=`` domain, selector, private key file and algorithm."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str = Field(min_length=1)
    selector: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    key_file: Path
    algorithm: dkim_keys.Algorithm = "rsa-sha256"
    subdomains: bool = False  # also sign mail from any subdomain of ``domain``

    @field_validator("domain")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().rstrip(".").lower()


class SignSettings(BaseModel):
    """``plugins: [{name: dkim_sign, settings: {...}}]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[KeySettings] = Field(min_length=1)
    headers: list[str] = DEFAULT_HEADERS
    oversign: list[str] = DEFAULT_OVERSIGN
    body_canonicalization: Literal["relaxed", "simple"] = "relaxed"

    @field_validator("headers", "oversign")
    @classmethod
    def _allowed(cls, value: list[str]) -> list[str]:
        bad = [h for h in value if h.lower() in _FORBIDDEN]
        if bad:
            raise ValueError(f"these header fields must not be signed (RFC 6376 5.4): {bad}")
        return value


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().rstrip(".>").lower()


def include_list(header_names: list[str], settings: SignSettings) -> list[str]:
    """The ``h=`` list: each configured field as often as present, oversigned +1."""
    counts: dict[str, int] = {}
    for name in header_names:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    oversign = {h.lower() for h in settings.oversign}
    out: list[str] = []
    for name in dict.fromkeys(h.lower() for h in settings.headers):
        n = counts.get(name, 0) + (1 if name in oversign else 0)
        out.extend([name] * n)
    if "from" not in out:  # RFC 6376 5.4: From MUST be signed
        out.insert(0, "from")
    return out


def sign_message(
    raw: bytes,
    key: KeySettings,
    private: bytes,
    include: list[str],
    body_canon: str,
) -> str:
    """Sign ``raw`` and return the ``DKIM-Signature`` header *value* (unfolded)."""
    signer = dkim.DKIM(raw, signature_algorithm=key.algorithm.encode())
    header = signer.sign(
        key.selector.encode(),
        key.domain.encode(),
        private,
        include_headers=[h.encode() for h in include],
        canonicalize=(b"relaxed", body_canon.encode()),
    )
    name, _, value = header.decode("ascii").partition(":")
    assert name.lower() == "dkim-signature"
    return " ".join(value.split())


class DKIMSign:
    """The ``dkim_sign`` plugin: see the module docstring."""

    Settings = SignSettings
    # Body canonicalization and hashing take time linear in the message, much of it in
    # regular expressions that hold the interpreter lock: a large message is handled in
    # a content-analysis worker process (docs/plugins.md, "Isolation").
    isolate = "large"

    def __init__(self, settings: SignSettings) -> None:
        self.settings = settings
        self._keys: list[tuple[KeySettings, bytes]] = []

    @hookimpl
    def mailflow_startup(self, app: App) -> None:
        """Load every key now, so a missing or bad file stops start-up with its name."""
        loaded = []
        for key in self.settings.keys:
            private = dkim_keys.load_private(key.key_file, key.algorithm)
            loaded.append((key, private))
        self._keys = loaded

    def keys_for(self, domain: str) -> list[tuple[KeySettings, bytes]]:
        """Keys whose domain is ``domain`` (or a parent, when subdomains are allowed)."""
        exact = [(k, p) for k, p in self._keys if k.domain == domain]
        if exact:
            return exact
        return [(k, p) for k, p in self._keys if k.subdomains and domain.endswith("." + k.domain)]

    @hookimpl
    async def mailflow_data(self, message: MessageContext) -> Result | None:
        if not message.connection.trusted:
            return None  # only our own users' mail is ours to sign
        from_values = message.fields.get_all("From")
        if len(from_values) != 1:
            # RFC 5322 3.6: exactly one From; signing an ambiguous author is pointless.
            reason = "no From header" if not from_values else f"{len(from_values)} From headers"
            return Result(details={"signed": [], "reason": f"not signed: {reason}"})
        addresses = [
            a.address for a in mime.parse_addresses(mime.unfold(from_values[0]), 1) if a.address
        ]
        candidates = [_domain_of(a) for a in addresses[:1]] + [
            _domain_of(message.envelope.mail_from)
        ]
        keys: list[tuple[KeySettings, bytes]] = []
        for domain in candidates:
            if domain and (keys := self.keys_for(domain)):
                break
        if not keys:
            return Result(details={"signed": [], "reason": "no key for the sender's domain"})
        raw = message.raw  # the bytes that will be delivered, earlier mutations included
        names = [str(n) for n in message.headers]  # every field, duplicates included
        include = include_list(names, self.settings)
        mutations: list[Mutation] = []
        signed = []
        for key, private in keys:
            try:
                value = await asyncio.to_thread(
                    sign_message, raw, key, private, include, self.settings.body_canonicalization
                )
            except dkim.DKIMException as exc:
                log.warning("dkim_sign: cannot sign for %s: %s", key.domain, exc)
                signed.append({"domain": key.domain, "selector": key.selector, "error": str(exc)})
                continue
            mutations.append(AddHeader("DKIM-Signature", value))
            signed.append(
                {"domain": key.domain, "selector": key.selector, "algorithm": key.algorithm}
            )
        return Result(mutations=mutations, details={"signed": signed})

    @staticmethod
    @hookimpl
    def mailflow_register_commands(cli: click.Group) -> None:
        """Add ``mailflow dkim keygen``."""
        group = cli.commands.get("dkim")
        if not isinstance(group, click.Group):
            group = click.Group("dkim", help="DKIM keys and signing.")
            cli.add_command(group)
        group.add_command(keygen)


@click.command("keygen")
@click.argument("domain")
@click.argument("selector")
@click.option(
    "--type",
    "kind",
    type=click.Choice(["rsa", "ed25519"]),
    default="rsa",
    show_default=True,
    help="Key algorithm (ed25519 is RFC 8463; sign with both for wide support).",
)
@click.option("--bits", type=int, default=dkim_keys.DEFAULT_RSA_BITS, show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory for the private key file.",
)
def keygen(domain: str, selector: str, kind: str, bits: int, out_dir: Path) -> None:
    """Create a DKIM key for DOMAIN/SELECTOR and print the DNS TXT record to publish."""
    domain = domain.strip().rstrip(".").lower()
    try:
        KeySettings(domain=domain, selector=selector, key_file=Path("x"))
    except ValueError as exc:
        raise click.BadParameter(str(exc).splitlines()[-1], param_hint="SELECTOR") from None
    try:
        pair = dkim_keys.generate("ed25519" if kind == "ed25519" else "rsa", bits)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bits") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{selector}.{domain}.{kind}.key"
    try:
        dkim_keys.write_private(path, pair.private)
    except FileExistsError:
        raise click.ClickException(f"{path} exists; not overwriting a key") from None
    algorithm = "ed25519-sha256" if kind == "ed25519" else "rsa-sha256"
    value = dkim_keys.txt_record(pair.type, pair.public_b64)
    name = dkim_keys.record_name(domain, selector)
    click.echo(f"; private key written to {path} (mode 0600)")
    click.echo("; publish this TXT record (RFC 6376 3.6.2.1):")
    click.echo(f"{name}. IN TXT ( {dkim_keys.zone_strings(value)} )")
    click.echo("; and add to mailflow.yaml under the dkim_sign plugin's settings.keys:")
    click.echo(
        f"; - {{domain: {domain}, selector: {selector}, key_file: {path.resolve()}, "
        f"algorithm: {algorithm}}}"
    )
