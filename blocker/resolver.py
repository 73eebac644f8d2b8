"""The request flow, in one place: parse → identify → decide → cache → forward → check CNAMEs → respond → record.

`Resolver.handle` answers synchronously whatever it can (blocked, refused, malformed, cached),
which is nearly every query; only a cache miss returns a coroutine that forwards upstream. The
order of the steps, and why:

1. parse: a packet that is not a query is answered FORMERR/NOTIMP (or dropped) before any work.
2. identify: the client's group and device decide everything after, so they come first.
3. decide: above the cache, because a decision is per client and the cache is shared.
4. cache: holds upstream answers only, so a reload never needs to flush it.
5. forward: the only step doing network I/O.
6. CNAME check: after the answer, whether it came from cache or upstream.
7. record: every outcome, errors included, counted once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

from blocker.cache import AnswerCache, CacheEntry
from blocker.clients import Client
from blocker.message import (
    EDE_BLOCKED,
    EDE_OTHER,
    EDE_PROHIBITED,
    QTYPE_A,
    QTYPE_AAAA,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    BadVersion,
    Query,
    WireError,
    address_record,
    answer,
    badvers_answer,
    ede_option,
    error_answer,
    opt_pair,
    read_question,
    scan_response,
    soa_record,
    truncated,
)
from blocker.metrics import Stats
from blocker.policy import CANARY_NAMES, Action, Decision, Policy, decide_categories, identify
from blocker.querylog import QueryLog
from blocker.upstream import Upstreams

log = logging.getLogger("blocker")

TCP_MAX = 65535
MAX_FORWARDS = 4096  # queries waiting on upstreams at once; beyond this, SERVFAIL at once
_MEMO_LIMIT = 200_000
_EDE_NO_REACHABLE_AUTHORITY = 22
_FOREVER = float("inf")


class BlockAnswers:
    """The pieces of blocked answers for one policy, built once at load time."""

    def __init__(self, policy: Policy) -> None:
        dns = policy.config.dns
        self.kind = dns.block_response.kind
        self.version = policy.version
        ttl = dns.block_ttl
        self.soa = soa_record(ttl)
        if self.kind == "null":
            self.a: bytes | None = address_record(QTYPE_A, ttl, "0.0.0.0")
            self.aaaa: bytes | None = address_record(QTYPE_AAAA, ttl, "::")
        elif self.kind == "ip":
            ipv4, ipv6 = dns.block_response.ipv4, dns.block_response.ipv6
            self.a = address_record(QTYPE_A, ttl, ipv4) if ipv4 else None
            self.aaaa = address_record(QTYPE_AAAA, ttl, ipv6) if ipv6 else None
        else:
            self.a = self.aaaa = None
        self._opts: dict[str, tuple[bytes, bytes]] = {}
        self.refused_opt = opt_pair(ede_option(EDE_PROHIBITED, "source address not in allow_networks"))
        self.servfail_opt = opt_pair(ede_option(_EDE_NO_REACHABLE_AUTHORITY, "no upstream answered"))
        self.unreadable_opt = opt_pair(ede_option(EDE_OTHER, "upstream answer unreadable"))
        self.internal_opt = opt_pair(ede_option(EDE_OTHER, "internal error"))
        for category in policy.lists.categories:
            self.opt_for(category)

    def opt_for(self, category: str) -> tuple[bytes, bytes]:
        opt = self._opts.get(category)
        if opt is None:
            text = f"blocked: category={category}; policy={self.version}"
            opt = self._opts[category] = opt_pair(ede_option(EDE_BLOCKED, text))
        return opt

    def build(self, query: Query, category: str, canary: bool) -> bytes:
        opt = self.opt_for(category)
        kind = self.kind
        if canary or kind == "nxdomain":
            return answer(query, RCODE_NXDOMAIN, authority=self.soa, nscount=1, opt=opt)
        if kind == "refused":
            return answer(query, RCODE_REFUSED, opt=opt)
        record = self.a if query.qtype == QTYPE_A else self.aaaa if query.qtype == QTYPE_AAAA else None
        if record is not None:
            return answer(query, RCODE_NOERROR, record, 1, opt=opt)
        return answer(query, RCODE_NOERROR, authority=self.soa, nscount=1, opt=opt)


class PolicyState:
    """The running policy and what is derived from it; replaced whole on reload, so nothing here
    can outlive the policy it was derived from."""

    __slots__ = ("answers", "categories", "clients", "decisions", "memo", "memo_clients", "policy")

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.answers = BlockAnswers(policy)
        self.clients: dict[tuple[str, bytes | None], Client] = {}
        self.categories: dict[str, frozenset[str]] = {}
        # (group, categories, is a canary) -> decision, for clients without exemptions: then the
        # decision depends on nothing else (not even the time), and most names share few category sets.
        self.decisions: dict[tuple[str, frozenset[str], bool], Decision] = {}
        # Source address -> client, for clients whose answers depend on their group alone: allowed,
        # not a trusted forwarder (ECS would name someone else), and no exemption (time-dependent).
        self.memo_clients: dict[str, Client] = {}
        # (transport, group, query bytes after the ID) -> the answer after the ID and what to record.
        # Most queries repeat byte for byte; this answers them without parsing or deciding again.
        self.memo: dict[tuple[str, str, bytes], _Memo] = {}


class Resolver:
    """Answers queries under the current policy; shared by the UDP and TCP listeners."""

    def __init__(self, policy: Policy, cache: AnswerCache, upstreams: Upstreams, stats: Stats) -> None:
        self.state = PolicyState(policy)
        self.cache = cache
        self.upstreams = upstreams
        self.stats = stats
        self.forwarding = 0
        self.querylog: QueryLog | None = None
        self._inflight: dict[bytes, asyncio.Future[bytes | None]] = {}

    @property
    def policy(self) -> Policy:
        return self.state.policy

    def swap(self, policy: Policy) -> None:
        """Install a new policy; queries already past `identify` finish on the old one."""
        self.state = PolicyState(policy)

    def handle(self, data: bytes, address: str, transport: str) -> bytes | Coroutine[Any, Any, bytes | None] | None:
        """The answer to one packet: bytes now, None to drop, or a coroutine that forwards it."""
        started = time.perf_counter()
        state = self.state
        client = state.memo_clients.get(address)
        if client is not None:
            hit = state.memo.get((transport, client.group, data[2:]))
            if hit is not None and (hit.valid_until == _FOREVER or hit.valid_until > time.monotonic()):
                hit.counter[0] += 1
                if hit.blocked_counter is not None:
                    hit.blocked_counter[0] += 1
                else:
                    self.cache.hits += 1
                self.stats.duration.observe(time.perf_counter() - started)
                reply = data[:2] + hit.reply
                if self.querylog is not None:
                    self._log(address, client, hit.qname, hit.qtype, hit.action, hit.categories, None, reply,
                              started)
                return reply
        try:
            query = read_question(data)
        except WireError:
            self.stats.bad_packet(transport)
            self.stats.answered(transport, "error", None, "", time.perf_counter() - started)
            return error_answer(data, RCODE_FORMERR)
        except NotImplementedError:
            self.stats.answered(transport, "error", None, "", time.perf_counter() - started)
            return error_answer(data, RCODE_NOTIMP)
        except BadVersion as err:
            self.stats.answered(transport, "error", None, "", time.perf_counter() - started)
            return badvers_answer(err.query)
        request = _Request(data, query, address, transport, started, state)
        try:
            return self._answer(request)
        except Exception:
            log.exception("error while answering a query for %s", query.qname)
            self.stats.internal_errors += 1
            return self._done(request, answer(query, RCODE_SERVFAIL, opt=state.answers.internal_opt), "error")

    def _done(self, request: _Request, reply: bytes, action: str, category: str | None = None,
              categories: frozenset[str] = frozenset(), exemption: str | None = None) -> bytes:
        """Record one answered query (metrics, query log) and return its answer."""
        client = request.client
        group = client.group if client is not None else ""
        self.stats.answered(request.transport, action, category, group, time.perf_counter() - request.started)
        if self.querylog is not None:
            self._log(request.address, client, request.query.qname, request.query.qtype, action,
                      tuple(sorted(categories)), exemption, reply, request.started)
        return reply

    def _log(self, address: str, client: Client | None, qname: str, qtype: int, action: str,
             categories: tuple[str, ...], exemption: str | None, reply: bytes, started: float) -> None:
        querylog = self.querylog
        assert querylog is not None
        if querylog.only_blocked and action not in ("blocked", "exempted"):
            return
        querylog.put((time.time(), address, client.device if client else None, qname, qtype, action, categories,
                      client.group if client else "", exemption, self.state.policy.version,
                      time.perf_counter() - started, reply[3] & 0xF))

    def _answer(self, request: _Request) -> bytes | Coroutine[Any, Any, bytes | None]:
        state, query, address = request.state, request.query, request.address
        policy = state.policy
        key = (address, query.ecs)
        client = state.clients.get(key)
        if client is None:
            if len(state.clients) >= _MEMO_LIMIT:
                state.clients.clear()
                state.memo_clients.clear()
            client = state.clients[key] = identify(policy, address, query.ecs)
            if client.allowed and client.device not in policy.exemptions and not policy.is_trusted(address):
                state.memo_clients[address] = client
        request.client = client
        if not client.allowed:
            return self._done(request, answer(query, RCODE_REFUSED, opt=state.answers.refused_opt), "refused")
        qname = query.qname
        categories = state.categories.get(qname)
        if categories is None:
            if len(state.categories) >= _MEMO_LIMIT:
                state.categories.clear()
            categories = state.categories[qname] = policy.categorize(qname)
        if categories:
            if client.device in policy.exemptions:
                decision = decide_categories(policy, client, qname, categories, datetime.now(UTC))
            else:
                key2 = (client.group, categories, qname in CANARY_NAMES)
                decision = state.decisions.get(key2)  # type: ignore[assignment]
                if decision is None:
                    decision = state.decisions[key2] = decide_categories(policy, client, qname, categories,
                                                                         datetime.now(UTC))
            if decision.action is Action.BLOCKED:
                return self._blocked(request, decision, remember=True)
            request.decision = decision
        now = time.monotonic()
        entry = self.cache.get(query.cache_key, now)
        if entry is not None:
            return self._respond(request, entry, now)
        if self.forwarding >= MAX_FORWARDS:
            return self._done(request, answer(query, RCODE_SERVFAIL, opt=state.answers.servfail_opt), "error")
        return self._forward(request)

    def _remember(self, request: _Request, reply: bytes, action: str, category: str | None,
                  categories: frozenset[str], valid_until: float) -> None:
        """Keep an answer for the same bytes from the same group (only for memo-eligible clients)."""
        state = request.state
        if state.memo_clients.get(request.address) is None or state is not self.state:
            return
        if len(state.memo) >= _MEMO_LIMIT:
            state.memo.clear()
        key = (request.transport, request.client.group, request.data[2:])  # type: ignore[union-attr]
        stats = self.stats
        state.memo[key] = _Memo(reply[2:], action, category, valid_until, request.query.qname, request.query.qtype,
                                tuple(sorted(categories)), stats.query_cell(request.transport, action),
                                stats.blocked_cell(category, key[1]) if action == "blocked" and category else None)

    def _blocked(self, request: _Request, decision: Decision, remember: bool) -> bytes:
        category = decision.category or ""
        reply = request.state.answers.build(request.query, category, decision.canary)
        if remember:
            self._remember(request, reply, "blocked", category, decision.categories, _FOREVER)
        return self._done(request, reply, "blocked", category, decision.categories)

    async def _forward(self, request: _Request) -> bytes | None:
        query = request.query
        key = query.cache_key
        self.forwarding += 1
        try:
            waiting = self._inflight.get(key)
            if waiting is not None:
                # The same question is already on its way upstream: share its answer.
                wire = await asyncio.shield(waiting)
            else:
                future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
                self._inflight[key] = future
                try:
                    wire = await self.upstreams.resolve(query)
                    future.set_result(wire)
                except BaseException as err:
                    future.set_exception(err)
                    future.exception()  # marks it retrieved when nobody else waits
                    raise
                finally:
                    del self._inflight[key]
        except Exception:
            log.exception("error while forwarding a query for %s", query.qname)
            self.stats.internal_errors += 1
            wire = None
        finally:
            self.forwarding -= 1
        state = request.state
        if wire is None:
            return self._done(request, answer(query, RCODE_SERVFAIL, opt=state.answers.servfail_opt), "error")
        now = time.monotonic()
        try:
            scan = scan_response(wire)
        except WireError:
            return self._done(request, answer(query, RCODE_SERVFAIL, opt=state.answers.unreadable_opt), "error")
        entry = self.cache.put(key, wire, scan, now)
        return self._respond(request, entry, now)

    def _respond(self, request: _Request, entry: CacheEntry, now: float) -> bytes:
        query, client, decision = request.query, request.client, request.decision
        assert client is not None
        if entry.targets:
            blocked = self._blocked_target(request.state, client, entry)
            if blocked is not None:
                # Not memoised: whether the chain is blocked is known only with the cache entry.
                return self._blocked(request, blocked, remember=False)
        exempted = decision is not None and decision.action is Action.EXEMPTED
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
            self.stats.exempt(decision.category or "")
            return self._done(request, reply, "exempted", decision.category, categories,
                              decision.exemption.reference)
        # A SERVFAIL passed on from the upstreams is an error for the dashboards and alerts, not an answer.
        action = "error" if reply[3] & 0xF == RCODE_SERVFAIL else "allowed"
        # Valid until the TTLs would tick down a second, or the entry expires.
        valid_until = min(entry.expires, entry.stored + int(now - entry.stored) + 1)
        if valid_until > now:
            self._remember(request, reply, action, None, categories, valid_until)
        return self._done(request, reply, action, None, categories)

    def _blocked_target(self, state: PolicyState, client: Client, entry: CacheEntry) -> Decision | None:
        """The decision that blocks one of the answer's CNAME targets for this client, if any."""
        policy = state.policy
        if entry.target_policy is not policy:
            entry.target_categories = tuple(policy.categorize(t) for t in entry.targets)
            entry.target_policy = policy
        now = None
        for target, categories in zip(entry.targets, entry.target_categories, strict=True):
            if not categories:
                continue
            now = now or datetime.now(UTC)
            decision = decide_categories(policy, client, target, categories, now)
            if decision.action is Action.BLOCKED:
                return decision
        return None


class _Memo:
    """A remembered answer and what to record when it is served again."""

    __slots__ = ("action", "blocked_counter", "categories", "category", "counter", "qname", "qtype", "reply",
                 "valid_until")

    def __init__(self, reply: bytes, action: str, category: str | None, valid_until: float, qname: str, qtype: int,
                 categories: tuple[str, ...], counter: list[int], blocked_counter: list[int] | None) -> None:
        self.reply = reply
        self.action = action
        self.category = category
        self.valid_until = valid_until
        self.qname = qname
        self.qtype = qtype
        self.categories = categories
        # The metric cells this answer counts in (see Stats): bound once, added to on every hit.
        self.counter = counter
        self.blocked_counter = blocked_counter


class _Request:
    """One query on its way through the resolver."""

    __slots__ = ("address", "client", "data", "decision", "query", "started", "state", "transport")

    def __init__(self, data: bytes, query: Query, address: str, transport: str, started: float,
                 state: PolicyState) -> None:
        self.data = data
        self.query = query
        self.address = address
        self.transport = transport
        self.started = started
        self.state = state
        self.client: Client | None = None
        self.decision: Decision | None = None
