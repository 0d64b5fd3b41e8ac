"""Paging policy: when a message may go out, and what is held back instead. Pure functions.

Three things can hold a page; each releases what it held as *one* SMS, never drops it:

=============  ==========  ==============  =================================================
hold           decided     scope           released as
=============  ==========  ==============  =================================================
quiet_hours    at accept   whole message   one summary per group when the quiet period ends
digest         at accept   whole message   one summary per group per aligned window
throttle       at send     one number      one bundle per number once every rule allows it
=============  ==========  ==============  =================================================

A level with ``delivery: none`` is recorded and counted, never sent. Urgent levels (``paging.
urgent_level`` and above) skip quiet hours only when the group's ``min_level`` says so, but are
never held by the throttle longer than ``paging.urgent_max_delay``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo

from receiver.config import Config, Group, QuietHours, ThrottleRule, format_duration

PolicyKind = Literal["immediate", "digest", "quiet_hours", "none"]
QUIET_HOURS = "quiet hours"  # the hold reason shown in the API and in the summary's head
THROTTLE = "throttle"  # the hold reason of a message whose recipients the throttle holds


def hold_kind(reason: str) -> Literal["digest", "quiet_hours"]:
    """The metric label of a message-level hold from its shown reason ("digest 15m", …)."""
    return "quiet_hours" if reason == QUIET_HOURS else "digest"


@dataclass(frozen=True, slots=True)
class Policy:
    """What happens to a new message of one level for one group, decided at accept time."""

    kind: PolicyKind
    until: float | None = None  # digest and quiet_hours: when the summary goes out
    reason: str = ""  # shown in the API and in the summary's head

    def describe(self) -> str:
        if self.kind == "immediate":
            return "immediate"
        if self.kind == "none":
            return "none (recorded, not sent)"
        return f"held: {self.reason} until {_utc(self.until)}"


def _utc(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def quiet_until(qh: QuietHours, now: float) -> float | None:
    """The end of the quiet period ``now`` falls in, or None outside quiet hours.

    Periods may cross midnight (22:00–07:00 ends the next day); ``days`` are the days a period
    starts on. Start and end are wall-clock times in ``qh.timezone``, so a night with a DST change
    is an hour shorter or longer, and the period still ends at 07:00 local time."""
    tz = _zone(qh.timezone)
    today = datetime.fromtimestamp(now, tz).date()
    for back in (1, 0):  # a period that started yesterday evening, or one that started today
        day = today - timedelta(days=back)
        if day.weekday() not in qh.days:
            continue
        start = datetime.combine(day, qh.start, tz).timestamp()
        end_day = day if qh.end > qh.start else day + timedelta(days=1)
        end = datetime.combine(end_day, qh.end, tz).timestamp()
        if start <= now < end:
            return end
    return None


def digest_until(window: float, now: float) -> float:
    """The end of the aligned digest window ``now`` falls in (15m → :00, :15, :30, :45 UTC)."""
    return (math.floor(now / window) + 1) * window


def policy_for(cfg: Config, group: Group, level: str, now: float) -> Policy:
    """Quiet hours first (a level below the group's ``min_level`` waits for them to end), then the
    level's own delivery policy."""
    qh = group.quiet_hours
    if qh is not None:
        least = qh.min_level or cfg.levels[0].name
        if cfg.level_rank(level) > cfg.level_rank(least):
            end = quiet_until(qh, now)
            if end is not None:
                return Policy("quiet_hours", end, QUIET_HOURS)
    delivery = cfg.delivery(level)
    if delivery.mode == "none":
        return Policy("none", reason="delivery none")
    if delivery.mode == "digest":
        return Policy("digest", digest_until(delivery.window, now),
                      f"digest {format_duration(delivery.window)}")
    return Policy("immediate")


# ---------------------------------------------------------------------------------------------
# Per-number throttle


def next_allowed(history: Sequence[float], rules: Sequence[ThrottleRule], now: float) -> float:
    """The earliest time ≥ ``now`` at which one more SMS to a number keeps every rule
    (at most ``count`` sends in any ``window``), given the times of its earlier sends.

    For one rule the answer is the ``count``-th most recent send in the window plus the window;
    for several it is the latest of those, since a window only ever slides past old sends."""
    allowed = now
    for rule in rules:
        recent = sorted((t for t in history if t > now - rule.window), reverse=True)
        if len(recent) >= rule.count:
            allowed = max(allowed, recent[rule.count - 1] + rule.window)
    return allowed


@dataclass(frozen=True, slots=True)
class Throttle:
    """The per-number flood control of ``paging``: the rules, and the urgency bound."""

    rules: tuple[ThrottleRule, ...]
    urgent_rank: int
    urgent_max_delay: float

    @classmethod
    def from_config(cls, cfg: Config) -> Throttle:
        return cls(cfg.paging.throttle, cfg.urgent_rank, cfg.paging.urgent_max_delay)

    @property
    def horizon(self) -> float:
        """How far back sends matter."""
        return max((r.window for r in self.rules), default=0.0)

    def deadline(self, priority: int, created_at: float) -> float:
        """When a message must go out whatever the rules say (``inf`` for non-urgent levels)."""
        return created_at + self.urgent_max_delay if priority <= self.urgent_rank else math.inf

    def release_at(self, history: Sequence[float], deadlines: Sequence[float], now: float) -> float:
        """When a number's held messages (with these urgency deadlines) may go out as one SMS."""
        return min(next_allowed(history, self.rules, now), min(deadlines, default=math.inf))

    def admit(
        self, history: Sequence[float], holding: bool, priority: int, created_at: float, now: float
    ) -> float | None:
        """None: send to this number now. Otherwise hold it until the returned time; ``holding``
        (the number already has held messages) makes a new one join them, so they go out
        together, most urgent first, rather than overtaking them."""
        if not self.rules:
            return None
        at = self.release_at(history, [self.deadline(priority, created_at)], now)
        if at <= now and not holding:
            return None
        return max(at, now)
