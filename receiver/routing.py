"""Routing: which SMS groups receive which alerts of a notification, at which level.

Pure functions of (notification, config). Each alert is routed on its own labels:

1. its level comes from ``severity_label`` through ``levels`` (case-insensitive), else
   ``default_level``;
2. routes are tried in order; every matching route adds its groups, and the first match stops
   the walk unless it says ``continue: true``; no match at all sends it to ``default_groups``;
3. a group takes the alert only at its own ``level`` or more urgent, and a resolved alert only
   with ``send_resolved``.

The alerts that reach one group become one :class:`GroupDelivery` (one text).
"""

from __future__ import annotations

from dataclasses import dataclass

from receiver.config import Config
from receiver.models import Alert, AlertStatus, GroupDelivery, Notification


@dataclass(frozen=True, slots=True)
class RoutingResult:
    deliveries: tuple[GroupDelivery, ...]
    unrouted: tuple[Alert, ...]  # matched no route, and there are no default groups
    filtered: tuple[Alert, ...]  # matched groups, none of which takes it (level, send_resolved)


def alert_level(alert: Alert, cfg: Config) -> str:
    return cfg.severity_level(alert.labels.get(cfg.severity_label, ""))


def matched_groups(alert: Alert, cfg: Config) -> tuple[str, ...]:
    """Group ids an alert's labels route to, in route order, without repeats."""
    found: list[str] = []
    for route in cfg.routes:
        if all(m.matches(alert.labels) for m in route.matchers):
            found.extend(g for g in route.groups if g not in found)
            if not route.continue_:
                break
    return tuple(found) if found else cfg.default_groups


def route(notification: Notification, cfg: Config) -> RoutingResult:
    buckets: dict[str, list[tuple[Alert, str]]] = {}
    unrouted: list[Alert] = []
    filtered: list[Alert] = []
    for alert in notification.alerts:
        level = alert_level(alert, cfg)
        rank = cfg.level_rank(level)
        group_ids = matched_groups(alert, cfg)
        if not group_ids:
            unrouted.append(alert)
            continue
        taken = False
        for gid in group_ids:
            group = cfg.group(gid)
            if group is None or rank > cfg.level_rank(cfg.group_level(group)):
                continue
            if alert.status is AlertStatus.RESOLVED and not group.send_resolved:
                continue
            buckets.setdefault(gid, []).append((alert, level))
            taken = True
        if not taken:
            filtered.append(alert)

    deliveries = []
    for gid, items in buckets.items():
        alerts = tuple(a for a, _ in items)
        deliveries.append(
            GroupDelivery(
                group_id=gid,
                level=min((lvl for _, lvl in items), key=cfg.level_rank),
                status=(
                    AlertStatus.FIRING
                    if any(a.status is AlertStatus.FIRING for a in alerts)
                    else AlertStatus.RESOLVED
                ),
                alerts=alerts,
            )
        )
    return RoutingResult(tuple(deliveries), tuple(unrouted), tuple(filtered))
