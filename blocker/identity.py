"""The dynamic side of "who is asking", as one service: the binding table, the RADIUS accounting
listener, the snapshot file and the shared store, started and stopped together, and their metrics.

The daemon and the proxy addon each own one `IdentityService`; clients.identify() reads its table.
Nothing here runs on the query path except `BindingTable.lookup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from blocker.bindings import BindingTable, SnapshotWriter, read_snapshot
from blocker.config import IdentityConfig
from blocker.metrics import counter, gauge
from blocker.radius import PACKET_TYPES, RESULTS, AccountingStats, load_secret, start_listener

log = logging.getLogger("blocker.identity")

SWEEP_EVERY = 30.0
FOLLOW_EVERY = 2.0


class IdentityService:
    """Owns the bindings of one process; `start()` inside the event loop, `stop()` at shutdown."""

    def __init__(self, config: IdentityConfig, clock: Callable[[], float] = time.time, mirror: bool = False) -> None:
        """`mirror`: only follow what others learn (the proxy addon): no accounting listener, and the
        snapshot file (the resolver's) is read when it changes, never written."""
        if mirror:
            config = replace(config, radius_accounting=None)
        self.config = config
        self.mirror = mirror
        radius = config.radius_accounting
        self.table = BindingTable(radius.max_bindings if radius else 500_000, clock)
        self.stats = AccountingStats()
        self.snapshot = SnapshotWriter(self.table, config.snapshot) if config.snapshot and not mirror else None
        self.follow = config.snapshot if mirror and config.store is None else None
        self.store = None
        if config.store is not None:
            from blocker.store import BindingStore

            self.store = BindingStore(self.table, config.store, clock)
        self.radius_address: tuple[str, int] | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: list[asyncio.Future[None]] = []

    @staticmethod
    def wanted(config: IdentityConfig) -> bool:
        """Whether bindings can exist at all (else there is no table and identify() skips it)."""
        return config.radius_accounting is not None or config.snapshot is not None or config.store is not None

    async def start(self) -> None:
        """Restore the snapshot, bind the accounting port, start the store mirror; raises ConfigError/OSError."""
        radius = self.config.radius_accounting
        secret = load_secret(radius.secret_file) if radius else b""
        if self.snapshot is not None:
            self.snapshot.restore()
        if radius is not None:
            self._transport, _ = await start_listener(radius, secret, self.table, self.stats, self.table.clock)
            self.radius_address = self._transport.get_extra_info("sockname")[:2]
        if self.snapshot is not None:
            self._tasks.append(asyncio.ensure_future(self.snapshot.run()))
        if self.store is not None:
            self._tasks.append(asyncio.ensure_future(self.store.run()))
        if self.follow is not None:
            self._tasks.append(asyncio.ensure_future(self._follow(self.follow)))
        self._tasks.append(asyncio.ensure_future(self._sweep()))

    async def _follow(self, path: Path) -> None:
        """Re-read the resolver's snapshot whenever it is rewritten (the proxy addon without a store)."""
        seen: object = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                st = path.stat()
                signature: object = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                signature = None
            if signature != seen and signature is not None:
                seen = signature
                bindings = await loop.run_in_executor(None, read_snapshot, path, self.table.clock())
                now = {b.network for b in bindings}
                for binding in list(self.table.bindings()):
                    if binding.network not in now:
                        self.table.remove(binding.network)
                self.table.replace_all(bindings)
            await asyncio.sleep(FOLLOW_EVERY)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            self.table.sweep()

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.snapshot is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.snapshot.flush)


class IdentityCollector(Collector):
    """`blocker_bindings_*`, `blocker_radius_*`, `blocker_binding_store_*`: no address or device in any label."""

    def __init__(self, service: IdentityService) -> None:
        self.service = service

    def collect(self) -> Iterator[object]:
        service = self.service
        table = service.table
        yield gauge("blocker_bindings_active", "address bindings learned from accounting, in force",
                     len(table))
        yield counter("blocker_bindings_expired_total", "bindings dropped because their interims stopped",
                       table.expired_total)
        yield counter("blocker_bindings_refused_total",
                       "bindings not recorded because the table was at its cap", table.refused_total)
        packets = CounterMetricFamily("blocker_radius_accounting_packets_total",
                                      "RADIUS accounting packets by status type and result",
                                      labels=["type", "result"])
        counts = dict(service.stats.packets)
        for kind in PACKET_TYPES:
            for result in RESULTS:
                packets.add_metric([kind, result], counts.get((kind, result), 0))
        yield packets
        yield gauge("blocker_radius_last_accounting_timestamp_seconds",
                     "when the last authentic accounting packet arrived (0: never)", service.stats.last_ok)
        yield gauge("blocker_radius_enabled", "1 when the accounting listener runs",
                     1 if service.radius_address else 0)
        if service.store is not None:
            yield gauge("blocker_binding_store_up", "1 while the shared binding store is connected and in sync",
                         1 if service.store.up else 0)
            yield counter("blocker_binding_store_errors_total", "connections to the binding store that failed",
                           service.store.errors_total)
        if service.snapshot is not None:
            yield counter("blocker_bindings_snapshot_failures_total", "snapshot writes that failed",
                           service.snapshot.failures)




def bindings_for_check(config: IdentityConfig) -> tuple[BindingTable | None, str]:
    """The bindings `blocker check --client` can see from outside the daemon: the shared store if one is
    configured and reachable, else the snapshot file; and where they came from."""
    if config.store is None and config.snapshot is None:
        return None, ""
    table = BindingTable(10_000_000)
    if config.store is not None:
        import json

        import redis
        from redis.exceptions import RedisError

        from blocker.bindings import Binding

        try:
            client = redis.Redis.from_url(config.store.url, socket_timeout=2.0, socket_connect_timeout=2.0)
            keys = list(client.scan_iter(match=f"{config.store.prefix}:binding:*", count=1000))
            for value in client.mget(keys) if keys else []:
                binding = Binding.from_row(json.loads(value)) if value else None
                if binding is not None:
                    table.bind(binding.network, binding.device, binding.gateway, binding.since, binding.expires)
            return table, f"store {config.store.url}"
        except (RedisError, OSError, ValueError) as err:
            log.warning("binding store %s unreachable (%s)", config.store.url, err)
    if config.snapshot is not None:
        table.replace_all(read_snapshot(config.snapshot, time.time()))
        return table, f"snapshot {config.snapshot}"
    return None, ""
