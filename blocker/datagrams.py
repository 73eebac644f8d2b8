"""Many UDP datagrams per system call: `recvmmsg` and `sendmmsg` (Linux), called through ctypes.

The socket module has neither, and on the 80/20 mix its `recvfrom_into` and `sendto` were more
than half of blocker's own CPU per answered query: a system call each way, the GIL released and
taken back each time, the source address formatted with sprintf into a new string per datagram,
and an exception raised for the read that finds the socket empty (bench/). With `Datagrams`, one
call reads up to `BATCH` queries and one call sends every answer ready by the end of the batch;
the answers go to the very socket addresses the queries came from, and address strings are
formatted once per client address.

The buffers are laid out once, so a batch costs no allocation besides the query bytes: a
`HEAD`-byte slot per datagram (nearly every query fits, and the slots are copied out with one
copy per batch), then a spill slot per datagram for the rest of a larger one, in an anonymous
mapping whose pages are touched only if such datagrams come. An answer is sent from its own bytes
object, not copied: its buffer lies `BYTES_DATA` bytes into the object (CPython's layout, checked
at import; elsewhere `available()` is False and the listener reads datagram by datagram).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import socket
import sys

BATCH = 64  # datagrams per call; as many as the plain loop read per wake-up
HEAD = 256  # bytes of each datagram copied out with the batch: queries are nearly always shorter
DATAGRAM_MAX = 65536
MSG_DONTWAIT = 0x40
NAME_SIZE = 28  # sockaddr_in6, the larger of the two
_EMPTY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)  # nothing to read now: not an error


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _bytes_data_offset() -> int | None:
    """Where a bytes object's buffer starts within it, if id() is its address and the layout the known one."""
    if sys.implementation.name != "cpython":
        return None
    offset = sys.getsizeof(b"") - 1  # the header: the size of an empty bytes object less its NUL
    probe = bytes(range(256)) * 2
    return offset if ctypes.string_at(id(probe) + offset, len(probe)) == probe else None


def _libc() -> tuple[object, object] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: glibc or musl alike
    try:
        # No argtypes: ctypes then passes ints and ctypes objects as they are, at half the cost.
        return libc.recvmmsg, libc.sendmmsg
    except AttributeError:
        return None


BYTES_DATA = _bytes_data_offset()
_CALLS = _libc()


def available() -> bool:
    return BYTES_DATA is not None and _CALLS is not None


