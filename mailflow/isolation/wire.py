"""What the server and a content-analysis worker process say to each other.

One frame is a fixed header (the lengths of a pickled object and of raw message
bytes that follow it), the pickle, then the raw bytes, if any. The worker is our
own child process, started from the same installation, so pickle is safe here.

The message bytes travel outside the pickle so that a large message is copied
once into the socket and not again into a pickle buffer; when the worker already
holds the version of the message a job is about (``Job.version``), they are not
sent at all.
"""

from __future__ import annotations

import dataclasses
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from mailflow.message import Connection, Envelope, PluginRun
from mailflow.verdict import Action, Route

HEADER = struct.Struct("!QQ")  # pickle length, raw length (NO_RAW: the worker has it)
NO_RAW = 2**64 - 1
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL


@dataclass(slots=True)
class Init:
    """The first frame a worker reads: what to load."""

    config: Any  # mailflow.config.Config (imported lazily by the worker)
    plugins: list[str]  # the plugin names whose data hook this worker runs
    available: dict[str, Any] | None  # name -> factory, or None for entry points
    log_level: int
    log_file: str | None  # the server's log.file; None: standard error
    # What builds the worker's application from (config, available_plugins=...):
    # mailflow.app.App, sent by reference, so this package never imports the app.
    app_factory: Any = None


@dataclass(slots=True)
class Ready:
    """A worker's answer to Init: ``error`` is empty when it started."""

    error: str = ""
    pid: int = 0


@dataclass(slots=True)
class Job:
    """Run the data hooks of ``plugins``, in order, on one version of one message.

    The worker answers with one :class:`Reply` per hook, as each one finishes (so the
    server knows which hook a timeout belongs to), and stops where the server's
    pipeline would stop (a verdict that ends the data stage)."""

    token: int  # the message, unique in the server process
    version: int  # MessageContext.raw_version of the bytes to use
    plugins: list[str]
    queue_id: str
    envelope: Envelope
    connection: Connection
    score: float
    runs: list[PluginRun]
    routes: dict[str, Route] = field(default_factory=dict)
    action: Action = Action.CONTINUE
    received_at: float = 0.0
    keep: bool = False  # more isolated hooks of this message follow: keep the copy


@dataclass(slots=True)
class Reply:
    """One hook's run, and the message version the worker holds after applying the
    run's mutations (the server applies the same ones and gets the same); ``last``
    marks the job's final reply."""

    run: PluginRun
    version: int
    last: bool


def encode(obj: object, raw: bytes | None = None) -> list[bytes]:
    """The pieces of one frame, to be written in order."""
    meta = pickle.dumps(obj, PICKLE_PROTOCOL)
    head = HEADER.pack(len(meta), NO_RAW if raw is None else len(raw))
    return [head, meta] if raw is None else [head, meta, raw]


def decode_header(head: bytes) -> tuple[int, int | None]:
    meta_len, raw_len = HEADER.unpack(head)
    return meta_len, (None if raw_len == NO_RAW else raw_len)


def read_frame(stream: BinaryIO) -> tuple[Any, bytes | None] | None:
    """One frame from a blocking binary stream; None at end of stream."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    meta_len, raw_len = decode_header(head)
    meta = stream.read(meta_len)
    raw = stream.read(raw_len) if raw_len is not None else None
    if len(meta) < meta_len or (raw_len is not None and (raw is None or len(raw) < raw_len)):
        return None
    return pickle.loads(meta), raw


def without_details(run: PluginRun) -> PluginRun:
    """``run`` with its result's details dropped (when they cannot be pickled)."""
    result = run.result
    if result is not None:
        result = dataclasses.replace(result, details={})
    return dataclasses.replace(run, result=result)
