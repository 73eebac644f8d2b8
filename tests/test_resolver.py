"""The resolver in-process, CoreDNS-style: rows of (config, source, query) → (rcode, EDE, action),
against a real Knot upstream on loopback, with an injected clock instead of sleeping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.rcode
import pytest
from conftest import short_exemption, standard_config
from helpers import BlackHole, Knot, edes

from blocker.cache import AnswerCache
from blocker.clock import ManualClock
from blocker.config import load_config
from blocker.domains import RuleIndex
from blocker.message import Scan
from blocker.metrics import Stats
from blocker.policy import Policy, compile_policy
from blocker.recorder import Recorder
from blocker.resolver import Resolver
from blocker.upstream import Upstreams


class Harness:
    """A Resolver built as the daemon builds it, answering packets handed to it directly."""

    def __init__(self, policy: Policy, cache: AnswerCache | None = None, clock: ManualClock | None = None) -> None:
        self.clock = clock or ManualClock()
        self.stats = Stats()
        dns_config = policy.config.dns
        self.upstreams = Upstreams(dns_config.upstreams, dns_config.upstream_timeout, self.stats)
        cache = cache if cache is not None else AnswerCache(100)
        self.resolver = Resolver(policy, cache, self.upstreams, Recorder(self.stats, self.clock), self.clock)

    async def ask(self, name: str, rdtype: str = "A", source: str = "127.0.0.1", transport: str = "udp",
                  use_edns: int | bool = 0) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, use_edns=use_edns)
        reply = self.resolver.handle(query.to_wire(), source, transport)
        if reply is not None and not isinstance(reply, bytes):
            reply = await reply
        assert isinstance(reply, bytes)
        response = dns.message.from_wire(reply)
        assert response.id == query.id
        return response

    def count(self, action: str) -> int:
        return sum(cell[0] for (_, a), cell in self.stats.queries.items() if a == action)


def run(policy: Policy, scenario: Callable[[Harness], Awaitable[None]], cache: AnswerCache | None = None,
        clock: ManualClock | None = None) -> None:
    async def main() -> None:
        harness = Harness(policy, cache, clock)
        try:
            await scenario(harness)
        finally:
            harness.upstreams.close()

    asyncio.run(main())


def policy_for(tmp_path: Path, upstreams: list[str], extra_dns: str = "", policy: str = "",
               upstream_timeout: float = 0.5) -> Policy:
    return compile_policy(load_config(standard_config(tmp_path, upstreams, extra_dns, policy,
                                                      upstream_timeout=upstream_timeout)))


COMMS = """\
policy:
  devices:
    - {id: MPS-COMMS, addresses: ["127.0.0.3"], group: comms-team}
