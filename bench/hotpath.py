"""The resolver's own CPU per query, in process: `Resolver.handle` on prepared packets, no sockets.

What bench.py cannot separate: how much of a query's cost is blocker's Python and how much is
the kernel's UDP path (which unbound pays too). Process CPU time, best of several repeats, so a
busy machine disturbs it far less than a q/s figure. Kinds:

- memo_blocked / memo_allowed: the same query bytes again (the fast path, memo.py);
- cached_allowed: a name in the answer cache but not remembered (spelled in another case);
- cold_blocked: every name new (parse, categorise, decide, build the answer, remember it);
- gc: garbage-collector passes and the longest pause while 250,000 new names are answered.

Usage: python3 bench/hotpath.py [--repeats N]
"""

from __future__ import annotations

import argparse
import gc
import random
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blocker.cache import AnswerCache  # noqa: E402
from blocker.clock import Clock  # noqa: E402
from blocker.message import read_question, scan_response  # noqa: E402
from blocker.metrics import Stats  # noqa: E402
from blocker.recorder import Recorder  # noqa: E402
from blocker.resolver import Resolver  # noqa: E402
from blocker.source import PolicySource  # noqa: E402
from blocker.upstream import Upstreams  # noqa: E402

BLOCKED = ("tiktok.com", "twitter.com", "facebook.com", "instagram.com", "whatsapp.com", "telegram.org",
           "snapchat.com", "signal.org")
ALLOWED = [f"a{i}.bench.test" for i in range(2000)]


def query(name: str, qid: int = 0x1234, qtype: int = 1) -> bytes:
    labels = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def upstream_answer(name: str) -> bytes:
    packet = bytearray(query(name))
    packet[2:4] = struct.pack("!H", 0x8180)
    packet[6:8] = struct.pack("!H", 1)  # ANCOUNT
    return bytes(packet) + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 3600, 4) + bytes((192, 0, 2, 1))


def make_resolver(workdir: Path) -> Resolver:
    config = workdir / "blocker.yaml"
    config.write_text(f"dns:\n  listen: [\"127.0.0.1:0\"]\n  upstreams: [\"127.0.0.1:9\"]\n  cache_size: 100000\n"
                      f"metrics:\n  listen: null\nblocklists: \"{ROOT / 'blocklists'}\"\n")
    policy = PolicySource.load(config)
    stats = Stats()
    clock = Clock()
    cache = AnswerCache(100_000)
    now = clock.monotonic()
    for name in ALLOWED:
        wire = upstream_answer(name)
        cache.put(read_question(query(name)).cache_key, wire, scan_response(wire), now)
    upstreams = Upstreams(policy.config.dns.upstreams, 1.0, stats)
    return Resolver(policy, cache, upstreams, Recorder(stats, clock), clock)


def per_query_us(resolver: Resolver, packets: list[bytes]) -> float:
    handle = resolver.handle
    started = time.process_time()
    for packet in packets:
        handle(packet, "127.0.0.1", "udp")
    return (time.process_time() - started) / len(packets) * 1e6


def best(repeats: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="blocker-hotpath-") as tmp:
        resolver = make_resolver(Path(tmp))
        policy = resolver.policy
        memo_blocked = [query(f"www.{d}") for d in BLOCKED] * 5000
        memo_allowed = [query(name) for name in ALLOWED] * 20
        cached = [query(name.upper()) for name in ALLOWED] * 5

        def cached_run() -> float:
            resolver.swap(policy)  # nothing remembered: every query goes to the cache
            return per_query_us(resolver, cached[:len(ALLOWED)])

        def cold_run() -> float:
            resolver.swap(policy)
            names = [query(f"u{i}x{rng.randrange(10**6)}.{rng.choice(BLOCKED)}") for i in range(50_000)]
            return per_query_us(resolver, names)

        for _ in range(2):  # an answer is remembered the second time its name is asked
            per_query_us(resolver, memo_blocked[:100] + memo_allowed[:2000])
        print(f"memo_blocked    {best(args.repeats, lambda: per_query_us(resolver, memo_blocked)):6.2f} µs/query")
        print(f"memo_allowed    {best(args.repeats, lambda: per_query_us(resolver, memo_allowed)):6.2f} µs/query")
        print(f"cached_allowed  {best(args.repeats, cached_run):6.2f} µs/query")
        print(f"cold_blocked    {best(args.repeats, cold_run):6.2f} µs/query")

        pauses: list[tuple[int, float]] = []
        began = [0.0]

        def watch(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                began[0] = time.perf_counter()
            else:
                pauses.append((info["generation"], time.perf_counter() - began[0]))

        resolver.swap(policy)
        names = [query(f"g{i}x{rng.randrange(10**6)}.{rng.choice(BLOCKED)}") for i in range(250_000)]
        gc.callbacks.append(watch)
        try:
            us = per_query_us(resolver, names)
        finally:
            gc.callbacks.remove(watch)
        full = [p for g, p in pauses if g == 2]
        print(f"gc              {us:6.2f} µs/query over 250,000 new names: {len(pauses)} collections, "
              f"{len(full)} full ({sum(full) * 1000:.0f} ms), longest pause "
              f"{max((p for _, p in pauses), default=0) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
