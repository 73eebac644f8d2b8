"""The per-policy memo tables: what is remembered when, and how a full table makes room (pure logic,
driven through the real Resolver on the embedded defaults)."""

from __future__ import annotations

import dns.message
import dns.rcode
import pytest

from blocker import memo
from blocker.cache import AnswerCache
from blocker.clock import Clock
from blocker.config import embedded_defaults
from blocker.metrics import Stats
from blocker.policy import compile_policy
from blocker.recorder import Recorder
from blocker.resolver import Resolver
from blocker.upstream import Upstreams


@pytest.fixture
def resolver() -> Resolver:
    stats = Stats()
    return Resolver(compile_policy(embedded_defaults()), AnswerCache(10), Upstreams([], 1.0, stats),
                    Recorder(stats, Clock()))


def ask(resolver: Resolver, name: str, address: str = "127.0.0.1", qid: int = 1) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    query.id = qid
    reply = resolver.handle(query.to_wire(), address, "udp")
    assert isinstance(reply, bytes)
    return dns.message.from_wire(reply)


def test_an_answer_is_remembered_the_second_time_its_name_is_asked(resolver: Resolver) -> None:
    first = ask(resolver, "www.tiktok.com", qid=1)
    assert resolver.memo.replies == {}  # a name asked once (most of the long tail) costs no memo entry
    second = ask(resolver, "www.tiktok.com", qid=2)
    assert len(resolver.memo.replies) == 1
    third = ask(resolver, "www.tiktok.com", qid=3)  # from the memo
    for reply, qid in ((first, 1), (second, 2), (third, 3)):
        assert reply.id == qid and reply.rcode() == dns.rcode.NXDOMAIN
    assert first.to_wire()[2:] == second.to_wire()[2:] == third.to_wire()[2:]
    queries = resolver.stats.queries
    assert sum(cell[0] for cell in queries.values()) == 3  # each counted once, memo or not


def test_a_full_table_drops_its_oldest_slice_not_everything(resolver: Resolver,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memo, "MEMO_LIMIT", 64)
    monkeypatch.setattr(memo, "EVICT_SLICE", 16)
    names = [f"n{i}.tiktok.com" for i in range(100)]
    for name in names:
        ask(resolver, name)
    categories = resolver.memo.categories
    assert len(categories) <= 64
    assert names[0] not in categories and names[-1] in categories
    assert len(categories) > 64 - 16  # only a slice went, not the whole table
    assert ask(resolver, names[0]).rcode() == dns.rcode.NXDOMAIN  # an evicted name is worked out again


def test_clients_dropped_from_a_full_table_leave_the_fast_path_too(resolver: Resolver,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memo, "MEMO_LIMIT", 32)
    monkeypatch.setattr(memo, "EVICT_SLICE", 8)
    addresses = [f"127.0.{i // 250}.{i % 250 + 1}" for i in range(80)]
    for address in addresses:
        ask(resolver, "www.tiktok.com", address=address)
    table = resolver.memo
    known = {address for address, _ecs in table.clients}
    assert len(table.clients) <= 32
    assert set(table.memo_clients) <= known
    assert addresses[-1] in table.memo_clients and addresses[0] not in table.memo_clients
    # Each client was identified from its own address, also when its arrival made room.
    assert all(client.address == address for (address, _ecs), client in table.clients.items())
    assert all(client.address == address for address, client in table.memo_clients.items())
