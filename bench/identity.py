"""The cost of knowing who is asking: CPU per query on the 80/20 mix with and without 100,000
inventory devices and 100,000 RADIUS bindings, plus the inventory's load time and memory.

dnsperf sends from one source address, which would hide identification behind the memo, so this
drives the resolver's own `handle()` in process from 100,000 source addresses, against a real Knot
upstream (allowed names are forwarded once, then cached). Binding churn is included: one binding
changes every CHURN_EVERY queries (an interim with a new device), so the memo keeps forgetting.

    python3 bench/identity.py [--queries 600000] [--rounds 12]
    python3 bench/identity.py --dnsperf [--rounds 4] [--seconds 10]   # the real server, dnsperf, one core
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import dnslib  # noqa: E402
from helpers import free_port, wait_for_dns  # noqa: E402

from blocker.bindings import BindingTable  # noqa: E402
from blocker.cache import AnswerCache  # noqa: E402
from blocker.clock import Clock  # noqa: E402
from blocker.inventory import load_inventory, parse_network  # noqa: E402
from blocker.metrics import Stats  # noqa: E402
from blocker.policy import load_policy  # noqa: E402
from blocker.recorder import Recorder  # noqa: E402
from blocker.resolver import Resolver  # noqa: E402
from blocker.upstream import follow_config  # noqa: E402

DEVICES = 100_000
ALLOWED = 2000
CHURN_EVERY = 500
NO_GC = False


def address(i: int) -> str:
    return f"10.{8 + i // 65536}.{i // 256 % 256}.{i % 256}"


def start_knot(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    zone = workdir / "bench.test.zone"
    records = "\n".join(f"a{i} 3600 IN A 192.0.2.{i % 250 + 1}" for i in range(ALLOWED))
    zone.write_text("$ORIGIN bench.test.\n$TTL 3600\n@ IN SOA ns h 1 3600 600 86400 3600\n@ IN NS ns\n"
                    f"ns IN A 127.0.0.1\n{records}\n")
    port = free_port()
    conf = workdir / "knot.conf"
    conf.write_text(f"server:\n  rundir: \"{workdir}\"\n  listen: 127.0.0.1@{port}\n"
                    f"database:\n  storage: \"{workdir}/knotdb\"\nlog:\n  - target: stderr\n    any: error\n"
                    f"template:\n  - id: default\n    storage: \"{workdir}\"\n    file: \"%s.zone\"\n"
                    "zone:\n  - domain: bench.test\n")
    knotd = shutil.which("knotd") or "/usr/sbin/knotd"
    process = subprocess.Popen([knotd, "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_for_dns(port, "bench.test")
    return process, port


def write_config(workdir: Path, port: int, inventory: bool) -> Path:
    config = workdir / ("with.yaml" if inventory else "without.yaml")
    config.write_text(f"dns:\n  listen: [\"127.0.0.1:0\"]\n  upstreams: [\"127.0.0.1:{port}\"]\n"
                      f"  allow_networks: [\"10.0.0.0/8\"]\nblocklists: \"{ROOT / 'blocklists'}\"\n"
                      + ("policy:\n  inventory: [devices.csv]\n" if inventory else ""))
    return config


def queries(rng: random.Random, count: int) -> list[tuple[bytes, str]]:
    blocked = ["www.tiktok.com", "www.facebook.com", "api.twitter.com", "www.instagram.com", "web.whatsapp.com",
               "m.snapchat.com", "edge1.threads.net", "t.me", "signal.org", "dns.google"]
    packets_allowed = [dnslib.DNSRecord.question(f"a{i}.bench.test", "A").pack() for i in range(ALLOWED)]
    packets_blocked = [dnslib.DNSRecord.question(name, "A").pack() for name in blocked]
    out = []
    for i in range(count):
        data = rng.choice(packets_blocked) if i % 5 == 0 else rng.choice(packets_allowed)
        out.append((rng.randbytes(2) + data[2:], address(rng.randrange(DEVICES))))
    return out


async def run(resolver: Resolver, stream: list[tuple[bytes, str]], bindings: BindingTable | None,
              rng: random.Random) -> float:
    """CPU seconds per query over the stream (coroutines, i.e. cache misses, are awaited)."""
    gc.collect()
    if NO_GC:
        gc.disable()
    started = time.process_time()
    for n, (data, source) in enumerate(stream):
        reply = resolver.handle(data, source, "udp")
        if reply is not None and not isinstance(reply, bytes):
            await reply
        # The same test on both sides, so the loop costs both the same; only "with" has bindings to change.
        if n % CHURN_EVERY == 0 and bindings is not None:
            i = rng.randrange(DEVICES // 2, DEVICES)
            bindings.bind(parse_network(address(i)), f"MPS-{rng.randrange(DEVICES):06d}", "gw", time.time(),  # type: ignore[arg-type]
                          time.time() + 3600)
    spent = time.process_time() - started
    gc.enable()
    return spent / len(stream)


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    knot, port = start_knot(workdir)
    try:
        # Half the devices have a static address, the other half are known only by a binding.
        with (workdir / "devices.csv").open("w") as out:
            out.write("id,group,addresses,model\n")
            for i in range(DEVICES):
                out.write(f"MPS-{i:06d},standard,{address(i) if i < DEVICES // 2 else ''},Pixel 8\n")
        gc.collect()
        load_cpu = []
        for _ in range(3):
            started = time.process_time()
            load_inventory([workdir / "devices.csv"], ["standard", "comms-team"])
            load_cpu.append(time.process_time() - started)
        tracemalloc.start()
        inventory = load_inventory([workdir / "devices.csv"], ["standard", "comms-team"])
        memory = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del inventory
        results: dict[str, object] = {
            "inventory_devices": DEVICES,
            "inventory_load_cpu_seconds": round(min(load_cpu), 3),
            "inventory_memory_mb": round(memory / 1e6, 1),
        }
        # Both resolvers are built and warmed first, then measured in alternating rounds (the median
        # of each): a shared machine's noise then falls on both alike.
        resolvers: dict[str, tuple[Resolver, BindingTable | None]] = {}
        for label, with_identity in (("without", False), ("with", True)):
            policy = load_policy(write_config(workdir, port, with_identity))
            bindings = None
            if with_identity:
                bindings = BindingTable(capacity=DEVICES * 2)
                now = time.time()
                for i in range(DEVICES // 2, DEVICES):
                    bindings.bind(parse_network(address(i)), f"MPS-{i:06d}", "gw", now, now + 3600)  # type: ignore[arg-type]
                for i in range(DEVICES // 2):  # 50,000 more bindings elsewhere: 100,000 in the table
                    bindings.bind(parse_network(f"10.{200 + i // 65536}.{i // 256 % 256}.{i % 256}"),  # type: ignore[arg-type]
                                  f"MPS-{i:06d}", "gw", now, now + 3600)
                results["bindings"] = len(bindings)
            stats = Stats()
            clock = Clock()
            resolver = Resolver(policy, AnswerCache(100_000), follow_config(None, policy.config.dns, stats),
                                Recorder(stats, clock), clock, bindings)
            await run(resolver, queries(random.Random(12), 200_000), bindings, random.Random(13))
            resolvers[label] = (resolver, bindings)
        samples: dict[str, list[float]] = {"without": [], "with": []}
        for round_ in range(args.rounds):
            stream = queries(random.Random(100 + round_), args.queries // args.rounds)
            for label in (("without", "with") if round_ % 2 == 0 else ("with", "without")):
                resolver, bindings = resolvers[label]
                samples[label].append(await run(resolver, stream, bindings, random.Random(round_)))
        for label, values in samples.items():
            results[f"cpu_us_per_query_{label}"] = round(statistics.median(values) * 1e6, 2)
            results[f"cpu_us_per_query_{label}_rounds"] = [round(v * 1e6, 2) for v in values]
        for resolver, _ in resolvers.values():
            resolver.upstreams.close()
        base, loaded = results["cpu_us_per_query_without"], results["cpu_us_per_query_with"]
        results["increase_percent"] = round((loaded / base - 1) * 100, 1)  # type: ignore[operator]
        return results
    finally:
        knot.terminate()
        knot.wait(10)


def end_to_end(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    """The real server (pinned to CPU 0) under dnsperf (CPU 1) on the 80/20 mix, without and with 100,000
    inventory devices and 100,000 bindings (restored from a snapshot; dnsperf's 127.0.0.1 is one of them)."""
    from blocker.bindings import Binding, write_snapshot

    def tool(name: str) -> str:
        found = shutil.which(name)
        if found is None:
            sys.exit(f"bench: {name} is missing (bench/run installs it)")
        return found

    def pinned(cpu: str, command: list[str]) -> list[str]:
        return [tool("taskset"), "-c", cpu, *command]

    knot, port = start_knot(workdir)
    try:
        with (workdir / "devices.csv").open("w") as out:
            out.write("id,group,addresses\n")
            for i in range(DEVICES):
                out.write(f"MPS-{i:06d},standard,{address(i) if i < DEVICES // 2 else ''}\n")
        now = time.time()
        rows = [Binding(parse_network(f"10.{200 + i // 65536}.{i // 256 % 256}.{i % 256}"),  # type: ignore[arg-type]
                        f"MPS-{i:06d}", "gw", now, now + 7200).as_row() for i in range(DEVICES - 1)]
        rows.append(Binding((4, 0x7F000001, 32), "MPS-000001", "gw", now, now + 7200).as_row())
        write_snapshot(rows, workdir / "bindings.json", now)
        (workdir / "radius.secret").write_text("bench\n")
        base = (f"dns:\n  listen: [\"127.0.0.1:0\"]\n  upstreams: [\"127.0.0.1:{port}\"]\n"
                f"metrics:\n  listen: null\nblocklists: \"{ROOT / 'blocklists'}\"\n")
        configs = {"without": base,
                   "with": base + ("policy:\n  inventory: [devices.csv]\nidentity:\n  snapshot: bindings.json\n"
                                   "  radius_accounting: {listen: \"127.0.0.1:0\", secret_file: radius.secret, "
                                   "clients: [\"127.0.0.1/32\"]}\n")}
        rng = random.Random(1)
        blocked = ["www.tiktok.com", "www.facebook.com", "api.twitter.com", "www.instagram.com", "web.whatsapp.com"]
        lines = [f"{rng.choice(blocked)} A" if i % 5 == 0 else f"a{rng.randrange(ALLOWED)}.bench.test A"
                 for i in range(10_000)]
        (workdir / "mix.txt").write_text("\n".join(lines) + "\n")
        qps: dict[str, list[float]] = {"without": [], "with": []}
        for round_ in range(args.rounds):
            for label in (("without", "with") if round_ % 2 == 0 else ("with", "without")):
                config = workdir / f"{label}.yaml"
                config.write_text(configs[label])
                server = subprocess.Popen(pinned("0", [sys.executable, "-m", "blocker", "serve", "--config",
                                                       str(config)]), cwd=ROOT, stderr=subprocess.PIPE, text=True)
                try:
                    dns_port = 0
                    assert server.stderr is not None
                    for line in server.stderr:
                        found = re.search(r"listening dns=127\.0\.0\.1:(\d+)", line)
                        dns_port = int(found.group(1)) if found else dns_port
                        if " ready " in line:
                            break
                    subprocess.run([tool("dnsperf"), "-s", "127.0.0.1", "-p", str(dns_port), "-d",
                                    str(workdir / "mix.txt"), "-n", "1", "-q", "50"], capture_output=True, timeout=120)
                    out = subprocess.run(pinned("1", [tool("dnsperf"), "-s", "127.0.0.1", "-p", str(dns_port), "-d",
                                                      str(workdir / "mix.txt"), "-c", "8", "-q", "500", "-t", "2",
                                                      "-l", str(args.seconds)]),
                                         capture_output=True, text=True, timeout=args.seconds + 60).stdout
                    qps[label].append(float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1)))  # type: ignore[union-attr]
                finally:
                    server.terminate()
                    server.wait(20)
        median = {label: statistics.median(values) for label, values in qps.items()}
        return {"dnsperf_qps_without": qps["without"], "dnsperf_qps_with": qps["with"],
                "dnsperf_cpu_us_per_query_without": round(1e6 / median["without"], 2),
                "dnsperf_cpu_us_per_query_with": round(1e6 / median["with"], 2),
                "dnsperf_increase_percent": round((median["without"] / median["with"] - 1) * 100, 1)}
    finally:
        knot.terminate()
        knot.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=600_000, help="measured queries, over all rounds")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--dnsperf", action="store_true",
                        help="instead: the real server under dnsperf (one source address), QPS on one core")
    parser.add_argument("--seconds", type=int, default=10, help="per dnsperf run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blocker-identity-bench-") as tmp:
        results = end_to_end(args, Path(tmp)) if args.dnsperf else asyncio.run(measure(args, Path(tmp)))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
