"""The shared cache of upstream answers: TTL-bounded, LRU, keyed by name, type, class, DO and CD.

It holds upstream answers only, never a per-client decision, so it is shared by every client and
survives a policy reload. Entries keep the wire bytes and where each TTL sits, so a hit costs a
byte splice (re-rendering TTLs at most once a second) instead of a parse.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from blocker.message import RCODE_NOERROR, RCODE_NXDOMAIN, RCODE_SERVFAIL, Scan

MAX_TTL = 86_400
SERVFAIL_TTL = 2  # a failing upstream is asked again soon, but not by every client at once
_TTL = struct.Struct("!I")


class CacheEntry:
    """One upstream answer with what is needed to serve it again."""

    __slots__ = ("expires", "offsets", "rendered", "rendered_age", "rendered_plain", "stored",
                 "target_categories", "target_policy", "targets", "ttls", "wire", "without_opt")

    def __init__(self, wire: bytes, scan: Scan, stored: float, lifetime: float) -> None:
        self.wire = wire
        self.without_opt = scan.without_opt
        self.offsets = scan.ttl_offsets
        self.ttls = scan.ttls
        self.targets = scan.cname_targets
        self.stored = stored
        self.expires = stored + lifetime
        self.rendered_age = 0
        self.rendered = wire
        self.rendered_plain = scan.without_opt
        # The categories of the CNAME targets depend on the policy only, not the client: memoised.
        self.target_policy: object | None = None
        self.target_categories: tuple[frozenset[str], ...] = ()

    def render(self, now: float, edns: bool, cap: float | None = None) -> bytes:
        """The answer with TTLs counted down to `now` (and no higher than `cap` seconds)."""
        age = int(now - self.stored)
        if cap is None:
            if age != self.rendered_age:
                self.rendered = _with_ttls(self.wire, self.offsets, self.ttls, age, None)
                self.rendered_plain = _with_ttls(self.without_opt, self.offsets, self.ttls, age, None)
                self.rendered_age = age
            return self.rendered if edns else self.rendered_plain
        return _with_ttls(self.wire if edns else self.without_opt, self.offsets, self.ttls, age, cap)


def _with_ttls(wire: bytes, offsets: tuple[int, ...], ttls: tuple[int, ...], age: int,
               cap: float | None) -> bytes:
    out = bytearray(wire)
    limit = MAX_TTL if cap is None else max(0, int(cap))
    for offset, ttl in zip(offsets, ttls, strict=True):
        _TTL.pack_into(out, offset, min(max(0, ttl - age), limit))
    return bytes(out)


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
    """A bounded LRU of upstream answers; every call takes `now` (monotonic seconds) from the caller's clock."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires <= now:
            del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: bytes, wire: bytes, scan: Scan, now: float) -> CacheEntry:
        """Store an answer if it may be cached; returns its entry either way."""
        lifetime = lifetime_of(scan)
        entry = CacheEntry(wire, scan, now, lifetime)
        if lifetime <= 0 or self.size <= 0:
            return entry
        entries = self._entries
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)
            self.evictions += 1
        return entry

    def clear(self) -> None:
        self._entries.clear()
