"""One client's SMTP conversation as a sans-IO model: the stages, what to answer.

The SMTP front end (:mod:`mailflow.smtp`), the milter session
(:mod:`mailflow.milter.session`) and ``mailflow check`` (:mod:`mailflow.check`) are
adapters over :class:`Transaction`: they turn what they receive into calls of
:meth:`~Transaction.connect`, :meth:`~Transaction.helo`, :meth:`~Transaction.mail`,
:meth:`~Transaction.rcpt` and :meth:`~Transaction.data` and send the
:class:`Decision` each returns in their own protocol. The model does no I/O of its own
beyond awaiting the pipeline (and the optional recipient check it is given); it owns
the plugin runs, the pending MAIL/RCPT mutations and verdicts, the score, the refused
recipients and, through :func:`mailflow.verdict.refusal_reply`, the one stage ->
reply table. Storing the message (spool, quarantine) stays with the front end: only it
knows when the message is durable, and only then may it answer 250.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mailflow.config import Config
from mailflow.message import Connection, Envelope, MessageContext, PluginRun
from mailflow.pipeline import Pipeline
from mailflow.policy import admit_recipient
from mailflow.verdict import (
    PENDING,
    REFUSE,
    STAGE_ACTIONS,
    Action,
    Mutation,
    Result,
    SMTPReply,
    Stage,
    refusal_reply,
)

# RFC 5321 4.5.3.1.8: a server may refuse recipients past its limit, temporarily.
R_TOO_MANY_RCPTS = SMTPReply(452, "Too many recipients", "4.5.3")
# RFC 5321 3.3: a transaction whose every recipient was refused.
R_NO_VALID_RCPTS = SMTPReply(554, "No valid recipients", "5.5.1")
NO_RECIPIENTS_LEFT = "no recipients left"

# Checks a recipient (as admitted) before the plugins see it, e.g. a mailbox quota:
# a reply refuses it.
RecipientCheck = Callable[[str], Awaitable[SMTPReply | None]]


def accepted_reply(queue_id: str) -> SMTPReply:
    """The answer once the message is durably stored (queued or quarantined)."""
    return SMTPReply(250, f"Ok: queued as {queue_id}", "2.0.0")


def discarded_reply(queue_id: str) -> SMTPReply:
    """The answer to a discarded message: the client is told 250 all the same."""
    return SMTPReply(250, f"Ok: {queue_id} discarded", "2.0.0")


@dataclass(frozen=True, slots=True)
class Decision:
    """What to answer one stage.

    ``action`` CONTINUE: the command is accepted, go on. REJECT / TEMPFAIL: refused
    with ``reply`` (at connect: refuse and close). At the data stage also ACCEPT and
    QUARANTINE (store the message, then answer :func:`accepted_reply`) and DISCARD
    (answer ``reply``, store nothing).
    """

    action: Action
    reply: SMTPReply | None = None
    reason: str = ""
    plugin: str = ""
    address: str = ""  # RCPT: the recipient as admitted (postmaster -> its mailbox)
    duplicate: bool = False  # RCPT: that mailbox is a recipient already (one copy)

    @property
    def refused(self) -> bool:
        return self.action in (Action.REJECT, Action.TEMPFAIL)


GO_ON = Decision(Action.CONTINUE)


@dataclass(slots=True)
class _Pending:
    """A verdict given at MAIL or RCPT that decides the message at end of data."""

    action: Action
    reason: str
    plugin: str


@dataclass(slots=True)
class _MailTransaction:
    """One MAIL ... end of data."""

    sender: str = ""
    options: list[str] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)
    runs: list[PluginRun] = field(default_factory=list)
    mutations: list[Mutation] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    pending: _Pending | None = None


class Transaction:
    """The stages of one client connection and the transactions in it.

    ``policy``: relay control and the recipient limit run here (True where mailflow is
    the MTA: SMTP and ``check``); an MTA in front of the milter does them itself.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        config: Config,
        conn: Connection,
        *,
        policy: bool = True,
        recipient_check: RecipientCheck | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.config = config
        self.conn = conn
        self.policy = policy
        self.recipient_check = recipient_check
        self.connect_runs: list[PluginRun] = []
        self.helo_runs: list[PluginRun] = []
        self.tx = _MailTransaction()

    # --- stages --------------------------------------------------------------------------

    async def connect(self) -> Decision:
        result, runs = await self.pipeline.run_stage("connect", connection=self.conn)
        self.connect_runs = runs
        return self._verdict(Stage.CONNECT, result, runs)

    async def helo(self, name: str) -> Decision:
        """HELO/EHLO: a new name replaces the old one and its runs (RFC 5321 4.1.4),
        and ends any transaction in progress."""
        self.reset()
        self.conn.helo = name
        result, runs = await self.pipeline.run_stage("helo", connection=self.conn, name=name)
        self.helo_runs = runs
        return self._verdict(Stage.HELO, result, runs)

    def forget_helo(self) -> None:
        """After STARTTLS the client starts over (RFC 3207 4.2)."""
        self.reset()
        self.conn.helo = ""
        self.helo_runs = []

    def reset(self) -> None:
        """RSET, a new MAIL, the end of a message, or an aborted transaction."""
        self.tx = _MailTransaction()

    async def mail(self, sender: str, options: list[str]) -> Decision:
        """MAIL FROM (``sender`` "" is the null sender): a new transaction begins."""
        self.reset()
        tx = self.tx
        result, runs = await self.pipeline.run_stage(
            "mail", connection=self.conn, sender=sender, options=options
        )
        tx.runs.extend(runs)
        decision = self._verdict(Stage.MAIL, result, runs)
        if decision.refused:
            return decision
        tx.sender = sender
        tx.options = list(options)
        tx.mutations.extend(_mutations(runs))
        return decision

    async def rcpt(self, asked: str, options: list[str]) -> Decision:
        """RCPT TO: relay control (``policy``), the recipient check, then the plugins."""
        tx = self.tx
        address = asked
        if self.policy:
            if len(tx.recipients) >= self.config.server.max_recipients:
                return self._refuse_rcpt(asked, Decision(Action.TEMPFAIL, R_TOO_MANY_RCPTS))
            # Postmaster (RFC 5321 4.5.1) becomes its configured mailbox here, so the
            # plugins, routing and delivery see an ordinary address.
            address, denied = admit_recipient(self.config, self.conn, asked)
            if denied is not None:
                action = Action.TEMPFAIL if denied.code < 500 else Action.REJECT
                return self._refuse_rcpt(asked, Decision(action, denied, denied.text))
            if address != asked and address in tx.recipients:
                return Decision(Action.CONTINUE, address=address, duplicate=True)
        if self.recipient_check is not None:
            refusal = await self.recipient_check(address)
            if refusal is not None:
                action = Action.TEMPFAIL if refusal.code < 500 else Action.REJECT
                return self._refuse_rcpt(asked, Decision(action, refusal, refusal.text))
        result, runs = await self.pipeline.run_stage(
            "rcpt", connection=self.conn, sender=tx.sender, recipient=address, options=options
        )
        tx.runs.extend(runs)
        decision = self._verdict(Stage.RCPT, result, runs)
        if decision.refused:
            return self._refuse_rcpt(asked, decision)
        tx.recipients.append(address)
        tx.mutations.extend(_mutations(runs))
        return Decision(Action.CONTINUE, address=address)

    def message(self, raw: bytes, queue_id: str) -> MessageContext:
        """The message of this transaction: every run so far recorded (score), the
        MAIL/RCPT mutations applied together now that the recipients are known."""
        tx = self.tx
        ctx = MessageContext(
            raw, Envelope(tx.sender, list(tx.recipients), list(tx.options)), self.conn, queue_id
        )
        for run in (*self.connect_runs, *self.helo_runs, *tx.runs):
            ctx.record(run)
        if tx.mutations:
            ctx.apply(tx.mutations)
        if tx.refused:
            ctx.refused_recipients = dict(tx.refused)
        return ctx

    async def data(self, ctx: MessageContext) -> Decision:
        """End of data: the data hooks, thresholds and routes; the message's decision.

        ``ctx`` comes from :meth:`message`. The transaction ends here.
        """
        pending = self.tx.pending
        self.reset()
        if pending is not None and pending.action is Action.DISCARD:
            ctx.action, ctx.reason, ctx.decided_by = pending.action, pending.reason, pending.plugin
        else:
            if pending is not None:  # quarantine: the data hooks still add their headers
                ctx.action, ctx.reason = pending.action, pending.reason
                ctx.decided_by = pending.plugin
            await self.pipeline.run_data(ctx)
        action = ctx.action
        if action is Action.CONTINUE:
            action = Action.ACCEPT
        if action in (Action.ACCEPT, Action.QUARANTINE) and not ctx.envelope.rcpt_tos:
            # The data hooks removed every recipient: nobody to deliver (or release) to.
            ctx.action = action = Action.DISCARD
            ctx.reason = NO_RECIPIENTS_LEFT
        if action in (Action.REJECT, Action.TEMPFAIL):
            ctx.reply = refusal_reply(Stage.DATA, action, ctx.reply, ctx.reason)
        elif action is Action.DISCARD:
            ctx.reply = discarded_reply(ctx.queue_id)
        else:
            ctx.reply = None
        return Decision(action, ctx.reply, ctx.reason, ctx.decided_by)

    def no_recipients(self) -> Decision:
        """DATA with no recipient accepted (``check``; SMTP and milter MTAs answer it)."""
        return Decision(Action.REJECT, R_NO_VALID_RCPTS, "no valid recipients")

    # --- helpers -------------------------------------------------------------------------

    def _verdict(self, stage: Stage, result: Result | None, runs: list[PluginRun]) -> Decision:
        if result is None:
            return GO_ON
        plugin = runs[-1].plugin if runs else ""
        effect = STAGE_ACTIONS[stage].get(result.action)
        if effect == REFUSE:
            if result.action is Action.DISCARD:
                # A refusal only because nothing can be discarded here: the reason
                # was meant for the log, not for the client.
                reply = refusal_reply(stage, Action.REJECT)
            else:
                reply = refusal_reply(stage, result.action, result.reply, result.reason)
            action = Action.TEMPFAIL if result.action is Action.TEMPFAIL else Action.REJECT
            return Decision(action, reply, result.reason, plugin)
        if effect == PENDING and self.tx.pending is None:
            self.tx.pending = _Pending(result.action, result.reason, plugin)
        return GO_ON

    def _refuse_rcpt(self, asked: str, decision: Decision) -> Decision:
        self.tx.refused[asked] = str(decision.reply)
        return decision


def _mutations(runs: list[PluginRun]) -> list[Mutation]:
    return [m for run in runs if run.result is not None for m in run.result.mutations]
