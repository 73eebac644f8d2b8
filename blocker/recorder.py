"""Recording answered queries: the metrics (Stats) and the query log, in one place.

Every query is recorded exactly once, after its answer is known, from the labels the answer
carries (action, category, group); nothing here decides anything again.
"""

from __future__ import annotations

import time

from blocker.clients import Client
from blocker.clock import Clock
from blocker.memo import MemoHit
from blocker.metrics import FIRST_BUCKET, Stats
from blocker.policy import Action
from blocker.querylog import QueryLog

_LOGGED_WHEN_ONLY_BLOCKED = (Action.BLOCKED, Action.EXEMPTED)


class Recorder:
    """Counts every answered query and writes it to the query log (when one is configured)."""

    def __init__(self, stats: Stats, clock: Clock, querylog: QueryLog | None = None) -> None:
        self.stats = stats
        self.clock = clock
        self.querylog = querylog
        self.version = ""  # the running policy's version, for the query log

    def answered(self, transport: str, address: str, client: Client | None, qname: str, qtype: int,
                 action: Action, category: str | None, categories: frozenset[str], exemption: str | None,
                 reply: bytes, started: float, internal: bool = False) -> bytes:
        """One query answered as `action` (`internal`: SERVFAIL because answering it raised);
        returns its reply."""
        group = client.group if client is not None else ""
        if internal:
            self.internal_error()
        if action is Action.EXEMPTED and category is not None:
            self.stats.exempt(category)
        self.stats.answered(transport, action, category, group, time.perf_counter() - started)
        if client is not None and client.unidentified_vpn:
            self.stats.unidentified_vpn += 1
        if self.querylog is not None:
            self._log(address, client, qname, qtype, action, tuple(sorted(categories)), exemption, reply, started)
        return reply

    def internal_error(self) -> None:
        """Handling a query raised (it is answered SERVFAIL, and recorded as answered apart)."""
        self.stats.internal_errors += 1

    def cells(self, transport: str, action: Action, category: str | None,
              group: str) -> tuple[list[int], list[int] | None]:
        """The metric cells a remembered answer counts in each time it is served again."""
        blocked = self.stats.blocked_cell(category, group) if action is Action.BLOCKED and category else None
        return self.stats.query_cell(transport, action), blocked

    def unreadable(self, transport: str, started: float, malformed: bool) -> None:
        """A packet answered FORMERR, NOTIMP or BADVERS (counted as an error; not in the query log)."""
        if malformed:
            self.stats.bad_packet(transport)
        self.stats.answered(transport, Action.ERROR, None, "", time.perf_counter() - started)

    def memo_hit(self, address: str, client: Client, hit: MemoHit, reply: bytes, started: float) -> bytes:
        """A remembered answer served again: its metric cells were bound when it was remembered."""
        hit.counter[0] += 1
        if hit.blocked_counter is not None:
            hit.blocked_counter[0] += 1
        if client.unidentified_vpn:
            self.stats.unidentified_vpn += 1
        elapsed = time.perf_counter() - started
        duration = self.stats.duration
        if elapsed <= FIRST_BUCKET:  # Histogram.observe, inlined: this is most queries
            duration.counts[0] += 1
            duration.sum += elapsed
        else:
            duration.observe(elapsed)
        if self.querylog is not None:
            self._log(address, client, hit.qname, hit.qtype, hit.action, hit.categories, None, reply, started)
        return reply

    def _log(self, address: str, client: Client | None, qname: str, qtype: int, action: Action,
             categories: tuple[str, ...], exemption: str | None, reply: bytes, started: float) -> None:
        querylog = self.querylog
        assert querylog is not None
        if querylog.only_blocked and action not in _LOGGED_WHEN_ONLY_BLOCKED:
            return
        querylog.put((self.clock.time(), address, client.device if client else None, qname, qtype, action, categories,
                      client.group if client else "", exemption, self.version,
                      time.perf_counter() - started, reply[3] & 0xF, client))
