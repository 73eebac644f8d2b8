"""The answer memo in-process: bounded in bytes, oldest entries dropped one by one, and the byte
count held honest against tracemalloc."""

from __future__ import annotations

import dataclasses
import gc
import tracemalloc

import dns.message

from blocker.cache import MEMO_SHARE, AnswerCache
from blocker.clock import Clock
from blocker.config import embedded_defaults
from blocker.memo import BoundedTable
from blocker.metrics import Stats
from blocker.policy import Policy, compile_policy
from blocker.recorder import Recorder
from blocker.resolver import Resolver
from blocker.upstream import Upstreams


def resolver_with(cache_bytes: int) -> Resolver:
    config = embedded_defaults()
    config = dataclasses.replace(config, dns=dataclasses.replace(config.dns, cache_bytes=cache_bytes, upstreams=()))
    policy: Policy = compile_policy(config)
    stats = Stats()
    return Resolver(policy, AnswerCache(10), Upstreams([], 1.0, stats), Recorder(stats, Clock()))


def blocked_queries(count: int, edns: bool = True) -> list[bytes]:
    # Blocked names are answered and remembered at once, with no upstream: each one a memo entry.
    return [dns.message.make_query(f"n{i}-some-label.tiktok.com", "A", use_edns=0 if edns else False).to_wire()
            for i in range(count)]


def test_the_memo_stays_within_its_share_of_cache_bytes() -> None:
    resolver = resolver_with(400_000)
    memo = resolver.memo
    assert memo.max_bytes == 400_000 // MEMO_SHARE
    queries = blocked_queries(3000)
    for data in queries:
        assert isinstance(resolver.handle(data, "127.0.0.1", "udp"), bytes)
        assert memo.bytes <= memo.max_bytes
    assert 0 < len(memo.replies) < 3000
    # The newest are kept, the oldest went first; what is kept is still answered from the memo.
    assert (("udp", "standard", queries[-1][2:])) in memo.replies
    assert (("udp", "standard", queries[0][2:])) not in memo.replies
    hits = resolver.cache.hits
    before = resolver.stats.queries[("udp", "blocked")][0]
    assert isinstance(resolver.handle(queries[-1], "127.0.0.1", "udp"), bytes)
    assert resolver.stats.queries[("udp", "blocked")][0] == before + 1 and resolver.cache.hits == hits


def test_a_full_table_drops_its_oldest_entries_one_by_one() -> None:
    table = BoundedTable(3, 10_000, lambda key, value: 1)
    for i in range(10):
        table.add(i, str(i))
        assert len(table) <= 3
    assert list(table) == [7, 8, 9] and table.bytes == 3
    sized = BoundedTable(100, 10, lambda key, value: len(value))  # type: ignore[arg-type]
    sized.add("a", "xxxx")
    sized.add("b", "xxxx")
    sized.add("a", "xx")  # replacing an entry counts only its new size
    assert sized.bytes == 6
    sized.add("c", "xxxxxx")
    assert list(sized) == ["a", "c"] and sized.bytes == 8


def test_counted_memo_bytes_match_what_the_tables_really_hold() -> None:
    for edns in (True, False):
        resolver = resolver_with(10**12)
        queries = blocked_queries(2000, edns)
        resolver.handle(queries[0], "127.0.0.1", "udp")  # the client, its decision: not name-dependent
        memo = resolver.memo
        start = memo.bytes
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for data in queries[1:]:
                resolver.handle(data, "127.0.0.1", "udp")
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        counted = memo.bytes - start
        assert 0.9 < held / counted < 1.1, (edns, held, counted)
