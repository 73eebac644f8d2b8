"""Forwarding to the upstream servers: tried in order, failover on timeout, SERVFAIL or REFUSED,
and a retry over TCP when the UDP answer is truncated.

One connected UDP socket per upstream carries every outstanding query, matched by random ID and
by question; a port-unreachable error fails that upstream's pending queries at once. Identical
questions waiting at the same time share one upstream query (single-flight), and the number of
queries waiting on upstreams is capped so a dead upstream cannot pile up unbounded work.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import time
from collections.abc import Sequence

from blocker.config import DnsConfig
from blocker.message import RCODE_REFUSED, RCODE_SERVFAIL, Query, upstream_query
from blocker.metrics import Stats
from blocker.yamlfile import format_endpoint

Endpoint = tuple[str, int]

MAX_FORWARDS = 4096  # queries waiting on upstreams at once; beyond this, SERVFAIL at once


class _UdpChannel(asyncio.DatagramProtocol):
    """One connected UDP socket to one upstream, multiplexing queries by ID."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, tuple[bytes, asyncio.Future[bytes]]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12:
            return
        query_id = struct.unpack_from("!H", data)[0]
        waiting = self.pending.get(query_id)
        if waiting is None:
            return
        question, future = waiting
        # The question must come back as asked (case-insensitively), or it is not our answer.
        if data[12:12 + len(question)].lower() != question.lower():
            return
        if not future.done():
            future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        for _question, future in list(self.pending.values()):
            if not future.done():
                future.set_exception(ConnectionRefusedError(str(exc)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.error_received(exc or ConnectionError("closed"))
        self.transport = None


class Upstreams:
    """The configured upstream servers, asked in order."""

    def __init__(self, endpoints: Sequence[Endpoint], timeout: float, stats: Stats,
                 max_forwards: int = MAX_FORWARDS) -> None:
        self.endpoints = tuple(endpoints)
        self.names = tuple(format_endpoint(host, port) for host, port in self.endpoints)
        self.timeout = timeout
        self.stats = stats
        self.max_forwards = max_forwards
        self.forwarding = 0  # queries waiting on `forward` now
        self._channels: dict[Endpoint, _UdpChannel] = {}
        self._opening: dict[Endpoint, asyncio.Lock] = {}
        self._inflight: dict[bytes, asyncio.Future[bytes | None]] = {}  # question -> its shared query

    @property
    def busy(self) -> bool:
        """Whether the cap on waiting queries is reached (the caller answers SERVFAIL at once)."""
        return self.forwarding >= self.max_forwards

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

    async def _channel(self, endpoint: Endpoint) -> _UdpChannel:
        channel = self._channels.get(endpoint)
        if channel is not None and channel.transport is not None:
            return channel
        # Queries arriving together must share one new socket, not each open their own.
        async with self._opening.setdefault(endpoint, asyncio.Lock()):
            channel = self._channels.get(endpoint)
            if channel is not None and channel.transport is not None:
                return channel
            loop = asyncio.get_running_loop()
            _transport, channel = await loop.create_datagram_endpoint(_UdpChannel, remote_addr=endpoint)
            self._channels[endpoint] = channel
            return channel

    def _settled(self, key: bytes, done: asyncio.Future[bytes | None]) -> None:
        self._inflight.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved, even when every waiter went away

    async def resolve(self, query: Query) -> bytes | None:
        """The first good upstream answer, else the last SERVFAIL/REFUSED seen, else None."""
        last: bytes | None = None
        for endpoint, name in zip(self.endpoints, self.names, strict=True):
            started = time.perf_counter()
            try:
                wire = await self._ask_udp(endpoint, query)
                if wire[2] & 0x02:  # TC: the full answer only fits over TCP
                    self.stats.upstream(name, "truncated", time.perf_counter() - started)
                    started = time.perf_counter()
                    wire = await self._ask_tcp(endpoint, query)
            except TimeoutError:
                self.stats.upstream(name, "timeout", time.perf_counter() - started)
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError):
                self.stats.upstream(name, "error", time.perf_counter() - started)
                continue
            rcode = wire[3] & 0xF
            if rcode in (RCODE_SERVFAIL, RCODE_REFUSED):
                self.stats.upstream(name, "servfail" if rcode == RCODE_SERVFAIL else "refused",
                                    time.perf_counter() - started)
                last = wire
                continue
            self.stats.upstream(name, "ok", time.perf_counter() - started)
            return wire
        return last

    async def _ask_udp(self, endpoint: Endpoint, query: Query) -> bytes:
        channel = await self._channel(endpoint)
        pending = channel.pending
        query_id = secrets.randbelow(65536)
        while query_id in pending:
            query_id = secrets.randbelow(65536)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        pending[query_id] = (query.question, future)
        try:
            assert channel.transport is not None
            channel.transport.sendto(upstream_query(query, query_id))
            return await asyncio.wait_for(future, self.timeout)
        finally:
            pending.pop(query_id, None)

    async def _ask_tcp(self, endpoint: Endpoint, query: Query) -> bytes:
        query_id = secrets.randbelow(65536)
        message = upstream_query(query, query_id)
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(*endpoint)
            try:
                writer.write(struct.pack("!H", len(message)) + message)
                await writer.drain()
                while True:
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                    wire = await reader.readexactly(length)
                    if len(wire) >= 12 and struct.unpack_from("!H", wire)[0] == query_id:
                        return wire
            finally:
                writer.close()

    def close(self) -> None:
        for channel in self._channels.values():
            if channel.transport is not None:
                channel.transport.close()
        self._channels.clear()


def follow_config(current: Upstreams | None, dns: DnsConfig, stats: Stats) -> Upstreams:
    """The upstreams for a newly loaded config: `current` when its servers and timeout are unchanged,
    else new ones, the old ones closed once the queries still waiting on them had time to finish."""
    if current is not None and (current.endpoints, current.timeout) == (dns.upstreams, dns.upstream_timeout):
        return current
    fresh = Upstreams(dns.upstreams, dns.upstream_timeout, stats)
    stats.prepare_upstreams(fresh.names)
    if current is not None:
        try:
            # A query may wait twice the timeout on each upstream (UDP, then TCP after truncation).
            asyncio.get_running_loop().call_later(2 * current.timeout * len(current.endpoints) + 1, current.close)
        except RuntimeError:  # no loop yet: nothing can be waiting on it
            current.close()
    return fresh

