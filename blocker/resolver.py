"""The request flow, in one place: parse → identify → decide → cache → forward → check CNAMEs → respond → record.

`Resolver.handle` answers synchronously whatever it can (remembered, blocked, refused, malformed,
cached), which is nearly every query; only a cache miss returns a coroutine that forwards upstream.
The order of the steps, and why:

0. memo: an identical query from a client whose answer depends on its group alone was answered
   before under this policy; serve that answer (see memo.py).
1. parse: a packet that is not a query is answered FORMERR/NOTIMP (or dropped) before any work.
2. identify: the client's group and device decide everything after, so they come first.
3. decide: above the cache, because a decision is per client and the cache is shared.
4. cache: holds upstream answers only, so a reload never needs to flush it.
5. forward: the only step doing network I/O (single-flight and the cap live in upstream.py).
   A client over its rate limit is refused (or dropped) before step 0, and one with too many
   queries already waiting upstream gets SERVFAIL instead of a new one (ratelimit.py). When every
   upstream fails, an expired answer is served stale (RFC 8767) rather than SERVFAIL.
6. CNAME check: after the answer, whether it came from cache or upstream.
7. record: every outcome, errors included, counted once (recorder.py).

Whatever raises while answering one query, before or after the upstream answered, is caught
here once: the client gets SERVFAIL, the traceback is logged and `internal_errors` counted.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from time import perf_counter
from typing import Any

from blocker.bindings import Binding, BindingTable
from blocker.cache import AnswerCache, CacheEntry
from blocker.clients import Client
from blocker.clock import Clock
from blocker.memo import FOREVER, MemoHit, PolicyMemo
from blocker.message import (
    CLASS_ANY,
    CLASS_IN,
    RCODE_FORMERR,
    RCODE_NOTIMP,
    RCODE_SERVFAIL,
    BadVersion,
    Query,
    WireError,
    badvers_answer,
    error_answer,
    read_question,
    scan_response,
    truncated,
)
from blocker.policy import Action, Decision, Policy, decide_categories
from blocker.ratelimit import Outstanding, RateLimiter
from blocker.recorder import Recorder
from blocker.upstream import Upstreams

log = logging.getLogger("blocker")

TCP_MAX = 65535
STALE_TTL = 30  # RFC 8767 §4: the TTL of a stale answer, and how long to serve it before asking again
_STALE_LIMIT = 200_000

Reply = bytes | Coroutine[Any, Any, bytes | None] | None


class Resolver:
    """Answers queries under the current policy; shared by the UDP and TCP listeners."""

    def __init__(self, policy: Policy, cache: AnswerCache, upstreams: Upstreams, recorder: Recorder,
                 clock: Clock | None = None, bindings: BindingTable | None = None, share: int = 1) -> None:
        """`share`: worker processes the server's memory bounds are divided among (dns.workers as started)."""
        self.share = share
        self.cache = cache
        self.bindings = bindings
        self.upstreams = upstreams
        self.recorder = recorder
        self.stats = recorder.stats  # for the listeners' own counters (TCP connections)
        self.clock = clock or recorder.clock
        self.memo = PolicyMemo(policy, bindings, share)
        recorder.version = policy.version
        self.limiter: RateLimiter | None = None
        self.outstanding = Outstanding(0)
        # Cache keys served stale lately -> until when they are served stale without asking again.
        self._stale_until: dict[bytes, float] = {}
        self._configure_limits(policy)
        if bindings is not None:
            bindings.listeners.append(self.binding_changed)

    def binding_changed(self, op: str, binding: Binding, local: bool) -> None:
        """A listener of the binding table: the memo must not keep the old identity of that address."""
        self.memo.forget(binding.network)

    @property
    def policy(self) -> Policy:
        return self.memo.policy

    def swap(self, policy: Policy) -> PolicyMemo:
        """Install a new policy; queries already past `identify` finish on the old one. Returns the
        old memo, for the caller to free where it stalls nothing."""
        old, self.memo = self.memo, PolicyMemo(policy, self.bindings, self.share)
        self.recorder.version = policy.version
        self._configure_limits(policy)
        return old

    def _configure_limits(self, policy: Policy) -> None:
        dns = policy.config.dns
        self.outstanding.limit = dns.max_outstanding_per_client
        limit = dns.rate_limit
        if limit.qps <= 0:
            self.limiter = None
        elif self.limiter is None or (self.limiter.qps, self.limiter.burst) != (limit.qps, limit.burst):
            self.limiter = RateLimiter(limit.qps, limit.burst, self.clock.monotonic)
        self._drop_limited = limit.action == "drop"
        self._unlimited: set[str] = set()  # trusted forwarders seen over the limit: exempt

    def _limited(self, data: bytes, address: str, transport: str, started: float) -> bytes | bool | None:
        """The answer to a query over its client's rate limit; False when the client is exempt."""
        if address in self._unlimited:
            return False
        if self.policy.is_trusted(address):
            self._unlimited.add(address)
            return False
        if self._drop_limited:
            self.stats.rate_limited["drop"] += 1
            return None
        self.stats.rate_limited["refused"] += 1
        try:
            query = read_question(data)
        except (WireError, NotImplementedError, BadVersion):
            return None
        request = _Request(data, query, address, transport, started, self.memo)
        return self._done(request, self.memo.answers.rate_limited(query), Action.REFUSED)

    def handle(self, data: bytes, address: str, transport: str) -> Reply:
        """The answer to one packet: bytes now, None to drop, or a coroutine that forwards it."""
        started = perf_counter()
        try:
            limiter = self.limiter
            if limiter is not None and not limiter.allow(address):
                limited = self._limited(data, address, transport, started)
                if limited is not False:
                    return limited  # type: ignore[return-value]
            # Step 0, the memo (memo.py), written out here: it answers nearly every query, and a
            # Python call less is a tenth of its cost. The clock is read only for answers that expire.
            memo = self.memo
            client = memo.memo_clients.get(address)
            if client is not None:
                hit: MemoHit | None = memo.replies.get((transport, client.group, data[2:]))
                if hit is not None and (hit.valid_until == FOREVER or hit.valid_until > self.clock.monotonic()):
                    if hit.blocked_counter is None:
                        self.cache.hits += 1  # a remembered forwarded answer stands for a cache hit
                    return self.recorder.memo_hit(address, client, hit, data[:2] + hit.reply, started)
            return self._parse(data, address, transport, started, memo)
        except Exception:
            # Outside a parsed query (the memo, the parser): a header-only SERVFAIL, if answerable.
            log.exception("error while answering a packet from %s", address)
            self.recorder.internal_error()
            self.recorder.unreadable(transport, started, malformed=False)
            return error_answer(data, RCODE_SERVFAIL)

    def _parse(self, data: bytes, address: str, transport: str, started: float, memo: PolicyMemo) -> Reply:
        try:
            query = read_question(data)
        except WireError:
            self.recorder.unreadable(transport, started, malformed=True)
            return error_answer(data, RCODE_FORMERR)
        except NotImplementedError:
            self.recorder.unreadable(transport, started, malformed=False)
            return error_answer(data, RCODE_NOTIMP)
        except BadVersion as err:
            self.recorder.unreadable(transport, started, malformed=False)
            return badvers_answer(err.query)
        request = _Request(data, query, address, transport, started, memo)
        try:
            return self._answer(request)
        except Exception:
            return self._internal_error(request)

    def _internal_error(self, request: _Request) -> bytes:
        log.exception("error while answering a query for %s", request.query.qname)
        reply = request.memo.answers.internal_error(request.query)
        try:
            return self._done(request, reply, Action.ERROR, internal=True)
        except Exception:
            log.exception("error while recording an internal error")
            return reply

    def _done(self, request: _Request, reply: bytes, action: Action, category: str | None = None,
              categories: frozenset[str] = frozenset(), exemption: str | None = None, internal: bool = False) -> bytes:
        query = request.query
        return self.recorder.answered(request.transport, request.address, request.client, query.qname, query.qtype,
                                      action, category, categories, exemption, reply, request.started, internal)

    def _answer(self, request: _Request) -> Reply:
        memo, query = request.memo, request.query
        client = request.client = memo.client(request.address, query.ecs)
        if not client.allowed:
            return self._done(request, memo.answers.refused(query), Action.REFUSED)
        if query.qclass != CLASS_IN and query.qclass != CLASS_ANY:
            return self._done(request, memo.answers.other_class(query), Action.REFUSED)
        # A name asked before under this policy is likely asked again: its answer is worth remembering.
        request.known = query.qname in memo.categories
        categories = memo.categories_of(query.qname)
        if categories:
            decision = memo.decision(client, query.qname, categories, self.clock.now)
            if decision.action is Action.BLOCKED:
                return self._blocked(request, decision, remember=True)
            request.decision = decision
        now = self.clock.monotonic()
        entry = self.cache.get(query.cache_key, now)
        if entry is not None:
            return self._respond(request, entry, now)
        if self._stale_until and self._stale_until.get(query.cache_key, 0.0) > now:
            entry = self.cache.get_stale(query.cache_key, now)
            if entry is not None:
                self.stats.stale_answers += 1
                return self._respond(request, entry, now, stale=True)
        if self.upstreams.busy:
            return self._done(request, memo.answers.no_upstream(query), Action.ERROR)
        if not self.outstanding.acquire(client.device or request.address):
            self.stats.client_limited += 1
            return self._done(request, memo.answers.client_busy(query), Action.ERROR)
        return self._forward(request)

    def _remember(self, request: _Request, reply: bytes, action: Action, category: str | None,
                  categories: frozenset[str], valid_until: float) -> None:
        """Keep an answer for the same bytes from the same group (only for memo-eligible clients)."""
        memo = request.memo
        if memo is not self.memo or not memo.may_remember(request.address):
            return
        group = request.client.group  # type: ignore[union-attr]
        key = (request.transport, group, request.data[2:])
        if not request.known and key not in memo.replies:  # in replies: expired, renewed at once
            return
        counter, blocked_counter = self.recorder.cells(request.transport, action, category, group)
        memo.remember(key,
                      MemoHit(reply[2:], action, category, valid_until, request.query.qname, request.query.qtype,
                              tuple(sorted(categories)), counter, blocked_counter))

    def _blocked(self, request: _Request, decision: Decision, remember: bool) -> bytes:
        category = decision.category or ""
        reply = request.memo.answers.blocked(request.query, category, decision.canary)
        if remember:
            self._remember(request, reply, Action.BLOCKED, category, decision.categories, FOREVER)
        return self._done(request, reply, Action.BLOCKED, category, decision.categories)

    async def _forward(self, request: _Request) -> bytes | None:
        query = request.query
        try:
            wire = await self.upstreams.forward(query)
        except Exception:
            log.exception("error while forwarding a query for %s", query.qname)
            self.recorder.internal_error()  # then answered SERVFAIL, as when no upstream answers
            wire = None
        finally:
            self.outstanding.release(request.client.device or request.address)  # type: ignore[union-attr]
        try:
            answers = request.memo.answers
            now = self.clock.monotonic()
            if wire is None or wire[3] & 0xF == RCODE_SERVFAIL:
                stale = self.cache.get_stale(query.cache_key, now)
                if stale is not None:
                    # RFC 8767: an expired answer beats SERVFAIL, and the failure is not cached over it.
                    self.stats.stale_answers += 1
                    if len(self._stale_until) >= _STALE_LIMIT:
                        self._stale_until.clear()
                    self._stale_until[query.cache_key] = now + STALE_TTL
                    return self._respond(request, stale, now, stale=True)
            if wire is None:
                return self._done(request, answers.no_upstream(query), Action.ERROR)
            try:
                scan = scan_response(wire)
            except WireError:
                return self._done(request, answers.unreadable(query), Action.ERROR)
            entry = self.cache.put(query.cache_key, wire, scan, now)
            return self._respond(request, entry, now)
        except Exception:
            return self._internal_error(request)

    def _render_stale(self, request: _Request, entry: CacheEntry) -> bytes:
        """A stale answer: every TTL 30, and (for EDNS clients) our own OPT carrying EDE 3."""
        query = request.query
        wire = entry.render_stale(STALE_TTL)
        if not query.edns:
            return wire
        opt = request.memo.answers.stale_opt[1 if query.do else 0]
        arcount = int.from_bytes(wire[10:12], "big") + 1
        return wire[:10] + arcount.to_bytes(2, "big") + wire[12:] + opt

    def _respond(self, request: _Request, entry: CacheEntry, now: float, stale: bool = False) -> bytes:
        query, client, decision = request.query, request.client, request.decision
        assert client is not None
        if entry.targets:
            blocked = self._blocked_target(request.memo, client, entry)
            if blocked is not None:
                # Not memoised: whether the chain is blocked is known only with the cache entry.
                return self._blocked(request, blocked, remember=False)
        exempted = decision is not None and decision.action is Action.EXEMPTED
        if stale:
            rendered = self._render_stale(request, entry)
        else:
            rendered = entry.render(now, query.edns, decision.expires_in if exempted else None)  # type: ignore[union-attr]
        # Our client's ID and its question exactly as it spelled it (0x20 case preserved).
        qlen = len(query.question)
        reply = query.id + rendered[2:12] + query.question + rendered[12 + qlen:]
        max_size = TCP_MAX if request.transport == "tcp" else query.max_udp()
        if len(reply) > max_size:
            reply = truncated(query, reply)
        categories = decision.categories if decision is not None else frozenset()
        if exempted:
            assert decision is not None and decision.exemption is not None
            return self._done(request, reply, Action.EXEMPTED, decision.category, categories,
                              decision.exemption.reference)
        # A SERVFAIL passed on from the upstreams is an error for the dashboards and alerts, not an answer.
        action = Action.ERROR if reply[3] & 0xF == RCODE_SERVFAIL else Action.ALLOWED
        # Valid until the TTLs would tick down a second, or the entry expires.
        valid_until = min(entry.expires, entry.stored + int(now - entry.stored) + 1)
        if valid_until > now:
            self._remember(request, reply, action, None, categories, valid_until)
        return self._done(request, reply, action, None, categories)

    def _blocked_target(self, memo: PolicyMemo, client: Client, entry: CacheEntry) -> Decision | None:
        """The decision that blocks one of the answer's CNAME targets for this client, if any."""
        policy = memo.policy
        if entry.target_policy is not policy:
            entry.target_categories = tuple(policy.categorize(t) for t in entry.targets)
            entry.target_policy = policy
        now = None
        for target, categories in zip(entry.targets, entry.target_categories, strict=True):
            if not categories:
                continue
            now = now or self.clock.now()
            decision = decide_categories(policy, client, target, categories, now)
            if decision.action is Action.BLOCKED:
                return decision
        return None


class _Request:
    """One query on its way through the resolver."""

    __slots__ = ("address", "client", "data", "decision", "known", "memo", "query", "started", "transport")

    def __init__(self, data: bytes, query: Query, address: str, transport: str, started: float,
                 memo: PolicyMemo) -> None:
        self.data = data
        self.query = query
        self.address = address
        self.transport = transport
        self.started = started
        self.memo = memo
        self.client: Client | None = None
        self.decision: Decision | None = None
        self.known = False
