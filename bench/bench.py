"""Benchmark blocker against unbound and dnsmasq in the same run, on loopback, one core for the server.

Every server forwards to the same Knot upstream and blocks the same names (the shipped lists' fixed
rules; unbound as local-zones, dnsmasq as address=/d/). dnsperf runs pinned to the other core.
Mixes: blocked names, cached allowed names, 80 % allowed / 20 % blocked, and 300,000 blocked names
each asked once (nothing can be reused: the cold path). Then p99 latency at
a fixed 2,000 QPS, the cost of metrics, and load time and RSS with a 1,000,000-name list.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))

from helpers import free_port  # noqa: E402  (the tests' helper: a port free for UDP and TCP)

from blocker.blocklists import load_blocklists  # noqa: E402

SERVER_CPU = "0"
CLIENT_CPU = "1"
ALLOWED_NAMES = 2000


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        sys.exit(f"bench: {name} is missing (bench/run installs it)")
    return path


def wait_udp(port: int, timeout: float = 30.0) -> None:
    query = bytes.fromhex("abcd01000001000000000000") + b"\x07example\x04test\x00\x00\x06\x00\x01"
    end = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < end:
            try:
                s.sendto(query, ("127.0.0.1", port))
                s.recv(4096)
                return
            except OSError:
                time.sleep(0.1)
    raise SystemExit(f"bench: nothing answered on port {port}")


def pinned(cpu: str, args: list[str]) -> list[str]:
    return [tool("taskset"), "-c", cpu, *args]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Bench:
    def __init__(self, workdir: Path, seconds: int) -> None:
        self.workdir = workdir
        self.seconds = seconds
        self.lists = load_blocklists(ROOT / "blocklists")
        self.blocked_domains = sorted(self._fixed_rules())
        self.processes: list[subprocess.Popen[bytes]] = []

    def _fixed_rules(self) -> set[str]:
        rules = set()
        for path in (ROOT / "blocklists").glob("*.yaml"):
            for line in path.read_text().splitlines():
                found = re.match(r"^  - ([a-z0-9][a-z0-9.-]*[a-z0-9])\s*(#.*)?$", line)
                if found:
                    rules.add(found.group(1))
        return rules

    # --- the upstream and the query files -------------------------------------------------------
    def start_upstream(self) -> int:
        zone = self.workdir / "bench.test.zone"
        records = "\n".join(f"a{i} 3600 IN A 192.0.2.{i % 250 + 1}" for i in range(ALLOWED_NAMES))
        zone.write_text("$ORIGIN bench.test.\n$TTL 3600\n@ IN SOA ns h 1 3600 600 86400 3600\n@ IN NS ns\n"
                        f"ns IN A 127.0.0.1\n{records}\n")
        (self.workdir / "example.test.zone").write_text(
            "$ORIGIN example.test.\n@ 3600 IN SOA ns h 1 3600 600 86400 3600\n@ 3600 IN NS ns\n")
        port = free_port()
        conf = self.workdir / "knot.conf"
        conf.write_text(f"server:\n  rundir: \"{self.workdir}\"\n  listen: 127.0.0.1@{port}\n"
                        f"database:\n  storage: \"{self.workdir}/knotdb\"\n"
                        "log:\n  - target: stderr\n    any: error\n"
                        f"template:\n  - id: default\n    storage: \"{self.workdir}\"\n    file: \"%s.zone\"\n"
                        "zone:\n  - domain: bench.test\n  - domain: example.test\n")
        # The upstream runs on the client's core: it is only asked on cache misses.
        self.processes.append(subprocess.Popen(pinned(CLIENT_CPU, [tool("knotd"), "-c", str(conf)]),
                                               stderr=subprocess.DEVNULL))
        wait_udp(port)
        return port

    def query_files(self) -> dict[str, Path]:
        rng = random.Random(1)
        blocked = [f"{rng.choice(['www', 'api', 'm', 'cdn', 'edge1'])}.{d} A" for d in self.blocked_domains]
        rng.shuffle(blocked)
        allowed = [f"a{i}.bench.test A" for i in range(ALLOWED_NAMES)]
        mix = []
        for i in range(10_000):
            mix.append(rng.choice(blocked) if i % 5 == 0 else rng.choice(allowed))
        # Every name once: no answer, decision or category can be reused (the cold path).
        unique = [f"u{i}x{rng.randrange(10**6)}.{rng.choice(self.blocked_domains)} A" for i in range(300_000)]
        files = {"blocked": blocked, "cached": allowed, "mix": mix, "unique_blocked": unique}
        paths = {}
        for name, lines in files.items():
            path = self.workdir / f"{name}.txt"
            path.write_text("\n".join(lines) + "\n")
            paths[name] = path
        return paths

    # --- the servers under test ---------------------------------------------------------------
    def start_blocker(self, upstream: int, metrics: bool = True, extra_list: Path | None = None,
                      counters: bool = True) -> tuple[int, int]:
        port = free_port()
        lists = ROOT / "blocklists"
        if extra_list is not None:
            lists = self.workdir / "lists-1m"
            lists.mkdir(exist_ok=True)
            for path in (ROOT / "blocklists").glob("*.yaml"):
                shutil.copy(path, lists / path.name)
            (lists / "bulk.yaml").write_text(f"name: bulk\ninclude: [\"{extra_list}\"]\n")
        config = self.workdir / "blocker.yaml"
        metrics_listen = '"127.0.0.1:0"' if metrics else "null"
        config.write_text(f"dns:\n  listen: [\"127.0.0.1:{port}\"]\n  upstreams: [\"127.0.0.1:{upstream}\"]\n"
                          f"  cache_size: 100000\nmetrics:\n  listen: {metrics_listen}\n"
                          f"blocklists: \"{lists}\"\n"
                          "policy:\n  groups:\n    standard: {block: [tiktok, twitter, facebook, instagram, "
                          "snapchat, threads, whatsapp, telegram, signal, doh"
                          + (", bulk" if extra_list else "") + "]}\n")
        entry = ["-m", "blocker"] if counters else [str(ROOT / "bench" / "without_metrics.py")]
        process = subprocess.Popen(pinned(SERVER_CPU, [sys.executable, *entry, "serve", "--config", str(config)]),
                                   cwd=ROOT, stderr=subprocess.PIPE)
        self.processes.append(process)
        assert process.stderr is not None
        for raw in process.stderr:
            if b" ready " in raw:
                break
        else:
            raise SystemExit("bench: blocker did not start")
        wait_udp(port)
        return port, process.pid

    def start_unbound(self, upstream: int) -> int:
        port = free_port()
        zones = "\n".join(f'    local-zone: "{d}." always_nxdomain' for d in self.blocked_domains)
        conf = self.workdir / "unbound.conf"
        conf.write_text(f"""server:
    interface: 127.0.0.1@{port}
    port: {port}
    num-threads: 1
    do-daemonize: no
    chroot: ""
    username: ""
    pidfile: ""
    use-syslog: no
    verbosity: 0
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "iterator"
    qname-minimisation: no
    msg-cache-size: 64m
    rrset-cache-size: 128m
    so-reuseport: no
{zones}
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{upstream}
""")
        self.processes.append(subprocess.Popen(pinned(SERVER_CPU, [tool("unbound"), "-d", "-c", str(conf)]),
                                               stderr=subprocess.DEVNULL))
        wait_udp(port)
        return port

    def start_dnsmasq(self, upstream: int) -> int:
        port = free_port()
        conf = self.workdir / "dnsmasq.conf"
        conf.write_text("\n".join(f"address=/{d}/" for d in self.blocked_domains) + "\n")
        args = [tool("dnsmasq"), "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
                "--listen-address=127.0.0.1", f"--port={port}", f"--server=127.0.0.1#{upstream}",
                "--cache-size=10000", f"--conf-file={conf}", "--user=root", "--pid-file="]
        self.processes.append(subprocess.Popen(pinned(SERVER_CPU, args), stderr=subprocess.DEVNULL))
        wait_udp(port)
        return port

    # --- measurements ------------------------------------------------------------------------
    def dnsperf(self, port: int, queries: Path, seconds: int, qps: int | None = None,
                verbose: bool = False, once: bool = False) -> dict[str, float]:
        args = [tool("dnsperf"), "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-c", "8", "-q", "500",
                "-t", "2", *(["-n", "1"] if once else ["-l", str(seconds)])]
        if qps:
            args += ["-Q", str(qps)]
        if verbose:
            args.append("-v")
        out = subprocess.run(pinned(CLIENT_CPU, args), capture_output=True, text=True,
                             timeout=seconds + 30).stdout
        result = {
            "qps": float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "lost_pct": float(re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", out).group(1)),  # type: ignore[union-attr]
            "avg_ms": float(re.search(r"Average Latency \(s\):\s+([\d.]+)", out).group(1)) * 1000,  # type: ignore[union-attr]
        }
        if verbose:
            latencies = sorted(float(m) for m in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M))
            if latencies:
                result["p50_ms"] = latencies[len(latencies) // 2] * 1000
                result["p99_ms"] = latencies[int(len(latencies) * 0.99)] * 1000
        return result

    def warm(self, port: int, queries: Path) -> None:
        subprocess.run([tool("dnsperf"), "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-n", "2",
                        "-q", "50"], capture_output=True, timeout=120)

    def run(self) -> dict[str, object]:
        upstream = self.start_upstream()
        files = self.query_files()
        results: dict[str, object] = {"seconds_per_run": self.seconds, "blocked_rules": len(self.blocked_domains)}
        servers = {
            "blocker": lambda: self.start_blocker(upstream)[0],
            "unbound": lambda: self.start_unbound(upstream),
            "dnsmasq": lambda: self.start_dnsmasq(upstream),
        }
        for name, start in servers.items():
            port = start()
            self.warm(port, files["cached"])
            server_results = {}
            for mix in ("blocked", "cached", "mix"):
                server_results[mix] = self.dnsperf(port, files[mix], self.seconds)
            server_results["unique_blocked"] = self.dnsperf(port, files["unique_blocked"], self.seconds, once=True)
            server_results["mix_at_2000qps"] = self.dnsperf(port, files["mix"], min(self.seconds, 10), qps=2000,
                                                            verbose=True)
            results[name] = server_results
            stop(self.processes.pop())
            print(f"{name}: {json.dumps(server_results)}", flush=True)
        # Metrics cost: the same mix with every hot-path counter a no-op and the endpoint off.
        port, _pid = self.start_blocker(upstream, metrics=False, counters=False)
        self.warm(port, files["cached"])
        results["blocker_without_metrics"] = {"mix": self.dnsperf(port, files["mix"], self.seconds)}
        stop(self.processes.pop())
        results["load_1m"] = self.load_million(upstream)
        print(f"load_1m: {json.dumps(results['load_1m'])}", flush=True)
        return results

    def load_million(self, upstream: int) -> dict[str, float]:
        path = self.workdir / "million.txt"
        rng = random.Random(2)
        letters = "abcdefghijklmnopqrstuvwxyz0123456789"
        with path.open("w") as out:
            for i in range(1_000_000):
                label = "".join(rng.choice(letters) for _ in range(10))
                out.write(f"{label}{i}.{rng.choice(['com', 'net', 'org', 'io'])}\n")
        baseline_port, baseline_pid = self.start_blocker(upstream)
        baseline_rss = rss_mb(baseline_pid)
        stop(self.processes.pop())
        started = time.monotonic()
        port, pid = self.start_blocker(upstream, extra_list=path)
        load_seconds = time.monotonic() - started
        rss = rss_mb(pid)
        stop(self.processes.pop())
        del port, baseline_port
        return {"load_seconds": round(load_seconds, 2), "rss_mb": round(rss, 1),
                "baseline_rss_mb": round(baseline_rss, 1)}

    def close(self) -> None:
        for process in reversed(self.processes):
            stop(process)


def report(results: dict[str, object]) -> str:
    lines = ["", "| mix | blocker qps | unbound qps | dnsmasq qps | blocker/unbound | blocker/dnsmasq |",
             "| --- | --- | --- | --- | --- | --- |"]
    b, u, d = results["blocker"], results["unbound"], results["dnsmasq"]  # type: ignore[index]
    for mix in ("blocked", "cached", "mix", "unique_blocked"):
        bq, uq, dq = b[mix]["qps"], u[mix]["qps"], d[mix]["qps"]  # type: ignore[index]
        lines.append(f"| {mix} | {bq:,.0f} | {uq:,.0f} | {dq:,.0f} | {bq / uq:.2f} | {bq / dq:.2f} |")
    lines.append("")
    lines.append("| at 2,000 QPS (mix) | p50 ms | p99 ms | lost % |")
    lines.append("| --- | --- | --- | --- |")
    for name, data in (("blocker", b), ("unbound", u), ("dnsmasq", d)):
        at = data["mix_at_2000qps"]  # type: ignore[index]
        lines.append(f"| {name} | {at.get('p50_ms', 0):.3f} | {at.get('p99_ms', 0):.3f} | {at['lost_pct']:.2f} |")
    no_metrics = results["blocker_without_metrics"]["mix"]["qps"]  # type: ignore[index]
    with_metrics = b["mix"]["qps"]  # type: ignore[index]
    lines.append("")
    lines.append(f"metrics on vs counters off (mix): {with_metrics:,.0f} vs {no_metrics:,.0f} qps "
                 f"(cost {(1 - with_metrics / no_metrics) * 100:+.1f} %)")
    load = results["load_1m"]
    lines.append(f"1,000,000 extra names: ready in {load['load_seconds']} s, RSS {load['rss_mb']} MB "  # type: ignore[index]
                 f"(shipped lists only: {load['baseline_rss_mb']} MB)")  # type: ignore[index]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15, help="length of each dnsperf run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs two cores (one for the server, one for dnsperf)")
    with tempfile.TemporaryDirectory(prefix="blocker-bench-") as tmp:
        bench = Bench(Path(tmp), args.seconds)
        try:
            results = bench.run()
        finally:
            bench.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"\nraw results: {args.out}")


if __name__ == "__main__":
    main()
