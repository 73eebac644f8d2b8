"""Fairness between clients: a token bucket per source address, and a cap on each client's queries
waiting on the upstreams at once (per device where known, else per address).

The bucket table is bounded: it is cleared wholesale at `TABLE_LIMIT` keys, which at worst forgives
every client once; the outstanding table only holds clients with queries waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable

TABLE_LIMIT = 200_000


class RateLimiter:
    """`qps` tokens a second per key, up to `burst`; a query costs one token."""

    __slots__ = ("_buckets", "burst", "clock", "qps")

    def __init__(self, qps: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.qps = qps
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, list[float]] = {}

    def allow(self, key: str) -> bool:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= TABLE_LIMIT:
                self._buckets.clear()
            self._buckets[key] = [self.burst - 1, now]
            return True
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.qps)
        bucket[1] = now
        if tokens >= 1:
            bucket[0] = tokens - 1
            return True
        bucket[0] = tokens
        return False


class Outstanding:
    """How many queries each client has waiting on the upstreams."""

    __slots__ = ("_counts", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        """Take a slot for `key`; False (and nothing taken) when it already has `limit` waiting."""
        count = self._counts.get(key, 0)
        if self.limit and count >= self.limit:
            return False
        self._counts[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def __getitem__(self, key: str) -> int:
        return self._counts.get(key, 0)
