"""The planner: received notifications → messages.

A webhook is answered once its notification is durable (:meth:`Store.receive`). The planner then
routes and renders each one (:func:`~receiver.pipeline.plan_notification`, as of the time of
receipt) and stores its messages in the transaction that removes it. A notification that cannot
be planned (only a bug can cause that: its body was validated on receipt) is kept with its error,
counted and shown by the API; it never blocks the others.

Planning shares the event loop with the webhook answers. While webhooks are being answered it
takes at most :data:`SHARE` of the loop (after each batch, once it is stored, it pauses nineteen
times as long as planning it took): Alertmanager gives up on a slow answer and retries, so in a
storm the answers come first and the planner catches up from the durable backlog as soon as the
storm passes. It never stops: a twentieth of the loop still plans ~250 (10 alerts each) to ~700
(1 alert) notifications a second, and the loop is never answering all the time unless the storm
outruns the receiver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from receiver.config import Config
from receiver.ingest import parse_webhook
from receiver.metrics import Metrics
from receiver.models import Alert, AlertStatus, NewMessage, Notification
from receiver.pipeline import Plan, Snapshot, plan_notification, refs_wanted, resolved_keys, with_refs
from receiver.routing import RoutingResult, alert_level, matched_groups
from receiver.store import Planned, Store, StoreError

log = logging.getLogger("sms_receiver.planner")

BATCH = 25  # notifications per transaction: a webhook commit waits behind at most one (~3 ms)
SHARE = 0.05  # of the event loop's time, at most, while webhooks are being answered
_DROPPED_SHOWN = 10  # alerts named in a notification's "dropped" line: a storm's stays one line


class Planner:
    def __init__(self, *, store: Store, snapshot: Callable[[], Snapshot], metrics: Metrics,
                 planned: Callable[[], None], answering: Callable[[], bool] = lambda: False) -> None:
        self._store = store
        self._answering = answering  # webhooks are being answered now
        self._snapshot = snapshot
        self._metrics = metrics
        self._planned = planned  # new messages are stored (wakes the dispatcher)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one pass at a time (drain() may run beside run())
        self._spent = 0.0  # seconds the last pass spent planning (its CPU in the loop)
        self.last_error: str | None = None

    def wake(self) -> None:
        """A notification was received: plan now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                taken = await self.run_once()
            except Exception as exc:  # noqa: BLE001 - a bug in a pass: the next one tries again
                if self.last_error is None:
                    log.exception("planner pass failed")
                self.last_error, taken = f"{type(exc).__name__}: {exc}", 0
            if self._answering():  # webhooks come first: a pause of (1 - SHARE) / SHARE the work
                await asyncio.sleep(self._spent * (1 / SHARE - 1))
            if taken >= BATCH:
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
        """Plan the oldest received notifications; returns how many were taken."""
        async with self._lock:
            self._spent = 0.0
            try:
                rows = await self._store.unplanned(BATCH)
            except StoreError as exc:
                self._error(exc)
                return 0
            if not rows:
                self.last_error = None  # the store answers, and nothing waits
                return 0
            snap = self._snapshot()
            plans: list[Planned] = []
            counted: list[tuple[Notification, Plan]] = []
            for row in rows:
                started = time.perf_counter()
                try:
                    notification = parse_webhook(row.body, row.source)  # type: ignore[arg-type]
                    plan = plan_notification(notification, row.id, snap, row.received_at)
                    if wanted := refs_wanted(plan, snap):  # two-way pages: their " #<ref>"
                        plan = with_refs(plan, await self._store.allocate_refs(wanted), snap, row.received_at)
                except StoreError as exc:  # no page reference: nothing moved on, planned again next pass
                    self._error(exc)
                    return 0
                except Exception as exc:  # noqa: BLE001 - validated on receipt: only a bug lands here
                    log.exception("cannot plan notification %s; it is kept with its error", row.id)
                    plans.append(Planned(row.id, row.received_at, error=f"{type(exc).__name__}: {exc}"))
                else:
                    plans.append(Planned(row.id, row.received_at, plan.messages, pages=plan.pages,
                                         resolved=resolved_keys(notification)))
                    counted.append((notification, plan))
                self._spent += time.perf_counter() - started
                await asyncio.sleep(0)  # let webhook answers in between
            try:
                await self._store.planned(plans)
            except StoreError as exc:
                self._error(exc)  # nothing moved on: planned again next pass
                return 0
            self.last_error = None
            started = time.perf_counter()
            for notification, plan in counted:
                self._metrics.count_planned(plan.messages)
                _count_unrouted(self._metrics, notification, plan.routing)
                log.info("planned %s notification: alerts=%d group_key=%r messages=%s",
                         notification.source, len(notification.alerts), notification.group_key,
                         ",".join(_describe(m) for m in plan.messages) or "-")
                if plan.routing.filtered and log.isEnabledFor(logging.INFO):
                    log.info("%s notification group_key=%r: dropped %s", notification.source,
                             notification.group_key, _dropped(plan.routing.filtered, snap.config))
            self._metrics.planning_failures.inc(len(plans) - len(counted))
            self._spent += time.perf_counter() - started
            self._planned()
            return len(rows)

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


def _dropped(alerts: tuple[Alert, ...], cfg: Config) -> str:
    """Why each alert that matched groups was taken by none of them: for every group it matched,
    the group's id and the rule that excluded it (its level, or its send_resolved). One string,
    so that a notification's drops are one log line."""
    parts = []
    for alert in alerts[:_DROPPED_SHOWN]:
        level = alert_level(alert, cfg)
        reasons = []
        for gid in matched_groups(alert, cfg):
            group = cfg.group(gid)
            if group is None:
                reasons.append(f"{gid}: no such group")
            elif cfg.level_rank(level) > cfg.level_rank(cfg.group_level(group)):
                reasons.append(f"{gid}: level {level} is below the group's {cfg.group_level(group)}")
            elif alert.status is AlertStatus.RESOLVED and not group.send_resolved:
                reasons.append(f"{gid}: resolved, and the group has send_resolved off")
        parts.append(f"{alert.labels.get('alertname', '?')} ({alert.status.value}; {'; '.join(reasons)})")
    more = len(alerts) - _DROPPED_SHOWN
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def _describe(message: NewMessage) -> str:
    held = f", held {message.hold_reason}" if message.hold_reason else ""
    return f"{message.id}({message.group_id}{held})"
