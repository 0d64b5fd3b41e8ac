"""The accept pipeline, composed in one place: notification → routing → render → outbox rows.

Everything here is pure: given the same notification, config snapshot, time and ids, it plans
the same messages. It runs in two steps so that a webhook is answered as soon as it is durable:
on receipt the body is only validated and stored under a new notification id; the planner
later routes and renders it (:func:`plan_received`), as of the time of receipt, with message ids
derived from the notification id, so planning it twice gives the same messages.
``sms-receiver render`` prints the whole plan in one go (:func:`plan_notification`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from receiver.config import Config
from receiver.encoding import fit
from receiver.ingest import SendItem, send_notification
from receiver.models import AlertStatus, GroupDelivery, NewMessage, Notification
from receiver.paging import Policy, Throttle, policy_for
from receiver.render import Renderer, build_context
from receiver.routing import RoutingResult, alert_level, route
from receiver.summary import alert_item

IdSource = Callable[[float], str]


def new_message_id(now: float) -> str:
    """Time-ordered and unique across replicas: 11 hex digits of milliseconds + 64 random bits.
    Also sent as Clickatell's ``clientMessageId``, so delivery reports point back to it. The
    bits need to be unique, not secret (callbacks are authenticated on their own): ``random``,
    seeded from the OS and again in a forked child, without a system call per id."""
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


def plan_notification(
    notification: Notification, snap: Snapshot, now: float, new_id: IdSource = new_message_id
) -> Plan:
    """Route a notification and render one message per receiving group."""
    cfg = snap.config
    routing = route(notification, cfg)
    messages = tuple(
        with_policy(_message(notification, delivery, snap, now, new_id), snap, now)
        for delivery in routing.deliveries
    )
    return Plan(messages, routing)


def message_id_for(notification_id: str, group_id: str) -> str:
    """The id of a notification's message to one group: the notification id (time-ordered)
    and 8 hex digits of the group's. The same on every planning of the notification."""
    return notification_id + hashlib.blake2b(group_id.encode(), digest_size=4).hexdigest()


def inbox_plan(notification_id: str) -> str:
    """What the inbox keeps beside a received body: its notification id (the planner routes it)."""
    return f'{{"notification":"{notification_id}"}}'  # hex: no escaping (json.dumps: 2 µs)


def plan_received(notification: Notification, plan: str, snap: Snapshot,
                  now: float) -> tuple[Plan, tuple[str, ...]]:
    """The messages of a notification received at ``now`` and kept with ``plan``, and the
    groups dropped. ``plan`` is :func:`inbox_plan`'s (route now), or, from before routing moved
    to the planner, the deliveries and their message ids (:func:`render_routed`)."""
    stored = json.loads(plan)
    if isinstance(stored, list):
        messages, dropped = render_routed(notification, plan, snap, now)
        return Plan(messages, RoutingResult(deliveries=(), unrouted=(), filtered=())), dropped
    nid = stored["notification"]
    routing = route(notification, snap.config)
    ids = [message_id_for(nid, d.group_id) for d in routing.deliveries]
    if len(set(ids)) < len(ids):  # two groups' 32-bit digests collide: the whole id instead
        ids = [nid + hashlib.blake2b(d.group_id.encode()).hexdigest() for d in routing.deliveries]
    messages = tuple(
        with_policy(_message(notification, d, snap, now, lambda _, m=mid: m), snap, now)
        for d, mid in zip(routing.deliveries, ids)
    )
    return Plan(messages, routing), ()


def render_routed(notification: Notification, plan: str, snap: Snapshot,
                  now: float) -> tuple[tuple[NewMessage, ...], tuple[str, ...]]:
    """The messages of a notification routed on receipt (before routing moved to the planner),
    stored with ``plan``: its deliveries and their message ids, rendered with
    ``snap`` as of ``now`` (the time of receipt), and the groups dropped: a group removed from
    the config in between has no members or template left."""
    out, dropped = [], []
    for mid, group_id, level, status, positions in json.loads(plan):
        if group_id not in snap.config.groups_by_id:
            dropped.append(group_id)
            continue
        delivery = GroupDelivery(group_id, level, AlertStatus(status),
                                 tuple(notification.alerts[i] for i in positions))
        out.append(with_policy(_message(notification, delivery, snap, now, lambda _, m=mid: m), snap, now))
    return tuple(out), tuple(dropped)


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


def _message(
    notification: Notification,
    delivery: GroupDelivery,
    snap: Snapshot,
    now: float,
    new_id: IdSource,
    template: str | None = None,
) -> NewMessage:
    cfg = snap.config
    group = cfg.groups_by_id[delivery.group_id]
    rendered = snap.renderer.render(
        template or group.template,
        build_context(notification, delivery, group, now),
        cfg.clickatell.max_parts,
    )
    return NewMessage(
        id=new_id(now),
        group_id=group.id,
        level=delivery.level,
        status=delivery.status,
        sms=rendered.sms,
        recipients=group.members,
        source=notification.source,
        alert_count=len(delivery.alerts),
        priority=cfg.level_rank(delivery.level),
        template_error=rendered.error,
        items=tuple(
            alert_item(a, lvl, cfg.level_rank(lvl))
            for a in delivery.alerts
            for lvl in (alert_level(a, cfg),)
        ),
    )


def plan_send(
    item: SendItem, snap: Snapshot, now: float, new_id: IdSource = new_message_id
) -> NewMessage:
    """One ``/send`` item as a message to its group (whose existence the caller checked).

    A literal ``message`` is sent as written (cut to ``max_parts``); ``useTemplate`` renders the
    group's template (or the item's ``template``) with the caller's ``variables``.
    """
    cfg = snap.config
    group = cfg.groups_by_id[item.groupId]
    level = cfg.group_level(group)
    notification = send_notification(item)
    delivery = GroupDelivery(group.id, level, AlertStatus.FIRING, ())
    if item.useTemplate:
        return with_policy(_message(notification, delivery, snap, now, new_id, item.template), snap, now)
    return with_policy(NewMessage(
        id=new_id(now),
        group_id=group.id,
        level=level,
        status=AlertStatus.FIRING,
        sms=fit(item.message or "", cfg.clickatell.max_parts),
        recipients=group.members,
        source="send",
        alert_count=0,
        priority=cfg.level_rank(level),
    ), snap, now)