class Datagrams:
    """The buffers for one socket's batches, and views of them cheap to index from Python.

    `receive()` reads a batch; datagram i came from the socket address in name slot i. Send slot k
    answers datagram k unless `redirect`ed; the listener points its iovec at the answer itself
    (`send_iov`, base and length: a call per datagram saved), and `send(0, k)` sends slots 0..k-1."""

    def __init__(self, sock: socket.socket) -> None:
        assert _CALLS is not None and BYTES_DATA is not None
        self._recvmmsg, self._sendmmsg = _CALLS
        self.fd = sock.fileno()
        self.ipv6 = sock.family == socket.AF_INET6
        name_len = NAME_SIZE if self.ipv6 else 16
        spill = DATAGRAM_MAX - HEAD
        # Private: a worker forked with this listener must never read into its parent's pages.
        self._area = mmap.mmap(-1, BATCH * (HEAD + spill), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._area))
        self._names = (ctypes.c_char * (BATCH * NAME_SIZE))()
        self.names_base = ctypes.addressof(self._names)
        self._riov = (_Iovec * (2 * BATCH))()
        self._rvec = (_Mmsghdr * BATCH)()
        self._siov = (_Iovec * BATCH)()
        self._svec = (_Mmsghdr * BATCH)()
        for i in range(BATCH):
            self._riov[2 * i].iov_base, self._riov[2 * i].iov_len = base + i * HEAD, HEAD
            self._riov[2 * i + 1].iov_base = base + BATCH * HEAD + i * spill
            self._riov[2 * i + 1].iov_len = spill
            received = self._rvec[i].msg_hdr
            received.msg_name, received.msg_namelen = self.names_base + i * NAME_SIZE, name_len
            received.msg_iov, received.msg_iovlen = ctypes.addressof(self._riov[2 * i]), 2
            answer = self._svec[i].msg_hdr
            answer.msg_name, answer.msg_namelen = self.names_base + i * NAME_SIZE, name_len
            answer.msg_iov, answer.msg_iovlen = ctypes.addressof(self._siov[i]), 1
        view = memoryview(self._area)
        self.head = view[:BATCH * HEAD]
        self.spill = view[BATCH * HEAD:]
        self.spill_size = spill
        stride = ctypes.sizeof(_Mmsghdr)
        self._lengths = memoryview(self._rvec).cast("B").cast("I")[_Mmsghdr.msg_len.offset // 4::stride // 4]
        self.names = memoryview(self._names).cast("B")
        self.names32 = self.names.cast("I")
        self.send_names = memoryview(self._svec).cast("B").cast("Q")[::stride // 8]
        self.send_iov = memoryview(self._siov).cast("B").cast("Q")

    def receive(self) -> tuple[list[int], bytes, list[int] | list[bytes]] | None:
        """Read what is waiting, up to BATCH datagrams, without blocking. None if nothing was, else
        their sizes, their first HEAD bytes each (datagram i from i * HEAD on) and a key for each
        one's source address (the IPv4 address as an int, the IPv6 address as bytes: what the
        listener caches address strings under). Raises OSError for an error other than an empty socket."""
        count: int = self._recvmmsg(self.fd, self._rvec, BATCH, MSG_DONTWAIT, None)
        if count <= 0:
            error = ctypes.get_errno() if count else 0
            if not count or error in _EMPTY:
                return None
            raise OSError(error, "recvmmsg")
        sizes: list[int] = self._lengths[:count].tolist()
        heads = bytes(self.head[:(count - 1) * HEAD + min(sizes[-1], HEAD)])  # one copy for the batch
        if self.ipv6:
            names = self.names
            return sizes, heads, [bytes(names[i * NAME_SIZE + 8:i * NAME_SIZE + 24]) for i in range(count)]
        return sizes, heads, self.names32[1:count * NAME_SIZE // 4:NAME_SIZE // 4].tolist()

    def spilled(self, source: int, size: int) -> bytes:
        """What datagram `source`, `size` bytes long, holds beyond its first HEAD bytes."""
        start = source * self.spill_size
        return bytes(self.spill[start:start + size - HEAD])

    def redirect(self, slot: int, source: int) -> None:
        """Send slot `slot` answers datagram `source` (by default, send slot i answers datagram i)."""
        self.send_names[slot] = self.names_base + source * NAME_SIZE

    def straighten(self, stop: int) -> None:
        """Send slots up to `stop` answer their own datagram again."""
        for slot in range(stop):
            self.send_names[slot] = self.names_base + slot * NAME_SIZE

    def send(self, start: int, count: int) -> tuple[int, int]:
        """Send slots start..start+count-1: (how many were sent, errno of the next one or 0)."""
        first = self._svec if not start else ctypes.byref(self._svec, start * ctypes.sizeof(_Mmsghdr))
        sent: int = self._sendmmsg(self.fd, first, count, 0)
        if sent < 0:
            return 0, ctypes.get_errno()
        return sent, 0

    def source(self, slot: int) -> int:
        """The datagram whose source send slot `slot` answers."""
        return (self.send_names[slot] - self.names_base) // NAME_SIZE  # type: ignore[no-any-return]

    def address(self, source: int) -> tuple[str, int] | tuple[str, int, int, int]:
        """The source of datagram `source` as the socket module spells addresses."""
        raw = bytes(self.names[source * NAME_SIZE:(source + 1) * NAME_SIZE])
        port = int.from_bytes(raw[2:4], "big")
        if self.ipv6:
            return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, int.from_bytes(raw[4:8], "big"),
                    int.from_bytes(raw[24:28], sys.byteorder))
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
