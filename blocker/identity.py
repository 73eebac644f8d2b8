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

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from blocker.bindings import BindingTable, SnapshotWriter
from blocker.config import IdentityConfig
from blocker.inventory import AddressTable
from blocker.radius import PACKET_TYPES, RESULTS, AccountingStats, load_secret, start_listener

log = logging.getLogger("blocker.identity")

SWEEP_EVERY = 30.0


class IdentityService:
    """Owns the bindings of one process; `start()` inside the event loop, `stop()` at shutdown."""

    def __init__(self, config: IdentityConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        radius = config.radius_accounting
        self.table = BindingTable(radius.max_bindings if radius else 500_000, clock)
        self.stats = AccountingStats()
        self.snapshot = SnapshotWriter(self.table, config.snapshot) if config.snapshot else None
        self.store = None
        if config.store is not None:
            from blocker.store import BindingStore

            self.store = BindingStore(self.table, config.store, clock)
        self.vpn_networks: AddressTable[bool] = AddressTable()
        for network in config.vpn_networks:
            self.vpn_networks.add((network.version, int(network.network_address), network.prefixlen), True)
        self.unidentified_vpn = 0  # queries from inside vpn_networks that matched no binding and no device
        self.radius_address: tuple[str, int] | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: list[asyncio.Future[None]] = []

    @property
    def active(self) -> bool:
        """Whether bindings can exist at all (else identify() skips the table)."""
        return self.config.radius_accounting is not None or self.snapshot is not None or self.store is not None

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
        self._tasks.append(asyncio.ensure_future(self._sweep()))

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

    def in_vpn(self, version: int, value: int) -> bool:
        return self.vpn_networks.lookup(version, value) is not None


class IdentityCollector(Collector):
    """`blocker_bindings_*`, `blocker_radius_*`, `blocker_binding_store_*`: no address or device in any label."""

    def __init__(self, service: IdentityService) -> None:
        self.service = service

    def collect(self) -> Iterator[object]:
        service = self.service
        table = service.table
        yield _gauge("blocker_bindings_active", "address bindings learned from accounting, in force",
                     len(table))
        yield _counter("blocker_bindings_expired_total", "bindings dropped because their interims stopped",
                       table.expired_total)
        yield _counter("blocker_bindings_refused_total",
                       "bindings not recorded because the table was at its cap", table.refused_total)
        packets = CounterMetricFamily("blocker_radius_accounting_packets_total",
                                      "RADIUS accounting packets by status type and result",
                                      labels=["type", "result"])
        counts = dict(service.stats.packets)
        for kind in PACKET_TYPES:
            for result in RESULTS:
                packets.add_metric([kind, result], counts.get((kind, result), 0))
        yield packets
        yield _gauge("blocker_radius_last_accounting_timestamp_seconds",
                     "when the last authentic accounting packet arrived (0: never)", service.stats.last_ok)
        yield _gauge("blocker_radius_enabled", "1 when the accounting listener runs",
                     1 if service.radius_address else 0)
        yield _counter("blocker_dns_unidentified_vpn_queries_total",
                       "queries from inside identity.vpn_networks with no binding and no inventory device",
                       service.unidentified_vpn)
        if service.store is not None:
            yield _gauge("blocker_binding_store_up", "1 while the shared binding store is connected and in sync",
                         1 if service.store.up else 0)
            yield _counter("blocker_binding_store_errors_total", "connections to the binding store that failed",
                           service.store.errors_total)
        if service.snapshot is not None:
            yield _counter("blocker_bindings_snapshot_failures_total", "snapshot writes that failed",
                           service.snapshot.failures)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family
