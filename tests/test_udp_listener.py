"""The UDP listener's two read paths, batched (recvmmsg/sendmmsg, datagrams.py) and datagram by
datagram, on real loopback sockets with the real Resolver on the embedded defaults: every query
is answered once, to the socket it came from, with its own ID and question, whatever the batch
holds (answers ready at once, answers that wait for an upstream, datagrams longer than the slot
each one gets, garbage)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import dns.edns
import dns.message
import dns.rcode
import pytest

from blocker import datagrams
from blocker.cache import AnswerCache
from blocker.clock import Clock
from blocker.config import embedded_defaults
from blocker.metrics import Stats
from blocker.policy import compile_policy
from blocker.recorder import Recorder
from blocker.resolver import Resolver
from blocker.server import UdpListener
from blocker.upstream import Upstreams

BATCHED = [False, pytest.param(True, marks=pytest.mark.skipif(not datagrams.available(),
                                                                reason="recvmmsg is Linux and CPython only"))]


def resolver() -> Resolver:
    stats = Stats()
    # No upstream at all: a name that must be forwarded is answered SERVFAIL, later, by a coroutine.
    return Resolver(compile_policy(embedded_defaults()), AnswerCache(10), Upstreams([], 0.2, stats),
                    Recorder(stats, Clock()))


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> Iterator[int]:
    if request.param == socket.AF_INET6 and not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 loopback")
    yield request.param


def bound(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def query(name: str, qid: int, pad: int = 0) -> bytes:
    options = [dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"\0" * pad)] if pad else []
    message = dns.message.make_query(name, "A", use_edns=0, options=options)
    message.id = qid
    return message.to_wire()


async def exchange(listener: UdpListener, clients: list[socket.socket], packets: list[tuple[int, bytes]],
                   expected: int) -> dict[int, list[dns.message.Message]]:
    """Send every packet (client index, bytes) before the listener reads any; collect `expected` answers."""
    loop = asyncio.get_running_loop()
    server = listener.sock.getsockname()
    for index, packet in packets:
        clients[index].sendto(packet, server)
    listener.start(loop)
    answers: dict[int, list[dns.message.Message]] = {i: [] for i in range(len(clients))}
    got = 0
    async with asyncio.timeout(5):
        while got < expected:
            await asyncio.sleep(0.01)
            for index, client in enumerate(clients):
                while True:
                    try:
                        data = client.recv(65535)
                    except BlockingIOError:
                        break
                    answers[index].append(dns.message.from_wire(data))
                    got += 1
    await asyncio.sleep(0.05)  # nothing more may come
    for client in clients:
        with pytest.raises(BlockingIOError):
            client.recv(65535)
    return answers


@pytest.mark.parametrize("batched", BATCHED)
def test_a_full_batch_of_mixed_queries_is_answered_each_to_its_own_client(batched: bool, family: int) -> None:
    listener = UdpListener(resolver(), set(), bound(family), batched=batched)
    clients = [bound(family) for _ in range(3)]
    packets = []
    # More than a batch; a forwarded name (answered later, by a coroutine) among blocked ones, a
    # datagram longer than datagrams.HEAD, and garbage, which gets no answer.
    for qid in range(1, datagrams.BATCH + 11):
        if qid % 7 == 0:
            packets.append((qid % 3, query(f"n{qid}.allowed.example", qid)))
        elif qid % 11 == 0:
            packets.append((qid % 3, query(f"www{qid}.tiktok.com", qid, pad=datagrams.HEAD + 300)))
        else:
            packets.append((qid % 3, query(f"www{qid}.tiktok.com", qid)))
    packets.insert(5, (1, b"\x01"))
    try:
        answers = asyncio.run(exchange(listener, clients, packets, len(packets) - 1))
    finally:
        listener.close()
        for client in clients:
            client.close()
    for index, replies in answers.items():
        sent = {qid for qid in range(1, datagrams.BATCH + 11) if qid % 3 == index}
        assert sorted(reply.id for reply in replies) == sorted(sent)
        for reply in replies:
            if reply.id % 7 == 0:
                assert reply.rcode() == dns.rcode.SERVFAIL
                assert str(reply.question[0].name) == f"n{reply.id}.allowed.example."
            else:
                assert reply.rcode() == dns.rcode.NXDOMAIN
                assert str(reply.question[0].name) == f"www{reply.id}.tiktok.com."


@pytest.mark.parametrize("batched", BATCHED)
def test_the_same_query_again_is_answered_from_the_memo_under_its_new_id(batched: bool) -> None:
    listener = UdpListener(resolver(), set(), bound(socket.AF_INET), batched=batched)
    clients = [bound(socket.AF_INET)]
    packets = [(0, query("www.tiktok.com", qid)) for qid in range(1, 21)]
    try:
        answers = asyncio.run(exchange(listener, clients, packets, len(packets)))
    finally:
        listener.close()
        clients[0].close()
    assert sorted(reply.id for reply in answers[0]) == list(range(1, 21))
    assert len(listener.resolver.memo.replies) == 1
    assert sum(cell[0] for cell in listener.resolver.stats.queries.values()) == 20  # each counted once


def test_batched_reads_are_the_default_where_available() -> None:
    sock = bound(socket.AF_INET)
    try:
        listener = UdpListener(resolver(), set(), sock)
        assert (listener._batch is not None) == datagrams.available()
    finally:
        sock.close()
