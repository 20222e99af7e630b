"""Run the whole pipeline on one message without SMTP (``mailflow check``)."""

from __future__ import annotations

from typing import Any

from mailflow.app import App
from mailflow.delivery.spool import new_queue_id
from mailflow.message import Connection, Envelope, MessageContext
from mailflow.normalize import normalize_newlines
from mailflow.policy import admit_recipient, in_networks
from mailflow.verdict import Action, Mutation, SMTPReply


async def check_message(
    app: App,
    raw: bytes,
    *,
    sender: str | None = None,
    recipients: list[str] | None = None,
    ip: str = "127.0.0.1",
    helo: str = "localhost",
    authenticated_user: str = "",
) -> MessageContext:
    """Run every stage (connect .. data, routing) as an SMTP session would.

    Sender and recipients default to the From and To/Cc headers. A verdict at an
    early stage ends the check there, as it would end the SMTP transaction.
    """
    raw = normalize_newlines(raw)
    conn = Connection(ip=ip, helo=helo, authenticated_user=authenticated_user)
    conn.relay_allowed = in_networks(ip, app.config.relay_network_objects)
    ctx = MessageContext(raw, Envelope(), conn, queue_id=new_queue_id())
    if sender is None:
        found = [a.address for a in ctx.view.addresses("From") if a.address]
        sender = found[0] if found else ""
    if not recipients:
        mailboxes = [*ctx.view.addresses("To"), *ctx.view.addresses("Cc")]
        recipients = [a.address for a in mailboxes if a.address]
    ctx.envelope.mail_from = sender
    pipeline = app.pipeline
    # As in the SMTP front end, MAIL and RCPT mutations are kept and applied together
    # once the recipients are known (so e.g. RemoveRecipient can name a later one).
    pending: list[Mutation] = []

    stages: list[tuple[str, dict[str, Any]]] = [
        ("connect", {"connection": conn}),
        ("helo", {"connection": conn, "name": helo}),
        ("mail", {"connection": conn, "sender": sender, "options": []}),
    ]
    for stage, kwargs in stages:
        result, runs = await pipeline.run_stage(stage, **kwargs)
        for run in runs:
            ctx.record(run)
            if stage == "mail" and run.result is not None:
                pending.extend(run.result.mutations)
        refused: tuple[Action, ...] = (Action.REJECT, Action.TEMPFAIL)
        if stage == "connect":
            refused += (Action.DISCARD,)  # the SMTP front end drops such a connection too
        if result is not None and result.action in refused:
            ctx.action, ctx.reply, ctx.reason = result.action, result.smtp_reply(), result.reason
            if ctx.action is Action.DISCARD:
                ctx.action = Action.REJECT
                ctx.reply = SMTPReply(554, result.reason or "Connection refused", "5.7.1")
            ctx.decided_by = runs[-1].plugin
            return ctx
    for asked in recipients:
        # Postmaster becomes its configured mailbox here, as at SMTP RCPT (RFC 5321 4.5.1).
        rcpt, denied = admit_recipient(app.config, conn, asked)
        if denied is not None:
            _refuse(ctx, asked, Action.REJECT, denied, denied.text)
            continue
        if rcpt != asked and rcpt in ctx.envelope.rcpt_tos:
            continue  # several forms of postmaster: one mailbox, one copy
        result, runs = await pipeline.run_stage(
            "rcpt", connection=conn, sender=sender, recipient=rcpt, options=[]
        )
        for run in runs:
            ctx.record(run)
        if result is not None and result.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCARD):
            # Like the SMTP front end: a discard at RCPT can only be a refusal.
            reply = result.smtp_reply() or SMTPReply(550, "Recipient rejected", "5.7.1")
            action = Action.REJECT if result.action is Action.DISCARD else result.action
            _refuse(ctx, asked, action, reply, result.reason)
            continue
        ctx.envelope.rcpt_tos.append(rcpt)
        for run in runs:
            if run.result is not None:
                pending.extend(run.result.mutations)
    if not ctx.envelope.rcpt_tos:
        if ctx.action is Action.CONTINUE:
            ctx.action = Action.REJECT
            ctx.reason = "no valid recipients"
            ctx.reply = SMTPReply(554, "No valid recipients", "5.5.1")  # RFC 5321 3.3
        return ctx
    # Some recipients were refused at RCPT, others accepted: the transaction goes on,
    # so a refusal recorded above must not become the message's decision.
    ctx.action = Action.CONTINUE
    ctx.reply = None
    ctx.reason = ""
    ctx.apply(pending)
    await pipeline.run_data(ctx)
    return ctx


def _refuse(ctx: MessageContext, rcpt: str, action: Action, reply: SMTPReply, reason: str) -> None:
    """Record a recipient refused at RCPT; with none left, this becomes the answer."""
    ctx.extra.setdefault("refused_recipients", {})[rcpt] = str(reply)
    ctx.action, ctx.reply, ctx.reason = action, reply, reason


def _final_reply(ctx: MessageContext, action: Action) -> dict[str, Any] | None:
    """What the SMTP front end would answer when the message is not simply accepted."""
    if action in (Action.REJECT, Action.TEMPFAIL):
        default = SMTPReply(550, "Rejected", "5.7.1")
        if action is Action.TEMPFAIL:
            default = SMTPReply(451, "Try again later", "4.7.1")
        return (ctx.reply or default).as_dict()
    if action is Action.DISCARD:  # the client is told 250 either way
        return SMTPReply(250, f"Ok: {ctx.queue_id} discarded", "2.0.0").as_dict()
    if action is Action.QUARANTINE:
        return SMTPReply(250, f"Ok: queued as {ctx.queue_id}", "2.0.0").as_dict()
    return None


def report(ctx: MessageContext) -> dict[str, Any]:
    """The ``check --json`` object."""
    action = Action.ACCEPT if ctx.action is Action.CONTINUE else ctx.action
    out: dict[str, Any] = {
        "queue_id": ctx.queue_id,
        "action": action.value,
        "smtp_reply": _final_reply(ctx, action),
        "reason": ctx.reason or None,
        "decided_by": ctx.decided_by or None,
        "score": round(ctx.score, 4),
        "sender": ctx.envelope.mail_from,
        "recipients": list(ctx.envelope.rcpt_tos),
        "route": {r: route.as_dict() for r, route in ctx.routes.items()},
        "headers_added": [[name, value] for name, value in ctx.headers_added],
        "plugins": ctx.plugin_report(),
    }
    refused = ctx.extra.get("refused_recipients")
    if refused:
        out["refused_recipients"] = refused
    return out
