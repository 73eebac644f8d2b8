"""Hostile and measuring DNS clients over real sockets, shared by the tests and bench/soak_server.py.

`NonReadingFlood` keeps many TCP connections from one loopback address that pipeline queries and
never read an answer (a client that holds a server hostage). `TcpProber` asks from another address,
one query per fresh connection, and counts how many were answered in time.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

import dns.message
import dns.query

_TCP_ESTABLISHED = 1


def framed(name: str, rdtype: str = "A", query_id: int = 0) -> bytes:
    wire = dns.message.make_query(name, rdtype, use_edns=0, id=query_id).to_wire()
    return struct.pack("!H", len(wire)) + wire


class NonReadingFlood:
    """`connections` TCP connections from `source` (an address, or several used in turn), each
    sending `pipeline` queries and never reading.

    A connection the server closes is opened again, so the pressure lasts until `stop()`.
    """

    def __init__(self, port: int, source: str | list[str], connections: int, name: str, rdtype: str = "TXT",
                 pipeline: int = 200) -> None:
        self.port = port
        self.sources = [source] if isinstance(source, str) else source
        self.connections = connections
        self.burst = b"".join(framed(name, rdtype, i) for i in range(pipeline))
        self.opened = 0  # connections the server accepted (our connect() succeeded)
        self.dropped = 0  # connections the server closed or reset on us
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> NonReadingFlood:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _open(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A tiny receive window: the server's answers pile up after a few kilobytes.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.settimeout(0.5)
        try:
            sock.bind((self.sources[self.opened % len(self.sources)], 0))
            sock.connect(("127.0.0.1", self.port))
            sock.settimeout(0.05)
            with contextlib.suppress(TimeoutError):
                sock.sendall(self.burst)
        except OSError:
            sock.close()
            self.dropped += 1
            return None
        self.opened += 1
        return sock

    @staticmethod
    def _alive(sock: socket.socket) -> bool:
        """Whether the server still holds this connection (its TCP state; no answer is read)."""
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == _TCP_ESTABLISHED

    def _run(self) -> None:
        open_: list[socket.socket] = []
        try:
            while not self._stop.is_set():
                for sock in list(open_):
                    if not self._alive(sock):
                        open_.remove(sock)
                        sock.close()
                        self.dropped += 1
                while len(open_) < self.connections and not self._stop.is_set():
                    sock = self._open()
                    if sock is not None:
                        open_.append(sock)
                self._stop.wait(0.2)
        finally:
            for sock in open_:
                sock.close()


class TcpProber:
    """Asks `names` in turn over TCP from `source`, a fresh connection per query, until stopped."""

    def __init__(self, port: int, source: str, names: list[str], timeout: float = 1.0) -> None:
        self.port = port
        self.source = source
        self.names = names
        self.timeout = timeout
        self.asked = 0
        self.answered = 0
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TcpProber:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    @property
    def ratio(self) -> float:
        return self.answered / self.asked if self.asked else 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            name = self.names[self.asked % len(self.names)]
            self.asked += 1
            started = time.monotonic()
            try:
                dns.query.tcp(dns.message.make_query(name, "A"), "127.0.0.1", port=self.port,
                              timeout=self.timeout, source=self.source)
            except (OSError, dns.exception.DNSException, EOFError):
                continue
            self.answered += 1
            self.slowest = max(self.slowest, time.monotonic() - started)
            self._stop.wait(0.01)


def udp_flood(port: int, names: list[str], rdtype: str = "TXT", window: int = 200, timeout: float = 30.0) -> int:
    """Ask every name once over UDP, keeping up to `window` queries outstanding; the number answered."""
    import select

    answered = 0
    outstanding = 0
    sent = 0
    wires = [dns.message.make_query(name, rdtype, use_edns=0, payload=1232, id=i % 65536).to_wire()
             for i, name in enumerate(names)]
    end = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.setblocking(False)
        idle_since = time.monotonic()
        while time.monotonic() < end and (sent < len(wires) or outstanding):
            while sent < len(wires) and outstanding < window:
                try:
                    sock.sendto(wires[sent], ("127.0.0.1", port))
                except BlockingIOError:
                    break  # our send buffer is full: read answers first
                sent += 1
                outstanding += 1
            ready, _, _ = select.select([sock], [], [], 0.05)
            if ready:
                idle_since = time.monotonic()
                while True:
                    try:
                        sock.recv(65535)
                    except BlockingIOError:
                        break
                    answered += 1
                    outstanding -= 1
            elif time.monotonic() - idle_since > 2.0:
                outstanding = 0  # lost: send the rest
    return answered


def tcp_flood(port: int, names: list[str], rdtype: str = "TXT", connections: int = 4,
              timeout: float = 30.0) -> list[int]:
    """Ask the names over TCP, pipelined on a few connections, reading every answer; their sizes."""
    sizes: list[int] = []
    lock = threading.Lock()

    def one(part: list[str]) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"".join(framed(name, rdtype, i) for i, name in enumerate(part)))
            stream = sock.makefile("rb")
            for _ in part:
                length = struct.unpack("!H", stream.read(2))[0]
                data = stream.read(length)
                with lock:
                    sizes.append(len(data))

    threads = [threading.Thread(target=one, args=(names[i::connections],)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return sizes
