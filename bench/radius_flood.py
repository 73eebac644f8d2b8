"""Bad input at volume for the RADIUS accounting listener: 1,000,000 random packets, bounded.

Two parts: (1) the packet handler itself, in process, fed 1,000,000 random datagrams from a listed
client (headers made plausible for a quarter of them, so decoding and MD5 run): CPU per packet and
memory growth; (2) the standalone listener (`python -m blocker.radius`) on loopback, sent 1,000,000
random datagrams over UDP plus a flood of authentic Starts for one address, then asked by the real
radclient whether it still answers; its RSS before and after.

    python3 bench/radius_flood.py [--packets 1000000]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import random
import socket
import struct
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from radius_tools import SECRET, RadiusListener, acct_packet, radclient  # noqa: E402

from blocker.bindings import BindingTable  # noqa: E402
from blocker.config import RadiusConfig  # noqa: E402
from blocker.radius import AccountingServer  # noqa: E402


def packets(rng: random.Random, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        if i % 4 == 0:
            body = rng.randbytes(rng.randrange(0, 300))
            out.append(struct.pack("!BBH", 4, i % 256, 20 + len(body)) + rng.randbytes(16) + body)
        else:
            out.append(rng.randbytes(rng.randrange(0, 700)))
    return out


def in_process(count: int) -> dict[str, object]:
    logging.getLogger("blocker").setLevel(logging.ERROR)  # one warning a minute per source: here every 60 packets
    table = BindingTable()
    server = AccountingServer(RadiusConfig(clients=(ipaddress.ip_network("127.0.0.0/8"),)), SECRET.encode(), table,
                              clock=iter(range(10**9)).__next__)  # type: ignore[arg-type]  # a new second each packet
    rng = random.Random(7)
    batch = 100_000
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cpu = 0.0
    for _ in range(count // batch):
        data = packets(rng, batch)
        started = time.process_time()
        for packet in data:
            server.handle(packet, "127.0.0.1")
        cpu += time.process_time() - started
        del data
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    counts = {f"{k}/{r}": v for (k, r), v in server.stats.packets.items() if v}
    return {"packets": count, "cpu_us_per_packet": round(cpu / count * 1e6, 2),
            "memory_growth_kb": round((after - before) / 1024, 1), "bindings": len(table), "results": counts}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def over_udp(count: int, workdir: Path) -> dict[str, object]:
    (workdir / "radius.secret").write_text(SECRET + "\n")
    config = workdir / "blocker.yaml"
    config.write_text('identity:\n  radius_accounting:\n    listen: "127.0.0.1:0"\n    secret_file: radius.secret\n'
                      '    clients: ["127.0.0.0/8"]\n')
    listener = RadiusListener(config).start()
    try:
        assert listener.process is not None
        assert radclient(listener.port, {"User-Name": "MPS-0", "Acct-Status-Type": "Start",
                                         "Framed-IP-Address": "10.8.0.1"})
        rss_before = rss_kb(listener.process.pid)
        rng = random.Random(8)
        started = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            target = ("127.0.0.1", listener.port)
            for _ in range(count // 10_000):
                for packet in packets(rng, 10_000):
                    sock.sendto(packet, target)
            for i in range(20_000):  # a flood of authentic Starts for one address
                sock.sendto(acct_packet(User_Name=f"FLOOD-{i}", Acct_Status_Type=1, Framed_IP_Address="10.8.0.77"),
                            target)
        sent_in = time.monotonic() - started
        answered = radclient(listener.port, {"User-Name": "MPS-1", "Acct-Status-Type": "Start",
                                             "Framed-IP-Address": "10.8.0.2"}, timeout=2.0, retries=3)
        rss_after = rss_kb(listener.process.pid)
        return {"packets": count + 20_000, "send_seconds": round(sent_in, 1), "still_answers": answered,
                "rss_kb_before": rss_before, "rss_kb_after": rss_after,
                "binding_events": len(listener.events)}
    finally:
        listener.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    args = parser.parse_args()
    results = {"in_process": in_process(args.packets)}
    with tempfile.TemporaryDirectory(prefix="blocker-radius-flood-") as tmp:
        results["over_udp"] = over_udp(args.packets, Path(tmp))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
