"""The listeners: asyncio UDP and TCP on every listen address, feeding packets to the Resolver.

TCP follows RFC 7766: many queries per connection, answered as they complete (pipelining), an
idle timeout, and a cap on open connections.
"""

from __future__ import annotations

import asyncio
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


class UdpListener(asyncio.DatagramProtocol):
    """Receives queries on one UDP socket and sends each answer back to its sender."""

    def __init__(self, resolver: Resolver, tasks: set[asyncio.Task[Any]]) -> None:
        self.resolver = resolver
        self.tasks = tasks
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        result = self.resolver.handle(data, addr[0], "udp")
        if result is None:
            return
        if isinstance(result, bytes):
            self.transport.sendto(result, addr)  # type: ignore[union-attr]
            return
        task = asyncio.ensure_future(self._finish(result, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _finish(self, pending: Coroutine[Any, Any, bytes | None], addr: tuple[Any, ...]) -> None:
        try:
            reply = await pending  # the resolver's coroutine answers SERVFAIL itself rather than raise
        except Exception:  # a last resort: never let one query's failure escape into the loop
            log.exception("error while answering a query from %s", addr[0])
            return
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for answers we sent; nothing to do


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
        try:
            reply = await pending  # the resolver's coroutine answers SERVFAIL itself rather than raise
        except Exception:  # a last resort: never let one query's failure escape into the loop
            log.exception("error while answering a TCP query")
            return
        if reply is not None and not writer.is_closing():
            writer.write(struct.pack("!H", len(reply)) + reply)
            with contextlib.suppress(ConnectionError):
                await writer.drain()


class Listeners:
    """Every UDP and TCP socket the resolver listens on."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.tasks: set[asyncio.Task[Any]] = set()
        self.udp: list[asyncio.DatagramTransport] = []
        self.tcp: list[asyncio.Server] = []
        self.tcp_listener = TcpListener(resolver, self.tasks)
        self.bound: list[tuple[str, int]] = []

    async def bind(self, host: str, port: int) -> tuple[str, int]:
        """UDP and TCP on one address; port 0 picks a free port shared by both."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        attempts = 20 if port == 0 else 1
        for attempt in range(attempts):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: UdpListener(self.resolver, self.tasks), local_addr=(host, port), family=family)
            actual = transport.get_extra_info("sockname")[1]
            try:
                server = await asyncio.start_server(self.tcp_listener.serve, host, actual, family=family,
                                                    reuse_address=True, backlog=1024)
            except OSError as err:
                transport.close()
                if err.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue
                raise
            self.udp.append(transport)
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
        for transport in self.udp:
            transport.close()
