"""The small items of issue 10: NOTIFY without a question, CHAOS identity queries answered here,
and an ops endpoint that idle connections cannot hold. Real `blocker serve` and real sockets."""

from __future__ import annotations

import socket
import struct
import time
import urllib.request

import dns.message
import dns.opcode
import dns.query
import dns.rdataclass
import pytest
from helpers import Blocker, edes, rcode_text

from blocker.httpd import OpsServer
from blocker.metrics import Gauges, Stats, make_registry


def test_notify_without_a_question_gets_notimp(blocker: Blocker) -> None:
    # ID 0x4242, opcode NOTIFY (4), AA, no question: what a primary sends for a zone change.
    packet = struct.pack("!HHHHHH", 0x4242, (4 << 11) | 0x0400, 0, 0, 0, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(packet, ("127.0.0.1", blocker.port))
        reply = sock.recv(512)
    assert reply[:2] == b"\x42\x42"
    flags = struct.unpack("!H", reply[2:4])[0]
    assert flags & 0x8000 and (flags >> 11) & 0xF == 4 and flags & 0xF == 4  # QR, NOTIFY echoed, NOTIMP
    # A QUERY without a question is still malformed.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(struct.pack("!HHHHHH", 0x4343, 0x0100, 0, 0, 0, 0), ("127.0.0.1", blocker.port))
        assert struct.unpack("!H", sock.recv(512)[2:4])[0] & 0xF == 1  # FORMERR


@pytest.mark.parametrize("name", ["version.bind", "hostname.bind", "id.server", "version.server"])
def test_chaos_identity_queries_are_refused_here_not_forwarded(blocker: Blocker, name: str) -> None:
    for tcp in (False, True):
        query = dns.message.make_query(name, "TXT", rdclass=dns.rdataclass.CH, use_edns=0)
        send = dns.query.tcp if tcp else dns.query.udp
        response = send(query, "127.0.0.1", port=blocker.port, timeout=3)
        assert rcode_text(response) == "REFUSED" and not response.answer
        assert edes(response) == [(21, "only class IN is served")]
    assert rcode_text(blocker.query("www.example.test")) == "NOERROR"  # class IN still forwarded


def test_idle_connections_cannot_hold_the_metrics_endpoint(blocker: Blocker) -> None:
    idle = []
    try:
        for _ in range(200):  # more than the old accept queue of 5, each sending nothing
            idle.append(socket.create_connection(("127.0.0.1", blocker.metrics_port), timeout=3))
        started = time.monotonic()
        assert "blocker_dns_queries_total" in blocker.metrics()
        assert time.monotonic() - started < 2.0
    finally:
        for sock in idle:
            sock.close()


def test_ops_server_drops_a_connection_that_sends_nothing() -> None:
    server = OpsServer("127.0.0.1", 0, make_registry(Stats(), Gauges(lambda: (0, 0, 0, 0), lambda: None)),
                       lambda: True, timeout=0.5)
    server.start()
    try:
        host, port = server.address
        with socket.create_connection((host, port), timeout=5) as silent:
            silent.sendall(b"GET /metr")  # half a request line, then nothing
            started = time.monotonic()
            with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=3) as response:
                assert response.read() == b"ok\n"  # served beside the stuck one
            assert silent.recv(4096) == b""  # dropped at the timeout, not held forever
            assert 0.3 < time.monotonic() - started < 3.0
    finally:
        server.stop()
