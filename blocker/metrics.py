"""Every `blocker_*` metric: plain counters updated on the hot path, turned into Prometheus
families by a collector only when /metrics is scraped.

Labels come from closed sets (transport, action, category, group, upstream, result); a client
address, device id or domain name never becomes a label.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from blocker import __version__
from blocker.policy import Action, Policy

# 0.25 ms doubling to ~8 s: cached answers take well under a millisecond.
TIME_BUCKETS = tuple(0.00025 * 2 ** i for i in range(16))
FIRST_BUCKET = TIME_BUCKETS[0]
RELOAD_RESULTS = ("success", "failure")
TRANSPORTS = ("udp", "tcp")
ACTIONS = tuple(Action)
UPSTREAM_RESULTS = ("ok", "servfail", "refused", "timeout", "error", "truncated", "malformed", "case_mismatch",
                    "gave_way")
RATE_LIMIT_ACTIONS = ("refused", "drop")
# Why a TCP connection was refused or dropped early: at the per-client limit, every slot busy, shed
# because idle when a new one came, a client that did not take its answers in time, or the one
# holding the most answers when too many wait to be written.
TCP_CLOSE_REASONS = ("client_limit", "full", "shed_idle", "write_timeout", "wait_limit")


class Histogram:
    """A histogram as plain counts; cumulative only when exported."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(TIME_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Nearly every answer (blocked, cached) lands in the first bucket: skip the search for it.
        if value <= FIRST_BUCKET:
            self.counts[0] += 1
        else:
            self.counts[bisect_left(TIME_BUCKETS, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        out = []
        running = 0
        counts = list(self.counts)
        for bound, count in zip(TIME_BUCKETS, counts, strict=False):
            running += count
            out.append((repr(bound), running))
        out.append(("+Inf", running + counts[-1]))
        return out


class Stats:
    """The resolver's counters. Written on the event loop, read by the scrape thread.

    Every label value known in advance is created at 0 (`prepare`, `prepare_upstreams`), so a
    scrape before the first query shows every series and `rate()` sees the first increments.
    """

    def __init__(self) -> None:
        # Counters are one-element lists ("cells") so a hot path can keep a reference and add to it
        # without a dictionary lookup; the collector reads cell[0].
        self.queries: dict[tuple[str, str], list[int]] = {}
        self.blocked: dict[tuple[str, str], list[int]] = {}
        self.exempted: dict[str, int] = {}
        self.malformed: dict[str, int] = {transport: 0 for transport in TRANSPORTS}
        self.duration = Histogram()
        self.upstream_results: dict[tuple[str, str], int] = {}
        self.upstream_duration: dict[str, Histogram] = {}
        self.reloads = {result: 0 for result in RELOAD_RESULTS}
        self.last_reload_success = 0.0
        self.tcp_connections = 0
        self.tcp_closed = dict.fromkeys(TCP_CLOSE_REASONS, 0)
        self.internal_errors = 0
        self.upstream_unwanted = [0]  # a cell: exchange.py adds to it
        self.stale_answers = 0
        self.rate_limited = {action: 0 for action in RATE_LIMIT_ACTIONS}
        self.client_limited = 0
        self.unidentified_vpn = 0  # queries from inside identity.vpn_networks with no binding and no device
        self.last_reload_error: tuple[str, int, str] | None = None  # (file, line, message) while failing
        for transport in TRANSPORTS:
            for action in ACTIONS:
                self.query_cell(transport, action)

    def prepare(self, group_blocks: dict[str, tuple[str, ...]], categories: Iterable[str]) -> None:
        """Create the blocked and exempted series a policy can produce, at 0 (kept across reloads)."""
        for group, blocks in group_blocks.items():
            for category in blocks:
                self.blocked_cell(category, group)
        for category in categories:
            self.exempted.setdefault(category, 0)

    def prepare_upstreams(self, names: Iterable[str]) -> None:
        """Create every upstream's result series at 0."""
        for name in names:
            for result in UPSTREAM_RESULTS:
                self.upstream_results.setdefault((name, result), 0)
            self.upstream_duration.setdefault(name, Histogram())

    def query_cell(self, transport: str, action: Action) -> list[int]:
        cell = self.queries.get((transport, action))
        if cell is None:
            cell = self.queries[(transport, action)] = [0]
        return cell

    def blocked_cell(self, category: str, group: str) -> list[int]:
        cell = self.blocked.get((category, group))
        if cell is None:
            cell = self.blocked[(category, group)] = [0]
        return cell

    def answered(self, transport: str, action: Action, category: str | None, group: str, duration: float) -> None:
        """One query answered as `action`; a blocked one also counts under its category and group."""
        self.query_cell(transport, action)[0] += 1
        self.duration.observe(duration)
        if category is not None and action is Action.BLOCKED:
            self.blocked_cell(category, group)[0] += 1

    def exempt(self, category: str) -> None:
        self.exempted[category] = self.exempted.get(category, 0) + 1

    def bad_packet(self, transport: str) -> None:
        self.malformed[transport] = self.malformed.get(transport, 0) + 1

    def upstream(self, name: str, result: str, duration: float) -> None:
        key = (name, result)
        self.upstream_results[key] = self.upstream_results.get(key, 0) + 1
        histogram = self.upstream_duration.get(name)
        if histogram is None:
            histogram = self.upstream_duration[name] = Histogram()
        histogram.observe(duration)

    def reloaded(self, ok: bool) -> None:
        self.reloads["success" if ok else "failure"] += 1
        if ok:
            self.last_reload_success = time.time()


class QueryLogCounts(Protocol):
    written: int
    dropped: int
    errors: int


class MemoryCounts(NamedTuple):
    """What the answer cache and the memo hold, in bytes, against their bounds."""

    cache_bytes: int
    cache_max_bytes: int
    cache_too_large: int
    memo_bytes: int
    memo_max_bytes: int


class Gauges:
    """Values read at scrape time from the running daemon."""

    def __init__(self, cache: Callable[[], tuple[int, int, int, int]], policy: Callable[[], Policy | None],
                 querylog: Callable[[], QueryLogCounts | None] = lambda: None,
                 memory: Callable[[], MemoryCounts | None] = lambda: None) -> None:
        self.cache = cache  # (entries, hits, misses, evictions)
        self.policy = policy  # the current Policy
        self.querylog = querylog  # the QueryLog, when one is configured
        self.memory = memory


class BlockerCollector(Collector):
    """Turns Stats and the current state into metric families at scrape time."""

    def __init__(self, stats: Stats, gauges: Gauges) -> None:
        self.stats = stats
        self.gauges = gauges

    def collect(self) -> Iterator[object]:
        stats = self.stats
        yield from dns_families(stats)
        entries, hits, misses, evictions = self.gauges.cache()
        yield counter("blocker_dns_cache_hits", "Answers served from the cache.", hits)
        yield counter("blocker_dns_cache_misses", "Lookups that found no live cache entry.", misses)
        yield counter("blocker_dns_cache_evictions", "Entries pushed out of the full cache.", evictions)
        yield gauge("blocker_dns_cache_entries", "Answers held in the cache.", entries)
        yield from memory_families(self.gauges.memory())
        yield gauge("blocker_dns_tcp_connections", "Open client TCP connections.", stats.tcp_connections)
        family = CounterMetricFamily("blocker_dns_tcp_closed", "TCP connections refused or dropped to keep the "
                                     "server free for every client, by reason.", labels=["reason"])
        for reason, value in stats.tcp_closed.copy().items():
            family.add_metric([reason], value)
        yield family
        querylog = self.gauges.querylog()
        yield counter("blocker_querylog_written", "Query-log entries written.", querylog.written if querylog else 0)
        yield counter("blocker_querylog_dropped", "Query-log entries dropped because the writer fell behind.",
                       querylog.dropped if querylog else 0)
        yield counter("blocker_querylog_errors", "Query-log writes that failed (full disk, lost file); retried.",
                       querylog.errors if querylog else 0)
        yield from upstream_families(stats)
        yield from reload_families(stats)
        policy = self.gauges.policy()
        if policy is not None:
            yield from policy_families(policy)
        yield build_info()


def memory_families(memory: MemoryCounts | None) -> Iterator[object]:
    """Bytes held by the answer cache and the memo, their bounds, and answers too large to cache."""
    if memory is None:
        return
    yield gauge("blocker_dns_cache_bytes", "Bytes the answer cache holds (answers, keys, bookkeeping).",
                 memory.cache_bytes)
    yield gauge("blocker_dns_cache_max_bytes", "The answer cache's bound in bytes.", memory.cache_max_bytes)
    yield counter("blocker_dns_cache_too_large", "Answers not cached because they exceed the per-entry cap.",
                   memory.cache_too_large)
    yield gauge("blocker_dns_memo_bytes", "Bytes the answer memo holds for the running policy.", memory.memo_bytes)
    yield gauge("blocker_dns_memo_max_bytes", "The answer memo's bound in bytes.", memory.memo_max_bytes)


def dns_families(stats: Stats) -> Iterator[object]:
    """Queries by outcome, blocked and exempted by category, malformed packets, answer latency."""
    family = CounterMetricFamily("blocker_dns_queries", "DNS queries answered, by transport and action.",
                                 labels=["transport", "action"])
    for (transport, action), cell in stats.queries.copy().items():
        family.add_metric([transport, action], cell[0])
    yield family
    family = CounterMetricFamily("blocker_dns_blocked", "Blocked queries, by the category that blocked "
                                 "them and the client's group.", labels=["category", "group"])
    for (category, group), cell in stats.blocked.copy().items():
        family.add_metric([category, group], cell[0])
    yield family
    family = CounterMetricFamily("blocker_dns_exempted", "Queries allowed by an exemption, by category.",
                                 labels=["category"])
    for category, value in stats.exempted.copy().items():
        family.add_metric([category], value)
    yield family
    family = CounterMetricFamily("blocker_dns_malformed_packets", "Packets that were not a readable query.",
                                 labels=["transport"])
    for transport, value in stats.malformed.copy().items():
        family.add_metric([transport], value)
    yield family
    yield counter("blocker_dns_internal_errors", "Queries answered SERVFAIL because handling them raised an error.",
                   stats.internal_errors)
    yield counter("blocker_dns_stale_answers", "Expired answers served because every upstream failed.",
                   stats.stale_answers)
    family = CounterMetricFamily("blocker_dns_rate_limited", "Queries over their client's rate limit, by what "
                                 "was done with them.", labels=["action"])
    for action, value in stats.rate_limited.copy().items():
        family.add_metric([action], value)
    yield family
    yield counter("blocker_dns_client_limited", "Misses answered SERVFAIL because their client already had its "
                   "cap of queries waiting upstream.", stats.client_limited)
    yield counter("blocker_dns_unidentified_vpn_queries",
                   "Queries from inside identity.vpn_networks that no binding and no inventory device identified.",
                   stats.unidentified_vpn)
    histogram = HistogramMetricFamily("blocker_dns_request_duration_seconds",
                                      "Time from receiving a query to sending its answer.")
    histogram.add_metric([], stats.duration.buckets(), stats.duration.sum)
    yield histogram


def upstream_families(stats: Stats) -> Iterator[object]:
    """Upstream queries by result, and upstream latency."""
    family = CounterMetricFamily("blocker_upstream_queries", "Queries sent upstream, by upstream and result.",
                                 labels=["upstream", "result"])
    for (name, result), value in stats.upstream_results.copy().items():
        family.add_metric([name, result], value)
    yield family
    yield counter("blocker_upstream_unwanted_replies",
                   "Replies on an upstream query's port with the wrong ID or question (ignored).",
                   stats.upstream_unwanted[0])
    histogram = HistogramMetricFamily("blocker_upstream_request_duration_seconds",
                                      "Time an upstream took to answer (or to time out).", labels=["upstream"])
    for name, hist in stats.upstream_duration.copy().items():
        histogram.add_metric([name], hist.buckets(), hist.sum)
    yield histogram


def reload_families(stats: Stats) -> Iterator[object]:
    """Policy loads by result, the last success, and the last error while failing."""
    family = CounterMetricFamily("blocker_config_reloads", "Policy reloads, by result.", labels=["result"])
    for result, value in stats.reloads.copy().items():
        family.add_metric([result], value)
    yield family
    yield gauge("blocker_config_last_reload_success_timestamp_seconds",
                 "When the running policy was loaded (Unix time).", stats.last_reload_success)
    error = stats.last_reload_error
    family = GaugeMetricFamily("blocker_config_last_reload_error",
                               "1 while the last reload failed, with its first problem (file, line, message).",
                               labels=["file", "line", "message"])
    if error is not None:
        family.add_metric([error[0], str(error[1]), error[2][:200]], 1)
    yield family


def build_info() -> InfoMetricFamily:
    info = InfoMetricFamily("blocker_build", "The running blocker's version.")
    info.add_metric([], {"version": __version__})
    return info


def policy_info(policy: Policy) -> InfoMetricFamily:
    info = InfoMetricFamily("blocker_policy", "The running policy's version.")
    info.add_metric([], {"version": policy.version})
    return info


def policy_families(policy: Policy) -> Iterator[object]:
    """Rules per category, exemptions in force and expiring, devices, and the policy's version."""
    family = GaugeMetricFamily("blocker_blocklist_domains", "Rules loaded per category.", labels=["category"])
    sizes = policy.lists.index.categories_sizes()
    for category in sorted(policy.lists.categories):
        family.add_metric([category], sizes.get(category, 0))
    yield family
    now = datetime.now(UTC)
    exemptions = [e for items in policy.exemptions.values() for e in items]
    active = [e for e in exemptions if e.active(now)]
    yield gauge("blocker_exemptions_active", "Exemptions in force now.", len(active))
    soon = now + timedelta(days=policy.config.policy.expiry_warning_days)
    yield gauge("blocker_exemptions_expiring", "Exemptions in force now that expire within "
                 "policy.expiry_warning_days (default 14).",
                 sum(1 for e in active if e.expires <= soon))
    yield gauge("blocker_devices", "Devices in the running policy.", len(policy.devices))
    yield policy_info(policy)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    """One unlabelled counter family."""
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    """One unlabelled gauge family."""
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def make_registry(stats: Stats, gauges: Gauges, *extra: Collector) -> CollectorRegistry:
    """A registry of blocker's own metrics plus the standard `process_*` ones (memory, CPU, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BlockerCollector(stats, gauges))
    for collector in extra:
        registry.register(collector)
    ProcessCollector(registry=registry)
    return registry
