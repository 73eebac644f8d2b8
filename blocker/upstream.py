"""Forwarding to the upstream servers: healthy and fast ones first (health.py), failover on
timeout, SERVFAIL, REFUSED or an unreadable answer, and a retry over TCP when the UDP answer is
truncated.

Each query is one spoof-resistant exchange (exchange.py): its own socket, a random ID, 0x20 case,
and an exact question check. Identical questions waiting at the same time share one upstream
query (single-flight), and the number of queries waiting on upstreams is capped so a dead
upstream cannot pile up unbounded work.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from collections.abc import Sequence

from blocker.config import DnsConfig
from blocker.exchange import BadAnswer, CaseMismatch, GaveWay, ask_tcp, ask_udp, give_way, new_id, randomise_case
from blocker.health import Health, order
from blocker.message import RCODE_REFUSED, RCODE_SERVFAIL, Query, WireError, scan_response, upstream_query
from blocker.metrics import Stats
from blocker.yamlfile import format_endpoint

log = logging.getLogger("blocker")

Endpoint = tuple[str, int]
CASE_RETRY_SECONDS = 3600.0  # how long an upstream that lost our 0x20 case is asked plainly
_ROOT_NS = b"\x00\x00\x02\x00\x01"  # the question ". NS IN": what a probe asks

MAX_FORWARDS = 4096  # queries waiting on upstreams at once; beyond this, the oldest gives way or SERVFAIL
GIVE_WAY_AFTER = 0.2  # seconds a query must have waited before a new one may end its wait (Unbound's jostle)


class Upstreams:
    """The configured upstream servers, asked healthiest and fastest first."""

    def __init__(self, endpoints: Sequence[Endpoint], timeout: float, stats: Stats,
                 max_forwards: int = MAX_FORWARDS, use_0x20: bool = False) -> None:
        self.endpoints = tuple(endpoints)
        self.names = tuple(format_endpoint(host, port) for host, port in self.endpoints)
        self.timeout = timeout
        self.stats = stats
        self.max_forwards = max_forwards
        self.forwarding = 0  # queries waiting on `forward` now
        self.use_0x20 = use_0x20
        self.health = [Health(index, timeout) for index in range(len(self.endpoints))]
        self._probes: dict[int, asyncio.Task[None]] = {}
        self._closed = False
        self._waits: deque[tuple[float, asyncio.Future[bytes]]] = deque()
        self._inflight: dict[bytes, asyncio.Future[bytes | None]] = {}  # question -> its shared query

    @property
    def busy(self) -> bool:
        """Whether the cap on waiting queries is reached and no wait old enough could give way
        (the caller answers SERVFAIL at once). A query that gives way gets SERVFAIL (or stale)."""
        return self.forwarding >= self.max_forwards and not give_way(self._waits, GIVE_WAY_AFTER)

    async def forward(self, query: Query) -> bytes | None:
        """`resolve`, with identical questions in flight at the same time sharing one upstream query.

        The shared query runs in a task of its own: a client that goes away (its TCP connection
        closed, its task cancelled) stops waiting, but the others still get the answer.
        """
        key = query.cache_key
        self.forwarding += 1
        try:
            shared = self._inflight.get(key)
            if shared is None:
                shared = self._inflight[key] = asyncio.ensure_future(self.resolve(query))
                shared.add_done_callback(lambda done: self._settled(key, done))
            return await asyncio.shield(shared)
        finally:
            self.forwarding -= 1

    def _settled(self, key: bytes, done: asyncio.Future[bytes | None]) -> None:
        self._inflight.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved, even when every waiter went away

    async def resolve(self, query: Query) -> bytes | None:
        """The first good upstream answer, else the last SERVFAIL/REFUSED seen, else None.
        A good answer is one that scan_response can read; a malformed one fails over."""
        last: bytes | None = None
        now = time.monotonic()
        for health in order(self.health, now):
            try:
                wire = await self._ask(health, query)
            except GaveWay:
                return last
            if wire is None:
                continue
            rcode = wire[3] & 0xF
            if rcode in (RCODE_SERVFAIL, RCODE_REFUSED):
                last = wire
                continue
            return wire
        return last

    async def _ask(self, health: Health, query: Query) -> bytes | None:
        """One upstream's answer (any rcode), or None when it timed out or answered nonsense."""
        index = health.index
        endpoint, name = self.endpoints[index], self.names[index]
        stats = self.stats
        started = time.perf_counter()
        case_ok = self.use_0x20 and health.preserves_case_after <= time.monotonic()
        question = randomise_case(query.question) if case_ok else query.question
        message = upstream_query(query, new_id(), question)
        health.sent(time.monotonic())
        try:
            try:
                wire = await ask_udp(endpoint, message, question, health.timeout, stats.upstream_unwanted,
                                     self._waits)
            except CaseMismatch:
                # This upstream does not keep the case we send: ask it again plainly, and for an hour.
                stats.upstream(name, "case_mismatch", time.perf_counter() - started)
                health.preserves_case_after = time.monotonic() + CASE_RETRY_SECONDS
                question = query.question
                message = upstream_query(query, new_id(), question)
                wire = await ask_udp(endpoint, message, question, health.timeout, stats.upstream_unwanted,
                                     self._waits)
            if wire[2] & 0x02:  # TC: the full answer only fits over TCP
                stats.upstream(name, "truncated", time.perf_counter() - started)
                message = upstream_query(query, new_id(), question)
                wire = await ask_tcp(endpoint, message, question, health.timeout, stats.upstream_unwanted)
            scan_response(wire)
        except GaveWay:
            stats.upstream(name, "gave_way", time.perf_counter() - started)
            raise
        except TimeoutError:
            stats.upstream(name, "timeout", time.perf_counter() - started)
            self._failed(health)
            return None
        except WireError:
            health.replied(time.perf_counter() - started)
            stats.upstream(name, "malformed", time.perf_counter() - started)
            return None
        except (BadAnswer, CaseMismatch):
            health.replied(time.perf_counter() - started)
            stats.upstream(name, "malformed", time.perf_counter() - started)
            return None
        except (OSError, asyncio.IncompleteReadError, ValueError):
            stats.upstream(name, "error", time.perf_counter() - started)
            self._failed(health)
            return None
        rtt = time.perf_counter() - started
        health.replied(rtt)
        rcode = wire[3] & 0xF
        result = "servfail" if rcode == RCODE_SERVFAIL else "refused" if rcode == RCODE_REFUSED else "ok"
        stats.upstream(name, result, rtt)
        return wire

    def _failed(self, health: Health) -> None:
        if health.failed(time.monotonic()) and not self._closed:
            log.warning("upstream %s is not answering: skipped, and probed until it answers",
                        self.names[health.index])
            self._probes[health.index] = asyncio.ensure_future(self._probe(health))

    async def _probe(self, health: Health) -> None:
        """Ask a down upstream for the root's NS, with backoff, until it answers anything."""
        endpoint, name = self.endpoints[health.index], self.names[health.index]
        try:
            while health.is_down() and not self._closed:
                await asyncio.sleep(max(0.0, health.down_until - time.monotonic()))
                if not health.is_down():
                    break
                started = time.perf_counter()
                message = struct.pack("!HHHHHH", new_id(), 0x0100, 1, 0, 0, 0) + _ROOT_NS
                try:
                    await ask_udp(endpoint, message, _ROOT_NS, health.timeout, self.stats.upstream_unwanted)
                except (TimeoutError, OSError):
                    health.probe_failed(time.monotonic())
                    continue
                except (BadAnswer, CaseMismatch):
                    pass
                health.replied(time.perf_counter() - started)
                log.info("upstream %s answers again", name)
        finally:
            self._probes.pop(health.index, None)

    def close(self) -> None:
        self._closed = True
        for task in list(self._probes.values()):
            task.cancel()
        self._probes.clear()


def follow_config(current: Upstreams | None, dns: DnsConfig, stats: Stats) -> Upstreams:
    """The upstreams for a newly loaded config: `current` when its servers and timeout are unchanged,
    else new ones, the old ones closed once the queries still waiting on them had time to finish."""
    if current is not None and (current.endpoints, current.timeout, current.use_0x20) == (
            dns.upstreams, dns.upstream_timeout, dns.upstream_0x20):
        return current
    fresh = Upstreams(dns.upstreams, dns.upstream_timeout, stats, use_0x20=dns.upstream_0x20)
    stats.prepare_upstreams(fresh.names)
    if current is not None:
        try:
            # A query may wait twice the timeout on each upstream (UDP, then TCP after truncation).
            asyncio.get_running_loop().call_later(2 * current.timeout * len(current.endpoints) + 1, current.close)
        except RuntimeError:  # no loop yet: nothing can be waiting on it
            current.close()
    return fresh

