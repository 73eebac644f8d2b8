"""The answer cache with an injected clock: TTL countdown, expiry, negative caching, LRU bounds by
entries and by bytes, and the byte count held honest against tracemalloc."""

from __future__ import annotations

import gc
import tracemalloc

import dns.message
import dns.rcode
import dns.rrset

from blocker.cache import MAX_ENTRY_BYTES, SERVFAIL_TTL, AnswerCache
from blocker.clock import ManualClock
from blocker.message import scan_response


def response(name: str = "www.example.test.", ttl: int = 300, rcode: int = 0, soa: tuple[int, int] | None = None,
             cname: str | None = None) -> bytes:
    q = dns.message.make_query(name, "A", use_edns=0)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if cname:
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", "CNAME", cname))
    elif rcode == 0 and soa is None:
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", "192.0.2.1"))
    if soa:
        r.authority.append(dns.rrset.from_text("example.test.", soa[0], "IN", "SOA",
                                               f"ns.example.test. h.example.test. 1 2 3 4 {soa[1]}"))
    return r.to_wire()


def put(cache: AnswerCache, key: bytes, wire: bytes, clock: ManualClock) -> None:
    cache.put(key, wire, scan_response(wire), clock.monotonic())


def test_ttl_counts_down_and_entry_expires() -> None:
    clock = ManualClock()
    cache = AnswerCache(10)
    put(cache, b"k", response(ttl=30), clock)
    clock.advance(12.5)
    entry = cache.get(b"k", clock.monotonic())
    assert entry is not None
    served = dns.message.from_wire(entry.render(clock.monotonic(), edns=True))
    assert served.answer[0].ttl == 18
    clock.advance(18)
    assert cache.get(b"k", clock.monotonic()) is None
    assert (cache.hits, cache.misses) == (1, 1)


def test_exempted_answer_ttl_is_capped() -> None:
    clock = ManualClock()
    cache = AnswerCache(10)
    put(cache, b"k", response(ttl=3600), clock)
    entry = cache.get(b"k", clock.monotonic())
    assert entry is not None
    assert dns.message.from_wire(entry.render(clock.monotonic(), edns=True, cap=90.7)).answer[0].ttl == 90


def test_negative_answers_cached_for_soa_minimum() -> None:
    clock = ManualClock()
    cache = AnswerCache(10)
    put(cache, b"nx", response(rcode=dns.rcode.NXDOMAIN, soa=(300, 30)), clock)
    put(cache, b"nosoa", response(rcode=dns.rcode.NXDOMAIN), clock)
    assert cache.get(b"nosoa", clock.monotonic()) is None  # RFC 2308: no SOA, no negative caching
    clock.advance(29)
    assert cache.get(b"nx", clock.monotonic()) is not None
    clock.advance(1)
    assert cache.get(b"nx", clock.monotonic()) is None


def test_servfail_is_cached_only_briefly() -> None:
    clock = ManualClock()
    cache = AnswerCache(10)
    put(cache, b"sf", response(rcode=dns.rcode.SERVFAIL), clock)
    assert cache.get(b"sf", clock.monotonic()) is not None
    clock.advance(SERVFAIL_TTL)
    assert cache.get(b"sf", clock.monotonic()) is None
    assert SERVFAIL_TTL <= 5


def test_refused_and_zero_ttl_are_not_cached() -> None:
    clock = ManualClock()
    cache = AnswerCache(10)
    put(cache, b"r", response(rcode=dns.rcode.REFUSED), clock)
    put(cache, b"z", response(ttl=0), clock)
    assert len(cache) == 0


def test_lru_bound_evicts_least_recently_used() -> None:
    clock = ManualClock()
    cache = AnswerCache(2)
    put(cache, b"a", response(), clock)
    put(cache, b"b", response(), clock)
    assert cache.get(b"a", clock.monotonic()) is not None  # a is now the most recent
    put(cache, b"c", response(), clock)
    assert cache.get(b"b", clock.monotonic()) is None
    assert cache.get(b"a", clock.monotonic()) is not None and cache.get(b"c", clock.monotonic()) is not None
    assert cache.evictions == 1 and len(cache) == 2


def test_cname_targets_are_recorded() -> None:
    wire = response(name="cloaked.example.test.", cname="www.TikTok.com.")
    assert scan_response(wire).cname_targets == ("www.tiktok.com",)


