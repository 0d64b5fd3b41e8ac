"""The paging policy applied to what is stored: which recipients the throttle lets through or
holds, and what held messages go out as once their hold ends.

The decisions are pure functions over plain data the store reads (the claimed or held
:class:`~receiver.store.MessageRecord` rows, each number's :class:`~receiver.store.NumberHistory`)
that return the :class:`~receiver.store.Changes` to write; :func:`gate` and :func:`release` read,
decide and write. The rules themselves are :mod:`receiver.paging` (throttle, quiet hours,
digests) and :mod:`receiver.summary` (the texts).

:func:`gate` and :func:`release` run inside :meth:`Store.deciding`: what they read is still
true when they write, whichever replica (PostgreSQL) or task decides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from receiver.models import AlertStatus, NewMessage
from receiver.paging import THROTTLE, URGENT, Page, Throttle, hold_kind
from receiver.pipeline import new_message_id
from receiver.store import Changes, Decisions, Fold, MessageRecord, NumberHistory, Store
from receiver.summary import Entry, Summary, bundle, count_alerts, digest

IdSource = Callable[[float], str]


@dataclass(frozen=True, slots=True)
class Admission:
    ready: list[MessageRecord]  # claimed messages with recipients to send to now
    changes: Changes
    throttled: dict[str, int]  # recipients held, per group
    # bundles an urgent page made at once of what its numbers had held (stored, due now)
    released: list[Released] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Released:
    """One summary made from held messages (``message_id`` None: all of it collapsed)."""

    kind: Literal["bundle", "digest", "quiet_hours"]
    group_id: str
    message_id: str | None
    held_messages: int
    alerts: int
    collapsed: int


def ungated(claimed: Sequence[MessageRecord]) -> list[str]:
    """The numbers of claimed recipients the throttle has not seen yet."""
    return sorted({r.number for m in claimed for r in m.recipients
                   if r.state == "pending" and not r.admitted})


def _page(m: MessageRecord) -> Page:
    return Page(m.priority, str(m.status), m.created_at)


def admit(claimed: Sequence[MessageRecord], histories: Mapping[str, NumberHistory],
          throttle: Throttle, now: float, urgent: Mapping[str, Sequence[float]] | None = None) -> Admission:
    """Clear or hold each claimed recipient the throttle has not seen yet. One storm puts the
    same numbers in many claimed messages: each number's history (and ``urgent``: its urgent
    sends) is kept up to date here."""
    numbers = {n: (list(h.sent_at), h.holding) for n, h in histories.items()}
    urgent_sent = {n: list(t) for n, t in (urgent or {}).items()}
    sends: list[tuple[str, str]] = []
    holds: list[tuple[str, str, float]] = []
    throttled: dict[str, int] = {}
    ready: list[MessageRecord] = []
    for m in claimed:
        recipients = []
        for r in m.recipients:
            if r.state != "pending" or r.admitted:
                recipients.append(r)
                continue
            history, holding = numbers.setdefault(r.number, ([], False))
            mine = urgent_sent.setdefault(r.number, [])
            until = throttle.admit(history, holding, m.priority, m.created_at, now, str(m.status), mine)
            if until is None:
                history.append(now)
                if throttle.kind(m.priority, str(m.status)) == URGENT:
                    mine.append(now)
                sends.append((m.id, r.number))
                recipients.append(replace(r, admitted=True))
            else:
                numbers[r.number] = (history, True)
                holds.append((m.id, r.number, until))
                throttled[m.group_id] = throttled.get(m.group_id, 0) + 1
                recipients.append(replace(r, state="held", hold_until=until, updated_at=now))
        m = replace(m, recipients=tuple(recipients))
        if m.pending_numbers:
            ready.append(m)
    changes = Changes(now, sends=tuple(sends), holds=tuple(holds), hold_reason=THROTTLE)
    return Admission(ready, changes, throttled)


def _entry(m: MessageRecord) -> Entry:
    return Entry(m.id, m.created_at, m.priority, m.level, m.status, m.text, m.items,
                 summary=m.source == "summary")


def _summary_message(new_id: IdSource, now: float, group_id: str, entries: Sequence[Entry],
                     summary: Summary, recipients: Sequence[str], *, admitted: bool) -> NewMessage:
    top = min(entries, key=lambda e: (e.priority, e.created_at))
    firing = any(i.status == "firing" for e in entries for i in e.keyed_items())
    return NewMessage(
        id=new_id(now), group_id=group_id, level=top.level,
        status=AlertStatus.FIRING if firing else AlertStatus.RESOLVED, sms=summary.sms,
        recipients=tuple(recipients), source="summary", alert_count=summary.alerts,
        priority=top.priority, items=tuple(i for e in entries for i in e.items), admitted=admitted,
    )


def release_groups(held: Sequence[MessageRecord], max_parts: int, new_id: IdSource,
                   now: float) -> tuple[Changes, list[Released]]:
    """Digest windows and quiet periods that ended: one summary per group and reason, to the
    recipients still waiting, or nothing when every held alert fired and resolved meanwhile."""
    by_group: dict[tuple[str, str], list[MessageRecord]] = {}
    for m in held:
        by_group.setdefault((m.group_id, m.hold_reason or ""), []).append(m)
    messages: list[NewMessage] = []
    folds: list[Fold] = []
    out: list[Released] = []
    for (group_id, reason), group in by_group.items():
        ids = tuple(m.id for m in group)
        entries = [_entry(m) for m in group]
        summary = digest(entries, reason, max_parts)
        numbers = sorted({n for m in group for n in m.pending_numbers})
        kind = hold_kind(reason)
        if summary is None or not numbers:
            folds.append(Fold(ids, None))
            alerts = summary.alerts if summary else count_alerts(entries)
            out.append(Released(kind, group_id, None, len(ids), alerts,
                                summary.collapsed if summary else alerts))
            continue
        message = _summary_message(new_id, now, group_id, entries, summary, numbers, admitted=False)
        messages.append(message)
        folds.append(Fold(ids, message.id))
        out.append(Released(kind, group_id, message.id, len(ids), summary.alerts, summary.collapsed))
    return Changes(now, messages=tuple(messages), folds=tuple(folds)), out


def release_numbers(due: Mapping[str, Sequence[MessageRecord]], histories: Mapping[str, NumberHistory],
                    throttle: Throttle, max_parts: int, new_id: IdSource,
                    now: float, urgent: Mapping[str, Sequence[float]] | None = None
                    ) -> tuple[Changes, list[Released]]:
    """Numbers whose throttle hold is due: one bundle each if the rules (or an urgent page under
    the ceiling given each number's ``urgent`` sends, or an urgent message's deadline) allow it
    now; otherwise their holds move to when they will."""
    messages: list[NewMessage] = []
    sends: list[tuple[str, str]] = []
    holds: list[tuple[str, str, float]] = []
    folds: list[Fold] = []
    out: list[Released] = []
    for number, held in due.items():
        entries = [_entry(m) for m in held]
        history = histories.get(number, NumberHistory([], True)).sent_at
        at = throttle.release_at(history, [_page(m) for m in held], now, (urgent or {}).get(number, ()))
        if at > now:  # sends since the hold was set pushed it back
            holds += [(m.id, number, at) for m in held]
            continue
        ids = tuple(m.id for m in held)
        group_id = min(held, key=lambda m: (m.priority, m.created_at)).group_id
        summary = bundle(entries, max_parts)
        if summary is None:
            folds.append(Fold(ids, None, number))
            alerts = count_alerts(entries)
            out.append(Released("bundle", group_id, None, len(ids), alerts, alerts))
            continue
        message = _summary_message(new_id, now, group_id, entries, summary, [number], admitted=True)
        messages.append(message)
        sends.append((message.id, number))
        folds.append(Fold(ids, message.id, number))
        out.append(Released("bundle", group_id, message.id, len(ids), summary.alerts, summary.collapsed))
    changes = Changes(now, messages=tuple(messages), sends=tuple(sends), holds=tuple(holds),
                      hold_reason=THROTTLE, folds=tuple(folds))
    return changes, out


async def gate(store: Store, claimed: list[MessageRecord], throttle: Throttle, now: float,
               new_id: IdSource = new_message_id) -> Admission:
    """Run freshly claimed messages through the throttle; the admission is stored before any
    of it is sent. An urgent page that joins its number's held messages releases them with it
    at once as one bundle (``throttle.bundle_parts`` long at most), stored due now."""
    numbers = ungated(claimed) if throttle.rules else []
    if not numbers:
        return Admission(claimed, Changes(now), {})
    pressing = _urgent_numbers(claimed, throttle)
    async with store.deciding() as d:
        urgent = await _urgent_sends(d, sorted(pressing & set(numbers)), throttle, now)
        admission = admit(claimed, await d.history(numbers, now - throttle.horizon), throttle, now, urgent)
        if admission.changes:
            await d.apply(admission.changes)
        # an urgent page that joined held messages takes them with it now, not at the next release
        joined = {n for _, n, until in admission.changes.holds if until <= now}
        if joined:
            due = {n: held for n, held in (await d.held_numbers(now)).items() if n in joined}
            histories = await d.history(sorted(due), now - throttle.horizon)
            changes, released = release_numbers(due, histories, throttle, throttle.bundle_parts,
                                                new_id, now, urgent)
            await d.apply(changes)
            admission.released.extend(released)
    return admission


def _urgent_numbers(messages: Sequence[MessageRecord], throttle: Throttle) -> set[str]:
    """The numbers an urgent page in ``messages`` waits for: only theirs need urgent history."""
    return {r.number for m in messages if throttle.kind(m.priority, str(m.status)) == URGENT
            for r in m.recipients}


async def _urgent_sends(d: Decisions, numbers: Sequence[str], throttle: Throttle,
                        now: float) -> dict[str, list[float]]:
    if not numbers or not throttle.ceiling:
        return {}
    since = now - throttle.urgent_horizon
    return await d.urgent_sends(numbers, since, since - throttle.lookback, throttle.urgent_rank)


async def release(store: Store, throttle: Throttle, max_parts: int, new_id: IdSource,
                  now: float) -> list[Released]:
    """Turn the holds that are due into summaries (or later holds), each kind in one write."""
    out: list[Released] = []
    async with store.deciding() as d:
        held = await d.held_messages(now)
        if held:
            changes, released = release_groups(held, max_parts, new_id, now)
            await d.apply(changes)
            out += released
    async with store.deciding() as d:
        due = await d.held_numbers(now)
        if due:
            histories = await d.history(list(due), now - throttle.horizon)
            pressing = _urgent_numbers([m for held in due.values() for m in held], throttle) & set(due)
            urgent = await _urgent_sends(d, sorted(pressing), throttle, now)
            changes, released = release_numbers(due, histories, throttle, max_parts, new_id, now, urgent)
            await d.apply(changes)
            out += released
    return out
