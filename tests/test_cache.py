"""The answer cache with an injected clock: TTL countdown, expiry, negative caching, LRU bound."""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rrset

from blocker.cache import SERVFAIL_TTL, AnswerCache
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
