"""Soak: rerun issue 10's rows for memory, TCP, the query log, shutdown and the small items against
the real `blocker serve` (Knot upstream, loopback only), and print them as a table.

    python3 bench/soak_server.py                 # every row, the memory flood for 120 s
    python3 bench/soak_server.py --rows memory --seconds 30

Rows: memory (unique names with ~1 KB answers at full speed, RSS sampled every second, default
cache_bytes), tcp60k (60 KB answers over TCP), hostage (1,000 pipelining non-reading connections
from 127.0.0.2, a prober at 127.0.0.3), querylog (a full 64 KiB tmpfs, then rotation with a broken
config), sigterm (UDP and TCP queries in flight and stuck clients at SIGTERM), small (NOTIFY,
CHAOS, the metrics endpoint), with GC pauses read from blocker_gc_pause_longest_seconds.
Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rdataclass  # noqa: E402
from conftest import standard_config  # noqa: E402
from helpers import BlackHole, Blocker, Knot, metric_value  # noqa: E402
from hostile_clients import NonReadingFlood, TcpProber, framed, tcp_flood  # noqa: E402

Row = dict[str, object]
MiB = 1024 * 1024


def rss(server: Blocker) -> int:
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples the server's RSS every `every` seconds in a thread; keeps the peak."""

    def __init__(self, server: Blocker, every: float = 1.0) -> None:
        self.server = server
        self.every = every
        self.peak = rss(server)
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            value = rss(self.server)
            self.samples.append(value)
            self.peak = max(self.peak, value)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def tracebacks(server: Blocker) -> int:
    return sum(1 for line in server.lines if "Traceback" in line)


def started(work: Path, upstream: str, extra: str = "", policy: str = "") -> Blocker:
    config = standard_config(work, [upstream], extra, policy=policy)
    if "upstream_timeout" in extra:
        config.write_text(config.read_text().replace("  upstream_timeout: 0.5\n", "", 1))
    return Blocker(config).start()


def row_memory(work: Path, seconds: float) -> Row:
    """Unique names with ~1 KB answers at full speed for `seconds`, default cache_bytes."""
    dnsperf = shutil.which("dnsperf")
    if dnsperf is None:
        sys.exit("soak: dnsperf is missing (apt-get install dnsperf)")
    knot = Knot(work / "knot-mem", ["bulk.test"]).start()
    server = started(work, knot.endpoint, "upstream_timeout: 2.0")
    try:
        names = work / "unique.txt"
        count = int(seconds * 25_000)
        with names.open("w") as out:
            out.writelines(f"u{i}.kb.bulk.test TXT\n" for i in range(count))
        before = rss(server)
        sampler = RssSampler(server)
        result = subprocess.run([dnsperf, "-s", "127.0.0.1", "-p", str(server.port), "-d", str(names),
                                 "-l", str(seconds), "-q", "200", "-t", "3", "-c", "4"],
                                capture_output=True, text=True, timeout=seconds + 60)
        peak = sampler.stop()
        qps = next((line.split()[-1] for line in result.stdout.splitlines() if "Queries per second" in line), "?")
        lost = next((line.split(":")[1].strip() for line in result.stdout.splitlines()
                     if "Queries lost" in line), "?")
        text = server.metrics()
        return {
            "seconds": seconds, "qps": qps, "lost": lost,
            "rss_start_mib": round(before / MiB, 1), "rss_peak_mib": round(peak / MiB, 1),
            "cache_mib": round(metric_value(text, "blocker_dns_cache_bytes") / MiB, 1),
            "cache_limit_mib": round(metric_value(text, "blocker_dns_cache_max_bytes") / MiB, 1),
            "cache_entries": int(metric_value(text, "blocker_dns_cache_entries")),
            "memo_mib": round(metric_value(text, "blocker_dns_memo_bytes") / MiB, 1),
            "memo_limit_mib": round(metric_value(text, "blocker_dns_memo_max_bytes") / MiB, 1),
            "gc_longest_ms": round(metric_value(text, "blocker_gc_pause_longest_seconds") * 1000, 1),
            "gc_gen2_count": int(metric_value(text, "blocker_gc_pause_seconds_count", {"generation": "2"})),
            "gc_gen2_total_ms": round(metric_value(text, "blocker_gc_pause_seconds_sum",
                                                   {"generation": "2"}) * 1000, 1),
            "gc_gen2_over_64ms": int(metric_value(text, "blocker_gc_pause_seconds_count", {"generation": "2"})
                                     - metric_value(text, "blocker_gc_pause_seconds_bucket",
                                                    {"generation": "2", "le": "0.064"})),
            "gc_freeze": os.environ.get("BLOCKER_GC_FREEZE", "1") != "0",
        }
    finally:
        server.stop()
        knot.stop()


