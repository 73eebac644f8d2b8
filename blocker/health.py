"""How healthy each upstream is: smoothed RTT, failures in a row, down with backoff, the order to ask in.

Pure bookkeeping on an injectable clock; upstream.py feeds it and probes the upstreams it marks down.
An upstream is *suspect* when queries sent to it have gone unanswered for longer than it usually
takes (new queries then go elsewhere first), and *down* after `DOWN_AFTER` failures in a row, or
after one timeout when it has answered nothing at all since that query was sent (skipped while
another upstream is usable, and probed in the background until it answers).
"""

from __future__ import annotations

DOWN_AFTER = 3
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 10.0
SUSPECT_FLOOR = 0.25  # never call an upstream silent sooner than this
SUSPECT_DEFAULT = 0.25  # silent this long, before any RTT sample, is suspect (Unbound starts at 376 ms)
# ... or this many queries in a row unanswered for this long: under load, a dead upstream must be
# passed over before thousands of queries wait on it.
SUSPECT_UNANSWERED = 64
SUSPECT_UNANSWERED_AFTER = 0.02


class Health:
    """One upstream's state."""

    __slots__ = ("backoff", "down", "down_until", "failures", "index", "preserves_case_after", "rttvar", "silent_since",
                 "srtt", "timeout", "unanswered")

    def __init__(self, index: int, timeout: float) -> None:
        self.index = index  # position in the configuration: the order among equals
        self.timeout = timeout
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.failures = 0
        self.down = False
        self.down_until = 0.0  # when it is probed next
        self.backoff = FIRST_BACKOFF
        self.silent_since: float | None = None  # when the oldest query not followed by any reply was sent
        self.unanswered = 0  # queries sent since the last reply
        self.preserves_case_after = 0.0  # 0x20 is used again from this time on

    def sent(self, now: float) -> None:
        self.unanswered += 1
        if self.silent_since is None:
            self.silent_since = now

    def replied(self, rtt: float) -> None:
        """Any reply, even SERVFAIL or REFUSED: it is alive."""
        self.silent_since = None
        self.unanswered = 0
        self.failures = 0
        self.down = False
        self.down_until = 0.0
        self.backoff = FIRST_BACKOFF
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:  # RFC 6298 smoothing
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def failed(self, now: float) -> bool:
        """A timeout or a refused connection; True when this makes it down."""
        self.failures += 1
        silent = self.silent_since is not None and now - self.silent_since >= self.timeout
        if not self.down and (self.failures >= DOWN_AFTER or silent):
            self.down = True
            self.down_until = now + self.backoff
            return True
        return False

    def probe_failed(self, now: float) -> None:
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        self.down_until = now + self.backoff

    def is_down(self) -> bool:
        return self.down

    def suspect(self, now: float) -> bool:
        if self.silent_since is None:
            return False
        silent = now - self.silent_since
        if self.unanswered >= SUSPECT_UNANSWERED and silent > SUSPECT_UNANSWERED_AFTER:
            return True
        after = SUSPECT_DEFAULT if self.srtt is None else max(SUSPECT_FLOOR, 4 * (self.srtt + 4 * self.rttvar))
        return silent > min(after, self.timeout)

    def attempt_timeout(self) -> float:
        """How long one query waits for this upstream: the configured timeout (its RTT is used for
        ordering, not for cutting waits short, so a slow but healthy upstream still answers)."""
        return self.timeout


def order(health: list[Health], now: float) -> list[Health]:
    """Healthy upstreams fastest first (unmeasured ones in configured order, before measured ones so
    they get measured), then suspect ones; down ones only when nothing else is left."""
    usable = [h for h in health if not h.is_down()]
    if not usable:
        return sorted(health, key=lambda h: h.down_until)
    return sorted(usable, key=lambda h: _rank(h, now))


def _rank(health: Health, now: float) -> tuple[bool, bool, float, int]:
    suspect = health.suspect(now)
    # Among silent ones, one that has answered before goes ahead of one that never has.
    return suspect, suspect and health.srtt is None, health.srtt if health.srtt is not None else 0.0, health.index
