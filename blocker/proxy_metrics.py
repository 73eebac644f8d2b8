"""The proxy addon's metrics: decisions by action and category, connections by stage, policy reloads."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from blocker.metrics import RELOAD_RESULTS, Stats, build_info, policy_info, upstream_families
from blocker.policy import Action, Policy

STAGES = ("connect", "tls", "http")


class ProxyStats:
    """Counters of the proxy addon; written on mitmproxy's event loop, read by the scrape thread."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.stages: dict[str, int] = {stage: 0 for stage in STAGES}
        self.reloads = {result: 0 for result in RELOAD_RESULTS}
        self.last_reload_success = 0.0

    def prepare(self, categories: Iterable[str]) -> None:
        """Create the series a policy can produce, at 0 (so `rate()` sees the first decisions)."""
        for category in (*categories, "none", "ip_literal", "invalid_name"):
            for action in (Action.ALLOWED, Action.BLOCKED, Action.EXEMPTED):
                self.requests.setdefault((action.value, category), 0)

    def request(self, stage: str, action: Action, category: str) -> None:
        """One decision: `stage` is connect (CONNECT), tls (ClientHello SNI) or http (plain request)."""
        key = (action.value, category)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.stages[stage] = self.stages.get(stage, 0) + 1

    def reloaded(self, ok: bool) -> None:
        self.reloads["success" if ok else "failure"] += 1
        if ok:
            self.last_reload_success = time.time()


class ProxyCollector(Collector):
    """The proxy's decisions and reloads, its upstream queries, and the policy and build versions."""

    def __init__(self, stats: ProxyStats, upstream_stats: Stats, policy: Callable[[], Policy | None]) -> None:
        self.stats = stats
        self.upstream_stats = upstream_stats
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
        yield from upstream_families(self.upstream_stats)
        policy = self.policy()
        if policy is not None:
            yield policy_info(policy)
        yield build_info()


def make_proxy_registry(stats: ProxyStats, upstream_stats: Stats,
                        policy: Callable[[], Policy | None]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(stats, upstream_stats, policy))
    ProcessCollector(registry=registry)
    return registry
