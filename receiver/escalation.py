"""Escalation: a two-way page nobody acknowledged within its group's ``escalate.after`` goes to
the next groups of the chain, at most ``escalate.repeat`` rounds.

The rules are pure functions over the config and a :class:`~receiver.store.PageRecord`; the
:class:`Escalator` loop applies them. Each round is decided and stored in one transaction
(:meth:`Store.escalated`: a conditional UPDATE on the page's round count, then the round's
messages through the normal outbox): two replicas or a restart after kill -9 never send one
round twice, and a round whose transaction did not commit is simply due again.

The chain: round 1 pages the paged group's ``escalate.to``; round n pages, for each group of
round n-1, its own ``escalate.to`` when it has one, else that group again. ``after`` and
``repeat`` are the paged group's. A page stops escalating when acknowledged, when every one of
its alerts resolved, or after ``repeat`` rounds. A page whose every recipient failed (rejected,
or a failed delivery report) escalates at once instead of waiting for ``after``; one still held
(quiet hours, the throttle, a digest) when its round is due waits another ``after`` first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from receiver.clock import Clock
from receiver.config import Config
from receiver.encoding import fit
from receiver.metrics import Metrics
from receiver.models import AlertStatus, NewMessage
from receiver.pipeline import Snapshot, message_ids, new_message_id, with_policy
from receiver.store import MessageRecord, PageRecord, Store, StoreError
from receiver.twoway import REF_SUFFIX, with_ref

log = logging.getLogger("sms_receiver.escalation")

BATCH = 50  # pages escalated per pass
UNSENT = ("pending", "held")  # a page in these states has reached no phone yet


def targets(cfg: Config, group_id: str, round_: int) -> tuple[str, ...]:
    """The groups round ``round_`` (1, 2, …) of a page of ``group_id`` goes to (unknown ids, after
    a reload removed them, are left out)."""
    origin = cfg.group(group_id)
    if origin is None or origin.escalate is None or round_ < 1:
        return ()
    current = [g for g in origin.escalate.to if cfg.group(g) is not None]
    for _ in range(round_ - 1):
        following: list[str] = []
        for gid in current:
            group = cfg.group(gid)
            for nxt in (group.escalate.to if group is not None and group.escalate else (gid,)):
                if cfg.group(nxt) is not None and nxt not in following:
                    following.append(nxt)
        current = following
    return tuple(dict.fromkeys(current))


def next_round_at(cfg: Config, page: PageRecord, now: float) -> float | None:
    """When the round after the one being sent at ``now`` is due (None: that was the last)."""
    group = cfg.group(page.group_id)
    if group is None or group.escalate is None or page.rounds + 1 >= group.escalate.repeat:
        return None
    return now + group.escalate.after


def resume_at(cfg: Config, page: PageRecord, now: float) -> float | None:
    """After an UNACK: the next round's time, when the page still fires and has rounds left."""
    group = cfg.group(page.group_id)
    if group is None or group.escalate is None or not page.firing or page.rounds >= group.escalate.repeat:
        return None
    return now + group.escalate.after


def escalation_text(original: str, ref: int, round_: int, max_parts: int) -> str:
    """``ESC<n> `` before the page's text, its `` #<ref>`` kept at the end."""
    suffix = REF_SUFFIX.format(ref=ref)
    body = original[: -len(suffix)] if original.endswith(suffix) else original
    return with_ref(fit(f"ESC{round_} {body}", max_parts), ref, max_parts).text


def escalation_messages(snap: Snapshot, page: PageRecord, original: MessageRecord | None,
                        groups: tuple[str, ...], now: float) -> list[NewMessage]:
    """One message per group of the round, through the paging policy like any page."""
    cfg = snap.config
    round_ = page.rounds + 1
    text = escalation_text(original.text if original else f"page #{page.ref} of {page.group_id} not acknowledged",
                           page.ref, round_, cfg.clickatell.max_parts)
    level = original.level if original else cfg.levels[0].name
    out = []
    for gid, mid in zip(groups, message_ids(new_message_id(now), groups), strict=True):
        group = cfg.groups_by_id[gid]
        message = NewMessage(
            id=mid, group_id=gid, level=level, status=AlertStatus.FIRING, sms=fit(text, cfg.clickatell.max_parts),
            recipients=group.members, source=page.source if page.source in ("alertmanager", "grafana") else "send",
            alert_count=original.alert_count if original else 0, priority=cfg.level_rank(level),
            items=original.items if original else (),
        )
        out.append(with_policy(message, snap, now))
    return out


class Escalator:
    """The loop: every ``dispatch.poll_interval`` (or when woken by an ``ESC`` reply), the pages
    due are escalated one round each."""

    def __init__(self, *, store: Store, snapshot: Callable[[], Snapshot], metrics: Metrics, clock: Clock,
                 sent: Callable[[], None]) -> None:
        self._store = store
        self._snapshot = snapshot
        self._metrics = metrics
        self._clock = clock
        self._sent = sent  # new messages are stored (wakes the dispatcher)
        self._wake = asyncio.Event()
        self.last_error: str | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
                self.last_error = None
            except StoreError as exc:
                if self.last_error is None:
                    log.error("escalation cannot read or write the outbox: %s", exc)
                self.last_error = str(exc)
            try:
                async with asyncio.timeout(self._snapshot().config.dispatch.poll_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def run_once(self) -> int:
        """Escalate the pages due now by one round each; returns how many rounds were sent."""
        now = self._clock.now()
        sent = 0
        for page in await self._store.due_escalations(now, BATCH):
            snap = self._snapshot()
            groups = targets(snap.config, page.group_id, page.rounds + 1)
            original = await self._store.get_message(page.message_id)
            group = snap.config.group(page.group_id)
            # the last round sent (the page itself, or its last escalation) still held (quiet
            # hours, throttle, digest) or waiting: nobody could have answered what they did not
            # get, and rounds must not pile up unseen; its clock starts again
            last = original if page.rounds == 0 or not page.escalations else \
                await self._store.get_message(page.escalations[-1].message_id)
            if (last is not None and last.state in UNSENT and group is not None
                    and group.escalate is not None):
                await self._store.escalate_at(page.ref, now + group.escalate.after)
                continue
            messages = escalation_messages(snap, page, original, groups, now) if groups else []
            if not await self._store.escalated(page.ref, page.rounds, next_round_at(snap.config, page, now), now,
                                               messages, groups):
                continue  # acknowledged meanwhile, or another replica sent this round
            if groups:
                sent += 1
                self._metrics.escalations.labels(page.group_id).inc()
                log.info("escalated page #%d of %s (round %d) to %s", page.ref, page.group_id,
                         page.rounds + 1, ",".join(groups))
        if sent:
            self._sent()
        return sent
