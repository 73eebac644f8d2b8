"""The proxy addon's metrics: decisions by action and category, connections by stage, policy reloads."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from blocker.metrics import BlockerCollector, Gauges, Stats


class ProxyStats:
    """Counters of the proxy addon; written on mitmproxy's event loop, read by the scrape thread."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.stages: dict[str, int] = {}
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_success = 0.0

    def request(self, stage: str, action: str, category: str) -> None:
        """One decision: `stage` is connect (CONNECT), tls (ClientHello SNI) or http (plain request)."""
        key = (action, category)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.stages[stage] = self.stages.get(stage, 0) + 1

    def reloaded(self, ok: bool) -> None:
        self.reloads["success" if ok else "failure"] += 1
        if ok:
            self.last_reload_success = time.time()


class ProxyCollector(Collector):
    def __init__(self, stats: ProxyStats, upstream_stats: Stats, policy: Callable[[], object]) -> None:
        self.stats = stats
        self.upstream = BlockerCollector(upstream_stats, Gauges(lambda: (0, 0, 0, 0), policy))
        self.policy = policy

    def collect(self) -> Iterator[object]:
        family = CounterMetricFamily("blocker_proxy_requests", "Proxy decisions, by action and category "
                                     "(category 'none' when the host is in none).", labels=["action", "category"])
        for (action, category), value in self.stats.requests.copy().items():
            family.add_metric([action, category], value)
        yield family
        family = CounterMetricFamily("blocker_proxy_connections", "Connections and requests decided, by stage "
                                     "(connect, tls, http).", labels=["stage"])
        for stage, value in self.stats.stages.copy().items():
            family.add_metric([stage], value)
        yield family
        family = CounterMetricFamily("blocker_proxy_config_reloads", "Proxy policy loads, by result.",
                                     labels=["result"])
        for result, value in self.stats.reloads.copy().items():
            family.add_metric([result], value)
        yield family
        gauge = GaugeMetricFamily("blocker_proxy_config_last_reload_success_timestamp_seconds",
                                  "When the proxy's running policy was loaded (Unix time).")
        gauge.add_metric([], self.stats.last_reload_success)
        yield gauge
        for metric in self.upstream.collect():
            name = getattr(metric, "name", "")
            if name.startswith("blocker_upstream_") or name in ("blocker_policy", "blocker_build"):
                yield metric


def make_proxy_registry(stats: ProxyStats, upstream_stats: Stats, policy: Callable[[], object]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(stats, upstream_stats, policy))
    return registry
