"""The per-policy memo: what is remembered when (pure logic, driven through the real Resolver on the
embedded defaults)."""

from __future__ import annotations

import dns.message
import dns.rcode
import pytest

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
