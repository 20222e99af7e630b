"""One milter conversation mapped onto mailflow's pipeline.

The MTA's events become the steps of the transaction model the SMTP front end and
``mailflow check`` run too (:class:`mailflow.transaction.Transaction`): CONNECT ->
``connect``, HELO -> ``helo``, MAIL -> ``mail``, RCPT -> ``rcpt``, end of message ->
``data`` over a :class:`~mailflow.message.MessageContext` rebuilt from the headers and
body the MTA sent. Plugins cannot tell the front ends apart, and the replies come from
the same stage -> reply table.

Decisions come back as milter replies at the stage they were made (a reject at RCPT is
an SMFIR_REPLYCODE to that RCPT); at end of message the differences between what the
MTA has and what the pipeline produced become modification actions (see ``diff.py``).

What the MTA does itself and mailflow therefore skips here: relay control, size and
loop limits, Received headers, routing and delivery (``SetRoute`` and the
``mailflow_route`` hook have no effect), queueing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mailflow.app import App
from mailflow.delivery.spool import new_queue_id
from mailflow.message import Connection, Delivery, MessageContext
from mailflow.milter import protocol as p
from mailflow.milter.diff import Field, Snapshot, all_edits, field_from_milter, parse_fields
from mailflow.msglog import record_after_reply
from mailflow.policy import in_networks
from mailflow.transaction import Decision, Transaction
from mailflow.verdict import Action, SMTPReply

log = logging.getLogger("mailflow.milter")

# While plugins work on a message, tell the MTA we are alive (SMFIR_PROGRESS) so its
# milter_content_timeout (Postfix default 300 s) does not run out under slow plugins.
PROGRESS_INTERVAL = 30.0

R_TOO_BIG = SMTPReply(552, "Message size exceeds fixed maximum message size", "5.3.4")

# Macro stages that belong to one transaction: forgotten on SMFIC_ABORT (libmilter too).
_TX_STAGES = (
    p.SMFIC_MAIL,
    p.SMFIC_RCPT,
    p.SMFIC_DATA,
    p.SMFIC_HEADER,
    p.SMFIC_EOH,
    p.SMFIC_BODY,
    p.SMFIC_BODYEOB,
)


@dataclass(slots=True)
class MessageData:
    """The headers and body of the transaction's message as the MTA sends them."""

    headers: list[Field] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    size: int = 0
    too_big: bool = False


