"""Time, injectable: every part that reads the clock takes a `Clock`, so tests can move time by hand.

Three readings: `monotonic()` for TTLs, cache expiry and memo validity (never jumps), `now()`
for exemptions and the audit trail (wall time, timezone-aware UTC), and `time()`, the same wall
time as Unix seconds, for the query log. Durations for metrics use
`time.perf_counter` directly: they measure work, not policy time.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta


class Clock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def time(self) -> float:
        return time.time()


class ManualClock(Clock):
    """A clock that moves only when told to (tests)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)
        self._monotonic = 1000.0

    def monotonic(self) -> float:
        return self._monotonic

    def now(self) -> datetime:
        return self._now

    def time(self) -> float:
        return self._now.timestamp()

    def advance(self, seconds: float) -> None:
        self._monotonic += seconds
        self._now += timedelta(seconds=seconds)
