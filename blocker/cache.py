"""The shared cache of upstream answers: TTL-bounded, LRU, keyed by name, type, class, DO and CD.

It holds upstream answers only, never a per-client decision, so it is shared by every client and
survives a policy reload. Entries keep the wire bytes and where each TTL sits, so a hit costs a
byte splice (re-rendering TTLs at most once a second) instead of a parse.

Memory is bounded twice: by entries (`dns.cache_size`) and by bytes (`dns.cache_bytes`), counting
what an entry really costs (its one copy of the answer, its key and the bookkeeping around it).
An entry holds a single copy of the answer, rewritten in place as its TTLs tick down; clients
without EDNS get the OPT record cut out on the way. Answers over MAX_ENTRY_BYTES are not cached.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from blocker.message import RCODE_NOERROR, RCODE_NXDOMAIN, RCODE_SERVFAIL, Scan

MAX_TTL = 86_400
SERVFAIL_TTL = 2  # a failing upstream is asked again soon, but not by every client at once
MAX_ENTRY_BYTES = 16 * 1024  # larger answers (big TXT sets, ANY) are forwarded every time, never held
DEFAULT_BYTES = 128 * 1024 * 1024  # dns.cache_bytes: see README (sized for a 512 MiB pod)
MEMO_SHARE = 4  # the answer memo gets 1/MEMO_SHARE of dns.cache_bytes, the cache the rest
# What an entry costs beside its answer and key, measured with tracemalloc (tests/test_cache.py
# keeps the estimate honest): the entry object, its floats and tuples, the OrderedDict slot and
# link; and per record, a TTL and an offset (two ints and two tuple slots).
ENTRY_OVERHEAD = 480
RECORD_OVERHEAD = 76
_TTL = struct.Struct("!I")
_COUNT = struct.Struct("!H")


def cache_share(cache_bytes: int) -> int:
    """The answer cache's part of `dns.cache_bytes` (the memo has the rest)."""
    return cache_bytes - cache_bytes // MEMO_SHARE


class CacheEntry:
    """One upstream answer with what is needed to serve it again."""

    __slots__ = ("expires", "offsets", "opt_span", "rendered_age", "size", "stored", "target_categories",
                 "target_policy", "targets", "ttls", "wire")

    def __init__(self, wire: bytes, scan: Scan, stored: float, lifetime: float) -> None:
        # The only copy of the answer, its TTLs as of `rendered_age` seconds after `stored`.
        self.wire = wire
        self.opt_span = scan.opt_span
        self.offsets = scan.ttl_offsets
        self.ttls = scan.ttls
        self.targets = scan.cname_targets
        self.stored = stored
        self.expires = stored + lifetime
        self.rendered_age = 0
        self.size = (len(wire) + ENTRY_OVERHEAD + RECORD_OVERHEAD * len(self.offsets)
                     + sum(len(t) + 100 for t in self.targets))
        # The categories of the CNAME targets depend on the policy only, not the client: memoised.
        self.target_policy: object | None = None
        self.target_categories: tuple[frozenset[str], ...] = ()

    def render(self, now: float, edns: bool, cap: float | None = None) -> bytes:
        """The answer with TTLs counted down to `now` (and no higher than `cap` seconds)."""
        age = max(0, int(now - self.stored))
        if age != self.rendered_age:
            self.wire = _with_ttls(self.wire, self.offsets, self.ttls, age, None)
            self.rendered_age = age
        wire = self.wire if cap is None else _with_ttls(self.wire, self.offsets, self.ttls, age, cap)
        if edns or self.opt_span is None:
            return wire
        return _without_opt(wire, self.opt_span)

    def render_stale(self, ttl: int) -> bytes:
        """The answer without its OPT and with every TTL set to `ttl` (RFC 8767: served expired)."""
        return _with_ttls(self.without_opt, self.offsets, (ttl,) * len(self.offsets), 0, None)

    @property
    def without_opt(self) -> bytes:
        """The answer as last rendered, without its OPT record."""
        return self.wire if self.opt_span is None else _without_opt(self.wire, self.opt_span)


