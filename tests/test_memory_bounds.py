"""Memory bounded in bytes, through the real server: unique names with ~1 KB answers over UDP and
~60 KB answers over TCP keep the answer cache and the memo within `dns.cache_bytes`, as the
metrics say. (The long run, with RSS, is bench/soak_server.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import standard_config
from helpers import Blocker, Knot, metric_value
from hostile_clients import tcp_flood, udp_flood

CACHE_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def bulk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blocker]:
    """blocker with a 4 MiB cache_bytes, forwarding to a Knot serving wildcard bulk answers."""
    knot = Knot(tmp_path_factory.mktemp("knot-bulk"), ["bulk.test"]).start()
    config = standard_config(tmp_path_factory.mktemp("blocker-bulk"), [knot.endpoint],
                             f"cache_bytes: {CACHE_BYTES}\nupstream_timeout: 2.0")
    config.write_text(config.read_text().replace("  upstream_timeout: 0.5\n", ""))
    server = Blocker(config).start()
    yield server
    server.stop()
    knot.stop()


def test_unique_names_with_1kb_answers_stay_within_cache_bytes(bulk: Blocker) -> None:
    names = [f"u{i}.kb.bulk.test" for i in range(8000)]  # ~12 MB of answers as the cache counts them
    answered = udp_flood(bulk.port, names)
    assert answered >= 0.99 * len(names)
    text = bulk.metrics()
    cache_bytes = metric_value(text, "blocker_dns_cache_bytes")
    limit = metric_value(text, "blocker_dns_cache_max_bytes")
    memo_bytes = metric_value(text, "blocker_dns_memo_bytes")
    memo_limit = metric_value(text, "blocker_dns_memo_max_bytes")
    assert limit + memo_limit == CACHE_BYTES
    assert 0.8 * limit < cache_bytes <= limit  # full, and not over
    assert 0 < memo_bytes <= memo_limit
    assert metric_value(text, "blocker_dns_cache_evictions_total") > 0
    entries = metric_value(text, "blocker_dns_cache_entries")
    assert 1000 < entries < 4000 and cache_bytes / entries > 1000  # ~1 KB answers, counted whole


def test_60kb_answers_over_tcp_are_served_whole_and_not_cached(bulk: Blocker) -> None:
    before = bulk.metrics()
    names = [f"u{i}.big.bulk.test" for i in range(200)]
    sizes = tcp_flood(bulk.port, names)
    assert len(sizes) == 200 and min(sizes) > 60_000
    text = bulk.metrics()
    too_large = (metric_value(text, "blocker_dns_cache_too_large_total")
                 - metric_value(before, "blocker_dns_cache_too_large_total"))
    assert too_large >= 200
    assert metric_value(text, "blocker_dns_cache_bytes") <= metric_value(text, "blocker_dns_cache_max_bytes")
    assert metric_value(text, "blocker_dns_memo_bytes") <= metric_value(text, "blocker_dns_memo_max_bytes")
