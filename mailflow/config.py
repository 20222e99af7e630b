"""mailflow.yaml -> validated, immutable config models.

Unknown keys are errors. Every error names the file, the key path, the line (from
the YAML node marks) and what was expected.
"""

from __future__ import annotations

import difflib
import importlib.resources
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_NAME = "<embedded default>"

# How the spool and Maildir make writes durable (docs/delivery.md, "Durable writes").
SyncMethod = Literal["auto", "syncfs", "fsync"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def _parse_size(value: Any) -> Any:
    """Accept 1048576, "25M", "25MB", "1.5 GiB"."""
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(f"expected a size such as 10485760, '25M' or '1G', got {value!r}")
        unit = (m.group(2) or "").lower()[:1]
        return int(float(m.group(1)) * _SIZE_UNITS[unit])
    return value


def _parse_duration(value: Any) -> Any:
    """Accept 30, 30.5, "30s", "5m", "2h", "5d"."""
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(
                f"expected a duration such as 30, '30s', '5m', '2h' or '5d', got {value!r}"
            )
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return value


Size = Annotated[int, BeforeValidator(_parse_size), Field(ge=0)]
Duration = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_section_means_defaults(cls, data: Any) -> Any:
        # "server:" with every key below it commented out is YAML null: all defaults.
        # Likewise an emptied list or mapping ("targets:") is an empty one.
        if data is None:
            return {}
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if name in data and data[name] is None:
                    origin = get_origin(field.annotation)
                    if origin in (list, dict):
                        data = {**data, name: origin()}
        return data


class TLSConfig(Strict):
    cert: Path
    key: Path
    require: bool = False  # refuse MAIL before STARTTLS


class AuthThrottleConfig(Strict):
    """How failed SMTP AUTH attempts are slowed down and locked out (docs/smtp.md).

    The keys of ``server.auth`` other than the users file; their defaults also apply
    to an authenticator handed in without ``server.auth`` (embedding, tests).
    """

    # Before answering a failed attempt: this, times the recent failures of the
    # connection, client address or user name (whichever has most), at most 10 times.
    failure_delay: Duration = 1.0
    # Failures from one client address (an IPv6 /64) that lock it out ...
    max_failures_per_ip: int = Field(default=10, ge=1)
    # Networks whose addresses are not counted or locked out per address (a webmail
    # or submission proxy that logs in for many users); the per-user limit still applies.
    max_failures_per_ip_exempt: list[str] = []
    # ... and failures for one user name, from any address, that lock the name out.
    max_failures_per_user: int = Field(default=20, ge=1)
    # Failures are forgotten once this long has passed without a new one.
    failure_window: Duration = Field(default=900.0, gt=0)
    # How long a locked-out address or user gets 454 4.7.0 without a password check.
    lockout_time: Duration = Field(default=900.0, gt=0)
    # Password checks (argon2: ~64 MiB and several cores each) running at once; more wait.
    max_concurrent_checks: int = Field(default=1, ge=1)

    @field_validator("max_failures_per_ip_exempt")
    @classmethod
    def _check_exempt(cls, value: list[str]) -> list[str]:
        return check_networks(value)


class AuthConfig(AuthThrottleConfig):
    users_file: Path  # lines "user:$argon2id$..." (see `mailflow users add`)
    mechanisms: list[Literal["PLAIN", "LOGIN"]] = ["PLAIN", "LOGIN"]


class ServerConfig(Strict):
    listen: list[str] = ["127.0.0.1:2525"]
    hostname: str = "localhost"
    max_message_size: Size = 25 * 1024 * 1024
    max_recipients: int = Field(default=100, ge=1)
    max_connections: int = Field(default=200, ge=1)
    # Concurrent connections from one client address (relay_networks are exempt: an
    # MTA in front of mailflow opens many); None: no limit of its own.
    max_connections_per_ip: int | None = Field(default=50, ge=1)
    # Further networks exempt from it, without the right to relay (a load balancer,
    # a monitoring host).
    max_connections_per_ip_exempt: list[str] = []
    command_timeout: Duration = 300.0
    # Time without progress: a finished DATA, AUTH, STARTTLS, the first HELO/EHLO (NOOP,
    # RSET, HELP, VRFY, unknown commands, and MAIL/RCPT without their DATA are none).
    idle_timeout: Duration = 300.0
    data_timeout: Duration = 600.0  # silence during DATA
    # The whole of the message data, 354 to the final dot; 0: no limit.
    data_deadline: Duration = 3600.0
    # Bytes per second, on average since the 354, that DATA must keep up after
    # data_rate_grace (the client is allowed grace + bytes / rate seconds); 0: off.
    data_min_rate: Size = 500
    data_rate_grace: Duration = 30.0
    max_received_headers: int = Field(default=50, ge=1)  # loop detection (RFC 5321 6.3)
    bare_newline: Literal["normalize", "reject"] = "normalize"
    # Message data beyond this size goes to a temporary file while it arrives ...
    large_message_threshold: Size = 256 * 1024
    # ... and such messages held in memory to be filtered share this many bytes; the
    # next one waits for room (its client for the reply). At least one message fits.
    large_message_memory: Size = Field(default=100 * 1024 * 1024, ge=1)
    # Octets per second of large messages (past large_message_threshold) the server
    # reads, all connections together, so that a flood of them leaves the event loop
    # time for everyone else's replies (docs/smtp.md, "Memory"); 0: no limit.
    large_message_rate: Size = 64 * 1024 * 1024
    reverse_dns: bool = False
    # Turns of the event loop a message waits at the data stage for messages whose data
    # is still arriving (SMTP or milter); the batch then runs through the plugins back
    # to back, faster (mailflow.batching). 0: each message at once.
    data_batch_rounds: int = Field(default=3, ge=0, le=20)
    tls: TLSConfig | None = None
    auth: AuthConfig | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_listen(item)
        return value

    @field_validator("max_connections_per_ip_exempt")
    @classmethod
    def _check_exempt(cls, value: list[str]) -> list[str]:
        return check_networks(value)


class MaildirConfig(Strict):
    root: Path = Path("./mail")
    # {recipient}, {local}, {domain} are replaced; result is relative to root.
    layout: str = "{recipient}"
    quota: Size | None = None  # bytes per mailbox; None = unlimited
    over_quota_code: Literal[452, 552] = 452


class LMTPTarget(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=24, ge=0, le=65535)
    socket: Path | None = None  # unix socket path instead of host:port
    # First delivery attempt before the 250, for at most this long (as relay's); 0:
    # spool first.
    inline_timeout: Duration = 5.0


class RelayTarget(Strict):
    host: str
    port: int = Field(default=25, ge=0, le=65535)
    tls: Literal["none", "opportunistic", "required", "verify"] = "opportunistic"
    username: str | None = None
    password: str | None = None
    timeout: Duration = 60.0
    ca_file: Path | None = None  # CA bundle for tls: verify (default: the system CAs)


class LocalDeliveryConfig(Strict):
    method: Literal["maildir", "lmtp"] = "maildir"
    maildir: MaildirConfig = MaildirConfig()
    lmtp: LMTPTarget | None = None


class RelayConfig(Strict):
    # "none": refuse non-local recipients; "mx": deliver to the domain's MX;
    # any other string names a target in `targets`.
    default: str = "none"
    targets: dict[str, RelayTarget] = {}
    routes: dict[str, str] = {}  # recipient domain -> target name or "mx"
    mx_tls: Literal["none", "opportunistic", "required", "verify"] = "opportunistic"
    mx_port: int = Field(default=25, ge=0, le=65535)
    mx_ca_file: Path | None = None  # CA bundle for mx_tls: verify (default: the system CAs)
    mx_timeout: Duration = 60.0
    helo_name: str | None = None
    # Idle outbound connections kept per (host, port, TLS policy) for reuse.
    pool_size: int = Field(default=8, ge=0)  # = queue.workers: one per concurrent delivery
    pool_idle: Duration = 5.0  # seconds an idle connection is kept before QUIT
    # Relay routes: try the first delivery before answering the client, for at most
    # this long; what the upstream did not accept is spooled. 0: always spool first.
    inline_timeout: Duration = 5.0

    def target_names(self) -> set[str]:
        return set(self.targets) | {"mx", "none"}


class QueueConfig(Strict):
    directory: Path = Path("./spool")
    retry_schedule: list[Duration] = [60, 300, 900, 1800, 3600]
    lifetime: Duration = 5 * 86400.0
    workers: int = Field(default=8, ge=1)
    scan_interval: Duration = 1.0
    bounce_from: str = "MAILER-DAEMON"


class StorageConfig(Strict):
    """How durable writes (spool, Maildir) are synced: see docs/delivery.md."""

    # auto: syncfs(2) once per file system per commit where usable (Linux >= 5.8), else
    # fsync(2) per file and directory. syncfs also flushes other data on that file system.
    sync: SyncMethod = "auto"


class LogConfig(Strict):
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Path | None = None  # default: stderr


class ActionThresholds(Strict):
    """rspamd-style: one place maps the total spam score to an action (None = never)."""

    reject: float | None = None
    quarantine: float | None = None
    junk: float | None = None  # deliver to the recipient's .Junk folder
    add_header: float | None = None


class QuarantineConfig(Strict):
    directory: Path = Path("./quarantine")
    # Feedback (hook mailflow_learn): `quarantine release` teaches the plugins that the
    # message is ham, `quarantine delete --spam` that it is spam. --no-learn skips it.
    learn_on_release: bool = True
    learn_on_delete_spam: bool = True


class DNSConfig(Strict):
    nameservers: list[str] = []  # empty: the system resolver's
    port: int = Field(default=53, ge=1, le=65535)
    timeout: Duration = 2.0
    budget: Duration = 10.0  # overall DNS time per message


class MetricsConfig(Strict):
    listen: str | None = None  # e.g. "127.0.0.1:9125" serves GET /metrics (Prometheus)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value


class MilterConfig(Strict):
    """The milter front end (docs/milter.md): mailflow as a filter behind Postfix/Sendmail."""

    # "127.0.0.1:8891", "[::1]:8891" or "unix:/run/mailflow/milter.sock"; None = off.
    listen: str | None = None
    # What to answer when mailflow itself fails on a message (a bug, not a plugin
    # error: those follow each plugin's on_error). Mirrors Postfix's milter_default_action.
    default_action: Literal["tempfail", "accept"] = "tempfail"
    timeout: Duration = 300.0  # idle seconds per milter connection before closing it
    max_connections: int = Field(default=100, ge=1)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_milter_listen(value)
        return value


class PluginEntry(Strict):
    name: str
    enabled: bool = True
    # What a failure (exception, timeout, dead worker) does to the message: hold it in
    # quarantine for an admin (neither delivered as clean nor deferred until the sender
    # gives up), answer 451, or go on as if the plugin had no opinion (docs/plugins.md).
    on_error: Literal["quarantine", "tempfail", "continue"] = "quarantine"
    timeout: Duration = 30.0
    # Run the data hook in a content-analysis worker process: true (every message),
    # "large" (messages of at least isolation.large_message bytes), false (never);
    # None: as the plugin declares with its `isolate` attribute. See `isolation`.
    isolate: bool | Literal["large"] | None = None
    settings: dict[str, Any] = {}


class IsolationConfig(Strict):
    """Worker processes for CPU-bound data hooks (mailflow.isolation)."""

    # How many; None: one per CPU core; 0: every plugin runs in the server process,
    # where a timeout cannot stop work that never yields.
    processes: int | None = Field(default=None, ge=0, le=256)
    start_timeout: Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)] = 60.0
    # How long a message waits for a free worker before it is answered 451 (the
    # workers are all busy, or being restarted). 0: no limit.
    queue_timeout: Duration = 60.0
    # Where `isolate: large` hooks (the builtins: linear in the message size, so a
    # smaller message cannot keep them busy for long) start running in a worker.
    large_message: Size = 64 * 1024

    def process_count(self) -> int:
        if self.processes is not None:
            return self.processes
        return max(1, os.cpu_count() or 1)


