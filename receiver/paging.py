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
urgent_level`` and above) skip quiet hours only when the group's ``min_level`` says so. A firing
urgent page passes the throttle at once (taking what is held for its number with it) while its
number is under ``paging.urgent_ceiling``; past it, it is held no longer than
``paging.urgent_max_delay``.
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
class Page:
    """What the throttle needs to know of one message to a number."""

    priority: int  # level rank: 0 is the most urgent
    status: str  # "firing" or "resolved"
    created_at: float


URGENT, NORMAL = "urgent", "normal"


@dataclass(frozen=True, slots=True)
class Lane:
    """One way through the throttle: the kinds of page that may take it, which earlier sends to
    the number count against it, and which limits (a :class:`Throttle` field) they must keep."""

    kinds: frozenset[str]
    counts: Literal["all", "urgent"]
    limits: Literal["rules", "ceiling"]


# GoAlert's style: the policy is this table, not branches. A page may go when any lane it may
# take allows it (or at its urgency deadline); a number's pages go out together as one SMS at
# the earliest moment any of them may go, so an urgent page takes what is held with it.
# Urgent: a firing page at ``paging.urgent_level`` or above. Resolved pages and lower levels are
# normal: they are never counted against the urgent lane, so they never delay an urgent page;
# an urgent page past its ceiling is left the normal lane (and its deadline).
LANES = (
    Lane(frozenset({URGENT}), counts="urgent", limits="ceiling"),  # paging.urgent_ceiling
    Lane(frozenset({URGENT, NORMAL}), counts="all", limits="rules"),  # paging.throttle
)


@dataclass(frozen=True, slots=True)
class Throttle:
    """The per-number flood control of ``paging``: the rules, the urgent ceiling and bound."""

    rules: tuple[ThrottleRule, ...]
    urgent_rank: int
    urgent_max_delay: float
    ceiling: tuple[ThrottleRule, ...] = ()  # of urgent sends; () = none
    lookback: float = 3600.0  # how long after its creation a message may still be sent
    bundle_parts: int = 3  # the longest bundle an urgent page releases at once (clickatell.max_parts)

    @classmethod
    def from_config(cls, cfg: Config) -> Throttle:
        p = cfg.paging
        ceiling = (p.urgent_ceiling,) if p.urgent_ceiling is not None else ()
        return cls(p.throttle, cfg.urgent_rank, p.urgent_max_delay, ceiling, cfg.dispatch.max_age,
                   cfg.clickatell.max_parts)

    @property
    def horizon(self) -> float:
        """How far back sends matter."""
        return max((r.window for r in self.rules), default=0.0)

    @property
    def urgent_horizon(self) -> float:
        """How far back urgent sends matter (the ceiling's window)."""
        return max((r.window for r in self.ceiling), default=0.0)

    def kind(self, priority: int, status: str) -> str:
        return URGENT if priority <= self.urgent_rank and status == "firing" else NORMAL

    def deadline(self, priority: int, created_at: float) -> float:
        """When a message must go out whatever the rules say (``inf`` for non-urgent levels)."""
        return created_at + self.urgent_max_delay if priority <= self.urgent_rank else math.inf

    def page_at(self, page: Page, history: Sequence[float], urgent_history: Sequence[float],
                now: float) -> float:
        """The earliest time ≥ ``now`` this page may go out: through any lane (:data:`LANES`)
        its kind may take, or at its urgency deadline."""
        kind = self.kind(page.priority, page.status)
        sends = {"all": history, "urgent": urgent_history}
        lanes = (next_allowed(sends[lane.counts], getattr(self, lane.limits), now)
                 for lane in LANES if kind in lane.kinds)
        return max(now, min(self.deadline(page.priority, page.created_at), *lanes))

    def release_at(self, history: Sequence[float], pages: Sequence[Page], now: float,
                   urgent_history: Sequence[float] = ()) -> float:
        """When a number's held ``pages`` may go out as one SMS, given its sends (``history``)
        and its urgent sends among them (``urgent_history``)."""
        return min((self.page_at(p, history, urgent_history, now) for p in pages),
                   default=next_allowed(history, self.rules, now))

    def admit(
        self, history: Sequence[float], holding: bool, priority: int, created_at: float, now: float,
        status: str = "resolved", urgent_history: Sequence[float] = (),
    ) -> float | None:
        """None: send to this number now. Otherwise hold it until the returned time; ``holding``
        (the number already has held messages) makes a new one join them, so they go out
        together, most urgent first, rather than overtaking them (a returned time ≤ ``now``:
        release them with it at once). ``status`` and ``urgent_history`` (the number's urgent
        sends) make a firing urgent page pass the rules while under the urgent ceiling."""
        if not self.rules:
            return None
        page = Page(priority, status, created_at)
        at = self.release_at(history, [page], now, urgent_history)
        if at <= now and not holding:
            return None
        return max(at, now)
