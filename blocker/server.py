"""The listeners: UDP (a non-blocking socket drained at each wake-up) and asyncio TCP on every listen
address, feeding packets to the Resolver.

TCP follows RFC 7766: many queries per connection, answered as they complete (pipelining), an
idle timeout, and a cap on open connections.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Coroutine
from typing import Any

from blocker.resolver import Resolver

log = logging.getLogger("blocker")

TCP_IDLE_TIMEOUT = 10.0
TCP_MAX_CONNECTIONS = 1000
TCP_MAX_PIPELINE = 100  # queries one connection may have outstanding at once
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
UDP_MAX = 65535
UDP_BATCH = 64  # datagrams read per wake-up before the loop runs anything else
UDP_PENDING_MAX = 10_000  # answers waiting for a full send buffer; beyond, dropped as UDP would


class UdpListener:
    """Answers the queries on one UDP socket, reading every datagram waiting at each wake-up.

    A plain non-blocking socket read in a loop, not asyncio's DatagramProtocol: the stock loop's
    datagram transport reads one datagram per select() (about five times the CPU per query), and
    even uvloop's costs more per datagram than a recvfrom loop (bench/). Answers that cannot be
    sent at once (a full send buffer) wait in a bounded queue for the socket to be writable.
    """

    def __init__(self, resolver: Resolver, tasks: set[asyncio.Task[Any]], sock: socket.socket) -> None:
        self.resolver = resolver
        self.tasks = tasks
        self.sock = sock
        self._buffer = bytearray(UDP_MAX)
        self._pending: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        receive = self.sock.recvfrom_into
        buffer = self._buffer
        view = memoryview(buffer)
        handle = self.resolver.handle
        # Bounded, so TCP clients and timers get their turn under a flood.
        for _ in range(UDP_BATCH):
            try:
                size, addr = receive(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. an ICMP error for an answer sent earlier: nothing to do
            result = handle(bytes(view[:size]), addr[0], "udp")
            if result is None:
                continue
            if isinstance(result, bytes):
                self.send(result, addr)
                continue
            task = asyncio.ensure_future(self._finish(result, addr))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def send(self, reply: bytes, addr: Any) -> None:
        if self._pending:
            self._queue(reply, addr)
            return
        try:
            self.sock.sendto(reply, addr)
        except (BlockingIOError, InterruptedError):
            self._queue(reply, addr)
        except OSError:
            pass  # the client's address is unreachable now: UDP drops it, so do we

    def _queue(self, reply: bytes, addr: Any) -> None:
        if len(self._pending) >= UDP_PENDING_MAX or self.closed or self._loop is None:
            return
        if not self._pending:
            self._loop.add_writer(self.sock.fileno(), self._writable)
        self._pending.append((reply, addr))

    def _writable(self) -> None:
        pending = self._pending
        while pending:
            reply, addr = pending[0]
            try:
                self.sock.sendto(reply, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass
            pending.popleft()
        assert self._loop is not None
        self._loop.remove_writer(self.sock.fileno())

    async def _finish(self, pending: Coroutine[Any, Any, bytes | None], addr: tuple[Any, ...]) -> None:
        reply = await pending  # the resolver's coroutine answers SERVFAIL itself rather than raise
        if reply is not None and not self.closed:
            self.send(reply, addr)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            if self._pending:
                self._loop.remove_writer(self.sock.fileno())
        self._pending.clear()
        self.sock.close()


class TcpListener:
    """Serves DNS over TCP connections on one server socket."""

    def __init__(self, resolver: Resolver, tasks: set[asyncio.Task[Any]]) -> None:
        self.resolver = resolver
        self.tasks = tasks
        self.connections: set[asyncio.StreamWriter] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats = self.resolver.stats
        if len(self.connections) >= TCP_MAX_CONNECTIONS:
            writer.close()
            return
        self.connections.add(writer)
        stats.tcp_connections += 1
        peer = writer.get_extra_info("peername") or ("", 0)
        outstanding: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    prefix = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                    length = struct.unpack("!H", prefix)[0]
                    data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    break
                result = self.resolver.handle(data, peer[0], "tcp")
                if result is None:
                    continue
                if isinstance(result, bytes):
                    writer.write(struct.pack("!H", len(result)) + result)
                    await writer.drain()
                    continue
                task = asyncio.ensure_future(self._finish(result, writer))
                outstanding.add(task)
                task.add_done_callback(outstanding.discard)
                if len(outstanding) >= TCP_MAX_PIPELINE:
                    await asyncio.wait(outstanding, return_when=asyncio.FIRST_COMPLETED)
            if outstanding:
                await asyncio.wait(outstanding, timeout=TCP_IDLE_TIMEOUT)
        except (ConnectionError, OSError):
            pass
        finally:
            for task in outstanding:
                task.cancel()
            self.connections.discard(writer)
            stats.tcp_connections -= 1
            writer.close()

    async def _finish(self, pending: Coroutine[Any, Any, bytes | None], writer: asyncio.StreamWriter) -> None:
        reply = await pending
        if reply is not None and not writer.is_closing():
            writer.write(struct.pack("!H", len(reply)) + reply)
            with contextlib.suppress(ConnectionError):
                await writer.drain()


class Listeners:
    """Every UDP and TCP socket the resolver listens on."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.tasks: set[asyncio.Task[Any]] = set()
        self.udp: list[UdpListener] = []
        self.tcp: list[asyncio.Server] = []
        self.tcp_listener = TcpListener(resolver, self.tasks)
        self.bound: list[tuple[str, int]] = []

    async def bind(self, host: str, port: int) -> tuple[str, int]:
        """UDP and TCP on one address; port 0 picks a free port shared by both."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        attempts = 20 if port == 0 else 1
        for attempt in range(attempts):
            udp = UdpListener(self.resolver, self.tasks, await _udp_socket(loop, host, port, family))
            actual = udp.sock.getsockname()[1]
            try:
                server = await asyncio.start_server(self.tcp_listener.serve, host, actual, family=family,
                                                    reuse_address=True, backlog=1024)
            except OSError as err:
                udp.close()
                if err.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue
                raise
            udp.start(loop)
            self.udp.append(udp)
            self.tcp.append(server)
            self.bound.append((host, actual))
            return host, actual
        raise OSError(errno.EADDRINUSE, "no free port for UDP and TCP together")

    async def close(self, drain_seconds: float) -> None:
        """Stop accepting, then let answers in flight finish (up to a deadline)."""
        for server in self.tcp:
            server.close()
        for writer in list(self.tcp_listener.connections):
            writer.close()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=drain_seconds)
        for udp in self.udp:
            udp.close()


async def _udp_socket(loop: asyncio.AbstractEventLoop, host: str, port: int, family: int) -> socket.socket:
    """A bound non-blocking UDP socket, as asyncio's create_datagram_endpoint would make it."""
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned nothing")
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
