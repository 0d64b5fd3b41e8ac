"""Planning: the inbox → outbox stage.

A webhook is answered once its body and routing are durable in the inbox (``Store.receive``).
The planner then renders each stored notification into its messages (templates, encoding,
paging policy, all as of the time of receipt) and hands them to the outbox in the transaction
that removes the inbox row, so each notification is planned exactly once. Rendering is the
costly part of accepting an alert; keeping it here keeps webhook answers fast in a storm and
lets it run in the worker process next to the dispatcher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from receiver.ingest import parse_webhook
from receiver.metrics import Metrics
from receiver.models import NewMessage
from receiver.pipeline import Snapshot, render_routed
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
        try:
            rows = await self._store.inbox(BATCH)
        except StoreError as exc:
            self._error(exc)
            return 0
        if not rows:
            return 0
        snap = self._snapshot()
        done, failed = [], []
        for row in rows:
            try:
                notification = parse_webhook(row.body, row.source)
                messages, dropped = render_routed(notification, row.plan, snap, row.received_at)
            except Exception as exc:  # the body was validated on receipt: only a bug lands here
                log.exception("cannot plan received notification %d; kept in the inbox", row.id)
                failed.append((row.id, f"{type(exc).__name__}: {exc}"))
                continue
            for group_id in dropped:
                log.warning("group %s was removed from the config after notification %d was "
                            "received: its message is dropped", group_id, row.id)
            done.append((row.id, messages, row.received_at))
            log.info("planned %s notification %d: alerts=%d group_key=%r messages=%s",
                     row.source, row.id, len(notification.alerts), notification.group_key,
                     ",".join(_describe(m) for m in messages) or "-")
        try:
            await self._store.planned(done, failed)
        except StoreError as exc:
            self._error(exc)  # the rows stay in the inbox: planned again next pass
            return 0
        self.last_error = None
        for _, messages, _ in done:
            self._metrics.count_planned(messages)
        self._metrics.planning_failures.inc(len(failed))
        if done:
            self._planned()
        return len(rows)

    def _error(self, exc: StoreError) -> None:
        if self.last_error is None:
            log.error("planner cannot read or write the outbox: %s", exc)
        self.last_error = str(exc)


def _describe(message: NewMessage) -> str:
    held = f", held {message.hold_reason}" if message.hold_reason else ""
    return f"{message.id}({message.group_id}{held})"
