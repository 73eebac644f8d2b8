"""Upstreams that misbehave (tests/faulty_upstream.py, a real UDP/TCP server) and an off-path spoofer
(tests/spoofer.py, raw sockets): blocker fails over, never relays nonsense, is not poisoned, picks
healthy upstreams, serves stale answers, and keeps one client from starving the others."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest
from conftest import standard_config
from helpers import Blocker, FaultyUpstream, Knot, edes, metric_value, rcode_text
from spoofer import spray

from blocker.message import read_question
from blocker.metrics import Stats
from blocker.upstream import Upstreams

FORGED = "203.0.113.66"


@pytest.fixture
def upstreams() -> Iterator[list[FaultyUpstream]]:
    started: list[FaultyUpstream] = []
    yield started
    for upstream in started:
        upstream.stop()


def faulty(started: list[FaultyUpstream], mode: str, **kwargs: object) -> FaultyUpstream:
    upstream = FaultyUpstream(mode, **kwargs)  # type: ignore[arg-type]
    started.append(upstream)
    return upstream


def with_timeout(config: Path, seconds: float) -> Path:
    config.write_text(config.read_text().replace("upstream_timeout: 0.5", f"upstream_timeout: {seconds}"))
    return config


def addresses(response: dns.message.Message) -> list[str]:
    return [rr.to_text() for rrset in response.answer for rr in rrset]


@pytest.mark.parametrize("mode", ["malformed", "echo"])
def test_a_malformed_or_echoed_answer_fails_over_and_is_never_relayed(
        mode: str, knot: Knot, tmp_path: Path, upstreams: list[FaultyUpstream]) -> None:
    bad = faulty(upstreams, mode)
    server = Blocker(standard_config(tmp_path, [bad.endpoint, knot.endpoint])).start()
    try:
        response = server.query("www.example.test")
        assert rcode_text(response) == "NOERROR" and addresses(response) == ["192.0.2.1"]
        assert response.flags & dns.flags.QR
        assert bad.count() >= 1
        assert metric_value(server.metrics(), "blocker_upstream_queries_total",
                            {"upstream": bad.endpoint, "result": "malformed"}) >= 1
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["wrong-id", "wrong-question"])
def test_a_reply_for_another_query_is_counted_unwanted_and_ignored(
        mode: str, knot: Knot, tmp_path: Path, upstreams: list[FaultyUpstream]) -> None:
    bad = faulty(upstreams, mode)
    server = Blocker(standard_config(tmp_path, [bad.endpoint, knot.endpoint])).start()
    try:
        response = server.query("www.example.test")
        assert addresses(response) == ["192.0.2.1"]  # Knot's, after the bad upstream's timeout
        text = server.metrics()
        assert metric_value(text, "blocker_upstream_unwanted_replies_total") >= 1
        assert metric_value(text, "blocker_upstream_queries_total",
                            {"upstream": bad.endpoint, "result": "timeout"}) == 1
    finally:
        server.stop()


def test_truncated_udp_answer_is_asked_again_over_tcp(tmp_path: Path, upstreams: list[FaultyUpstream]) -> None:
    upstream = faulty(upstreams, "truncated", address="192.0.2.77")
    server = Blocker(standard_config(tmp_path, [upstream.endpoint])).start()
    try:
        assert addresses(server.query("tc.example.test")) == ["192.0.2.77"]
        assert upstream.count() == 2  # once over UDP, once over TCP
    finally:
        server.stop()


def test_names_go_upstream_in_random_case_and_come_back_as_the_client_spelled_them(
        tmp_path: Path, upstreams: list[FaultyUpstream]) -> None:
    upstream = faulty(upstreams, "ok")
    server = Blocker(standard_config(tmp_path, [upstream.endpoint])).start()
    try:
        name = "abcdefghijklmnopqrstuvwxyz.example.test"
        response = server.query(name)
        assert addresses(response) == ["192.0.2.1"]
        assert str(response.question[0].name) == name + "."
        sent = upstream.names()[-1]
        assert sent.lower() == name and sent != name  # 31 letters: all lower by chance is 2**-31
    finally:
        server.stop()


def test_an_upstream_that_does_not_keep_case_still_answers_after_one_timeout(
        tmp_path: Path, upstreams: list[FaultyUpstream]) -> None:
    upstream = faulty(upstreams, "lowercase")
    server = Blocker(standard_config(tmp_path, [upstream.endpoint])).start()
    try:
        for index in range(3):
            assert addresses(server.query(f"case-{index}.example.test")) == ["192.0.2.1"]
        text = server.metrics()
        assert metric_value(text, "blocker_upstream_queries_total",
                            {"upstream": upstream.endpoint, "result": "case_mismatch"}) == 1
        assert upstream.names()[-1] == "case-2.example.test"  # asked plainly after the first mismatch
    finally:
        server.stop()


def test_forged_answers_at_every_port_in_use_poison_nothing(tmp_path: Path, upstreams: list[FaultyUpstream]) -> None:
    """The strongest spoofer: it sees each port blocker asks from and sweeps all 65,536 IDs."""
    upstream = faulty(upstreams, "slow", delay=2.0)  # the port stays open 2 s: time to find and spray it
    server = Blocker(with_timeout(standard_config(tmp_path, [upstream.endpoint]), 4)).start()
    try:
        name = f"victim-{random.randrange(10**6)}.example.test"
        first: list[dns.message.Message] = []
        asker = threading.Thread(target=lambda: first.append(server.query(name, timeout=8)))
        asker.start()
        end = time.monotonic() + 3
        while upstream.count() == 0 and time.monotonic() < end:
            time.sleep(0.005)
        sent = spray(("127.0.0.1", upstream.port), "127.0.0.1", name, FORGED, 65536, 3.0, "live")
        asker.join(9)
        unwanted = metric_value(server.metrics(), "blocker_upstream_unwanted_replies_total")
        assert first and addresses(first[0]) == ["192.0.2.1"], (first, sent)
        assert addresses(server.query(name)) == ["192.0.2.1"]
        assert sent["ports_known"] >= 1 and unwanted > 0, (sent, unwanted)  # the forgeries did reach the port
        # Forged replies in the wrong case must not talk blocker out of 0x20 for this upstream.
        assert metric_value(server.metrics(), "blocker_upstream_queries_total", {"result": "case_mismatch"}) == 0
    finally:
        server.stop()


def test_a_black_holed_first_upstream_is_skipped_then_probed_back(
        tmp_path: Path, upstreams: list[FaultyUpstream]) -> None:
    hole = faulty(upstreams, "blackhole")
    healthy = faulty(upstreams, "ok", address="192.0.2.9")
    server = Blocker(standard_config(tmp_path, [hole.endpoint, healthy.endpoint])).start()
    try:
        for index in range(30):
            assert addresses(server.query(f"miss-{index}.example.test")) == ["192.0.2.9"]
        assert hole.count() <= 4  # the first miss or two, and background probes
        assert "is not answering" in "\n".join(server.lines)
        hole.set_mode("ok")
        end = time.monotonic() + 15
        while time.monotonic() < end and not any("answers again" in line for line in server.lines):
            time.sleep(0.1)
        server.wait_for_log("answers again", timeout=1)
    finally:
        server.stop()


def test_expired_answers_are_served_stale_when_every_upstream_fails(
        tmp_path: Path, upstreams: list[FaultyUpstream]) -> None:
    upstream = faulty(upstreams, "ok", ttl=1)
    server = Blocker(standard_config(tmp_path, [upstream.endpoint])).start()
    try:
        assert addresses(server.query("stale.example.test", use_edns=0)) == ["192.0.2.1"]
        upstream.set_mode("servfail")
        end = time.monotonic() + 5
        response = server.query("stale.example.test", use_edns=0)
        while not edes(response) and time.monotonic() < end:
            time.sleep(0.2)
            response = server.query("stale.example.test", use_edns=0)
        assert rcode_text(response) == "NOERROR" and addresses(response) == ["192.0.2.1"]
        assert response.answer[0].ttl == 30
        assert [code for code, _ in edes(response)] == [3]
        upstream.set_mode("blackhole")
        again = server.query("stale.example.test", use_edns=0)
        assert addresses(again) == ["192.0.2.1"] and [code for code, _ in edes(again)] == [3]
        assert rcode_text(server.query("never-seen.example.test")) == "SERVFAIL"
        assert metric_value(server.metrics(), "blocker_dns_stale_answers_total") == 2
    finally:
        server.stop()


def test_rate_limit_refuses_one_noisy_client_only(knot: Knot, tmp_path: Path) -> None:
    config = standard_config(tmp_path, [knot.endpoint], extra_dns="""\
        rate_limit: {qps: 5, burst: 10, action: refused}
        trusted_forwarders: ["127.0.0.9/32"]
        """)
    server = Blocker(config).start()
    try:
        noisy = [rcode_text(server.query("www.tiktok.com", source="127.0.0.5", use_edns=0)) for _ in range(30)]
        assert noisy.count("REFUSED") >= 15 and noisy[:10] == ["NXDOMAIN"] * 10
        refused = server.query("www.tiktok.com", source="127.0.0.5", use_edns=0)
        assert rcode_text(refused) == "REFUSED" and "rate" in edes(refused)[0][1]
        assert rcode_text(server.query("www.tiktok.com", source="127.0.0.6")) == "NXDOMAIN"
        trusted = [rcode_text(server.query("www.tiktok.com", source="127.0.0.9")) for _ in range(30)]
        assert trusted == ["NXDOMAIN"] * 30
        assert metric_value(server.metrics(), "blocker_dns_rate_limited_total", {"action": "refused"}) >= 16
    finally:
        server.stop()


def test_rate_limit_can_drop(knot: Knot, tmp_path: Path) -> None:
    config = standard_config(tmp_path, [knot.endpoint], extra_dns="rate_limit: {qps: 1, burst: 2, action: drop}")
    server = Blocker(config).start()
    try:
        assert rcode_text(server.query("www.tiktok.com", source="127.0.0.5")) == "NXDOMAIN"
        assert rcode_text(server.query("www.tiktok.com", source="127.0.0.5")) == "NXDOMAIN"
        with pytest.raises(dns.exception.Timeout):
            server.query("www.tiktok.com", source="127.0.0.5", timeout=0.3)
    finally:
        server.stop()


def test_one_client_cannot_hold_every_upstream_slot(tmp_path: Path, upstreams: list[FaultyUpstream]) -> None:
    upstream = faulty(upstreams, "ok", blackhole_zone="never.test")
    config = with_timeout(standard_config(tmp_path, [upstream.endpoint], extra_dns="max_outstanding_per_client: 5"), 2)
    server = Blocker(config).start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.7", 0))
            for index in range(20):
                sock.sendto(dns.message.make_query(f"r{index}.never.test", "A").to_wire(), ("127.0.0.1", server.port))
            rcodes = []
            sock.settimeout(1.0)
            for _ in range(15):
                rcodes.append(dns.message.from_wire(sock.recv(4096)).rcode())
        assert rcodes == [dns.rcode.SERVFAIL] * 15  # the 15 beyond the cap, at once
        assert addresses(server.query("other.example.test", source="127.0.0.8")) == ["192.0.2.1"]
    finally:
        server.stop()



def test_when_the_upstream_slots_are_full_the_oldest_wait_gives_way(upstreams: list[FaultyUpstream]) -> None:
    """In-process Upstreams against the real black hole: a third query with two slots ends the
    oldest wait (older than 0.2 s) instead of being refused."""
    hole = faulty(upstreams, "blackhole")

    async def run() -> tuple[bool, bool, bytes | None, float]:
        stats = Stats()
        pool = Upstreams([("127.0.0.1", hole.port)], 2.0, stats, max_forwards=2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(pool.forward(read_question(dns.message.make_query("a.test", "A").to_wire())))
        second = asyncio.ensure_future(pool.forward(read_question(dns.message.make_query("b.test", "A").to_wire())))
        await asyncio.sleep(0.05)
        busy_young = pool.busy  # both waits are younger than 0.2 s: nothing gives way
        await asyncio.sleep(0.25)
        busy_old = pool.busy  # now the oldest gives way
        wire = await asyncio.wait_for(first, 1.0)
        waited = loop.time() - started
        second.cancel()
        pool.close()
        return busy_young, busy_old, wire, waited

    busy_young, busy_old, wire, waited = asyncio.run(run())
    assert busy_young and not busy_old
    assert wire is None and waited < 1.0  # answered (SERVFAIL) long before the 2 s timeout
