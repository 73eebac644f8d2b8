"""Forwarding in-process against real servers on loopback: failover, matching answers to queries,
TC → TCP, and what a lying responder cannot make us accept."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

import dns.message
import dns.rcode
import dns.rrset
from helpers import BlackHole, Knot

from blocker.message import read_question
from blocker.metrics import Stats
from blocker.upstream import Upstreams


def question(name: str, rdtype: str = "A") -> bytes:
    return dns.message.make_query(name, rdtype).to_wire()


def resolve(endpoints: list[tuple[str, int]], name: str, rdtype: str = "A",
            timeout: float = 0.5) -> tuple[dns.message.Message | None, Stats]:
    stats = Stats()

    async def main() -> bytes | None:
        upstreams = Upstreams(endpoints, timeout, stats)
        try:
            return await upstreams.resolve(read_question(question(name, rdtype)))
        finally:
            upstreams.close()

    wire = asyncio.run(main())
    return (dns.message.from_wire(wire) if wire is not None else None), stats


def endpoint(server: Knot | BlackHole) -> tuple[str, int]:
    return ("127.0.0.1", server.port)


class Responder:
    """A UDP server that answers each query with the datagrams `reply` makes from it."""

    def __init__(self, reply: Callable[[dns.message.Message], list[bytes]]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            for datagram in self.reply(dns.message.from_wire(data)):
                self.sock.sendto(datagram, peer)

    def close(self) -> None:
        self.sock.close()


def answer_for(query: dns.message.Message, address: str, qid: int | None = None,
               name: str | None = None) -> bytes:
    asked = query if name is None else dns.message.make_query(name, "A")
    response = dns.message.make_response(asked)
    response.id = query.id if qid is None else qid
    response.answer.append(dns.rrset.from_text(asked.question[0].name, 60, "IN", "A", address))
    return response.to_wire()


def test_a_dead_first_upstream_fails_over_to_the_second(knot: Knot) -> None:
    hole = BlackHole()
    try:
        response, stats = resolve([endpoint(hole), endpoint(knot)], "www.example.test", timeout=1.0)
    finally:
        hole.close()
    assert response is not None and [str(r) for r in response.answer[0]] == ["192.0.2.1"]
    assert stats.upstream_results[(f"127.0.0.1:{hole.port}", "timeout")] == 1
    assert stats.upstream_results[(f"127.0.0.1:{knot.port}", "ok")] == 1


def test_refused_fails_over_and_the_last_refusal_is_kept_when_nobody_answers(knot: Knot, refusing_knot: Knot) -> None:
    response, _ = resolve([endpoint(refusing_knot), endpoint(knot)], "www.example.test")
    assert response is not None and response.rcode() == dns.rcode.NOERROR
    alone, stats = resolve([endpoint(refusing_knot)], "www.example.test")
    assert alone is not None and alone.rcode() == dns.rcode.REFUSED
    assert stats.upstream_results[(f"127.0.0.1:{refusing_knot.port}", "refused")] == 1


def test_nothing_listening_is_an_error_at_once_not_a_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    response, stats = resolve([("127.0.0.1", port)], "www.example.test", timeout=5)
    assert response is None
    assert stats.upstream_results[(f"127.0.0.1:{port}", "error")] == 1


def test_a_truncated_answer_is_asked_again_over_tcp(knot: Knot) -> None:
    response, stats = resolve([endpoint(knot)], "big.example.test", "TXT")
    assert response is not None and len(response.answer[0]) == 20
    name = f"127.0.0.1:{knot.port}"
    assert stats.upstream_results[(name, "truncated")] == 1 and stats.upstream_results[(name, "ok")] == 1


def test_answers_with_a_wrong_id_or_question_are_ignored() -> None:
    def lies_first(query: dns.message.Message) -> list[bytes]:
        return [answer_for(query, "198.51.100.1", qid=(query.id + 1) % 65536),  # wrong ID
                answer_for(query, "198.51.100.2", name="other.example.test"),  # wrong question
                answer_for(query, "192.0.2.1")]

    responder = Responder(lies_first)
    try:
        response, _ = resolve([("127.0.0.1", responder.port)], "www.example.test")
    finally:
        responder.close()
    assert response is not None and [str(r) for r in response.answer[0]] == ["192.0.2.1"]


def test_a_servfail_fails_over_and_is_returned_when_it_is_all_there_is(knot: Knot) -> None:
    response, stats = resolve([endpoint(knot)], "www.broken.test")
    assert response is not None and response.rcode() == dns.rcode.SERVFAIL
    assert stats.upstream_results[(f"127.0.0.1:{knot.port}", "servfail")] == 1
