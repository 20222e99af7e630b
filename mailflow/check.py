"""Run the whole pipeline on one message without SMTP (``mailflow check``)."""

from __future__ import annotations

from typing import Any

from mailflow.app import App
from mailflow.delivery.spool import new_queue_id
from mailflow.message import Connection, Envelope, MessageContext
from mailflow.normalize import normalize_newlines
from mailflow.policy import in_networks
from mailflow.smtp.data import DataFacts
from mailflow.smtp.policy import data_refusal
from mailflow.smtp.received import (
    count_received,
    is_header_start,
    protocol_name,
    received_header,
    with_trace,
)
from mailflow.transaction import Decision, Transaction, accepted_reply
from mailflow.verdict import Action


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

    The stages are those of :class:`~mailflow.transaction.Transaction`, the model the
    SMTP and milter front ends run too. Sender and recipients default to the From and
    To/Cc headers. A refusal at connect, HELO or MAIL ends the check there, as it
    would end the SMTP transaction; a refused recipient is reported and the others go on.
    Message data the SMTP front end refuses before any plugin (a NUL, a mail loop) is
    refused here too.
    """
    raw = without_mbox_line(normalize_newlines(raw))
    # `serve` takes AUTH only over TLS (auth_require_tls): an authenticated client
    # is a TLS client, and the plugins must see it as one here too.
    conn = Connection(ip=ip, authenticated_user=authenticated_user, tls=bool(authenticated_user))
    conn.relay_allowed = in_networks(ip, app.config.relay_network_objects)
    if app.config.server.reverse_dns:  # as the SMTP front end: the client's PTR name
        conn._resolver = app.resolver.ptr
    model = Transaction(app.pipeline, app.config, conn)
    queue_id = new_queue_id()
    if sender is None or not recipients:
        headers = MessageContext(raw, Envelope(), conn)
        if sender is None:
            found = [a.address for a in headers.view.addresses("From") if a.address]
            sender = found[0] if found else ""
        if not recipients:
            mailboxes = [*headers.view.addresses("To"), *headers.view.addresses("Cc")]
            recipients = [a.address for a in mailboxes if a.address]
    for step in (model.connect, lambda: model.helo(helo), lambda: model.mail(sender, [])):
        decision = await step()
        if decision.refused:
            return _stopped(model, raw, queue_id, decision, sender)
    last: Decision | None = None
    for asked in recipients:
        decision = await model.rcpt(asked, [])
        if decision.refused:
            last = decision
    if not model.tx.recipients:
        return _stopped(model, raw, queue_id, last or model.no_recipients(), sender)
    # What the SMTP front end refuses before the plugins see the data: NUL, a mail loop.
    # (Line ends were made CRLF above: a file on disk has LF ones.)
    facts = DataFacts(len(raw), nul=b"\x00" in raw, received=count_received(raw))
    refusal = data_refusal(facts, app.config.server)
    if refusal is not None:
        return _stopped(model, raw, queue_id, Decision(Action.REJECT, refusal), sender)
    # The trace field the SMTP front end puts in front of the message (the plugins see it).
    proto = protocol_name(True, conn.tls, bool(authenticated_user))
    received = received_header(
        conn, app.config.server.hostname, proto, model.tx.recipients, queue_id
    )
    ctx = model.message(with_trace(raw, received), queue_id)
    await model.data(ctx)
    return ctx


def without_mbox_line(raw: bytes) -> bytes:
    """``raw`` without the ``From sender date`` line an mbox file starts a message with.

    That line belongs to the file format, not to the message: no client sends it over
    SMTP. (Over SMTP a first line that is no header field would make the whole
    message body.)
    """
    if raw.startswith(b"From ") and not is_header_start(raw):
        end = raw.find(b"\r\n")
        return b"" if end < 0 else raw[end + 2 :]
    return raw


def _stopped(
    model: Transaction, raw: bytes, queue_id: str, decision: Decision, sender: str
) -> MessageContext:
    """The report of a check that a refusal ended before the data stage."""
    ctx = model.message(raw, queue_id)
    ctx.envelope.mail_from = sender
    ctx.action, ctx.reply, ctx.reason = decision.action, decision.reply, decision.reason
    ctx.decided_by = decision.plugin
    return ctx


def _final_reply(ctx: MessageContext, action: Action) -> dict[str, Any] | None:
    """What the SMTP front end would answer when the message is not simply accepted."""
    if action in (Action.REJECT, Action.TEMPFAIL, Action.DISCARD) and ctx.reply is not None:
        return ctx.reply.as_dict()
    if action is Action.QUARANTINE:
        return accepted_reply(ctx.queue_id).as_dict()
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
    refused = ctx.refused_recipients
    if refused:
        out["refused_recipients"] = refused
    return out