def row_tcp60k(work: Path, names: int = 3000) -> Row:
    """Unique names with 60 KB answers over TCP, pipelined on 8 connections that read."""
    knot = Knot(work / "knot-60k", ["bulk.test"]).start()
    server = started(work, knot.endpoint, "upstream_timeout: 2.0")
    try:
        before = rss(server)
        sampler = RssSampler(server, 0.2)
        begun = time.monotonic()
        sizes: list[int] = []
        for start in range(0, names, 500):
            sizes += tcp_flood(server.port, [f"t{i}.big.bulk.test" for i in range(start, min(names, start + 500))],
                               connections=8, timeout=60)
        elapsed = time.monotonic() - begun
        peak = sampler.stop()
        after = rss(server)
        text = server.metrics()
        return {
            "names": names, "answered": len(sizes), "answers_over_60kb": sum(1 for size in sizes if size > 60_000),
            "seconds": round(elapsed, 1),
            "rss_start_mib": round(before / MiB, 1), "rss_peak_mib": round(peak / MiB, 1),
            "rss_end_mib": round(after / MiB, 1),
            "kib_per_name": round((after - before) / 1024 / names, 2),
            "cache_mib": round(metric_value(text, "blocker_dns_cache_bytes") / MiB, 2),
            "too_large": int(metric_value(text, "blocker_dns_cache_too_large_total")),
            "memo_mib": round(metric_value(text, "blocker_dns_memo_bytes") / MiB, 2),
        }
    finally:
        server.stop()
        knot.stop()


def row_hostage(work: Path, knot: Knot, seconds: float) -> Row:
    """1,000 pipelining, never-reading connections from 127.0.0.2 for `seconds`; a prober at 127.0.0.3."""
    server = started(work, knot.endpoint)
    try:
        server.query("big.example.test", "TXT", tcp=True)
        before = rss(server)
        sampler = RssSampler(server)
        prober = TcpProber(server.port, "127.0.0.3", ["www.example.test", "www.tiktok.com", "mail.example.test"])
        flood = NonReadingFlood(server.port, "127.0.0.2", 1000, "big.example.test").start()
        prober.start()
        time.sleep(seconds)
        prober.stop()
        flood.stop()
        peak = sampler.stop()
        text = server.metrics()
        closed = {reason: int(metric_value(text, "blocker_dns_tcp_closed_total", {"reason": reason}))
                  for reason in ("client_limit", "full", "shed_idle", "write_timeout", "wait_limit")}
        time.sleep(1)
    finally:
        server.stop()
    return {
        "seconds": seconds, "prober_answered": f"{prober.answered}/{prober.asked}",
        "prober_ratio": round(prober.ratio, 4), "prober_slowest_ms": round(prober.slowest * 1000, 1),
        "flood_connections_opened": flood.opened, "flood_dropped": flood.dropped,
        "rss_start_mib": round(before / MiB, 1), "rss_peak_mib": round(peak / MiB, 1),
        "tcp_closed": closed, "tracebacks": tracebacks(server),
    }


def row_querylog(work: Path, knot: Knot) -> Row:
    """A full disk (64 KiB tmpfs) and back; a rotation with a broken config."""
    disk = work / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        path = disk / "queries.jsonl"
        config = standard_config(work, [knot.endpoint], policy=f'query_log:\n  path: "{path}"\n', name="ql.yaml")
        server = Blocker(config).start()
        try:
            server.query("first.tiktok.com")
            deadline = time.monotonic() + 5
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            mode = oct(path.stat().st_mode & 0o777)
            fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while os.write(fd, b"\0" * 512):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
            asked = 0
            deadline = time.monotonic() + 10
            while metric_value(server.metrics(), "blocker_querylog_errors_total") == 0 and time.monotonic() < deadline:
                for _ in range(20):
                    server.query(f"full{asked}.tiktok.com")
                    asked += 1
            errors = metric_value(server.metrics(), "blocker_querylog_errors_total")
            answering = server.query("during.tiktok.com").rcode() == 3
            (disk / "filler").unlink()
            freed = time.monotonic()
            server.query("after.tiktok.com")
            recovered = None
            while time.monotonic() - freed < 15:
                if "after.tiktok.com" in path.read_text():
                    recovered = time.monotonic() - freed
                    break
                time.sleep(0.05)
            # Rotation while the config is broken.
            rotated = path.with_suffix(".jsonl.1")
            os.rename(path, rotated)
            config.write_text(config.read_text() + "typo_key: 1\n")
            server.signal(signal.SIGHUP)
            time.sleep(0.5)
            server.query("rotated.tiktok.com")
            deadline = time.monotonic() + 5
            while not (path.exists() and "rotated.tiktok.com" in path.read_text()) and time.monotonic() < deadline:
                time.sleep(0.05)
            new_file = path.exists() and "rotated.tiktok.com" in path.read_text()
            old_grew = "rotated.tiktok.com" in rotated.read_text()
            lines_whole = all(json.loads(line) for line in path.read_text().splitlines())
        finally:
            server.stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    return {
        "file_mode": mode, "errors_counted": int(errors), "answering_while_full": answering,
        "recovered_after_space_s": None if recovered is None else round(recovered, 2),
        "rotation_with_broken_config_new_file": new_file, "old_file_grew": old_grew,
        "lines_whole_json": lines_whole, "tracebacks": tracebacks(server),
    }


