"""Planning: the inbox → outbox stage.

A webhook is answered once its body is durable in the inbox (``Store.receive``). The planner
then routes and renders each stored notification into its messages (routes, templates, encoding,
paging policy, all as of the time of receipt), commits them to the outbox, then removes the inbox
row. Message ids derive from the notification id, so a notification planned again after a crash
between the two commits adds nothing. Routing and rendering are the costly part of accepting an
alert; doing them here keeps webhook answers fast in a storm, in the worker process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from receiver.ingest import parse_webhook
from receiver.metrics import Metrics
from receiver.models import NewMessage, Notification
from receiver.pipeline import Plan, Snapshot, plan_received
from receiver.routing import RoutingResult
from receiver.store import Store, StoreError

log = logging.getLogger("sms_receiver.planner")

BATCH = 100  # inbox rows per transaction: short write locks, few commits


class Planner:
    """Needs no clock: a notification is planned as of the time it was received."""

    def __init__(self, *, store: Store, snapshot: Callable[[], Snapshot], metrics: Metrics,
                 planned: Callable[[], None]) -> None:
        self._store = store
        self._snapshot = snapshot
        self._metrics = metrics
        self._planned = planned  # new messages are in the outbox (wakes the dispatcher)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one pass at a time (drain() may run beside run())
        self.last_error: str | None = None

    def wake(self) -> None:
        """A notification was received: plan now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            if await self.run_once() >= BATCH:
                continue  # more may be waiting
            try:
                async with asyncio.timeout(self._snapshot().config.dispatch.poll_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def drain(self) -> None:
        """Plan everything received so far (tests)."""
        while await self.run_once():
            pass

    async def run_once(self) -> int:
        """Plan the oldest inbox rows; returns how many were taken (planned or failed)."""
        async with self._lock:
            return await self._pass()

    async def _pass(self) -> int:
        """Inbox rows first (kept from an older release, or ``:memory:``), then the journal."""
        try:
            rows = await self._store.inbox(BATCH)
            batch = None if rows else await self._store.unplanned(BATCH)
        except StoreError as exc:
            self._error(exc)
            return 0
        if batch is not None:
            rows = batch.rows
            if not rows and batch.after is None:
                return 0
        snap = self._snapshot()
        done, failed = [], []
        plans: dict[int, tuple[Notification, Plan]] = {}  # counted and logged once committed
        for row in rows:
            try:
                notification = parse_webhook(row.body, row.source)
                plan, dropped = plan_received(notification, row.plan, snap, row.received_at)
            except Exception as exc:  # the body was validated on receipt: only a bug lands here
                log.exception("cannot plan received notification %s; kept in the inbox", row.plan[:40])
                failed.append((row.id, f"{type(exc).__name__}: {exc}"))
                continue
            for group_id in dropped:
                log.warning("group %s was removed from the config after a notification was "
                            "received: its message is dropped", group_id)
            plans[row.id] = (notification, plan)
            done.append((row.id, plan.messages, row.received_at))
        try:
            if batch is None:
                await self._store.planned(done, failed)
                replays: set[int] = set()
            else:
                replays = await self._store.planned_unplanned(batch, done, failed)
        except StoreError as exc:
            self._error(exc)  # nothing moved on: planned again next pass
            return 0
        self.last_error = None
        for row_id, (notification, plan) in plans.items():
            if row_id in replays:  # older than the web process remembered: the outbox knew it
                log.info("replayed %s notification dropped: group_key=%r", notification.source,
                         notification.group_key)
                self._metrics.count_replay(plan.routing)
                continue
            self._metrics.count_planned(plan.messages)
            _count_unrouted(self._metrics, notification, plan.routing)
            log.info("planned %s notification: alerts=%d group_key=%r messages=%s",
                     notification.source, len(notification.alerts), notification.group_key,
                     ",".join(_describe(m) for m in plan.messages) or "-")
        self._metrics.planning_failures.inc(len(failed))
        if len(replays) < len(done):
            self._planned()
        return max(len(rows), 1)

    def _error(self, exc: StoreError) -> None:
        if self.last_error is None:
            log.error("planner cannot read or write the outbox: %s", exc)
        self.last_error = str(exc)


def _count_unrouted(m: Metrics, notification: Notification, routing: RoutingResult) -> None:
    source = notification.source
    if routing.unrouted:
        m.child(m.alerts_unrouted, source, "no_route").inc(len(routing.unrouted))
        log.warning("%d alert(s) matched no route and no default group: %s",
                    len(routing.unrouted),
                    ", ".join(a.labels.get("alertname", "?") for a in routing.unrouted[:10]))
    if routing.filtered:
        m.child(m.alerts_unrouted, source, "filtered").inc(len(routing.filtered))


def _describe(message: NewMessage) -> str:
    held = f", held {message.hold_reason}" if message.hold_reason else ""
    return f"{message.id}({message.group_id}{held})"