def _with_ttls(wire: bytes, offsets: tuple[int, ...], ttls: tuple[int, ...], age: int,
               cap: float | None) -> bytes:
    out = bytearray(wire)
    limit = MAX_TTL if cap is None else max(0, int(cap))
    for offset, ttl in zip(offsets, ttls, strict=True):
        _TTL.pack_into(out, offset, min(max(0, ttl - age), limit))
    return bytes(out)


def _without_opt(wire: bytes, span: tuple[int, int]) -> bytes:
    """The answer for a client that sent no EDNS: the OPT record cut out, ARCOUNT one less.
    (The scan refuses answers with records after the OPT, so no TTL offset moves.)"""
    start, end = span
    return wire[:10] + _COUNT.pack(_COUNT.unpack_from(wire, 10)[0] - 1) + wire[12:start] + wire[end:]


def lifetime_of(scan: Scan) -> float:
    """How long an answer may be cached (RFC 2308 for negative answers); 0 means not at all."""
    if scan.truncated:
        return 0
    if scan.rcode == RCODE_SERVFAIL:
        return SERVFAIL_TTL
    if scan.rcode == RCODE_NXDOMAIN or (scan.rcode == RCODE_NOERROR and scan.answer_count == 0):
        return min(scan.negative_ttl, MAX_TTL) if scan.negative_ttl else 0
    if scan.rcode != RCODE_NOERROR or not scan.ttls:
        return 0
    return min(min(scan.ttls), MAX_TTL)


class AnswerCache:
    """An LRU of upstream answers bounded by entries and by bytes; every call takes `now`
    (monotonic seconds) from the caller's clock."""

    def __init__(self, size: int, max_bytes: int = DEFAULT_BYTES - DEFAULT_BYTES // MEMO_SHARE) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.stale_window = 0.0  # expired entries are kept (until evicted) this long, for serve-stale
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self.bytes = 0  # the sum of the entries' sizes (answer, key, bookkeeping)
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.too_large = 0  # answers not cached because they exceed MAX_ENTRY_BYTES

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires <= now:
            if now - entry.expires > self.stale_window:
                del self._entries[key]
                self.bytes -= entry.size + len(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def get_stale(self, key: bytes, now: float) -> CacheEntry | None:
        """An expired answer still within the serve-stale window; never a SERVFAIL. (Kept entries
        count in `bytes` like live ones and are evicted by the same LRU.)"""
        entry = self._entries.get(key)
        if entry is None or entry.expires > now or now - entry.expires > self.stale_window:
            return None
        if entry.wire[3] & 0xF == RCODE_SERVFAIL:
            return None
        return entry

    def put(self, key: bytes, wire: bytes, scan: Scan, now: float) -> CacheEntry:
        """Store an answer if it may be cached; returns its entry either way."""
        lifetime = lifetime_of(scan)
        entry = CacheEntry(wire, scan, now, lifetime)
        if lifetime <= 0 or self.size <= 0 or self.max_bytes <= 0:
            return entry
        if len(wire) > MAX_ENTRY_BYTES:
            self.too_large += 1
            return entry
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size + len(key)
        entries[key] = entry
        self.bytes += entry.size + len(key)
        self._shrink()
        return entry

    def resize(self, size: int, max_bytes: int) -> None:
        """New bounds (on reload); evicts at once down to them."""
        self.size = size
        self.max_bytes = max_bytes
        if size <= 0 or max_bytes <= 0:
            self.clear()
        self._shrink()

    def _shrink(self) -> None:
        entries = self._entries
        while entries and (len(entries) > self.size or self.bytes > self.max_bytes):
            key, entry = entries.popitem(last=False)
            self.bytes -= entry.size + len(key)
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
