"""The delivery queue: takes spooled messages to their routes, retries, expires, bounces.

Every recipient has its own state. 2xx -> delivered; 4xx or a connection failure ->
retried along ``queue.retry_schedule`` (the last step repeats) until
``queue.lifetime`` has passed, then expired; 5xx -> bounced. Bounced and expired
recipients get one DSN (RFC 3464) to the sender, unless the sender is null.

The common case costs no thread hand-off on the event loop: a message just stored
by :meth:`QueueManager.enqueue` keeps its bytes in memory for its first attempt
(bounded by ``FIRST_ATTEMPT_MEMORY``) and is handed straight to a worker task; the
spool files of finished messages are removed in batches by one background hop.
Retries, restarts and ``mailflow queue flush`` read the spool as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from mailflow.config import Config
from mailflow.delivery.outcome import Outcome
from mailflow.delivery.spool import (
    BOUNCED,
    DELIVERED,
    DISCARDED,
    EXPIRED,
    PENDING,
    QueueEntry,
    RecipientState,
    Spool,
    new_queue_id,
)
from mailflow.verdict import Route, RouteKind

log = logging.getLogger("mailflow.queue")


def log_results(queue_id: str, kind: str, lines: Mapping[tuple[str, str], list[str]]) -> None:
    """One delivery log line per distinct (status, reply), naming its recipients."""
    for (what, reply), addresses in lines.items():
        log.info(
            "queue %s: to=<%s> route=%s status=%s reply=%r",
            queue_id,
            ">,<".join(addresses),
            kind,
            what,
            reply,
        )


# A transport delivers one message to a group of recipients sharing one route.
Transport = Callable[
    [QueueEntry, bytes, list[RecipientState], Route], Awaitable[dict[str, Outcome]]
]
DeliveredHook = Callable[[str, str, Route, str, str], Awaitable[None]]
BounceBuilder = Callable[[QueueEntry, list[RecipientState], bytes], bytes]

FLUSH_TRIGGER = "flush.request"
STOP_GRACE = 10.0  # seconds running attempts get to finish at shutdown
# Bytes of just-stored messages kept for their first attempt (beyond this, a first
# attempt reads the spool like a retry does): bounds memory when the upstream is slow.
FIRST_ATTEMPT_MEMORY = 32 * 1024 * 1024


class QueueManager:
    """Runs in ``serve``: one instance per process."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        transports: dict[RouteKind, Transport],
        on_delivered: DeliveredHook | None = None,
        build_bounce: BounceBuilder | None = None,
        bounce_route: Callable[[str], Route] | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self._queue_dir = os.fspath(spool.queue_dir)
        self.transports = transports
        self.on_delivered = on_delivered
        self.build_bounce = build_bounce
        self.bounce_route = bounce_route
        self._entries: dict[str, QueueEntry] = {}
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._running: set[str] = set()
        self._sem = asyncio.Semaphore(config.queue.workers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None
        self._stopping = False
        # Message bytes kept from enqueue() for the first attempt, and their total size.
        self._first: dict[str, bytes] = {}
        self._first_bytes = 0
        # Permanent refusals from the server's inline attempt, by queue id: the first
        # attempt records them instead of asking the upstream again (memory only; after
        # a restart the recipient is simply asked again).
        self._refused: dict[str, dict[str, Outcome]] = {}
        # Finished messages whose spool files are still to be removed (one thread hop
        # per batch); they must not be picked up again from the spool meanwhile.
        self._reap_ids: list[str] = []
        self._reaping: set[str] = set()
        self._reaper: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        entries = await asyncio.to_thread(self.spool.recover)
        for entry in entries:
            self._schedule(entry)
        if entries:
            log.info("queue: resumed %d message(s) from %s", len(entries), self.spool.queue_dir)
        self._main = asyncio.create_task(self._run(), name="mailflow-queue")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_GRACE)
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._reaper is not None:
            with contextlib.suppress(Exception):
                await self._reaper
        # Transports holding connections (relay pools) expose ``aclose``.
        for transport in self.transports.values():
            aclose = getattr(transport, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    # --- intake ---------------------------------------------------------------------------

    async def enqueue(
        self,
        sender: str,
        routes: dict[str, Route],
        message: bytes,
        *,
        client_ip: str = "",
        helo: str = "",
        is_bounce: bool = False,
        queue_id: str = "",
        tried: Mapping[str, Outcome] | None = None,
    ) -> QueueEntry:
        """Store durably (returns after fsync), then start the first attempt at once.

        The attempt uses ``message`` as given rather than reading the spool back; the
        spool copy is only removed after every recipient has a final answer.

        ``tried`` holds the outcomes of an attempt already made before the message was
        spooled (the server's inline relay or LMTP attempt). A recipient with a temporary
        outcome there is stored as deferred once (``attempts`` 1, its reply, the first
        ``retry_schedule`` step), so the upstream is not hit again at once. Permanent
        outcomes are kept in memory: the first attempt (at once) records them as its
        own answer without asking the upstream again, and the usual logic bounces.
        """
        now = time.time()
        recipients = []
        refused: dict[str, Outcome] = {}
        for rcpt, route in routes.items():
            state = RecipientState(rcpt, route.as_dict(), next_attempt=now)
            outcome = tried.get(rcpt) if tried else None
            if outcome is not None and outcome.permanent:
                refused[rcpt] = outcome
            elif outcome is not None and outcome.temporary:
                state.attempts = 1
                state.last_reply = str(outcome)
                state.final_code = outcome.code
                deadline = now + self.config.queue.lifetime
                state.next_attempt = min(now + self._backoff(1), deadline)
            recipients.append(state)
        entry = QueueEntry(
            id=queue_id or new_queue_id(),
            sender=sender,
            recipients=recipients,
            created=now,
            size=len(message),
            client_ip=client_ip,
            helo=helo,
            is_bounce=is_bounce,
        )
        await self.spool.store(entry, message)
        if self._first_bytes + len(message) <= FIRST_ATTEMPT_MEMORY:
            self._first[entry.id] = message
            self._first_bytes += len(message)
        if refused:
            self._refused[entry.id] = refused
        self._schedule(entry)
        return entry

    def _schedule(self, entry: QueueEntry) -> None:
        self._entries[entry.id] = entry
        if (
            self._main is not None
            and not self._stopping
            and entry.id not in self._running
            and entry.next_attempt <= time.time()
        ):
            self._start_attempt(entry)  # due now: no trip through the heap and the loop
            return
        heapq.heappush(self._heap, (entry.next_attempt, entry.id))
        self._wake.set()

    def _start_attempt(self, entry: QueueEntry) -> None:
        self._running.add(entry.id)
        task = asyncio.create_task(self._attempt_guarded(entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take_first(self, queue_id: str) -> bytes | None:
        """The bytes kept by enqueue() for this message's first attempt, if any."""
        message = self._first.pop(queue_id, None)
        if message is not None:
            self._first_bytes -= len(message)
        return message

    def flush(self) -> None:
        """Retry everything now."""
        for entry in self._entries.values():
            for r in entry.pending():
                r.next_attempt = 0
            heapq.heappush(self._heap, (0, entry.id))
        self._wake.set()

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        scan = self.config.queue.scan_interval or 1.0
        next_trigger_check = 0.0
        while not self._stopping:
            now = time.time()
            # Look for `mailflow queue flush`'s trigger file once per scan interval,
            # not on every wake-up (an enqueue wakes the loop once per message).
            if now >= next_trigger_check:
                self._check_flush_trigger()
                next_trigger_check = now + scan
                now = time.time()
            while self._heap and self._heap[0][0] <= now:
                _, queue_id = heapq.heappop(self._heap)
                entry = self._entries.get(queue_id)
                if entry is None or queue_id in self._running:
                    continue
                if entry.next_attempt > now:  # stale heap item; a newer one exists
                    continue
                self._start_attempt(entry)
            delay = scan
            if self._heap:
                delay = max(0.0, min(scan, self._heap[0][0] - time.time()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _check_flush_trigger(self) -> None:
        trigger = Path(self.spool.root) / FLUSH_TRIGGER
        if trigger.exists():
            trigger.unlink(missing_ok=True)
            # Pick up entries changed or added by other processes (`mailflow queue ...`).
            known = set(self._entries)
            for entry in self.spool.entries():
                if entry.id not in self._running and entry.id not in self._reaping:
                    self._entries[entry.id] = entry
            for gone in known - set(self.spool.ids()):
                self._entries.pop(gone, None)
            self.flush()

    async def _attempt_guarded(self, entry: QueueEntry) -> None:
        try:
            async with self._sem:
                await self.attempt(entry)
        except Exception:
            log.exception("queue %s: delivery attempt failed unexpectedly", entry.id)
            for r in entry.pending():
                r.next_attempt = time.time() + self._backoff(r.attempts)
        finally:
            self._take_first(entry.id)  # only ever used for the first attempt
            self._refused.pop(entry.id, None)
            self._running.discard(entry.id)
            if entry.id in self._entries and not entry.done:
                heapq.heappush(self._heap, (entry.next_attempt, entry.id))
                self._wake.set()

    def _backoff(self, attempts: int) -> float:
        schedule = self.config.queue.retry_schedule or [300.0]
        return schedule[min(max(attempts - 1, 0), len(schedule) - 1)]

    async def attempt(self, entry: QueueEntry) -> None:
        """One delivery attempt for every due recipient of ``entry``."""
        if self._deleted(entry.id):  # by `mailflow queue delete`
            self._take_first(entry.id)
            self._refused.pop(entry.id, None)
            self._entries.pop(entry.id, None)
            return
        now = time.time()
        due = [r for r in entry.pending() if r.next_attempt <= now]
        if not due:
            return
        message = self._take_first(entry.id)
        if message is None:
            try:
                message = await asyncio.to_thread(self.spool.read_message, entry.id)
            except FileNotFoundError:
                # Metadata without a message (e.g. rewritten by `queue flush` just as the
                # message was finished): nothing left to deliver; do not retry for ever.
                log.warning("queue %s: message file is gone; dropping its metadata", entry.id)
                self._entries.pop(entry.id, None)
                self._reap(entry.id)
                return
        groups: dict[tuple[str, str, str, str], list[RecipientState]] = defaultdict(list)
        for r in due:
            route = r.route_obj
            groups[(route.kind.value, route.target, route.folder, route.mailbox)].append(r)
        refused = self._refused.pop(entry.id, {})
        for members in groups.values():
            route = members[0].route_obj
            outcomes = {r.address: refused[r.address] for r in members if r.address in refused}
            ask = [r for r in members if r.address not in outcomes]
            if ask:
                outcomes.update(await self._deliver_group(entry, message, ask, route))
            await self._record_group(entry, members, route, outcomes)
        failed = [r for r in due if r.status in (BOUNCED, EXPIRED)]
        if failed:
            await self._bounce(entry, failed, message)
        # The bounce (above) is stored before this state change: a crash in between
        # repeats the bounce after restart rather than losing it.
        if entry.done:
            # Every recipient has its final answer: the files go in the next batch
            # removal. A crash before that delivers again (at least once, as before).
            self._entries.pop(entry.id, None)
            self._reap(entry.id)
        elif not self._deleted(entry.id):
            await asyncio.to_thread(self.spool.update, entry)
        else:  # deleted by `mailflow queue delete` during the attempt: stay deleted
            self._entries.pop(entry.id, None)

    # --- removing finished messages ---------------------------------------------------------

    def _reap(self, queue_id: str) -> None:
        """Remove the spool files of ``queue_id`` soon, batched with other removals."""
        self._reap_ids.append(queue_id)
        self._reaping.add(queue_id)
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_batches(), name="mailflow-reaper")

    async def _reap_batches(self) -> None:
        # Unlinking takes ~100 us of wall time per file on a busy disk: done on the
        # loop it would stall every session, and a thread hop per message costs the
        # loop more than the unlinks. One hop per batch of whatever has accumulated.
        try:
            while self._reap_ids:
                batch, self._reap_ids = self._reap_ids, []
                try:
                    await asyncio.to_thread(self._remove_all, batch)
                finally:
                    self._reaping.difference_update(batch)
        finally:
            self._reaper = None

    def _spool_file(self, queue_id: str, suffix: str) -> str:
        """``Spool.meta_path`` (".json") / ``message_path`` (".eml") as a plain string.

        Per message on the event loop (and in the removal thread, under the GIL),
        building ``Path`` objects and re-checking the id costs more than the system
        call itself. The ids are the spool's own names (``new_queue_id`` or a
        ``*.json`` in the queue directory), never user input.
        """
        return os.path.join(self._queue_dir, queue_id + suffix)

    def _deleted(self, queue_id: str) -> bool:
        """Whether the metadata is gone (`mailflow queue delete`): one stat, on the loop."""
        return not os.path.exists(self._spool_file(queue_id, ".json"))

    def _remove_all(self, queue_ids: list[str]) -> None:
        """``Spool.remove`` for many ids: metadata first, then the message."""
        for queue_id in queue_ids:
            for suffix in (".json", ".eml"):
                try:
                    os.unlink(self._spool_file(queue_id, suffix))
                except FileNotFoundError:
                    pass
                except OSError:
                    log.exception("queue %s: cannot remove %s%s", queue_id, queue_id, suffix)

    async def _deliver_group(
        self, entry: QueueEntry, message: bytes, members: list[RecipientState], route: Route
    ) -> dict[str, Outcome]:
        if route.kind is RouteKind.DISCARD:
            return {r.address: Outcome(250, "discarded by route") for r in members}
        transport = self.transports.get(route.kind)
        if transport is None:
            # A deployment problem, not the recipient's: keep the mail until it is fixed.
            outcome = Outcome(451, f"4.3.5 no transport for route {route.kind.value}")
            return {r.address: outcome for r in members}
        try:
            return await transport(entry, message, members, route)
        except Exception as exc:
            log.exception("queue %s: transport %s failed", entry.id, route.kind.value)
            return {r.address: Outcome(451, f"transport error: {exc}") for r in members}

    async def _record_group(
        self,
        entry: QueueEntry,
        members: list[RecipientState],
        route: Route,
        outcomes: dict[str, Outcome],
    ) -> None:
        """Update each member's state; one log line per distinct result in the group."""
        lines: dict[tuple[str, str], list[str]] = {}
        results: list[tuple[RecipientState, str, str]] = []
        for r in members:
            outcome = outcomes.get(r.address) or Outcome(451, "no result from transport")
            what = self._record(entry, r, route, outcome)
            reply = str(outcome)
            lines.setdefault((what, reply), []).append(r.address)
            results.append((r, what, reply))
        log_results(entry.id, route.kind.value, lines)
        if self.on_delivered is not None:
            for r, what, reply in results:
                await self.on_delivered(entry.id, r.address, route, what, reply)

    def _record(self, entry: QueueEntry, r: RecipientState, route: Route, outcome: Outcome) -> str:
        """Apply ``outcome`` to ``r``; returns delivered / bounced / expired / deferred."""
        r.attempts += 1
        r.last_reply = str(outcome)
        r.final_code = outcome.code
        if outcome.ok:
            r.status = DELIVERED if route.kind is not RouteKind.DISCARD else DISCARDED
            return "delivered"
        if outcome.permanent:
            r.status = BOUNCED
            return "bounced"
        now = time.time()
        if now - entry.created >= self.config.queue.lifetime:
            r.status = EXPIRED
            return "expired"
        # Never sleep past the lifetime: the last try happens when it ends, so an
        # expired message is bounced on time rather than one backoff step late.
        deadline = entry.created + self.config.queue.lifetime
        r.next_attempt = min(now + self._backoff(r.attempts), max(deadline, now))
        return "deferred"

    async def _bounce(
        self, entry: QueueEntry, failed: list[RecipientState], message: bytes
    ) -> None:
        # RFC 5321 6.1/RFC 3464: never send a DSN to the null sender or about a DSN.
        if not entry.sender or entry.is_bounce or self.build_bounce is None:
            log.info("queue %s: not bouncing (null sender or bounce)", entry.id)
            return
        try:
            dsn = self.build_bounce(entry, failed, message)
        except Exception:
            # Never let a DSN bug keep the original in the queue for ever (and retry it).
            log.exception("queue %s: cannot build the bounce to <%s>", entry.id, entry.sender)
            return
        route = self.bounce_route(entry.sender) if self.bounce_route else Route(RouteKind.MAILDIR)
        bounce = await self.enqueue("", {entry.sender: route}, dsn, is_bounce=True)
        log.info("queue %s: bounce %s queued to <%s>", entry.id, bounce.id, entry.sender)

    # --- inspection -----------------------------------------------------------------------

    def entries(self) -> list[QueueEntry]:
        return list(self._entries.values())


PENDING_STATES = {PENDING}
