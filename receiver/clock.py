"""Time, injected.

Paging rules depend on the time of day and on how long something waited, so no module calls
``time.time()`` directly: they receive a :class:`Clock`. Tests pass a :class:`FakeClock`.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time as Unix seconds (what is stored and shown)."""

    def monotonic(self) -> float:
        """A clock that never goes back (for measuring durations)."""


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._mono = 0.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._mono += seconds