def row_sigterm(work: Path) -> Row:
    """6,000 UDP and 50 TCP queries waiting on a dead upstream, 20 stuck clients, then SIGTERM."""
    upstream = BlackHole()
    config = standard_config(work, [upstream.endpoint], "upstream_timeout: 1.0", name="term.yaml")
    config.write_text(config.read_text().replace("  upstream_timeout: 0.5\n", ""))
    server = Blocker(config).start()
    stuck = NonReadingFlood(server.port, "127.0.0.2", 20, "www.tiktok.com", pipeline=2000).start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * MiB)
    for i in range(6000):
        udp.sendto(dns.message.make_query(f"u{i}.example.test", "A").to_wire(), ("127.0.0.1", server.port))
    tcp = []
    for i in range(50):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((f"127.0.1.{i // 10 + 1}", 0))
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(framed(f"t{i}.example.test", "A", i))
        tcp.append(sock)
    time.sleep(0.3)
    server.signal(signal.SIGTERM)
    began = time.monotonic()
    udp.settimeout(3)
    udp_answered = 0
    try:
        while udp_answered < 6000:
            udp.recv(4096)
            udp_answered += 1
    except TimeoutError:
        pass
    tcp_answered = 0
    for sock in tcp:
        sock.settimeout(3)
        try:
            stream = sock.makefile("rb")
            length = struct.unpack("!H", stream.read(2))[0]
            if len(stream.read(length)) == length:
                tcp_answered += 1
        except (OSError, struct.error):
            pass
        sock.close()
    assert server.process is not None
    code = server.process.wait(15)
    stopped_after = time.monotonic() - began
    stuck.stop()
    udp.close()
    upstream.close()
    return {"udp_in_flight_answered": f"{udp_answered}/6000", "tcp_in_flight_answered": f"{tcp_answered}/50",
            "exit_code": code, "stopped_after_s": round(stopped_after, 2), "tracebacks": tracebacks(server)}


def row_small(work: Path, knot: Knot) -> Row:
    server = started(work, knot.endpoint)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(3)
            sock.sendto(struct.pack("!HHHHHH", 7, (4 << 11) | 0x0400, 0, 0, 0, 0), ("127.0.0.1", server.port))
            notify = {0: "NOERROR", 1: "FORMERR", 4: "NOTIMP"}.get(sock.recv(512)[3] & 0xF, "?")
        chaos = {}
        for name in ("version.bind", "hostname.bind", "id.server"):
            response = dns.query.udp(dns.message.make_query(name, "TXT", rdclass=dns.rdataclass.CH), "127.0.0.1",
                                     port=server.port, timeout=3)
            chaos[name] = dns.rcode.to_text(response.rcode())
        idle = [socket.create_connection(("127.0.0.1", server.metrics_port), timeout=3) for _ in range(200)]
        began = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
            response.read()
        scrape_ms = (time.monotonic() - began) * 1000
        began = time.monotonic()
        idle[0].settimeout(30)
        dropped = idle[0].recv(10) == b""
        dropped_after = time.monotonic() - began
        for sock in idle:
            sock.close()
    finally:
        server.stop()
    return {"notify_qdcount0": notify, "chaos": chaos, "scrape_with_200_idle_ms": round(scrape_ms, 1),
            "idle_http_dropped_after_s": round(dropped_after, 1) if dropped else "never"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="memory,tcp60k,hostage,querylog,sigterm,small")
    parser.add_argument("--seconds", type=float, default=120.0, help="length of the memory flood")
    parser.add_argument("--hostage-seconds", type=float, default=30.0)
    args = parser.parse_args()
    rows = args.rows.split(",")
    results: dict[str, Row] = {}
    with tempfile.TemporaryDirectory(prefix="i10a-soak-") as tmp:
        work = Path(tmp)
        knot = Knot(work / "knot", ["example.test", "tiktok.com"]).start()
        try:
            runs: dict[str, Callable[[], Row]] = {
                "memory": lambda: row_memory(work, args.seconds),
                "tcp60k": lambda: row_tcp60k(work),
                "hostage": lambda: row_hostage(work, knot, args.hostage_seconds),
                "querylog": lambda: row_querylog(work, knot),
                "sigterm": lambda: row_sigterm(work),
                "small": lambda: row_small(work, knot),
            }
            for name in rows:
                print(f"soak: {name} ...", file=sys.stderr, flush=True)
                results[name] = runs[name]()
                print(f"| {name} | {json.dumps(results[name])} |", flush=True)
        finally:
            knot.stop()
    print("\n| row | figures |\n| --- | --- |")
    for name, figures in results.items():
        print(f"| {name} | " + ", ".join(f"{k}={v}" for k, v in figures.items()) + " |")


if __name__ == "__main__":
    main()
