"""The planning pipeline, composed in one place: notification → routing → render → paging policy
→ messages. Pure: given the same notification, config snapshot, time and notification id it
plans the same messages, with the same ids, so planning a notification again after a crash adds
nothing. The planner (:mod:`receiver.planner`) runs it on what was received;
``sms-receiver render`` prints it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from receiver.config import Config
from receiver.encoding import fit
from receiver.models import AlertStatus, GroupDelivery, NewMessage, Notification
from receiver.paging import Policy, Throttle, policy_for
from receiver.render import Renderer, build_context
from receiver.routing import RoutingResult, alert_level, route
from receiver.store import NewPage
from receiver.summary import alert_item
from receiver.twoway import with_ref


def new_message_id(now: float) -> str:
    """Time-ordered and unique across replicas: 11 hex digits of milliseconds + 64 random bits.
    Notifications get one; their messages add the group's digest to it. Also sent as
    Clickatell's ``clientMessageId``, so delivery reports point back to the message. The bits
    need to be unique, not secret (callbacks are authenticated on their own)."""
    return f"{int(now * 1000):011x}{random.getrandbits(64):016x}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent config and what is compiled from it; swapped whole on reload."""

    config: Config
    renderer: Renderer
    throttle: Throttle

    @classmethod
    def build(cls, config: Config) -> Snapshot:
        return cls(config, Renderer(config.templates), Throttle.from_config(config))


@dataclass(frozen=True, slots=True)
class Plan:
    messages: tuple[NewMessage, ...]
    routing: RoutingResult
    pages: tuple[NewPage, ...] = ()  # two-way pages among ``messages`` (after :func:`with_refs`)


def message_ids(notification_id: str, group_ids: Sequence[str]) -> list[str]:
    """The ids of a notification's messages to these groups: the notification id (time-ordered)
    and 8 hex digits of the group's, or all of its digest should two groups' 8 digits collide."""
    ids = [notification_id + hashlib.blake2b(g.encode(), digest_size=4).hexdigest() for g in group_ids]
    if len(set(ids)) < len(ids):
        ids = [notification_id + hashlib.blake2b(g.encode()).hexdigest() for g in group_ids]
    return ids


def plan_notification(notification: Notification, notification_id: str, snap: Snapshot,
                      now: float) -> Plan:
    """Route a notification received at ``now`` and render one message per receiving group,
    with the paging policy of that time."""
    routing = route(notification, snap.config)
    ids = message_ids(notification_id, [d.group_id for d in routing.deliveries])
    messages = tuple(
        with_policy(_message(notification, d, snap, now, mid), snap, now)
        for d, mid in zip(routing.deliveries, ids)
    )
    return Plan(messages, routing)


def policy(message: NewMessage, snap: Snapshot, now: float) -> Policy:
    """The paging policy (immediate, digest, quiet hours, none) that applies to a new message."""
    cfg = snap.config
    return policy_for(cfg, cfg.groups_by_id[message.group_id], message.level, now)


def with_policy(message: NewMessage, snap: Snapshot, now: float) -> NewMessage:
    p = policy(message, snap, now)
    if p.kind == "none":
        return replace(message, suppressed=True, hold_reason=p.reason)
    if p.until is not None:
        return replace(message, hold_reason=p.reason, hold_until=p.until)
    return message


def _message(notification: Notification, delivery: GroupDelivery, snap: Snapshot, now: float,
             message_id: str) -> NewMessage:
    cfg = snap.config
    group = cfg.groups_by_id[delivery.group_id]
    rendered = snap.renderer.render(
        group.template,
        build_context(notification, delivery, group, now, zone=group.timezone or cfg.timezone),
        cfg.clickatell.max_parts,
    )
    return NewMessage(
        id=message_id,
        group_id=group.id,
        level=delivery.level,
        status=delivery.status,
        sms=rendered.sms,
        recipients=group.members,
        source=notification.source,
        alert_count=len(delivery.alerts),
        priority=cfg.level_rank(delivery.level),
        template_error=rendered.error,
        items=tuple(alert_item(a, lvl, cfg.level_rank(lvl))
                    for a in delivery.alerts for lvl in (alert_level(a, cfg),)),
    )


def plan_send(group_id: str, text: str, snap: Snapshot, now: float, message_id: str) -> NewMessage:
    """A ``/send`` text (rendered already: receiver.send) as a message to its group, whose
    existence the caller checked; cut to ``max_parts``, its paging policy applied."""
    cfg = snap.config
    group = cfg.groups_by_id[group_id]
    level = cfg.group_level(group)
    message = NewMessage(
        id=message_id, group_id=group.id, level=level, status=AlertStatus.FIRING,
        sms=fit(text, cfg.clickatell.max_parts), recipients=group.members,
        source="send", alert_count=0, priority=cfg.level_rank(level),
    )
    return with_policy(message, snap, now)


# ---------------------------------------------------------------------------------------------
# Two-way paging: a page's reference, said once at the end of its text


def _two_way(message: NewMessage, snap: Snapshot) -> bool:
    group = snap.config.groups_by_id.get(message.group_id)
    return bool(group and group.two_way and message.status is AlertStatus.FIRING and not message.suppressed)


def refs_wanted(plan: Plan, snap: Snapshot) -> int:
    """How many page references :func:`with_refs` needs: one per firing page of a two-way group."""
    return sum(_two_way(m, snap) for m in plan.messages)


def with_refs(plan: Plan, refs: Sequence[int], snap: Snapshot, now: float) -> Plan:
    """The plan with `` #<ref>`` at the end of each two-way page (``refs`` in order, as many as
    :func:`refs_wanted`) and the pages to store beside them, their first escalation due ``now``
    (the time of receipt) plus the group's ``escalate.after``."""
    cfg = snap.config
    it = iter(refs)
    messages, pages = [], []
    for message, delivery in zip(plan.messages, plan.routing.deliveries, strict=True):
        if not _two_way(message, snap):
            messages.append(message)
            continue
        ref = next(it)
        group = cfg.groups_by_id[message.group_id]
        messages.append(replace(message, sms=with_ref(message.sms, ref, cfg.clickatell.max_parts)))
        alerts = tuple((alert_item(a, "", 0).key, dict(a.labels)) for a in delivery.alerts
                       if a.status is AlertStatus.FIRING)
        esc = group.escalate
        escalates = esc is not None and (esc.level is None
                                          or cfg.level_rank(message.level) <= cfg.level_rank(esc.level))
        escalate_at = now + esc.after if escalates and esc is not None else None
        pages.append(NewPage(ref, message.id, group.id, message.source, escalate_at, alerts))
    return replace(plan, messages=tuple(messages), pages=tuple(pages))


def resolved_keys(notification: Notification) -> tuple[str, ...]:
    """The keys of a notification's resolved alerts: every page of theirs stops escalating."""
    return tuple(alert_item(a, "", 0).key for a in notification.alerts if a.status is AlertStatus.RESOLVED)
