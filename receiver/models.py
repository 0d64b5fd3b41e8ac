"""The internal data model every stage speaks, and the message state machine.

``ingest`` turns each sender's payload into one :class:`Notification`; ``routing`` splits it into
:class:`GroupDelivery` items; ``render`` turns each into an :class:`SmsText`; the planner makes
them :class:`NewMessage` rows that ``store`` keeps durable until ``dispatch`` delivers them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

Source = Literal["alertmanager", "grafana", "send", "summary"]  # summary: of held messages
Encoding = Literal["GSM-7", "UCS-2"]


class AlertStatus(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert. ``status`` comes from the alert itself, never from ``ends_at``."""

    status: AlertStatus
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: datetime | None
    ends_at: datetime | None  # None for the Go zero time of a firing alert
    generator_url: str = ""
    fingerprint: str = ""
    # Grafana's extras (empty for Alertmanager)
    silence_url: str = ""
    dashboard_url: str = ""
    panel_url: str = ""
    image_url: str = ""
    values: Mapping[str, Any] | None = None
    value_string: str = ""


@dataclass(frozen=True, slots=True)
class Notification:
    """One webhook call (or one ``/send`` item), whatever the sender."""

    source: Source
    alerts: tuple[Alert, ...]
    status: AlertStatus = AlertStatus.FIRING
    receiver: str = ""
    group_key: str = ""
    group_labels: Mapping[str, str] = field(default_factory=dict)
    common_labels: Mapping[str, str] = field(default_factory=dict)
    common_annotations: Mapping[str, str] = field(default_factory=dict)
    external_url: str = ""
    truncated_alerts: int = 0
    title: str = ""  # Grafana
    message: str = ""  # Grafana, or the literal text of a /send item


@dataclass(frozen=True, slots=True)
class GroupDelivery:
    """The alerts of one notification that reach one SMS group: they become one text."""

    group_id: str
    level: str  # the most urgent level among ``alerts``
    status: AlertStatus  # firing if any of ``alerts`` fires
    alerts: tuple[Alert, ...]


@dataclass(frozen=True, slots=True)
class SmsText:
    """A text ready to send: already cut to the configured number of parts."""

    text: str
    encoding: Encoding
    parts: int
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class Item:
    """One alert of a message, as a summary names it."""

    key: str  # identity across messages: the fingerprint, or a hash of the labels
    name: str  # "DiskFull db-1"
    level: str
    priority: int
    status: str  # firing | resolved
    # the alert's label set, sorted (kept for the history page); () for a summary's own items
    labels: tuple[tuple[str, str], ...] = ()

    def to_list(self) -> list[Any]:
        head: list[Any] = [self.key, self.name, self.level, self.priority, self.status]
        return head + [dict(self.labels)] if self.labels else head

    @classmethod
    def from_list(cls, raw: Sequence[Any]) -> Item:
        key, name, level, priority, status, *labels = raw
        return cls(str(key), str(name), str(level), int(priority), str(status),
                   tuple(sorted(labels[0].items())) if labels else ())


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to be stored in the outbox: one text for one group's recipients."""

    id: str
    group_id: str
    level: str
    status: AlertStatus
    sms: SmsText
    recipients: tuple[str, ...]  # E.164, with "+"
    source: Source
    alert_count: int
    priority: int = 0  # the level's rank: 0 is the most urgent, sent first
    template_error: str | None = None
    items: tuple[Item, ...] = ()  # its alerts, as a summary would name them
    hold_reason: str | None = None  # held at accept (digest, quiet hours) ...
    hold_until: float | None = None  # ... until then
    suppressed: bool = False  # delivery: none: recorded, never sent
    admitted: bool = False  # already cleared by the throttle (a bundle)

    @property
    def state(self) -> MessageState:
        """The state it is stored in."""
        return "suppressed" if self.suppressed else "held" if self.hold_until is not None else "pending"


# ---------------------------------------------------------------------------------------------
# The message state machine. A message's state is derived from its recipients' states
# (message_state), with two exceptions: ``sending`` (claimed under a lease by a dispatcher), and
# a message held whole (a digest, quiet hours): ``held`` while its recipients wait as ``pending``,
# until it is folded into a summary.

MessageState = Literal[
    "pending", "sending", "sent", "partial", "failed", "dead", "dry_run",
    "held", "suppressed", "bundled", "collapsed",
]
RecipientState = Literal[
    "pending", "accepted", "failed", "delivered", "undelivered", "dry_run",
    "held", "suppressed", "bundled", "collapsed",
]
# held: waiting for a digest, quiet hours or the throttle; suppressed: delivery none;
# bundled: folded into the summary message ``bundle_id``; collapsed: fired and resolved while held.
MESSAGE_STATES: tuple[MessageState, ...] = (
    "pending", "sending", "sent", "partial", "failed", "dead", "dry_run",
    "held", "suppressed", "bundled", "collapsed",
)
# States a message never leaves: what retention may delete.
FINISHED_STATES: tuple[MessageState, ...] = (
    "sent", "partial", "failed", "dead", "dry_run", "suppressed", "bundled", "collapsed",
)


def message_state(counts: Mapping[str, int], dead: bool = False) -> MessageState:
    """A message's state from how many of its recipients are in each state. Anyone still
    pending keeps it pending, then anyone held; ``dead`` (given up) wins over the results."""
    if counts.get("pending"):
        return "pending"
    if counts.get("held"):
        return "held"
    if dead:
        return "dead"
    ok = counts.get("accepted", 0) + counts.get("delivered", 0) + counts.get("undelivered", 0)
    folded = counts.get("bundled", 0)
    failed = counts.get("failed", 0)
    if counts.get("dry_run") and not ok and not failed:
        return "dry_run"
    if failed and (ok or folded):
        return "partial"
    if ok:
        return "sent"
    if failed:
        return "failed"
    if folded:
        return "bundled"
    if counts.get("collapsed"):
        return "collapsed"
    return "suppressed" if counts.get("suppressed") else "sent"
