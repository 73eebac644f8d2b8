"""A fault-injecting upstream: a small real DNS server (UDP and TCP, loopback) that misbehaves on purpose.

Run as `python tests/faulty_upstream.py --port N --mode MODE`; it prints `ready port=N` once both
sockets listen. Every name has an A record (`--address`, `--ttl`); other types get an empty answer.
Modes:

  ok              answers correctly
  blackhole       reads every query and never answers (UDP and TCP)
  slow            answers correctly after `--delay` seconds
  servfail        SERVFAIL
  refused         REFUSED
  malformed       a header promising one answer record followed by garbage
  echo            sends the query back unchanged (QR=0)
  wrong-id        a correct answer with the ID off by one
  wrong-question  a correct-looking answer for another name
  truncated       UDP: TC=1 and no records; TCP: the full answer
  lowercase       answers correctly but lower-cases the question (does not preserve 0x20 case)

`--blackhole-zone ZONE` makes names under ZONE go unanswered whatever the mode (a zone whose
servers never answer, behind an otherwise healthy resolver).

It is steered at run time with CHAOS-class TXT queries, answered in every mode:
`mode.MODE.faulty.control` switches the mode; `count.faulty.control` returns how many ordinary
queries it has received; `names.faulty.control` the last 20 question names exactly as received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import struct
import sys
from collections import deque

import dnslib

MODES = ("ok", "blackhole", "slow", "servfail", "refused", "malformed", "echo", "wrong-id",
         "wrong-question", "truncated", "lowercase")


class Behaviour:
    """The current mode and what the server has seen."""

    def __init__(self, mode: str, address: str, ttl: int, delay: float, blackhole_zone: str = "") -> None:
        self.mode = mode
        self.blackhole_zone = blackhole_zone.strip(".").lower()
        # The zone as wire labels: a query for it is dropped before any parsing (cheap under load).
        self.zone_wire = b"".join(bytes((len(label),)) + label.encode() for label in self.blackhole_zone.split(".")) \
            + b"\x00" if self.blackhole_zone else b""
        self.address = address
        self.ttl = ttl
        self.delay = delay
        self.count = 0
        self.names: deque[str] = deque(maxlen=20)

    def control(self, request: dnslib.DNSRecord) -> bytes | None:
        """The answer to a control query, or None when it is an ordinary query."""
        q = request.q
        name = str(q.qname).rstrip(".").lower()
        if q.qclass != dnslib.CLASS.CH or not name.endswith("faulty.control"):
            return None
        labels = name.split(".")
        if labels[0] == "mode" and len(labels) == 4 and labels[1] in MODES:
            self.mode = labels[1]
            text = "ok"
        elif labels[0] == "count":
            text = str(self.count)
        elif labels[0] == "names":
            text = " ".join(self.names)
        else:
            text = "unknown control"
        reply = request.reply()
        reply.add_answer(dnslib.RR(q.qname, dnslib.QTYPE.TXT, dnslib.CLASS.CH, 0, dnslib.TXT(text)))
        return bytes(reply.pack())

    def good(self, request: dnslib.DNSRecord) -> dnslib.DNSRecord:
        reply = request.reply()
        reply.header.ra = 1
        if request.q.qtype == dnslib.QTYPE.A:
            reply.add_answer(dnslib.RR(request.q.qname, dnslib.QTYPE.A, rdata=dnslib.A(self.address), ttl=self.ttl))
        return reply

    async def answer(self, data: bytes, transport: str) -> bytes | None:
        """The (mis)answer to one query; None means stay silent."""
        try:
            request = dnslib.DNSRecord.parse(data)
        except dnslib.DNSError:
            return None
        control = self.control(request)
        if control is not None:
            return control
        self.count += 1
        # dnslib lower-cases nothing, but its labels round-trip case exactly: record the raw name.
        self.names.append(".".join(label.decode("latin-1") for label in request.q.qname.label))
        mode = self.mode
        qname = str(request.q.qname).rstrip(".").lower()
        zone = self.blackhole_zone
        if zone and (qname == zone or qname.endswith("." + zone)):
            return None
        if mode == "blackhole":
            return None
        if mode == "slow":
            await asyncio.sleep(self.delay)
            mode = "ok"
        if mode == "echo":
            return data
        if mode in ("servfail", "refused"):
            reply = request.reply()
            reply.header.rcode = dnslib.RCODE.SERVFAIL if mode == "servfail" else dnslib.RCODE.REFUSED
            return _with_question(bytes(reply.pack()), data)
        if mode == "malformed":
            header = data[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0)
            return header + data[12:12 + _question_length(data)] + b"\xc0\x0c\x00\x01\xff"
        if mode == "truncated" and transport == "udp":
            reply = request.reply()
            reply.header.tc = 1
            return _with_question(bytes(reply.pack()), data)
        wire = _with_question(bytes(self.good(request).pack()), data)
        if mode == "wrong-id":
            return struct.pack("!H", (struct.unpack_from("!H", wire)[0] + 1) & 0xFFFF) + wire[2:]
        if mode == "wrong-question":
            other = request.reply()
            other.q.qname = dnslib.DNSLabel("wrong-question.invalid")
            other.add_answer(dnslib.RR("wrong-question.invalid", dnslib.QTYPE.A, rdata=dnslib.A(self.address),
                                       ttl=self.ttl))
            return bytes(other.pack())
        if mode == "lowercase":
            qlen = _question_length(data)
            return wire[:12] + wire[12:12 + qlen].lower() + wire[12 + qlen:]
        return wire


def _question_length(data: bytes) -> int:
    pos = 12
    while data[pos]:
        pos += data[pos] + 1
    return pos + 5 - 12


def _with_question(wire: bytes, query: bytes) -> bytes:
    """`wire` with the query's question bytes exactly as sent (dnslib would compress or re-case nothing,
    but being explicit keeps the echo of 0x20 case independent of the library)."""
    qlen = _question_length(query)
    return wire[:12] + query[12:12 + qlen] + wire[12 + _question_length(wire):]


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        zone = self.behaviour.zone_wire
        if zone and zone in data[12:].lower():
            self.behaviour.count += 1
            return
        task = asyncio.ensure_future(self._reply(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        wire = await self.behaviour.answer(data, "udp")
        if wire is not None and self.transport is not None:
            self.transport.sendto(wire, addr)


async def _tcp(behaviour: Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            length = struct.unpack("!H", await reader.readexactly(2))[0]
            data = await reader.readexactly(length)
            wire = await behaviour.answer(data, "tcp")
            if wire is not None:
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, behaviour: Behaviour) -> None:
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(behaviour), local_addr=(host, port))
    server = await asyncio.start_server(lambda r, w: _tcp(behaviour, r, w), host, port)
    print(f"ready port={port}", flush=True)
    try:
        await server.serve_forever()
    finally:
        udp.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--address", default="192.0.2.1")
    parser.add_argument("--ttl", type=int, default=300)
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--blackhole-zone", default="")
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host != "::1":
        parser.error("loopback only")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, Behaviour(args.mode, args.address, args.ttl, args.delay,
                                                                args.blackhole_zone)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
