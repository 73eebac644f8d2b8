"""The resolver in-process: what happens when answering one query raises."""

from __future__ import annotations

import dataclasses
import logging

import dns.message
import dns.rcode
import pytest

from blocker.cache import AnswerCache
from blocker.clock import Clock
from blocker.config import embedded_defaults
from blocker.domains import RuleIndex
from blocker.metrics import Stats
from blocker.policy import compile_policy
from blocker.recorder import Recorder
from blocker.resolver import Resolver
from blocker.upstream import Upstreams


class ExplodingIndex(RuleIndex):
    """Fault injection: the only way to make a lookup raise is to make it raise."""

    def classify(self, name: str) -> frozenset[str]:
        if name == "boom.example":
            raise RuntimeError("injected fault")
        return super().classify(name)


def test_an_exception_answers_servfail_logs_traceback_and_the_next_query_works(
        blocker_log: pytest.LogCaptureFixture) -> None:
    policy = compile_policy(embedded_defaults())
    index = ExplodingIndex()
    for slot in ("_exact", "_lines", "_patterns", "_shared", "rule_count"):
        setattr(index, slot, getattr(policy.lists.index, slot))
    policy = dataclasses.replace(policy, lists=dataclasses.replace(policy.lists, index=index))
    stats = Stats()
    resolver = Resolver(policy, AnswerCache(10), Upstreams([], 1.0, stats), Recorder(stats, Clock()))
    query = dns.message.make_query("boom.example", "A")
    with blocker_log.at_level(logging.ERROR, logger="blocker"):
        reply = resolver.handle(query.to_wire(), "127.0.0.1", "udp")
    assert isinstance(reply, bytes)
    response = dns.message.from_wire(reply)
    assert response.id == query.id and response.rcode() == dns.rcode.SERVFAIL
    assert "injected fault" in blocker_log.text and "Traceback" in blocker_log.text
    assert stats.internal_errors == 1
    blocked = resolver.handle(dns.message.make_query("www.tiktok.com", "A").to_wire(), "127.0.0.1", "udp")
    assert isinstance(blocked, bytes) and dns.message.from_wire(blocked).rcode() == dns.rcode.NXDOMAIN
