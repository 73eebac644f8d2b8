"""The real `blocker serve` on loopback, forwarding to a real Knot DNS, queried with dnspython, dig and kdig."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest
from conftest import standard_config
from helpers import ROOT, BlackHole, Blocker, Knot, edes, metric_value, network_namespace, rcode_text, require_tool


def test_blocked_name_gets_nxdomain_with_ede_naming_the_category(blocker: Blocker) -> None:
    response = blocker.query("www.tiktok.com")
    assert rcode_text(response) == "NXDOMAIN"
    assert not response.answer
    [(code, text)] = edes(response)
    assert code == 15
    assert text.startswith("blocked: category=tiktok")
    # A synthetic SOA carries block_ttl (60 by default) so downstream caches keep the answer that long.
    [soa] = response.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == 60 and soa[0].minimum == 60


@pytest.mark.parametrize("rdtype", ["A", "AAAA", "MX", "TXT", "HTTPS", "SRV", "CNAME", "NS", "ANY", "TYPE65280"])
def test_every_query_type_is_blocked(blocker: Blocker, rdtype: str) -> None:
    response = blocker.query("api.twitter.com", rdtype)
    assert rcode_text(response) == "NXDOMAIN"
    assert edes(response)[0][1].startswith("blocked: category=twitter")


def test_allowed_name_is_forwarded_faithfully(blocker: Blocker, knot: Knot) -> None:
    via_blocker = blocker.query("www.example.test", "A", want_dnssec=True)
    direct = dns.query.udp(dns.message.make_query("www.example.test", "A", use_edns=0, want_dnssec=True),
                           "127.0.0.1", port=knot.port, timeout=3)
    assert rcode_text(via_blocker) == "NOERROR"
    assert [str(r) for r in via_blocker.answer[0]] == ["192.0.2.1"]
    assert via_blocker.answer[0].to_text().split()[2:] == direct.answer[0].to_text().split()[2:]
    # Knot is authoritative: its AA flag passes through, and the DO bit came back in the OPT.
    assert via_blocker.flags & dns.flags.AA
    assert via_blocker.ednsflags & dns.flags.DO
    mx = blocker.query("example.test", "MX")
    assert [r.to_text() for r in mx.answer[0]] == ["10 mail.example.test."]


def test_negative_answer_passes_through_with_soa(blocker: Blocker) -> None:
    response = blocker.query("missing.example.test")
    assert rcode_text(response) == "NXDOMAIN"
    assert response.authority[0].rdtype == dns.rdatatype.SOA
    nodata = blocker.query("mail.example.test", "AAAA")
    assert rcode_text(nodata) == "NOERROR" and not nodata.answer


def test_comms_team_device_reaches_tiktok_through_upstream(blocker: Blocker) -> None:
    response = blocker.query("www.tiktok.com", source="127.0.0.3")
    assert rcode_text(response) == "NOERROR"
    assert [str(r) for r in response.answer[0]] == ["203.0.113.7"]
    # ... while messaging stays closed for that group.
    assert rcode_text(blocker.query("web.whatsapp.com", source="127.0.0.3")) == "NXDOMAIN"


def test_cname_to_a_blocked_name_is_blocked_as_that_category(blocker: Blocker) -> None:
    response = blocker.query("cloaked.example.test")
    assert rcode_text(response) == "NXDOMAIN"
    assert edes(response)[0][1].startswith("blocked: category=tiktok")
    # From the cache as well (the second answer is a cache hit).
    assert rcode_text(blocker.query("cloaked.example.test")) == "NXDOMAIN"
    # The comms team may follow the same chain.
    allowed = blocker.query("cloaked.example.test", source="127.0.0.3")
    assert rcode_text(allowed) == "NOERROR"
    assert allowed.answer[0].rdtype == dns.rdatatype.CNAME
    chain = blocker.query("chain.example.test")
    assert rcode_text(chain) == "NOERROR"


@pytest.mark.parametrize("name", ["use-application-dns.net", "mask.icloud.com", "mask-h2.icloud.com"])
def test_bypass_canaries_get_nxdomain(blocker: Blocker, name: str) -> None:
    response = blocker.query(name)
    assert rcode_text(response) == "NXDOMAIN"
    assert "category=doh" in edes(response)[0][1]


def test_dig_and_kdig_decode_the_ede(blocker: Blocker) -> None:
    dig = subprocess.run([require_tool("dig"), "@127.0.0.1", "-p", str(blocker.port), "www.tiktok.com",
                          "+tries=1", "+time=3"], capture_output=True, text=True, check=True).stdout
    assert "status: NXDOMAIN" in dig
    assert "EDE: 15 (Blocked): (blocked: category=tiktok" in dig
    kdig = subprocess.run([require_tool("kdig"), "@127.0.0.1", "-p", str(blocker.port), "+edns",
                           "+retry=0", "+timeout=3", "www.tiktok.com"], capture_output=True, text=True,
                          check=True).stdout
    assert "status: NXDOMAIN" in kdig
    assert "EDE: 15 (Blocked): 'blocked: category=tiktok" in kdig


def test_large_answer_is_truncated_over_udp_and_complete_over_tcp(blocker: Blocker) -> None:
    # Knot truncates its UDP answer too: blocker must have fetched the whole RRset over TCP.
    full = blocker.query("big.example.test", "TXT", tcp=True)
    assert len(full.answer[0]) == 20
    small = blocker.query("big.example.test", "TXT", payload=1232)
    assert small.flags & dns.flags.TC
    assert str(small.question[0].name) == "big.example.test."  # RFC 6891 §7: question kept
    assert small.edns == 0  # ... and OPT kept
    assert not small.answer
    no_edns = blocker.query("big.example.test", "TXT", use_edns=False)
    assert no_edns.flags & dns.flags.TC and no_edns.edns == -1
    # dig retries over TCP by itself and gets every record.
    out = subprocess.run([require_tool("dig"), "@127.0.0.1", "-p", str(blocker.port), "big.example.test", "TXT",
                          "+tries=1", "+time=3"], capture_output=True, text=True, check=True).stdout
    assert "Truncated, retrying in TCP mode" in out
    assert out.count("record-") == 20


def test_answer_without_edns_stays_within_512_bytes(blocker: Blocker) -> None:
    q = dns.message.make_query("www.example.test", "A", use_edns=False)
    raw = q.to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(raw, ("127.0.0.1", blocker.port))
        reply = sock.recv(65535)
    assert len(reply) <= 512
    assert dns.message.from_wire(reply).edns == -1  # no OPT for a client that sent none


def test_many_queries_on_one_tcp_connection_pipelined(blocker: Blocker) -> None:
    names = ["www.example.test", "www.tiktok.com", "mail.example.test", "missing.example.test", "x.com"] * 4
    with socket.create_connection(("127.0.0.1", blocker.port), timeout=5) as sock:
        queries = {}
        payload = b""
        for i, name in enumerate(names):
            q = dns.message.make_query(name, "A", use_edns=0)
            q.id = 1000 + i
            queries[q.id] = name
            wire = q.to_wire()
            payload += struct.pack("!H", len(wire)) + wire
        sock.sendall(payload)  # all at once: RFC 7766 pipelining
        answers = {}
        stream = sock.makefile("rb")
        for _ in names:
            length = struct.unpack("!H", stream.read(2))[0]
            response = dns.message.from_wire(stream.read(length))
            answers[response.id] = rcode_text(response)
    assert set(answers) == set(queries)
    for query_id, name in queries.items():
        expected = "NXDOMAIN" if name in ("www.tiktok.com", "x.com", "missing.example.test") else "NOERROR"
        assert answers[query_id] == expected, name


def test_idle_tcp_connection_is_closed(knot: Knot, tmp_path: Path) -> None:
    server = Blocker(standard_config(tmp_path, [knot.endpoint], extra_dns="tcp_idle_timeout: 1.0")).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(b"\x00")  # half a length prefix, then nothing
            started = time.monotonic()
            assert sock.recv(10) == b""  # closed by the server, well before the client's 20 s
            assert time.monotonic() - started > 0.9
    finally:
        server.stop()


def test_garbage_packets_never_stop_the_server(blocker: Blocker) -> None:
    rng = random.Random(7)
    valid = dns.message.make_query("www.example.test", "A", use_edns=0).to_wire()
    before = metric_value(blocker.metrics(), "blocker_dns_malformed_packets_total", {"transport": "udp"})
    formerr = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        for i in range(600):
            if i % 3 == 0:
                packet = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
            else:
                mutated = bytearray(valid)
                for _ in range(rng.randrange(1, 6)):
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
                packet = bytes(mutated[: rng.randrange(1, len(mutated) + 1)])
            sock.sendto(packet, ("127.0.0.1", blocker.port))
        sock.settimeout(0.2)
        try:
            while True:
                reply = sock.recv(65535)
                if len(reply) >= 4 and reply[3] & 0xF == 1:
                    formerr += 1
        except TimeoutError:
            pass
    assert formerr > 0
    after = metric_value(blocker.metrics(), "blocker_dns_malformed_packets_total", {"transport": "udp"})
    assert after - before > 50
    # Still serving, and promptly (within the client's 1 s timeout).
    assert rcode_text(blocker.query("www.example.test", timeout=1.0)) == "NOERROR"
    assert rcode_text(blocker.query("www.tiktok.com", timeout=1.0)) == "NXDOMAIN"
    assert blocker.process is not None and blocker.process.poll() is None


def test_garbage_over_tcp_gets_formerr_and_connection_survives(blocker: Blocker) -> None:
    with socket.create_connection(("127.0.0.1", blocker.port), timeout=5) as sock:
        junk = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff"
        sock.sendall(struct.pack("!H", len(junk)) + junk)
        length = struct.unpack("!H", sock.recv(2))[0]
        reply = sock.recv(length)
        assert reply[:2] == b"\x12\x34" and reply[3] & 0xF == 1
        q = dns.message.make_query("www.example.test", "A").to_wire()
        sock.sendall(struct.pack("!H", len(q)) + q)
        length = struct.unpack("!H", sock.recv(2))[0]
        assert rcode_text(dns.message.from_wire(sock.recv(length))) == "NOERROR"


def test_unsupported_opcode_gets_notimp(blocker: Blocker) -> None:
    q = dns.message.make_query("www.example.test", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    response = dns.query.udp(q, "127.0.0.1", port=blocker.port, timeout=3)
    assert rcode_text(response) == "NOTIMP"


def test_ipv6_listener(knot: Knot, tmp_path: Path) -> None:
    config = standard_config(tmp_path, [knot.endpoint])
    config.write_text(config.read_text().replace('listen: ["127.0.0.1:0"]', 'listen: ["127.0.0.1:0", "[::1]:0"]'))
    server = Blocker(config).start()
    try:
        [v6] = [e for e in server.dns_endpoints if ":" in e[0]]
        response = dns.query.udp(dns.message.make_query("www.tiktok.com", "A"), "::1", port=v6[1], timeout=3)
        assert rcode_text(response) == "NXDOMAIN"
        response = dns.query.tcp(dns.message.make_query("www.example.test", "A"), "::1", port=v6[1], timeout=3)
        assert rcode_text(response) == "NOERROR"
    finally:
        server.stop()


@pytest.mark.parametrize(("setting", "qtype", "rcode", "answer"), [
    ("refused", "A", "REFUSED", None),
    ("null", "A", "NOERROR", "0.0.0.0"),
    ("null", "AAAA", "NOERROR", "::"),
    ("null", "MX", "NOERROR", None),
    ('"ip:192.0.2.10,2001:db8::10"', "A", "NOERROR", "192.0.2.10"),
    ('"ip:192.0.2.10,2001:db8::10"', "AAAA", "NOERROR", "2001:db8::10"),
    ('"ip:192.0.2.10"', "AAAA", "NOERROR", None),
])
def test_block_response_kinds(knot: Knot, tmp_path: Path, setting: str, qtype: str, rcode: str,
                              answer: str | None) -> None:
    config = standard_config(tmp_path, [knot.endpoint], extra_dns=f"block_response: {setting}\nblock_ttl: 17")
    server = Blocker(config).start()
    try:
        response = server.query("www.instagram.com", qtype)
        assert rcode_text(response) == rcode
        assert edes(response)[0][1].startswith("blocked: category=instagram")
        if answer is None:
            assert not response.answer
        else:
            [rrset] = response.answer
            assert [str(r) for r in rrset] == [answer] and rrset.ttl == 17
        # The canaries stay NXDOMAIN whatever block_response says.
        assert rcode_text(server.query("use-application-dns.net", qtype)) == "NXDOMAIN"
    finally:
        server.stop()


def test_sources_outside_allow_networks_are_refused(knot: Knot, tmp_path: Path) -> None:
    config = standard_config(tmp_path, [knot.endpoint], extra_dns='allow_networks: ["127.0.0.2/32"]')
    server = Blocker(config).start()
    try:
        refused = server.query("www.example.test", source="127.0.0.1")
        assert rcode_text(refused) == "REFUSED"
        assert edes(refused)[0][0] == 18  # Prohibited
        assert rcode_text(server.query("www.example.test", source="127.0.0.2")) == "NOERROR"
        text = server.metrics()
        assert metric_value(text, "blocker_dns_queries_total", {"transport": "udp", "action": "refused"}) == 1
    finally:
        server.stop()


def test_failover_past_a_dead_and_a_refusing_upstream(knot: Knot, refusing_knot: Knot, tmp_path: Path) -> None:
    hole = BlackHole()
    config = standard_config(tmp_path, [hole.endpoint, refusing_knot.endpoint, knot.endpoint])
    server = Blocker(config).start()
    try:
        started = time.monotonic()
        response = server.query("www.example.test", timeout=5)
        elapsed = time.monotonic() - started
        assert rcode_text(response) == "NOERROR"
        assert [str(r) for r in response.answer[0]] == ["192.0.2.1"]
        assert elapsed > 0.4  # one upstream_timeout (0.5 s) lost on the black hole
        assert hole.received >= 1
        text = server.metrics()
        assert metric_value(text, "blocker_upstream_queries_total",
                            {"upstream": hole.endpoint, "result": "timeout"}) == 1
        assert metric_value(text, "blocker_upstream_queries_total",
                            {"upstream": refusing_knot.endpoint, "result": "refused"}) == 1
        assert metric_value(text, "blocker_upstream_queries_total", {"upstream": knot.endpoint, "result": "ok"}) == 1
    finally:
        server.stop()
        hole.close()


def test_upstream_down_gives_servfail_within_timeout_and_blocks_still_answer(tmp_path: Path) -> None:
    hole = BlackHole()
    config = standard_config(tmp_path, [hole.endpoint], upstream_timeout=2.0)
    server = Blocker(config).start()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(server.query, "www.example.test", timeout=5)  # 2 s on the black hole
            # A blocked name is answered while the allowed one still waits on the dead upstream.
            assert rcode_text(server.query("www.tiktok.com")) == "NXDOMAIN"
            assert not waiting.done()
            response = waiting.result()
        assert rcode_text(response) == "SERVFAIL"  # within the 5 s the client waits: one upstream_timeout
        assert edes(response)[0][0] == 22  # No Reachable Authority
    finally:
        server.stop()
        hole.close()


def test_upstream_servfail_is_passed_on_and_counted_as_an_error(knot: Knot, tmp_path: Path) -> None:
    server = Blocker(standard_config(tmp_path, [knot.endpoint])).start()
    try:
        for _ in range(3):  # the first from upstream, then from the cache (SERVFAIL is kept 2 s)
            assert rcode_text(server.query("www.broken.test")) == "SERVFAIL"
        text = server.metrics()
        assert metric_value(text, "blocker_dns_queries_total", {"transport": "udp", "action": "error"}) == 3
        assert metric_value(text, "blocker_dns_queries_total", {"transport": "udp", "action": "allowed"}) == 0
        assert metric_value(text, "blocker_upstream_queries_total",
                            {"upstream": knot.endpoint, "result": "servfail"}) == 1
    finally:
        server.stop()


def test_sighup_reloads_and_a_broken_config_keeps_the_old_policy(knot: Knot, tmp_path: Path) -> None:
    config = standard_config(tmp_path, [knot.endpoint])
    original = config.read_text()
    server = Blocker(config).start()
    try:
        assert rcode_text(server.query("www.example.test")) == "NOERROR"
        # Add a category blocking example.test, by a new list and a group that blocks it.
        lists = tmp_path / "lists"
        lists.mkdir()
        for path in (Path(__file__).parent.parent / "blocklists").glob("*.yaml"):
            (lists / path.name).write_text(path.read_text())
        (lists / "testing.yaml").write_text("name: testing\ndomains:\n  - example.test\n")
        config.write_text(original.replace(str(Path(__file__).parent.parent / "blocklists"), str(lists))
                          + "policy:\n  groups:\n    standard: {block: [tiktok, testing]}\n")
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for_log(r"reloaded \(SIGHUP\) policy=", after=mark)
        response = server.query("www.example.test")
        assert rcode_text(response) == "NXDOMAIN"
        assert "category=testing" in edes(response)[0][1]
        # A broken edit: rejected with FILE:LINE, the last good policy keeps serving.
        good = config.read_text()
        config.write_text(good + "  typo_key: 1\n")
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        line = server.wait_for_log(r"reload \(SIGHUP\) rejected", after=mark)
        assert f"{config}:" in line and "unknown key 'typo_key'" in line
        assert rcode_text(server.query("www.example.test")) == "NXDOMAIN"
        text = server.metrics()
        assert metric_value(text, "blocker_config_reloads_total", {"result": "failure"}) >= 1
    finally:
        assert server.stop() == 0


def test_sigterm_stops_cleanly(knot: Knot, tmp_path: Path) -> None:
    server = Blocker(standard_config(tmp_path, [knot.endpoint])).start()
    assert server.query("www.example.test") is not None
    assert server.stop() == 0
    server.wait_for_log(r" stopped$")


def test_broken_config_refuses_to_start_with_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("dns:\n  listen: [\"127.0.0.1:0\"]\n  block_tll: 60\n")
    server = Blocker(config).start(expect_ready=False)
    assert server.process is not None
    assert server.process.wait(15) == 2
    server.wait_for_log(rf"{config}:3: dns: unknown key 'block_tll'")


def test_embedded_defaults_block_on_port_8053() -> None:
    """The README's first command: `blocker serve` with no config, queried with dig. It runs in a
    network namespace of its own, so a blocker the user started from the Quick start (or anything
    else on 8053) cannot collide with it, and its resolv.conf upstreams are out of reach."""
    with network_namespace("bdef") as inside:
        server = Blocker(None, env={"PYTHONPATH": os.getcwd()}, prefix=inside).start()
        try:
            assert server.port == 8053 and server.metrics_port == 9153
            assert any(" loop=uvloop " in line for line in server.lines), server.lines
            # Only blocked names: they are answered locally and never reach an upstream.
            out = subprocess.run([*inside, require_tool("dig"), "@127.0.0.1", "-p", "8053", "www.tiktok.com",
                                  "+tries=1", "+time=3"], capture_output=True, text=True, check=True).stdout
            assert "status: NXDOMAIN" in out and "blocked: category=tiktok" in out
        finally:
            assert server.stop() == 0


def test_a_taken_port_fails_the_start_with_its_reason(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        config = tmp_path / "blocker.yaml"
        config.write_text(f"dns:\n  listen: [\"127.0.0.1:{port}\"]\n  upstreams: [\"127.0.0.1:9\"]\n"
                          f"metrics:\n  listen: null\nblocklists: \"{ROOT / 'blocklists'}\"\n")
        server = Blocker(config).start(expect_ready=False)
        assert server.process is not None and server.process.wait(15) == 2
        server.wait_for_log(rf"cannot listen for DNS \(udp\+tcp\) on 127\.0\.0\.1:{port}: address already in use")