class Config(Strict):
    server: ServerConfig = ServerConfig()
    local_domains: list[str] = ["*"]  # "*" accepts any recipient as local
    relay_networks: list[str] = []  # CIDRs allowed to relay without AUTH
    delivery: LocalDeliveryConfig = LocalDeliveryConfig()
    relay: RelayConfig = RelayConfig()
    queue: QueueConfig = QueueConfig()
    quarantine: QuarantineConfig = QuarantineConfig()
    storage: StorageConfig = StorageConfig()
    actions: ActionThresholds = ActionThresholds()
    dns: DNSConfig = DNSConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    milter: MilterConfig = MilterConfig()
    isolation: IsolationConfig = IsolationConfig()
    authserv_id: str | None = None  # default: server.hostname
    # Where mail to <postmaster> and postmaster@<local domain> goes (RFC 5321 4.5.1);
    # default: postmaster@ the first local domain (see postmaster_mailbox).
    postmaster: str | None = None
    plugins: list[PluginEntry] = []

    # Where the config came from, kept so later checks (plugin settings) can name lines.
    _source: str = PrivateAttr(default=DEFAULT_CONFIG_NAME)
    _lines: dict[tuple[Any, ...], int] = PrivateAttr(default_factory=dict)
    # The directory of the config file: relative paths in it (plugin settings too) are
    # relative to it. None: the embedded default or parsed text (relative to the cwd).
    _base_dir: Path | None = PrivateAttr(default=None)

    @field_validator("relay_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        return check_networks(value)

    @field_validator("plugins")
    @classmethod
    def _unique_plugins(cls, value: list[PluginEntry]) -> list[PluginEntry]:
        twice = first_repeated(p.name for p in value)
        if twice is not None:
            raise ValueError(f"plugin {twice!r} is listed twice")
        return value

    def is_local_domain(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        for pattern in self.local_domains:
            p = pattern.lower()
            if p == "*" or p == domain or (p.startswith("*.") and domain.endswith(p[1:])):
                return True
        return False

    @property
    def postmaster_mailbox(self) -> str:
        """The mailbox for postmaster: ``postmaster``, else postmaster@ the first local
        domain that is not a pattern, else postmaster@ ``server.hostname``."""
        if self.postmaster:
            return self.postmaster
        for pattern in self.local_domains:
            if "*" not in pattern:
                return f"postmaster@{pattern.lower().rstrip('.')}"
        return f"postmaster@{self.server.hostname.lower()}"

    @property
    def relay_network_objects(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.relay_networks]


def check_networks(values: list[str]) -> list[str]:
    """Validator body: every item must be an IP network in CIDR form."""
    for net in values:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ValueError(
                f"{net!r} is not a network (expected CIDR such as 10.0.0.0/8)"
            ) from None
    return values


def first_repeated(names: Iterable[str]) -> str | None:
    """The first name that occurs a second time, or None."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def parse_listen(item: str) -> tuple[str, int]:
    """'127.0.0.1:2525', '[::1]:2525', ':25' -> (host, port)."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", item.strip())
    if not m:
        raise ValueError(f"listen address {item!r}: expected HOST:PORT or [IPv6]:PORT")
    host = m.group(1) if m.group(1) is not None else (m.group(3) or "0.0.0.0")
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"listen address {item!r}: port out of range")
    return host, port


