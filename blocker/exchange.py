"""One query to one upstream, made expensive to forge (RFC 5452): a fresh UDP socket, hence a random
source port, for every query; a random ID; optional 0x20 case randomisation of the name; and a reply
accepted only when its ID, QR bit and question match what was sent, byte for byte.

An off-path attacker must then guess port, ID and the case of every letter at once. Replies that
fail the checks are counted in `unwanted` (a one-element list, like the Stats cells) and ignored:
the real answer may still come.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from collections import deque

Endpoint = tuple[str, int]

class BadAnswer(Exception):
    """A reply with our ID and question that is no answer: our own query echoed back (QR=0)."""


class GaveWay(Exception):
    """The wait was ended early to make room for a newer query (the upstreams are saturated)."""


class CaseMismatch(Exception):
    """No answer in time, but a reply with our ID and the name in another case came: the upstream
    does not keep 0x20 case. (Over UDP such a reply alone proves nothing, a forger sends exactly
    that to make us ask again without 0x20: it is ignored, and counts only if nothing better came.)"""


def randomise_case(question: bytes) -> bytes:
    """The question with each letter of its name in a random case. Label lengths are < 64, so never
    letters; QTYPE and QCLASS, the last 4 bytes, are left alone. Whole-integer XOR: no Python loop."""
    name = question[:-4]
    size = len(name)
    letters = int.from_bytes(name.translate(_LETTER_BITS), "big")
    noise = int.from_bytes(secrets.token_bytes(size), "big") & letters
    return (int.from_bytes(name, "big") ^ noise).to_bytes(size, "big") + question[-4:]


# byte -> 0x20 for ASCII letters (the case bit), 0 for everything else
_LETTER_BITS = bytes(0x20 if 65 <= b <= 90 or 97 <= b <= 122 else 0 for b in range(256))


def _verdict(data: bytes, query_id: bytes, question: bytes) -> type[Exception] | bool | None:
    """True: our answer. None: not ours (unwanted). An exception class: ours, but unusable."""
    end = 12 + len(question)
    if len(data) < end or data[0:2] != query_id:
        return None
    if data[12:end] != question or data[4:6] != b"\x00\x01":
        return CaseMismatch if data[12:end].lower() == question.lower() and data[4:6] == b"\x00\x01" else None
    if not data[2] & 0x80:
        return BadAnswer
    return True


async def ask_udp(endpoint: Endpoint, message: bytes, question: bytes, timeout: float,
                  unwanted: list[int], waits: deque[tuple[float, asyncio.Future[bytes]]] | None = None) -> bytes:
    """Send `message` from a new socket and wait for its answer; raises TimeoutError, OSError
    (e.g. port unreachable), BadAnswer, CaseMismatch, or GaveWay when ended early through `waits`
    (the queue of waits, oldest first, that `give_way` may end)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect(endpoint)  # the kernel picks a random free ephemeral port
        future: asyncio.Future[bytes] = loop.create_future()
        query_id = message[0:2]
        mismatched = False

        def readable() -> None:
            nonlocal mismatched
            while not future.done():
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    return
                except OSError as err:
                    future.set_exception(err)
                    return
                verdict = _verdict(data, query_id, question)
                if verdict is True:
                    future.set_result(data)
                elif verdict is None or verdict is CaseMismatch:
                    unwanted[0] += 1
                    mismatched = mismatched or verdict is CaseMismatch
                else:
                    future.set_exception(verdict())  # type: ignore[operator]

        def expire() -> None:
            if not future.done():
                future.set_exception(CaseMismatch() if mismatched else TimeoutError())

        sock.send(message)
        fd = sock.fileno()
        loop.add_reader(fd, readable)
        timer = loop.call_later(timeout, expire)
        if waits is not None:
            while waits and waits[0][1].done():
                waits.popleft()
            waits.append((loop.time(), future))
        try:
            return await future
        finally:
            timer.cancel()
            loop.remove_reader(fd)
    finally:
        sock.close()


async def ask_tcp(endpoint: Endpoint, message: bytes, question: bytes, timeout: float,
                  unwanted: list[int]) -> bytes:
    """The same exchange over a new TCP connection (after a truncated UDP answer)."""
    query_id = message[0:2]
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(*endpoint)
        try:
            writer.write(struct.pack("!H", len(message)) + message)
            await writer.drain()
            while True:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
                data = await reader.readexactly(length)
                verdict = _verdict(data, query_id, question)
                if verdict is True:
                    return data
                if verdict is None:
                    unwanted[0] += 1
                else:
                    raise verdict()  # type: ignore[operator]
        finally:
            writer.close()


def give_way(waits: deque[tuple[float, asyncio.Future[bytes]]], older_than: float) -> bool:
    """End the oldest wait if it has lasted `older_than` seconds; whether one was ended."""
    now = asyncio.get_running_loop().time()
    while waits:
        started, future = waits[0]
        if future.done():
            waits.popleft()
            continue
        if now - started < older_than:
            return False
        waits.popleft()
        future.set_exception(GaveWay())
        return True
    return False


def new_id() -> int:
    return secrets.randbelow(65536)