"""

ROWS = [
    # id, dns extra, policy, source, name, type → rcode, EDE code and text, action
    pytest.param("", "", "127.0.0.1", "www.tiktok.com", "A", "NXDOMAIN", (15, "category=tiktok"), "blocked",
                 id="blocked-nxdomain"),
    pytest.param("", "", "127.0.0.1", "www.tiktok.com", "TXT", "NXDOMAIN", (15, "category=tiktok"), "blocked",
                 id="blocked-every-type"),
    pytest.param("block_response: refused", "", "127.0.0.1", "x.com", "A", "REFUSED", (15, "category=twitter"),
                 "blocked", id="blocked-refused"),
    pytest.param("block_response: null", "", "127.0.0.1", "www.tiktok.com", "AAAA", "NOERROR",
                 (15, "category=tiktok"), "blocked", id="blocked-null"),
    pytest.param("block_response: null", "", "127.0.0.1", "use-application-dns.net", "A", "NXDOMAIN",
                 (15, "category=doh"), "blocked", id="canary-always-nxdomain"),
    pytest.param("", "", "192.0.2.1", "www.example.test", "A", "REFUSED", (18, "allow_networks"), "refused",
                 id="outside-allow-networks"),
    pytest.param("", COMMS, "127.0.0.3", "www.tiktok.com", "A", "NOERROR", None, "allowed",
                 id="comms-team-reaches-tiktok"),
    pytest.param("", COMMS, "127.0.0.3", "web.whatsapp.com", "A", "NXDOMAIN", (15, "category=whatsapp"),
                 "blocked", id="comms-team-messaging-closed"),
    pytest.param("", "", "127.0.0.1", "www.example.test", "A", "NOERROR", None, "allowed", id="allowed"),
    pytest.param("", "", "127.0.0.1", "cloaked.example.test", "A", "NXDOMAIN", (15, "category=tiktok"),
                 "blocked", id="cname-to-blocked"),
    pytest.param("", "", "127.0.0.1", "missing.example.test", "A", "NXDOMAIN", None, "allowed",
                 id="upstream-nxdomain-passes"),
    pytest.param("", "", "127.0.0.1", "www.broken.test", "A", "SERVFAIL", None, "error",
                 id="upstream-servfail-is-error"),
]


@pytest.mark.parametrize(("extra_dns", "policy", "source", "name", "rdtype", "rcode", "ede", "action"), ROWS)
def test_rows(knot: Knot, tmp_path: Path, extra_dns: str, policy: str, source: str, name: str, rdtype: str,
              rcode: str, ede: tuple[int, str] | None, action: str) -> None:
    async def scenario(harness: Harness) -> None:
        response = await harness.ask(name, rdtype, source)
        assert dns.rcode.to_text(response.rcode()) == rcode
        found = edes(response)
        if ede is None:
            assert not [e for e in found if e[0] in (15, 18)], found
        else:
            assert [code for code, _ in found] == [ede[0]] and ede[1] in found[0][1], found
        assert harness.count(action) == 1

    run(policy_for(tmp_path, [knot.endpoint], extra_dns, policy), scenario)


def test_null_block_answers_carry_the_null_address(tmp_path: Path) -> None:
    async def scenario(harness: Harness) -> None:
        a = await harness.ask("www.tiktok.com", "A")
        aaaa = await harness.ask("www.tiktok.com", "AAAA")
        mx = await harness.ask("www.tiktok.com", "MX")
        assert [str(r) for r in a.answer[0]] == ["0.0.0.0"] and [str(r) for r in aaaa.answer[0]] == ["::"]
        assert not mx.answer and mx.rcode() == dns.rcode.NOERROR

    run(policy_for(tmp_path, ["127.0.0.1:9"], "block_response: null"), scenario)


def test_no_upstream_answers_servfail_with_ede_22(tmp_path: Path) -> None:
    hole = BlackHole()

    async def scenario(harness: Harness) -> None:
        response = await harness.ask("www.example.test")
        assert response.rcode() == dns.rcode.SERVFAIL and edes(response)[0][0] == 22
        # Blocked names are still answered at once.
        assert (await harness.ask("www.tiktok.com")).rcode() == dns.rcode.NXDOMAIN

    try:
        run(policy_for(tmp_path, [hole.endpoint]), scenario)
    finally:
        hole.close()


class ExplodingIndex(RuleIndex):
    """Fault injection: the only way to make a lookup raise is to make it raise."""

    def classify(self, name: str) -> frozenset[str]:
        if name in ("boom.example", "www.tiktok.com"):
            raise RuntimeError("injected fault")
        return super().classify(name)


class ExplodingCache(AnswerCache):
    """Fault injection after the upstream answered: storing the answer raises."""

    def put(self, key: bytes, wire: bytes, scan: Scan, now: float) -> Any:
        raise RuntimeError("injected fault after the upstream answer")


def test_an_exception_answers_servfail_logs_traceback_and_the_next_query_works(
        tmp_path: Path, blocker_log: pytest.LogCaptureFixture) -> None:
    policy = policy_for(tmp_path, ["127.0.0.1:9"])
    policy.lists.index.__class__ = ExplodingIndex

    async def scenario(harness: Harness) -> None:
        with blocker_log.at_level(logging.ERROR, logger="blocker"):
            response = await harness.ask("boom.example", use_edns=0)
        assert response.rcode() == dns.rcode.SERVFAIL and edes(response) == [(0, "internal error")]
        assert "injected fault" in blocker_log.text and "Traceback" in blocker_log.text
        assert harness.stats.internal_errors == 1 and harness.count("error") == 1
        assert (await harness.ask("x.com")).rcode() == dns.rcode.NXDOMAIN

    run(policy, scenario)


def test_a_fault_after_the_upstream_answer_gives_servfail(knot: Knot, tmp_path: Path,
                                                          blocker_log: pytest.LogCaptureFixture) -> None:
    async def scenario(harness: Harness) -> None:
        with blocker_log.at_level(logging.ERROR, logger="blocker"):
            response = await harness.ask("www.example.test", use_edns=0)
        assert response.rcode() == dns.rcode.SERVFAIL and edes(response) == [(0, "internal error")]
        assert "injected fault after the upstream answer" in blocker_log.text
        assert harness.stats.internal_errors == 1
        assert harness.stats.upstream_results[(f"127.0.0.1:{knot.port}", "ok")] == 1

    run(policy_for(tmp_path, [knot.endpoint]), scenario, cache=ExplodingCache(100))


def test_cached_answer_ttl_counts_down_with_the_clock_also_from_the_memo(knot: Knot, tmp_path: Path) -> None:
    async def scenario(harness: Harness) -> None:
        first = await harness.ask("short.example.test")
        assert first.answer[0].ttl == 5
        again = await harness.ask("short.example.test")  # the memo: same bytes, same second
        assert again.answer[0].ttl == 5
        harness.clock.advance(2)
        later = await harness.ask("short.example.test")
        assert later.answer[0].ttl == 3
        harness.clock.advance(4)
        expired = await harness.ask("short.example.test")  # asked upstream again
        assert expired.answer[0].ttl == 5
        assert harness.stats.upstream_results[(f"127.0.0.1:{knot.port}", "ok")] == 2

    run(policy_for(tmp_path, [knot.endpoint]), scenario)


def test_exemption_caps_the_ttl_and_ends_at_its_expiry_without_reload(knot: Knot, tmp_path: Path) -> None:
    clock = ManualClock()
    expires = (clock.now() + timedelta(seconds=90)).isoformat()
    policy = policy_for(tmp_path, [knot.endpoint], policy=short_exemption(expires))

    async def scenario(harness: Harness) -> None:
        before = await harness.ask("web.whatsapp.com", source="127.0.0.6")
        assert before.rcode() == dns.rcode.NOERROR and before.answer[0].ttl == 90  # upstream says 300
        assert harness.stats.exempted == {**harness.stats.exempted, "whatsapp": 1}
        other = await harness.ask("web.whatsapp.com", source="127.0.0.7")
        assert other.rcode() == dns.rcode.NXDOMAIN
        harness.clock.advance(60)
        assert (await harness.ask("web.whatsapp.com", source="127.0.0.6")).answer[0].ttl == 30
        harness.clock.advance(30)
        after = await harness.ask("web.whatsapp.com", source="127.0.0.6")
        assert after.rcode() == dns.rcode.NXDOMAIN and "category=whatsapp" in edes(after)[0][1]

    run(policy, scenario, clock=clock)


def test_identical_questions_in_flight_share_one_upstream_query(knot: Knot, tmp_path: Path) -> None:
    async def scenario(harness: Harness) -> None:
        answers = await asyncio.gather(*(harness.ask("mail.example.test", source=f"127.0.0.{i}")
                                         for i in range(10, 20)))
        assert all(a.rcode() == dns.rcode.NOERROR for a in answers)
        assert harness.stats.upstream_results[(f"127.0.0.1:{knot.port}", "ok")] == 1
        assert harness.upstreams.forwarding == 0

    run(policy_for(tmp_path, [knot.endpoint]), scenario)


def test_over_the_forwarding_cap_answers_servfail_at_once(tmp_path: Path) -> None:
    hole = BlackHole()

    async def scenario(harness: Harness) -> None:
        harness.upstreams.max_forwards = 3
        waiting = [asyncio.ensure_future(harness.ask(f"n{i}.example.test")) for i in range(3)]
        await asyncio.sleep(0.05)
        assert harness.upstreams.busy
        response = await asyncio.wait_for(harness.ask("late.example.test"), 2.0)  # not the 5 s upstream wait
        assert response.rcode() == dns.rcode.SERVFAIL and edes(response)[0][0] == 22
        for future in waiting:
            future.cancel()

    try:
        run(policy_for(tmp_path, [hole.endpoint], upstream_timeout=5.0), scenario)
    finally:
        hole.close()


def test_a_reload_swaps_the_policy_and_drops_the_memo(knot: Knot, tmp_path: Path) -> None:
    first = policy_for(tmp_path, [knot.endpoint])
    (tmp_path / "second").mkdir()
    second = policy_for(tmp_path / "second", [knot.endpoint], policy=COMMS.replace("127.0.0.3", "127.0.0.1"))

    async def scenario(harness: Harness) -> None:
        assert (await harness.ask("www.tiktok.com")).rcode() == dns.rcode.NXDOMAIN
        assert (await harness.ask("www.tiktok.com")).rcode() == dns.rcode.NXDOMAIN  # from the memo
        harness.resolver.swap(second)
        allowed = await harness.ask("www.tiktok.com")
        assert allowed.rcode() == dns.rcode.NOERROR and [str(r) for r in allowed.answer[0]] == ["203.0.113.7"]

    run(first, scenario)


def test_edns_clients_get_opt_and_plain_clients_none(knot: Knot, tmp_path: Path) -> None:
    async def scenario(harness: Harness) -> None:
        plain = await harness.ask("www.tiktok.com", use_edns=False)
        assert plain.edns == -1 and not edes(plain)
        upstream = await harness.ask("www.example.test", use_edns=False)
        assert upstream.edns == -1 and upstream.rcode() == dns.rcode.NOERROR

    run(policy_for(tmp_path, [knot.endpoint]), scenario)


def test_ecs_from_a_trusted_forwarder_names_the_device(knot: Knot, tmp_path: Path) -> None:
    policy = policy_for(tmp_path, [knot.endpoint], 'trusted_forwarders: ["127.0.0.5/32"]', COMMS)

    async def ask_with_ecs(harness: Harness, source: str) -> dns.message.Message:
        query = dns.message.make_query("www.tiktok.com", "A", use_edns=0,
                                       options=[dns.edns.ECSOption("127.0.0.3", 32)])
        reply = harness.resolver.handle(query.to_wire(), source, "udp")
        if not isinstance(reply, bytes):
            reply = await reply  # type: ignore[misc]
        return dns.message.from_wire(reply)

    async def scenario(harness: Harness) -> None:
        assert (await ask_with_ecs(harness, "127.0.0.5")).rcode() == dns.rcode.NOERROR  # the comms device
        assert (await ask_with_ecs(harness, "127.0.0.8")).rcode() == dns.rcode.NXDOMAIN  # ECS ignored

    run(policy, scenario)


def test_a_client_that_goes_away_does_not_cancel_the_shared_upstream_query(knot: Knot, tmp_path: Path) -> None:
    async def scenario(harness: Harness) -> None:
        first = asyncio.ensure_future(harness.ask("www.example.test", source="127.0.0.10"))
        second = asyncio.ensure_future(harness.ask("www.example.test", source="127.0.0.11"))
        await asyncio.sleep(0)  # both wait on the one upstream query now
        first.cancel()  # e.g. its TCP connection closed
        answer = await second
        assert answer.rcode() == dns.rcode.NOERROR and [str(r) for r in answer.answer[0]] == ["192.0.2.1"]
        assert harness.stats.upstream_results[(f"127.0.0.1:{knot.port}", "ok")] == 1

    run(policy_for(tmp_path, [knot.endpoint]), scenario)