def parse_milter_listen(item: str) -> tuple[str, int] | str:
    """'unix:/path' -> '/path'; 'inet:HOST:PORT' or 'HOST:PORT' -> (host, port)."""
    text = item.strip()
    if text.startswith(("unix:", "local:")):
        path = text.partition(":")[2]
        if not path.startswith("/"):
            raise ValueError(f"milter listen {item!r}: expected an absolute socket path")
        return path
    return parse_listen(text.removeprefix("inet:").removeprefix("inet6:"))


# --- loading with good errors --------------------------------------------------------------


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} {self.message}"


class ConfigError(Exception):
    """One or more problems in a config file; ``str()`` lists them one per line."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _to_python(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> Any:
    """Turn a composed YAML node tree into Python objects, remembering each key's line."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if not isinstance(key, str | int | float | bool | None):
                raise ConfigError(
                    [
                        ConfigIssue(
                            "",
                            _dotted(path),
                            key_node.start_mark.line + 1,
                            "keys must be plain names, not lists or mappings",
                        )
                    ]
                )
            if key in out:
                # YAML itself would silently keep the last one; that hides mistakes.
                first = lines.get((*path, key))
                raise ConfigError(
                    [
                        ConfigIssue(
                            "",
                            _dotted((*path, key)),
                            key_node.start_mark.line + 1,
                            f"duplicate key (first given on line {first})",
                        )
                    ]
                )
            child = (*path, key)
            out[key] = _to_python(value_node, child, lines)
            lines[child] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, (*path, i), lines) for i, v in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    # Tags were resolved while composing, so the safe constructor can build the value
    # directly (re-serializing an empty value such as ``tls:`` would not parse back).
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# pydantic's wording ("Input should be a valid integer, unable to parse string as an
# integer") is precise but long; these say what was expected in the config's own terms.
_EXPECTED = {
    "int_parsing": "expected a whole number",
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a text string",
    "list_type": "expected a list (e.g. [a, b] or lines starting with '- ')",
    "dict_type": "expected a mapping of keys (key: value)",
    "model_type": "expected a mapping of keys (key: value)",
    "model_attributes_type": "expected a mapping of keys (key: value)",
    "path_type": "expected a file or directory path",
}


