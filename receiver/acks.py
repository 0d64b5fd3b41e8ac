"""What a reply does: ACK (record, silence, stop escalation, confirm), UNACK, ESC, HELP.

Order of work, so that a crash loses nothing that was answered: the acknowledgement is stored
with the page's escalation stopped, in one transaction, under the reply's id; only then is
Alertmanager asked for the silences, and their ids (or why there are none) are stored after, as
the ack's outcome. A repeated callback of a finished ack is answered ``duplicate``; one whose ack
has no outcome yet (the process died in between: Clickatell retries an unanswered callback)
makes the silences and the confirmation then. Answers by SMS go through the outbox like any page.

Silences: one per acknowledged alert whose matchers are exactly that alert's label set (so each
silences that alert and nothing else), at most :data:`MAX_SILENCES` per ack.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from receiver.clock import Clock
from receiver.config import Config, Group
from receiver.encoding import fit
from receiver.escalation import resume_at
from receiver.metrics import Metrics
from receiver.models import AlertStatus, NewMessage
from receiver.pipeline import Snapshot, message_ids, new_message_id, with_policy
from receiver.silences import SilenceError, create, expire
from receiver.store import NewAck, PageRecord, Store
from receiver.twoway import HELP_TEXT, Reply, ack_text, clock_time, mask, parse_command

log = logging.getLogger("sms_receiver.acks")

MAX_SILENCES = 20
SILENCE_BUDGET = 10.0  # seconds the silences of one ack may take (Clickatell waits for the answer)
UNKNOWN_WINDOW = 600.0  # at most one "not understood" answer per number in this many seconds
ANSWER_LIMIT = 5  # answers to one phone (HELP, "no page", …) in UNKNOWN_WINDOW, all kinds together


class Replies:
    """Acts on replies for one receiver (its store, config snapshot, clock and metrics)."""

    def __init__(self, *, store: Store, snapshot: Callable[[], Snapshot], metrics: Metrics, clock: Clock,
                 sent: Callable[[], None], escalate: Callable[[], None]) -> None:
        self._store = store
        self._snapshot = snapshot
        self._metrics = metrics
        self._clock = clock
        self._sent = sent  # wakes the dispatcher
        self._escalate = escalate  # wakes the escalator

    async def handle(self, reply: Reply) -> str:
        """Act on one reply; returns the action counted in ``replies_total``. Raises
        :class:`~receiver.store.StoreError` when the store cannot record it (the callback
        answers 503 and Clickatell retries; a repeat is recognised by its id)."""
        snap = self._snapshot()
        cfg = snap.config
        now = self._clock.now()
        mine = [g for g in cfg.groups if reply.number in g.members]
        if not mine:  # not recorded: strangers do not get to fill the store
            log.warning("reply from %s refused: the number is in no group", mask(reply.number))
            return "refused"
        cmd = parse_command(reply.text)
        action = "invalid" if cmd.problem else cmd.action
        # An ACK is recognised as a repeat by its own row (acks.reply_id), written in the
        # transaction that stops escalation: recording the reply first would lose the ack should
        # the process die in between (Clickatell's retry would be taken for a duplicate)
        if action != "ack" and not await self._store.reply_seen(reply.id, reply.number, now, action):
            return "duplicate"
        if cmd.action == "help":
            await self._reply_to(snap, mine[0], reply, HELP_TEXT)
            return "help"
        if cmd.action == "unknown" or cmd.problem:
            if await self._store.replied_since(reply.number, action, now - UNKNOWN_WINDOW) <= 1:
                why = cmd.problem or f"{reply.text.strip()[:20]!r} is not a command"
                await self._reply_to(snap, mine[0], reply, f"Not understood: {why}. Reply HELP for commands.")
            return action
        page = await self._page(cmd.ref, reply)
        if page is None:
            shown = f"#{cmd.ref}" if cmd.ref is not None else "to you"
            await self._reply_to(snap, mine[0], reply, f"No page {shown} is known. Reply HELP for commands.")
            return "unknown_page"
        if not any(reply.number in g.members for gid in page.groups if (g := cfg.group(gid)) is not None):
            await self._reply_to(snap, mine[0], reply,
                               f"#{page.ref} was not sent to your groups: only they can act on it.")
            return "refused"
        if cmd.action == "ack":
            if page.acked_at is not None and not any(
                    a.number == reply.number and a.outcome is None and a.unacked_at is None for a in page.acks):
                # acknowledged already (by this member or another): no second silence, no second
                # broadcast to the groups
                return "duplicate"
            if not await self._ack(snap, page, reply, cmd.duration, now):
                return "duplicate"
            await self._store.reply_seen(reply.id, reply.number, now, "ack")
        elif cmd.action == "unack":
            await self._unack(snap, page, reply, now)
        else:
            await self._esc(snap, page, reply, mine[0], now)
        return cmd.action

    async def _page(self, ref: int | None, reply: Reply) -> PageRecord | None:
        """The page named, else the one replied to (One API names our message), else the last
        page sent to the phone."""
        if ref is not None:
            return await self._store.page(ref)
        if reply.related_client:
            found = (await self._store.pages_of([reply.related_client])).get(reply.related_client)
            if found is not None:
                return found
        return await self._store.last_page(reply.number)

    # -- commands --------------------------------------------------------------------------------

    async def _ack(self, snap: Snapshot, page: PageRecord, reply: Reply, duration: float | None,
                   now: float) -> bool:
        """False: this reply acknowledged before (a repeated callback): nothing is done again."""
        cfg = snap.config
        group = cfg.group(page.group_id)
        until = now + (duration or (group.ack_duration if group else 3600.0))
        by = mask(reply.number)
        if await self._store.ack(NewAck(reply.id, page.ref, reply.number, by, now, until)):
            self._metrics.acks.labels(page.group_id).inc()
            self._metrics.ack_seconds.observe(max(0.0, now - page.created_at))
        else:
            # Acknowledged before: done, unless the process died between storing the ack and
            # recording its outcome; Clickatell's retry then finishes it (silences, confirmation)
            fresh = await self._store.page(page.ref)
            unfinished = next((a for a in (fresh.acks if fresh else ()) if a.number == reply.number
                               and a.outcome is None and a.unacked_at is None), None)
            if unfinished is None:
                return False
            log.info("page #%d: finishing an acknowledgement a restart interrupted", page.ref)
            now, until = unfinished.at, unfinished.until
        original = await self._store.get_message(page.message_id)
        names = [i.name for i in original.items if i.status == "firing"] if original else []
        ids, note = await self._silence(cfg, page, by, now, until)
        await self._store.ack_outcome(reply.id, ids, note or "created")
        log.info("page #%d of %s acknowledged by %s until %s; silences %s", page.ref, page.group_id, by,
                 clock_time(until, cfg.timezone), ",".join(ids) or note)
        zone = (group.timezone if group else None) or cfg.timezone
        await self._answer(snap, group or _any(cfg, page), _members(cfg, page.groups),
                           ack_text(page.ref, until, by, names or [f"page #{page.ref}"], zone, note))
        return True

    async def _silence(self, cfg: Config, page: PageRecord, by: str, now: float,
                       until: float) -> tuple[list[str], str]:
        """The silences of an ack: their ids, and "" or why there are none (or not all)."""
        api = cfg.alertmanager
        urls = api.grafana_urls if page.source == "grafana" else api.urls
        firing = [labels for _, labels, resolved in page.alerts if not resolved]
        if not urls:
            self._metrics.silences.labels("none").inc()
            where = "Grafana's Alertmanager (alertmanager.grafana_urls)" if page.source == "grafana" \
                else "an Alertmanager (alertmanager.urls)"
            return [], f"no silence made: {where} is not configured"
        if not firing:
            return [], "no silence made: its alerts resolved"
        ids: list[str] = []
        try:  # the callback waits for this: bounded, whatever the peers' timeouts add up to
            async with asyncio.timeout(SILENCE_BUDGET):
                for labels in firing[:MAX_SILENCES]:
                    ids.append(await create(api, urls, labels, now, until, f"sms-receiver ack by {by}",
                                            f"acknowledged by SMS reply to page #{page.ref} ({page.group_id})"))
                    self._metrics.silences.labels("created").inc()
        except (SilenceError, TimeoutError) as exc:
            self._metrics.silences.labels("failed").inc()
            log.warning("silence for page #%d failed: %s", page.ref,
                        exc if isinstance(exc, SilenceError) else f"over {SILENCE_BUDGET:g}s in all")
            return ids, "SILENCE FAILED: no Alertmanager took it"
        return ids, "" if len(firing) <= MAX_SILENCES else f"only {MAX_SILENCES} alerts silenced"

    async def _unack(self, snap: Snapshot, page: PageRecord, reply: Reply, now: float) -> None:
        cfg = snap.config
        if page.acked_at is None:
            await self._reply_to(snap, _any(cfg, page), reply, f"#{page.ref} is not acknowledged.")
            return
        ids = await self._store.unack(page.ref, now, resume_at(cfg, page, now))
        api = cfg.alertmanager
        urls = api.grafana_urls if page.source == "grafana" else api.urls
        failed = 0
        for sid in ids:
            try:
                await expire(api, urls, sid)
                self._metrics.silences.labels("expired").inc()
            except SilenceError as exc:
                failed += 1
                self._metrics.silences.labels("expire_failed").inc()
                log.warning("expiring silence %s of page #%d failed: %s", sid, page.ref, exc)
        note = f" ({failed} silence(s) could not be expired)" if failed else ""
        await self._answer(snap, _any(cfg, page), _members(cfg, page.groups),
                           f"UNACKED #{page.ref} by {mask(reply.number)}{note}")
        self._escalate()

    async def _esc(self, snap: Snapshot, page: PageRecord, reply: Reply, mine: Group, now: float) -> None:
        group = snap.config.group(page.group_id)
        if group is None or group.escalate is None:
            text = f"#{page.ref}: group {page.group_id} has no escalation configured."
        elif page.rounds >= group.escalate.repeat:
            text = f"#{page.ref} was escalated {page.rounds} time(s) already: no rounds left."
        elif await self._store.escalate_at(page.ref, now):
            self._escalate()
            text = f"ESC #{page.ref}: escalating now."
        else:
            text = f"#{page.ref} is acknowledged: UNACK {page.ref} first."
        await self._reply_to(snap, mine, reply, text)

    # -- answers -----------------------------------------------------------------------------------

    async def _reply_to(self, snap: Snapshot, group: Group, reply: Reply, text: str) -> None:
        """An answer to the one phone that replied, at most ANSWER_LIMIT of them per phone in
        UNKNOWN_WINDOW, whatever it sent: a phone (or a script) cannot make the receiver spend
        SMS credit answering it. Confirmations to a group are not limited."""
        now = self._clock.now()
        await self._store.reply_seen(f"answer:{reply.id}", reply.number, now, "answered")
        if await self._store.replied_since(reply.number, "answered", now - UNKNOWN_WINDOW) > ANSWER_LIMIT:
            log.info("not answering %s: %d answers in %ds already", mask(reply.number), ANSWER_LIMIT,
                     int(UNKNOWN_WINDOW))
            return
        await self._answer(snap, group, [reply.number], text)

    async def _answer(self, snap: Snapshot, group: Group, numbers: Iterable[str], text: str) -> None:
        """An SMS through the outbox (retries, metrics, the paging policy), as a /send would be."""
        cfg = snap.config
        now = self._clock.now()
        level = cfg.group_level(group)
        mid = message_ids(new_message_id(now), [group.id])[0]
        message = NewMessage(id=mid, group_id=group.id, level=level, status=AlertStatus.FIRING,
                             sms=fit(text, cfg.clickatell.max_parts), recipients=tuple(dict.fromkeys(numbers)),
                             source="send", alert_count=0, priority=cfg.level_rank(level))
        await self._store.accept([with_policy(message, snap, now)], now)
        self._sent()


def _members(cfg: Config, group_ids: Iterable[str]) -> list[str]:
    return [n for gid in group_ids if (g := cfg.group(gid)) is not None for n in g.members]


def _any(cfg: Config, page: PageRecord) -> Group:
    """The group an answer about ``page`` is counted under: its own, or one it reached."""
    for gid in page.groups:
        if (g := cfg.group(gid)) is not None:
            return g
    raise LookupError(page.group_id)