class MilterSession:
    """State of one milter connection; :meth:`handle` takes one decoded command.

    ``send`` writes encoded packets to the MTA. :class:`~mailflow.milter.protocol.ProtocolError`
    propagates to the server, which logs it and closes this connection only.
    """

    def __init__(
        self,
        app: App,
        send: Callable[[list[bytes]], Awaitable[None]],
        *,
        default_action: str = "tempfail",
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self.app = app
        self.send = send
        self.default_action = default_action
        self.progress_interval = progress_interval
        self.negotiated = False
        self.actions = 0
        self.protocol = 0
        self.macros: dict[bytes, dict[str, str]] = {}
        self.conn: Connection | None = None
        self.model: Transaction | None = None  # the sans-IO model, from SMFIC_CONNECT on
        self.tx = MessageData()
        self.closed = False
        self._relay_nets = app.config.relay_network_objects
        self._routes_noted = False
        # While this transaction's headers and body arrive, the message counts as
        # arriving for the data-stage batch (mailflow.batching) until end of message.
        self._arriving = False

    # --- helpers ------------------------------------------------------------------------------

    def macro(self, name: str) -> str:
        """Latest value of a macro, whether the MTA spelt it ``{i}`` or ``i``."""
        bare = name.strip("{}")
        for values in reversed(list(self.macros.values())):
            for key in (name, bare, "{" + bare + "}"):
                if key in values:
                    return values[key]
        return ""

    def all_macros(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for values in self.macros.values():
            merged.update(values)
        return merged

    @property
    def leading_space(self) -> bool:
        return bool(self.protocol & p.SMFIP_HDR_LEADSPC)

    async def _reply(self, command: bytes, packets: list[bytes]) -> None:
        """Send ``packets`` unless we agreed the MTA does not wait for this reply."""
        flag = p.NO_REPLY_FLAG.get(command, 0)
        if flag and self.protocol & flag:
            return
        await self.send(packets)

    def _failure_reply(self) -> bytes:
        """Our own failure (not a plugin's): configured like Postfix's milter_default_action."""
        code = p.SMFIR_ACCEPT if self.default_action == "accept" else p.SMFIR_TEMPFAIL
        return p.reply_simple(code)

    @staticmethod
    def _answer(decision: Decision) -> list[bytes]:
        """An early stage's decision as a milter reply (the model's reply on refusal).

        ACCEPT at an early stage only ends that stage's chain (hookspecs); an
        SMFIR_ACCEPT would skip the rest of the message's filtering, so it is never sent.
        """
        if decision.refused and decision.reply is not None:
            return [_reply_code(decision.reply)]
        return [p.reply_simple(p.SMFIR_CONTINUE)]

    # --- dispatch -----------------------------------------------------------------------------

    async def handle(self, cmd: p.Command) -> None:
        code = cmd.code
        if code == p.SMFIC_OPTNEG:
            await self._optneg(cmd.data)
            return
        if not self.negotiated:
            raise p.ProtocolError(f"{cmd.name} before SMFIC_OPTNEG")
        if code == p.SMFIC_MACRO:
            macros = p.decode_macros(cmd.data)
            self.macros[macros.stage] = macros.values
        elif code == p.SMFIC_CONNECT:
            await self._guard(code, self._connect(p.decode_connect(cmd.data)))
        elif code == p.SMFIC_HELO:
            names = p.split_strings(cmd.data)
            await self._guard(code, self._helo(names[0] if names else ""))
        elif code == p.SMFIC_MAIL:
            await self._guard(code, self._mail(*p.decode_args(cmd.data, "MAIL")))
        elif code == p.SMFIC_RCPT:
            await self._guard(code, self._rcpt(*p.decode_args(cmd.data, "RCPT")))
        elif code == p.SMFIC_HEADER:
            self._note_arriving()
            name, value = p.decode_header(cmd.data)
            self._add_body_size(len(name) + len(value) + 4)
            self.tx.headers.append(field_from_milter(name, value, self.leading_space))
            await self._reply(code, [p.reply_simple(p.SMFIR_CONTINUE)])
        elif code == p.SMFIC_BODY:
            self._note_arriving()
            self._add_body(cmd.data)
            await self._reply(code, [p.reply_simple(p.SMFIR_CONTINUE)])
        elif code == p.SMFIC_BODYEOB:
            self._add_body(cmd.data)  # libmilter allows a last chunk here
            self._arrived()
            await self._guard(code, self._end_of_message())
        elif code in (p.SMFIC_DATA, p.SMFIC_EOH, p.SMFIC_UNKNOWN):
            if code != p.SMFIC_UNKNOWN:
                self._note_arriving()
            # Nothing to decide: the MTA answers unknown SMTP commands itself.
            await self._reply(code, [p.reply_simple(p.SMFIR_CONTINUE)])
        elif code == p.SMFIC_ABORT:
            self._reset_transaction()  # no reply (mfdef.h: SMFIC_ABORT expects none)
        elif code == p.SMFIC_QUIT_NC:
            self._reset_connection()  # the next SMFIC_CONNECT starts afresh
            self.macros.clear()
        elif code == p.SMFIC_QUIT:
            self.closed = True
        else:
            raise p.ProtocolError(f"unknown milter command {code!r}")

    async def _guard(self, command: bytes, work: Awaitable[list[bytes]]) -> None:
        """Run a stage; a crash in mailflow itself gets the configured default reply."""
        try:
            packets = await work
        except p.ProtocolError:
            raise
        except Exception:
            log.exception(
                "milter: internal error at %s; answering %s",
                p.COMMAND_NAMES[command],
                self.default_action,
            )
            packets = [self._failure_reply()]
        await self._reply(command, packets)

    # --- stages -------------------------------------------------------------------------------

    async def _optneg(self, data: bytes) -> None:
        offer = p.decode_optneg(data)
        if offer.version < 2:
            raise p.ProtocolError(f"milter protocol version {offer.version} is not supported")
        self.actions = offer.actions & p.WANTED_ACTIONS
        self.protocol = offer.protocol & p.WANTED_PROTOCOL
        self.negotiated = True
        version = min(offer.version, p.MILTER_VERSION)
        log.debug(
            "milter: negotiated version %d actions %#x protocol %#x",
            version,
            self.actions,
            self.protocol,
        )
        await self.send([p.encode_optneg(version, self.actions, self.protocol)])

    async def _connect(self, info: p.ConnectInfo) -> list[bytes]:
        self._reset_connection()
        ip = info.address if info.family in (p.FAMILY_INET, p.FAMILY_INET6) else ""
        conn = Connection(ip=ip, port=info.port)
        # Postfix sends "unknown" or "[addr]" when the client has no verified PTR name.
        known = info.hostname and info.hostname != "unknown" and not info.hostname.startswith("[")
        conn.reverse_name = info.hostname if known else ""
        conn.relay_allowed = in_networks(ip, self._relay_nets)
        self.conn = conn
        # Relay control and the recipient limit are the MTA's (policy=False).
        self.model = Transaction(self.app.pipeline, self.app.config, conn, policy=False)
        return self._answer(await self.model.connect())

    def _require_model(self) -> Transaction:
        if self.model is None:
            raise p.ProtocolError("SMTP event before SMFIC_CONNECT")
        return self.model

    async def _helo(self, name: str) -> list[bytes]:
        model = self._require_model()
        self._tls_facts(model.conn)
        return self._answer(await model.helo(name))  # a second HELO replaces the first

    def _tls_facts(self, conn: Connection) -> None:
        version = self.macro("{tls_version}")
        conn.tls = bool(version)
        conn.tls_version = version

    async def _mail(self, sender: str, options: list[str]) -> list[bytes]:
        model = self._require_model()
        self._reset_transaction(keep=p.SMFIC_MAIL)  # a new MAIL starts a new transaction
        self._tls_facts(model.conn)
        model.conn.authenticated_user = self.macro("{auth_authen}")
        return self._answer(await model.mail(sender, options))

    async def _rcpt(self, recipient: str, options: list[str]) -> list[bytes]:
        return self._answer(await self._require_model().rcpt(recipient, options))

    def _add_body_size(self, n: int) -> None:
        self.tx.size += n
        if self.tx.size > self.app.config.server.max_message_size:
            self.tx.too_big = True  # keep reading, answer at end of message

    def _add_body(self, chunk: bytes) -> None:
        self._add_body_size(len(chunk))
        if not self.tx.too_big:
            self.tx.body += chunk

    async def _end_of_message(self) -> list[bytes]:
        started = time.perf_counter()
        model = self._require_model()
        tx = self.tx
        if tx.too_big:
            model.reset()
            return [_reply_code(R_TOO_BIG)]
        head = b"".join(f.to_bytes() for f in tx.headers)
        raw = head + b"\r\n" + bytes(tx.body)
        # What the MTA has, before the MAIL/RCPT mutations: the edits are the difference.
        sender, recipients = model.tx.sender, list(model.tx.recipients)
        before = Snapshot(list(tx.headers), bytes(tx.body), sender, recipients)
        ctx = model.message(raw, self.macro("{i}") or new_queue_id())
        ctx.connection.front_end = "milter"
        ctx.connection.milter_macros = self.all_macros()
        decision = await self._run_with_progress(model, ctx)
        packets, summary = self._decide(ctx, decision, before)
        elapsed = time.perf_counter() - started
        record_after_reply(ctx, summary, elapsed, self.app.metrics.observe_message)
        return packets

    async def _run_with_progress(self, model: Transaction, ctx: MessageContext) -> Decision:
        async def keepalive() -> None:
            while True:
                await asyncio.sleep(self.progress_interval)
                await self.send([p.reply_simple(p.SMFIR_PROGRESS)])

        task = asyncio.create_task(keepalive())
        try:
            return await model.data(ctx)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _decide(
        self, ctx: MessageContext, decision: Decision, before: Snapshot
    ) -> tuple[list[bytes], str]:
        """The end-of-message replies for the transaction's decision, and a log summary."""
        action = decision.action
        if decision.refused and decision.reply is not None:
            ctx.delivery = Delivery.REFUSED
            return [_reply_code(decision.reply)], str(decision.reply)
        if action is Action.DISCARD:
            # Also when no recipients are left: deleting every recipient would leave
            # the MTA a message it can only bounce or drop.
            ctx.delivery = Delivery.DISCARDED
            return [p.reply_simple(p.SMFIR_DISCARD)], "milter discard"
        if ctx.routes and not self._routes_noted:
            self._routes_noted = True
            log.debug("milter: routes are ignored in milter mode; the MTA delivers")
        head, body = _split(ctx.raw)
        after = Snapshot(parse_fields(head), body, ctx.envelope.mail_from, ctx.envelope.rcpt_tos)
        # Postfix names itself in the "v" macro and hides its own Received header.
        offset = 1 if self.macro("v").startswith("Postfix") else 0
        packets = all_edits(before, after, self.actions, self.leading_space, offset)
        summary = f"milter continue ({len(packets)} edits)"
        if action is Action.QUARANTINE:
            if self.actions & p.SMFIF_QUARANTINE:
                packets.append(p.reply_quarantine(ctx.reason or "quarantined by mailflow"))
                summary = f"milter quarantine ({len(packets) - 1} edits)"
            else:
                log.warning("milter: MTA did not allow quarantine; message %s passed", ctx.queue_id)
        ctx.delivery = Delivery.MILTER
        packets.append(p.reply_simple(p.SMFIR_CONTINUE))
        return packets, summary

    # --- resets -------------------------------------------------------------------------------

    def _note_arriving(self) -> None:
        if not self._arriving:
            self._arriving = True
            self.app.pipeline.batch.begin_receiving()

    def _arrived(self) -> None:
        if self._arriving:
            self._arriving = False
            self.app.pipeline.batch.end_receiving()

    def finish(self) -> None:
        """The connection is gone: forget the transaction it left open."""
        self._reset_transaction()

    def _reset_transaction(self, keep: bytes = b"") -> None:
        """Forget the transaction; ``keep`` names the macro stage just received for it."""
        self._arrived()
        self.tx = MessageData()
        if self.model is not None:
            self.model.reset()
        for stage in _TX_STAGES:
            if stage != keep:
                self.macros.pop(stage, None)

    def _reset_connection(self) -> None:
        self._reset_transaction()
        self.macros = {k: v for k, v in self.macros.items() if k == p.SMFIC_CONNECT}
        self.conn = None
        self.model = None


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """Header block and body. A message without headers starts with the empty line;
    ``MessageContext.split`` would look for a blank line inside such a body first."""
    if raw.startswith(b"\r\n"):
        return b"", raw[2:]
    end = raw.find(b"\r\n\r\n")
    if end < 0:  # headers only, no empty line
        return (raw if raw.endswith(b"\r\n") else raw + b"\r\n"), b""
    return raw[: end + 2], raw[end + 4 :]


def _reply_code(reply: SMTPReply) -> bytes:
    return p.reply_code(reply.code, reply.status, reply.text)