def _explain(err: dict[str, Any], known: list[str] | None = None) -> str:
    """One pydantic error as a short sentence ending with the offending value."""
    kind = err.get("type", "")
    value = err.get("input")
    if kind == "extra_forbidden":
        key = str(err["loc"][-1]) if err.get("loc") else ""
        close = difflib.get_close_matches(key, known or [], n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see `mailflow init` for all keys"
        return f"unknown key ({hint})"
    if kind == "missing":
        return "required key is missing"
    msg = _EXPECTED.get(kind) or str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if msg.startswith("Input should be "):
        msg = msg.removeprefix("Input should be ")
        if msg.startswith(("greater ", "less ")):
            msg = "a value " + msg  # "expected a value greater than or equal to 1"
        msg = "expected " + msg
    shown = repr(value)
    if not isinstance(value, dict | list) and shown not in msg:
        msg += f" (got {shown})"
    return msg


def _unwrap(tp: Any) -> Any:
    """Drop ``Annotated[...]`` and ``X | None`` around an annotation."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, UnionType):
            options = [a for a in get_args(tp) if a is not type(None)]
            if len(options) != 1:
                return tp
            tp = options[0]
        else:
            return tp


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed beside ``loc[-1]``, for "did you mean" hints (best effort)."""
    current: Any = model
    for part in loc[:-1]:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif get_origin(current) in (dict, list):
            current = get_args(current)[-1]  # a mapping's value type, a list's item type
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def load_yaml(text: str, filename: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse YAML text into Python data plus the line of every key path.

    Raises :class:`ConfigError` for syntax errors and duplicate keys.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or "invalid YAML"
        if exc.context:  # e.g. "while scanning a quoted scalar" started on another line
            where = f" (line {exc.context_mark.line + 1})" if exc.context_mark else ""
            problem = f"{problem} {exc.context}{where}"
        raise ConfigError(
            [ConfigIssue(filename, "", line, f"YAML syntax error: {problem}")]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(filename, "", None, f"YAML error: {exc}")]) from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is None:
        return {}, lines
    try:
        return _to_python(node, (), lines), lines
    except ConfigError as exc:
        raise ConfigError(
            [ConfigIssue(filename, i.path, i.line, i.message) for i in exc.issues]
        ) from None


ModelT = TypeVar("ModelT", bound=BaseModel)


def validate_model(
    model: type[ModelT], data: Any, filename: str, lines: dict[tuple[Any, ...], int]
) -> ModelT:
    """Validate loaded YAML data against ``model``; errors name file, key path and line."""
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(filename, "", 1, "the top level must be a mapping of keys")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        issues = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = None
            for n in range(len(loc), -1, -1):
                if loc[:n] in lines:
                    line = lines[loc[:n]]
                    break
            known = _known_keys(model, loc) if err.get("type") == "extra_forbidden" else None
            issues.append(ConfigIssue(filename, _dotted(loc), line, _explain(dict(err), known)))
        raise ConfigError(_by_line(issues)) from None


def parse_config(
    text: str, filename: str = DEFAULT_CONFIG_NAME, base_dir: Path | None = None
) -> Config:
    """Parse and validate YAML text; raise :class:`ConfigError` naming file/key/line.

    With ``base_dir``, every relative path in the config is made relative to it
    (:func:`resolve_paths`), and plugins resolve theirs against it too.
    """
    data, lines = load_yaml(text, filename)
    config = validate_model(Config, data, filename, lines)
    _check_references(config, filename, lines)
    if base_dir is not None:
        config = resolve_paths(config, base_dir)
        config._base_dir = base_dir
    config._source = filename
    config._lines = lines
    return config


def resolve_paths(model: ModelT, base_dir: Path) -> ModelT:
    """``model`` with every relative :class:`~pathlib.Path` field (in nested models,
    lists and mappings too) joined to ``base_dir``. Text fields are left alone."""
    resolved = _resolved(model, base_dir)
    assert isinstance(resolved, type(model))
    return resolved


def _resolved(value: Any, base_dir: Path) -> Any:
    if isinstance(value, Path):
        return value if value.is_absolute() else base_dir / value
    if isinstance(value, BaseModel):
        changed = {}
        for name in type(value).model_fields:
            old = getattr(value, name)
            new = _resolved(old, base_dir)
            if new is not old:
                changed[name] = new
        return value.model_copy(update=changed) if changed else value
    if isinstance(value, list):
        items = [_resolved(v, base_dir) for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    if isinstance(value, dict):
        mapped = {k: _resolved(v, base_dir) for k, v in value.items()}
        return mapped if any(mapped[k] is not value[k] for k in value) else value
    return value


def _by_line(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    """In file order, as an editor shows them (pydantic reports in model-field order)."""
    return sorted(issues, key=lambda i: i.line or 0)


def issues_from_validation(
    config: Config,
    prefix: tuple[Any, ...],
    exc: ValidationError,
    model: type[BaseModel] | None = None,
) -> ConfigError:
    """Turn a nested model's ValidationError (e.g. plugin settings) into a ConfigError.

    ``model`` (the one that raised) makes unknown keys come with a "did you mean" hint.
    """
    issues = []
    for err in exc.errors():
        loc = (*prefix, *err["loc"])
        line = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in config._lines:
                line = config._lines[loc[:n]]
                break
        known = None
        if model is not None and err.get("type") == "extra_forbidden":
            known = _known_keys(model, tuple(err["loc"]))
        issues.append(ConfigIssue(config._source, _dotted(loc), line, _explain(dict(err), known)))
    return ConfigError(_by_line(issues))


def _check_references(config: Config, filename: str, lines: dict[tuple[Any, ...], int]) -> None:
    """Cross-field checks pydantic cannot express per field."""
    issues: list[ConfigIssue] = []
    names = config.relay.target_names()
    if config.relay.default not in names:
        issues.append(
            ConfigIssue(
                filename,
                "relay.default",
                lines.get(("relay", "default")),
                f"unknown target {config.relay.default!r}; expected one of {sorted(names)} "
                "(targets are defined under relay.targets)",
            )
        )
    for domain, target in config.relay.routes.items():
        if target not in names:
            issues.append(
                ConfigIssue(
                    filename,
                    f"relay.routes.{domain}",
                    lines.get(("relay", "routes", domain)),
                    f"unknown target {target!r}; expected one of {sorted(names)} "
                    "(targets are defined under relay.targets)",
                )
            )
    postmaster_issue = _postmaster_issue(config)
    if postmaster_issue:
        where = ("postmaster",) if config.postmaster else ("local_domains",)
        issues.append(ConfigIssue(filename, where[0], lines.get(where), postmaster_issue))
    if config.delivery.method == "lmtp" and config.delivery.lmtp is None:
        issues.append(
            ConfigIssue(
                filename,
                "delivery.lmtp",
                lines.get(("delivery",)),
                "delivery.method is 'lmtp' but no delivery.lmtp target is set",
            )
        )
    if issues:
        raise ConfigError(issues)


_MAILBOX = re.compile(r"[^\s@<>()\[\],;:\\\"]+@[A-Za-z0-9][A-Za-z0-9.-]*")


def _postmaster_issue(config: Config) -> str | None:
    """Why mail for postmaster could not be delivered with this config, or None."""
    mailbox = config.postmaster_mailbox
    if not _MAILBOX.fullmatch(mailbox):
        return f"{mailbox!r} is not a mailbox (expected local@domain)"
    domain = mailbox.rpartition("@")[2].lower()
    if config.is_local_domain(domain):
        return None
    if config.relay.routes.get(domain, config.relay.default) != "none":
        return None  # relayed, like any other mail to that domain
    if config.postmaster:
        return (
            f"{mailbox!r} is neither in local_domains nor routed by relay "
            "(mail to postmaster could not be delivered)"
        )
    return (
        f"mail to postmaster would go to {mailbox!r}, which is not local: "
        "set postmaster to a mailbox (RFC 5321 4.5.1)"
    )


def default_config_text() -> str:
    return importlib.resources.files("mailflow").joinpath("default.yaml").read_text("utf-8")


def read_text_file(path: str | Path) -> str:
    """A config-like file's text; unreadable or non-UTF-8 files are a ConfigError."""
    p = Path(path)
    try:
        return p.read_text("utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(p), "", None, f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(str(p), "", None, "not UTF-8 text")]) from None


def load_config(path: str | Path | None = None) -> Config:
    """Load ``path``, or the embedded default when ``path`` is None.

    Relative paths in the file are relative to the file's directory.
    """
    if path is None:
        return parse_config(default_config_text(), DEFAULT_CONFIG_NAME)
    base_dir = Path(os.path.abspath(path)).parent  # abspath: also drops '..' parts
    return parse_config(read_text_file(path), str(path), base_dir)
