"""The listeners: UDP (a non-blocking socket drained at each wake-up) and asyncio TCP on every listen
address, feeding packets to the Resolver.

TCP follows RFC 7766: many queries per connection, answered as they complete (pipelining), an
idle timeout, and a cap on open connections. No client can hold the server: every answer is
written under a deadline, one address gets a bounded number of connections, and when every slot
is taken a new connection sheds the oldest idle one. On shutdown, TCP drains like UDP: no new
queries are read, answers in flight are written, then the connections close.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import socket
import struct
import sys
from collections.abc import Coroutine
from typing import Any

from blocker import datagrams
from blocker.config import DnsConfig
from blocker.datagrams import HEAD, Datagrams
from blocker.resolver import Resolver

log = logging.getLogger("blocker")

TCP_MAX_PIPELINE = 100  # queries one connection may have outstanding at once
# The kernel's send buffer per client connection, fixed (no autotuning to megabytes): answers a
# client does not read pile up in our buffer soon, where the write timeout sees them.
TCP_SEND_BUFFER = 64 * 1024
# Our own write buffer per connection: past this, the next answer waits until the client reads.
TCP_WRITE_HIGH_WATER = 32 * 1024
# Bytes of answers waiting to be written, all connections together (Unbound's stream-wait-size):
# past this, the connection with the most waiting is dropped. A pipelining client may have up to
# TCP_MAX_PIPELINE answers of up to 64 KiB on their way; this bounds what all of them hold.
TCP_WAIT_BYTES = 32 * 1024 * 1024
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
UDP_MAX = 65535
UDP_BATCH = 64  # datagrams read per wake-up before the loop runs anything else
UDP_PENDING_MAX = 10_000  # answers waiting for a full send buffer; beyond, dropped as UDP would
UDP_HOSTS_MAX = 100_000  # client address strings kept, formatted once each (cleared when full)
_SEND_LATER = (errno.EAGAIN, errno.EWOULDBLOCK)
_LENGTH = struct.Struct("!H")
_LINGER_RESET = struct.pack("ii", 1, 0)


class UdpListener:
    """Answers the queries on one UDP socket, reading every datagram waiting at each wake-up.

    A plain non-blocking socket read in a loop, not asyncio's DatagramProtocol: the stock loop's
    datagram transport reads one datagram per select() (about five times the CPU per query), and
    even uvloop's costs more per datagram than a recvfrom loop (bench/). Where it can (Linux,
    CPython: datagrams.py), a wake-up reads up to a batch with one recvmmsg and sends the answers
    ready by then with one sendmmsg; elsewhere it reads datagram by datagram. Answers that cannot be
    sent at once (a full send buffer) wait in a bounded queue for the socket to be writable.
    """

    def __init__(self, resolver: Resolver, tasks: set[asyncio.Task[Any]], sock: socket.socket,
                 batched: bool | None = None) -> None:
        """`batched`: whether to use recvmmsg/sendmmsg; by default, wherever they are available."""
        self.resolver = resolver
        self.tasks = tasks
        self.sock = sock
        self._buffer = bytearray(UDP_MAX)
        self._pending: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        if batched is None:
            batched = datagrams.available()
        self._batch = Datagrams(sock) if batched else None
        self._hosts: dict[int | bytes, str] = {}  # a source address, as datagrams.py has it -> its text
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._readable if self._batch is None else self._read_batch)

    def _read_batch(self) -> None:
        """Answer every datagram of one recvmmsg; those answered at once go out with one sendmmsg."""
        batch = self._batch
        assert batch is not None
        try:
            received = batch.receive()
        except OSError:
            return  # e.g. an ICMP error for an answer sent earlier: reported once; still readable if more wait
        if received is None:
            return
        sizes, heads, sources = received
        count = len(sizes)
        handle = self.resolver.handle
        hosts = self._hosts
        send_iov, data_offset = batch.send_iov, datagrams.BYTES_DATA
        assert data_offset is not None
        replies: list[bytes] = []  # alive until sent: the kernel reads them in place
        redirected = False
        start = 0
        for i in range(count):
            size = sizes[i]
            data = heads[start:start + size] if size <= HEAD else heads[start:start + HEAD] + batch.spilled(i, size)
            start += HEAD
            host = hosts.get(sources[i])
            if host is None:
                host = self._host(sources[i])
            result = handle(data, host, "udp")
            if result is None:
                continue
            if result.__class__ is bytes:
                slot = len(replies)
                if slot != i:  # an earlier datagram got no answer yet: send slot `slot` answers datagram i
                    batch.redirect(slot, i)
                    redirected = True
                replies.append(result)  # type: ignore[arg-type]
                send_iov[2 * slot] = id(result) + data_offset
                send_iov[2 * slot + 1] = len(result)  # type: ignore[arg-type]
                continue
            task = asyncio.ensure_future(self._finish(result, batch.address(i)))  # type: ignore[arg-type]
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if replies:
            self._send_batch(batch, replies)
        if redirected:
            batch.straighten(len(replies))

    def _host(self, key: int | bytes) -> str:
        if len(self._hosts) >= UDP_HOSTS_MAX:
            self._hosts.clear()
        if isinstance(key, int):
            host = socket.inet_ntop(socket.AF_INET, key.to_bytes(4, sys.byteorder))
        else:
            host = socket.inet_ntop(socket.AF_INET6, key)
        self._hosts[key] = host
        return host

    def _send_batch(self, batch: Datagrams, replies: list[bytes]) -> None:
        count = len(replies)
        sent = 0
        if not self._pending:  # else answers already wait for the socket: these go after them
            while sent < count:
                done, error = batch.send(sent, count - sent)  # a short count: the next call says why
                sent += done
                if error in _SEND_LATER:
                    break
                if error and error != errno.EINTR:
                    sent += 1  # this client's address is unreachable now: UDP drops the answer, so do we
        for slot in range(sent, count):
            self._queue(replies[slot], batch.address(batch.source(slot)))

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
        try:
            reply = await pending  # the resolver's coroutine answers SERVFAIL itself rather than raise
        except Exception:  # a last resort: never let one query's failure escape into the loop
            log.exception("error while answering a query from %s", addr[0])
            return
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


class TcpConnection:
    """One client TCP connection: reads queries, writes answers as they complete, never blocks forever.

    Every write is bounded: answers are written one at a time, and one that cannot be handed over
    within the write timeout (a client that pipelines queries and never reads) drops the connection.
    While our buffer is full, no new query is read.
    """

    __slots__ = ("address", "listener", "outstanding", "queued", "reader", "stopping", "task", "transport",
                 "waiting", "write_lock", "writer")

    def __init__(self, listener: TcpListener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 address: str) -> None:
        self.listener = listener
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.address = address
        self.outstanding: set[asyncio.Task[None]] = set()
        self.stopping = False
        # The timeout of the wait for a new query, while waiting for one: shutdown cuts it short.
        self.waiting: asyncio.Timeout | None = None
        self.task = asyncio.current_task()
        self.write_lock = asyncio.Lock()
        self.queued = 0  # bytes of answers waiting for their turn to be written
        self.transport.set_write_buffer_limits(high=TCP_WRITE_HIGH_WATER)

    @property
    def idle(self) -> bool:
        """Waiting for a new query with nothing owed to the client: the cheapest one to shed."""
        return (self.waiting is not None and not self.outstanding and not self.transport.is_closing()
                and self.transport.get_write_buffer_size() == 0)

    def stop(self) -> None:
        """Read no new query; answers already owed are still written (shutdown)."""
        self.stopping = True
        if self.waiting is not None:
            self.waiting.reschedule(asyncio.get_running_loop().time())

    async def run(self) -> None:
        resolver = self.listener.resolver
        reader, address = self.reader, self.address
        try:
            while not self.stopping:
                idle = self.listener.settings().tcp_idle_timeout  # read each time: it follows reloads
                try:
                    async with asyncio.timeout(idle) as self.waiting:
                        prefix = await reader.readexactly(2)
                    self.waiting = None
                    async with asyncio.timeout(idle):
                        data = await reader.readexactly(_LENGTH.unpack(prefix)[0])
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
                    break
                finally:
                    self.waiting = None
                result = resolver.handle(data, address, "tcp")
                if result is None:
                    continue
                if isinstance(result, bytes):
                    await self.send(result)
                    continue
                task = asyncio.ensure_future(self._finish(result))
                self.outstanding.add(task)
                task.add_done_callback(self.outstanding.discard)
                if len(self.outstanding) >= TCP_MAX_PIPELINE:
                    await asyncio.wait(self.outstanding, return_when=asyncio.FIRST_COMPLETED)
            if self.outstanding:
                await asyncio.wait(self.outstanding, timeout=self.listener.settings().tcp_idle_timeout)
        finally:
            # Answers still on their way are not cancelled (others may share their upstream query);
            # they find the connection closed and are dropped.
            self.close()

    async def _finish(self, pending: Coroutine[Any, Any, bytes | None]) -> None:
        try:
            reply = await pending  # the resolver's coroutine answers SERVFAIL itself rather than raise
        except Exception:  # a last resort: never let one query's failure escape into the loop
            log.exception("error while answering a TCP query")
            return
        if reply is not None:
            await self.send(reply)

    async def send(self, reply: bytes) -> None:
        """Write one answer; a client that does not take it in time is disconnected."""
        transport = self.transport
        if transport.is_closing():
            return
        listener = self.listener
        size = len(reply) + 2
        self.queued += size
        listener.queued += size
        try:
            if listener.queued > TCP_WAIT_BYTES:
                listener.shed_largest()
            async with self.write_lock:
                if transport.is_closing():
                    return
                self.writer.write(_LENGTH.pack(len(reply)) + reply)
                if transport.get_write_buffer_size() > TCP_WRITE_HIGH_WATER:
                    async with asyncio.timeout(listener.settings().tcp_write_timeout):
                        await self.writer.drain()
        except TimeoutError:
            listener.count("write_timeout")
            self.abort()
        except (ConnectionError, OSError):
            self.abort()
        finally:
            self.queued -= size
            listener.queued -= size

    def abort(self) -> None:
        """Drop the connection at once with a reset, discarding what the kernel still holds for it."""
        _reset_on_close(self.transport)
        self.transport.abort()

    def close(self) -> None:
        """Close once what is buffered is written, or at the write timeout at the latest."""
        transport = self.transport
        if transport.is_closing():
            return
        pending = transport.get_write_buffer_size()
        transport.close()
        if pending:
            asyncio.get_running_loop().call_later(self.listener.settings().tcp_write_timeout, self.abort)


def _reset_on_close(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError, RuntimeError):  # uvloop: a closed handle
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


class TcpListener:
    """Serves DNS over TCP connections on every server socket, within the connection limits:
    `dns.tcp_max_per_client` per source address (trusted forwarders exempt) and
    `dns.tcp_max_connections` in all, where a new connection sheds the oldest idle one."""

    def __init__(self, resolver: Resolver, tasks: set[asyncio.Task[Any]]) -> None:
        self.resolver = resolver
        self.tasks = tasks
        self.connections: dict[TcpConnection, None] = {}  # oldest first
        self.per_address: dict[str, int] = {}
        self.queued = 0  # bytes of answers waiting to be written, every connection together
        self.closing = False

    def settings(self) -> DnsConfig:
        return self.resolver.policy.config.dns

    def count(self, reason: str) -> None:
        """One connection refused or dropped (metrics.TCP_CLOSE_REASONS)."""
        self.resolver.stats.tcp_closed[reason] += 1

    def shed_largest(self) -> None:
        """Too many answers wait to be written: drop the connection holding the most of them."""
        largest, most = None, 0
        for connection in self.connections:
            transport = connection.transport
            if transport.is_closing():
                continue
            held = connection.queued + transport.get_write_buffer_size()
            if held > most:
                largest, most = connection, held
        if largest is not None:
            self.count("wait_limit")
            largest.abort()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        address = peer[0]
        if not self._admit(address):
            _reset_on_close(writer.transport)
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, TCP_SEND_BUFFER)
        connection = TcpConnection(self, reader, writer, address)
        self.connections[connection] = None
        self.per_address[address] = self.per_address.get(address, 0) + 1
        stats = self.resolver.stats
        stats.tcp_connections += 1
        try:
            await connection.run()
        except Exception:
            # Nothing a client sends may end in a traceback per connection; a bug is logged once here.
            log.exception("error on a TCP connection from %s", address)
            connection.abort()
        finally:
            del self.connections[connection]
            left = self.per_address[address] - 1
            if left:
                self.per_address[address] = left
            else:
                del self.per_address[address]
            stats.tcp_connections -= 1

    def _admit(self, address: str) -> bool:
        """Whether a new connection from `address` may stay, shedding an idle one to make room."""
        if self.closing:
            return False
        dns = self.settings()
        if (self.per_address.get(address, 0) >= dns.tcp_max_per_client
                and not self.resolver.policy.is_trusted(address)):
            self.count("client_limit")
            return False
        if len(self.connections) < dns.tcp_max_connections:
            return True
        for connection in self.connections:
            if connection.idle:
                self.count("shed_idle")
                connection.close()
                return True
        self.count("full")
        return False


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

    async def adopt(self, udp_sock: socket.socket, tcp_sock: socket.socket) -> tuple[str, int]:
        """Serve on sockets made by someone else (a worker's share of a SO_REUSEPORT group)."""
        loop = asyncio.get_running_loop()
        udp_sock.setblocking(False)
        udp = UdpListener(self.resolver, self.tasks, udp_sock)
        server = await asyncio.start_server(self.tcp_listener.serve, sock=tcp_sock, backlog=1024)
        udp.start(loop)
        self.udp.append(udp)
        self.tcp.append(server)
        host, port = udp_sock.getsockname()[:2]
        self.bound.append((host, port))
        return host, port

    async def close(self, drain_seconds: float) -> None:
        """Stop accepting and reading, let answers in flight be written (up to a deadline), close."""
        tcp = self.tcp_listener
        tcp.closing = True
        for server in self.tcp:
            server.close()
        for connection in list(tcp.connections):
            connection.stop()
        waiting = set(self.tasks) | {c.task for c in tcp.connections if c.task is not None}
        if waiting:
            await asyncio.wait(waiting, timeout=drain_seconds)
        stuck = [c.task for c in tcp.connections if c.task is not None]
        for connection in list(tcp.connections):
            connection.abort()
        if stuck:
            await asyncio.wait(stuck, timeout=1.0)  # let them unwind quietly after the abort
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
        if family == socket.AF_INET6:
            # IPv6 only, as asyncio makes the TCP socket: "[::]" beside "0.0.0.0" must not collide.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def shared_port(host: str, port: int) -> int:
    """Check that UDP and TCP `port` on `host` are free (port 0: find a port free for both); raises OSError.

    The check binds without SO_REUSEPORT, so a port that another process holds, with or without
    that option, is refused here instead of being silently shared with it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _attempt in range(20 if port == 0 else 1):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.bind((host, port))
            actual = udp.getsockname()[1]
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of a previous run
            try:
                tcp.bind((host, actual))
            except OSError as err:
                if port == 0 and err.errno == errno.EADDRINUSE:
                    continue
                raise
            return actual
        finally:
            udp.close()
            tcp.close()
    raise OSError(errno.EADDRINUSE, "no free port for UDP and TCP together")


def reuseport_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A bound UDP socket and a listening TCP socket on host:port with SO_REUSEPORT: one worker's share.

    The kernel spreads queries (by source address and port) and connections over every socket of
    the group; a socket closed with its worker leaves the group at once.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    made: list[socket.socket] = []
    try:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            sock = socket.socket(family, kind)
            made.append(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.setblocking(False)
        made[1].listen(1024)
    except OSError:
        for sock in made:
            sock.close()
        raise
    return made[0], made[1]