def test_opt_is_removed_for_clients_without_edns() -> None:
    q = dns.message.make_query("www.example.test.", "A", use_edns=0)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("www.example.test.", 60, "IN", "A", "192.0.2.1"))
    scan = scan_response(r.to_wire())
    plain = dns.message.from_wire(scan.without_opt)
    assert plain.edns == -1 and plain.answer[0].ttl == 60
    # The cache keeps one copy and cuts the OPT out itself, TTLs counted down as for everyone.
    clock = ManualClock()
    cache = AnswerCache(10)
    put(cache, b"k", r.to_wire(), clock)
    clock.advance(7)
    entry = cache.get(b"k", clock.monotonic())
    assert entry is not None
    plain = dns.message.from_wire(entry.render(clock.monotonic(), edns=False))
    with_opt = dns.message.from_wire(entry.render(clock.monotonic(), edns=True))
    assert plain.edns == -1 and plain.answer[0].ttl == 53
    assert with_opt.edns == 0 and with_opt.answer[0].ttl == 53


def txt_response(name: str, records: int, size: int = 200) -> bytes:
    q = dns.message.make_query(name, "TXT", use_edns=0)
    r = dns.message.make_response(q)
    for i in range(records):
        r.answer.append(dns.rrset.from_text(name, 300 + i, "IN", "TXT", f'"{"x" * size}{i}"'))
    return r.to_wire(max_size=65535)


def test_byte_bound_evicts_least_recently_used_by_size() -> None:
    clock = ManualClock()
    one = txt_response("a.example.test.", 4)
    cache = AnswerCache(1000, max_bytes=1)
    put(cache, b"probe", one, clock)
    assert len(cache) == 0 and cache.bytes == 0  # a bound smaller than one entry holds nothing
    cache = AnswerCache(1000, max_bytes=10_000)
    names = [f"n{i:02}".encode() for i in range(20)]
    for name in names[:3]:
        put(cache, name, one, clock)
    per_entry = cache.bytes / 3
    assert cache.get(names[0], clock.monotonic()) is not None  # n00 is now the most recent
    for name in names[3:]:
        put(cache, name, one, clock)
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == int(10_000 // per_entry)
    assert cache.get(names[0], clock.monotonic()) is None and cache.get(names[-1], clock.monotonic()) is not None
    assert cache.evictions == 20 - len(cache)
    cache.resize(1000, 2 * int(per_entry) + 1)
    assert len(cache) == 2 and cache.bytes <= 2 * per_entry + 1
    cache.resize(0, 10_000)
    assert len(cache) == 0 and cache.bytes == 0


def test_answers_over_the_entry_cap_are_counted_not_cached() -> None:
    clock = ManualClock()
    cache = AnswerCache(1000)
    big = txt_response("big.example.test.", 80)
    assert len(big) > MAX_ENTRY_BYTES
    put(cache, b"big", big, clock)
    assert len(cache) == 0 and cache.bytes == 0 and cache.too_large == 1


def test_counted_bytes_match_what_the_entries_really_hold() -> None:
    # The count is an estimate of Python's allocations; it must stay within 10 % of tracemalloc's
    # figure for small and large answers alike, or the byte bound would not bound memory.
    for records, size in ((1, 40), (1, 200), (5, 200), (60, 200)):
        wire = txt_response("n.flood.test.", records, size)
        answers = [(f"key-{i}-of-some-length".encode(), wire) for i in range(500)]
        cache = AnswerCache(10**9, max_bytes=10**12)
        clock = ManualClock()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for key, wire in answers:
                put(cache, bytes(bytearray(key)), bytes(bytearray(wire)), clock)  # copies only the cache holds
            for key, _ in answers:
                entry = cache.get(key, clock.monotonic() + 1.5)
                assert entry is not None
                entry.render(clock.monotonic() + 1.5, edns=True)  # the re-rendered copy replaces the first one
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert 0.9 < held / cache.bytes < 1.1, (records, size, held, cache.bytes)


def test_expired_answers_kept_for_serve_stale_count_in_the_byte_bound() -> None:
    clock = ManualClock()
    cache = AnswerCache(10)
    cache.stale_window = 60
    put(cache, b"k", response(ttl=30), clock)
    held = cache.bytes
    clock.advance(40)
    assert cache.get(b"k", clock.monotonic()) is None  # expired: a miss ...
    entry = cache.get_stale(b"k", clock.monotonic())
    assert entry is not None and cache.bytes == held  # ... but kept, and still counted
    stale = dns.message.from_wire(entry.render_stale(30))
    assert stale.answer[0].ttl == 30 and stale.edns == -1
    clock.advance(60)
    assert cache.get(b"k", clock.monotonic()) is None and cache.get_stale(b"k", clock.monotonic()) is None
    assert len(cache) == 0 and cache.bytes == 0
