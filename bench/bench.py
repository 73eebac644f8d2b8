"""Benchmark blocker against unbound and dnsmasq in the same run, on loopback, one core for the server.

Every server forwards to the same Knot upstream and blocks the same names (the shipped lists' fixed
rules; unbound as local-zones, dnsmasq as address=/d/). dnsperf runs pinned to the other core.
For every mix: queries per second, queries lost, and the server's CPU time per answered query
(utime+stime of the server process over the run, from /proc/PID/stat, divided by the answers):
on a machine where dnsperf, not the server, caps the rate, q/s alone hides a server that costs
twice as much; CPU per query does not.

Mixes: blocked names; cached allowed names; 80 % allowed / 20 % blocked; 300,000 blocked names
each asked once (nothing can be reused: the cold path); and a Zipf-like mix over 100,000 names
(a few names carry most queries, a long tail is asked once; 20 % of queries blocked; allowed
names are new to the cache the first time). Then p50/p99 latency at a steady 2,000 q/s, the cost
of metrics, and the time and memory an extra list of 1,000,000 names adds.

Self-contained on purpose: it needs the blocker checkout it lives in, its runtime dependencies
and the Debian tools that `bench/run` installs, nothing from tests/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVER_CPU = "0"
CLIENT_CPU = "1"
ALLOWED_NAMES = 2000
ZIPF_NAMES = 100_000
ZIPF_SCALE = 50_000  # the rank-r name is asked max(1, ZIPF_SCALE // r) times: ~620,000 queries
ZIPF_BLOCKED = 0.20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIXES = ("blocked", "cached", "mix", "unique_blocked", "zipf")
ONCE = ("unique_blocked", "zipf")  # asked once through the file: a second pass would be warm
SERVERS = ("blocker", "unbound", "dnsmasq")


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        sys.exit(f"bench: {name} is missing (bench/run installs it)")
    return path


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


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


def wait_ready(process: subprocess.Popen[bytes], port: int) -> None:
    """Until `blocker serve` logs that it is ready and answers on `port`; its log read on after."""
    assert process.stderr is not None
    for raw in process.stderr:
        if b" ready " in raw:
            if b" loop=uvloop" not in raw:
                print(f"bench: warning: blocker is not on uvloop: {raw.decode().strip()}", file=sys.stderr)
            break
    else:
        raise SystemExit("bench: blocker did not start")
    # Keep reading its log, or a full pipe would stall it.
    threading.Thread(target=process.stderr.read, daemon=True).start()
    wait_udp(port)


def pinned(cpu: str, args: list[str]) -> list[str]:
    return [tool("taskset"), "-c", cpu, *args]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, all its threads included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def machine() -> dict[str, object]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break

    def version(args: list[str]) -> str:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10)
        found = re.search(r"[Vv]ersion\s+(\S+)", out.stdout + out.stderr)
        return found.group(1) if found else "?"

    try:
        import uvloop
        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "missing"
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": model, "cores": os.cpu_count(),
            "kernel": platform.release(), "python": platform.python_version(), "uvloop": uvloop_version,
            "unbound": version([tool("unbound"), "-V"]), "dnsmasq": version([tool("dnsmasq"), "-v"]),
            "dnsperf": version([tool("dnsperf"), "-h"])}


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def zipf_queries(blocked_domains: list[str], rng: random.Random) -> list[str]:
    """100,000 names, the rank-r one asked ~1/r as often; a fifth of the queries blocked at every rank band.

    Each name is blocked or not so that the blocked share of the queries so far stays at 20 %: the
    head and the tail are both a fifth blocked, as in a real mix, not by luck of the draw.
    """
    lines: list[str] = []
    blocked_so_far = total = 0
    for rank in range(1, ZIPF_NAMES + 1):
        count = max(1, ZIPF_SCALE // rank)
        if blocked_so_far + count <= ZIPF_BLOCKED * (total + count) + 0.5:
            domain = blocked_domains[rank % len(blocked_domains)]
            name = f"z{rank}.{domain}"
            blocked_so_far += count
        else:
            name = f"z{rank}.bench.test"  # the bench.test zone's wildcard answers it
        total += count
        lines.extend([f"{name} A"] * count)
    rng.shuffle(lines)
    return lines


class Bench:
    def __init__(self, workdir: Path, seconds: int, profile: Path | None = None) -> None:
        self.workdir = workdir
        self.seconds = seconds
        self.profile = profile  # a folder for py-spy's collapsed stacks of blocker, one file per mix
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
                        f"ns IN A 127.0.0.1\n* 3600 IN A 192.0.2.251\n{records}\n")
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
        files = {"blocked": blocked, "cached": allowed, "mix": mix, "unique_blocked": unique,
                 "zipf": zipf_queries(self.blocked_domains, rng)}
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
        # The checkout this file lives in, whatever copy of blocker is installed.
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen(pinned(SERVER_CPU, [sys.executable, *entry, "serve", "--config", str(config)]),
                                   cwd=ROOT, stderr=subprocess.PIPE, env=env)
        self.processes.append(process)
        wait_ready(process, port)
        return port, process.pid

    def start_unbound(self, upstream: int) -> tuple[int, int]:
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
        process = subprocess.Popen(pinned(SERVER_CPU, [tool("unbound"), "-d", "-c", str(conf)]),
                                   stderr=subprocess.DEVNULL)
        self.processes.append(process)
        wait_udp(port)
        return port, process.pid

    def start_dnsmasq(self, upstream: int) -> tuple[int, int]:
        port = free_port()
        conf = self.workdir / "dnsmasq.conf"
        conf.write_text("\n".join(f"address=/{d}/" for d in self.blocked_domains) + "\n")
        args = [tool("dnsmasq"), "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
                "--listen-address=127.0.0.1", f"--port={port}", f"--server=127.0.0.1#{upstream}",
                "--cache-size=10000", f"--conf-file={conf}", "--user=root", "--pid-file="]
        process = subprocess.Popen(pinned(SERVER_CPU, args), stderr=subprocess.DEVNULL)
        self.processes.append(process)
        wait_udp(port)
        return port, process.pid

    # --- measurements ------------------------------------------------------------------------
    def dnsperf(self, port: int, pid: int, queries: Path, seconds: int, qps: int | None = None,
                verbose: bool = False, once: bool = False, profile: bool = False) -> dict[str, float]:
        args = [tool("dnsperf"), "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-c", "8", "-q", "500",
                "-t", "2", *(["-n", "1"] if once else ["-l", str(seconds)])]
        if qps:
            args += ["-Q", str(qps)]
        if verbose:
            args.append("-v")
        load = load_average()
        spy = self._spy(pid, f"{queries.stem}{'-' + str(qps) if qps else ''}") if profile else None
        cpu_before = cpu_seconds(pid)
        out = subprocess.run(pinned(CLIENT_CPU, args), capture_output=True, text=True,
                             timeout=600 if once else seconds + 30).stdout
        cpu_after = cpu_seconds(pid)
        user, system = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
        cpu = user + system
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(60)

        def number(pattern: str) -> float:
            found = re.search(pattern, out)
            if found is None:
                raise SystemExit(f"bench: unexpected dnsperf output:\n{out[-2000:]}")
            return float(found.group(1))

        completed = number(r"Queries completed:\s+(\d+)")
        result = {
            "qps": number(r"Queries per second:\s+([\d.]+)"),
            "lost_pct": number(r"Queries lost:\s+\d+ \(([\d.]+)%\)"),
            "avg_ms": number(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
            "completed": completed,
            "cpu_s": round(cpu, 3),
            "cpu_us_per_query": round(cpu / completed * 1e6, 2) if completed else 0.0,
            # Kernel time (the UDP path, which every server pays) apart from the server's own work.
            "user_us_per_query": round(user / completed * 1e6, 2) if completed else 0.0,
            "system_us_per_query": round(system / completed * 1e6, 2) if completed else 0.0,
            "load_1min": load,
        }
        if verbose:
            latencies = sorted(float(m) for m in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M))
            if latencies:
                result["p50_ms"] = latencies[len(latencies) // 2] * 1000
                result["p99_ms"] = latencies[int(len(latencies) * 0.99)] * 1000
                result["p999_ms"] = latencies[int(len(latencies) * 0.999)] * 1000
        return result

    def _spy(self, pid: int, name: str) -> subprocess.Popen[bytes]:
        assert self.profile is not None
        self.profile.mkdir(parents=True, exist_ok=True)
        out = self.profile / f"{name}.txt"
        # On the client's core, so the sampling does not steal the server's.
        return subprocess.Popen(pinned(CLIENT_CPU, [tool("py-spy"), "record", "--pid", str(pid), "--format", "raw",
                                                    "--rate", "250", "--nonblocking", "--output", str(out)]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def warm(self, port: int, queries: Path) -> None:
        subprocess.run([tool("dnsperf"), "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-n", "2",
                        "-q", "50"], capture_output=True, timeout=120)

    def run(self, servers: tuple[str, ...], mixes: tuple[str, ...], extras: bool) -> dict[str, object]:
        upstream = self.start_upstream()
        files = self.query_files()
        results: dict[str, object] = {"machine": machine(), "seconds_per_run": self.seconds,
                                      "blocked_rules": len(self.blocked_domains),
                                      "zipf_queries": sum(1 for _ in files["zipf"].open())}
        starts: dict[str, Callable[[], tuple[int, int]]] = {
            "blocker": lambda: self.start_blocker(upstream),
            "unbound": lambda: self.start_unbound(upstream),
            "dnsmasq": lambda: self.start_dnsmasq(upstream),
        }
        for name in servers:
            port, pid = starts[name]()
            self.warm(port, files["cached"])
            server_results = {}
            spy = self.profile is not None and name == "blocker"
            for mix in mixes:
                server_results[mix] = self.dnsperf(port, pid, files[mix], self.seconds, once=mix in ONCE,
                                                   profile=spy)
            server_results["mix_at_2000qps"] = self.dnsperf(port, pid, files["mix"], min(self.seconds, 10),
                                                            qps=2000, verbose=True, profile=spy)
            results[name] = server_results
            stop(self.processes.pop())
            print(f"{name}: {json.dumps(server_results)}", flush=True)
        if extras:
            # Metrics cost: the same mix with every hot-path counter a no-op and the endpoint off.
            port, pid = self.start_blocker(upstream, metrics=False, counters=False)
            self.warm(port, files["cached"])
            results["blocker_without_metrics"] = {"mix": self.dnsperf(port, pid, files["mix"], self.seconds)}
            stop(self.processes.pop())
            results["load_1m"] = self.load_million(upstream)
            print(f"load_1m: {json.dumps(results['load_1m'])}", flush=True)
        return results

    def _timed_start(self, upstream: int, extra_list: Path | None) -> tuple[float, float]:
        started = time.monotonic()
        _port, pid = self.start_blocker(upstream, extra_list=extra_list)
        seconds = time.monotonic() - started
        rss = rss_mb(pid)
        stop(self.processes.pop())
        return seconds, rss

    def load_million(self, upstream: int) -> dict[str, float]:
        path = self.workdir / "million.txt"
        rng = random.Random(2)
        letters = "abcdefghijklmnopqrstuvwxyz0123456789"
        with path.open("w") as out:
            for i in range(1_000_000):
                label = "".join(rng.choice(letters) for _ in range(10))
                out.write(f"{label}{i}.{rng.choice(['com', 'net', 'org', 'io'])}\n")
        base_seconds, base_rss = self._timed_start(upstream, None)
        seconds, rss = self._timed_start(upstream, path)
        return {"load_seconds": round(seconds, 2), "rss_mb": round(rss, 1),
                "baseline_seconds": round(base_seconds, 2), "baseline_rss_mb": round(base_rss, 1),
                "added_seconds": round(seconds - base_seconds, 2), "added_rss_mb": round(rss - base_rss, 1)}

    def close(self) -> None:
        for process in reversed(self.processes):
            stop(process)


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if numerator and denominator else "-"


def report(results: dict[str, object]) -> str:
    m = results["machine"]
    present = [s for s in SERVERS if s in results]
    data = {s: results[s] for s in present}
    mixes = [mix for mix in (*MIXES, "mix_at_2000qps") if all(mix in data[s] for s in present)]  # type: ignore[operator]
    peers = [p for p in ("unbound", "dnsmasq") if p in present and "blocker" in present]
    lines = [f"{m['date']}, {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, "  # type: ignore[index]
             f"uvloop {m['uvloop']}, unbound {m['unbound']}, dnsmasq {m['dnsmasq']}, dnsperf {m['dnsperf']}; "  # type: ignore[index]
             f"server on CPU {SERVER_CPU}, dnsperf and Knot on CPU {CLIENT_CPU}, {results['seconds_per_run']} s "
             f"per run. Ratios: blocker's q/s over the peer's; the peer's CPU per query over blocker's (so > 1 "
             "is blocker better in both). Load: the 1-minute load average as each run started.", ""]
    head = "| mix | " + " | ".join(f"{s} q/s (lost %)" for s in present)
    head += "".join(f" | q/s vs {p}" for p in peers)
    head += " | " + " | ".join(f"{s} CPU µs/query" for s in present)
    head += "".join(f" | CPU vs {p}" for p in peers) + " | load |"
    lines += [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for mix in mixes:
        row = [mix]
        row += [f"{data[s][mix]['qps']:,.0f} ({data[s][mix]['lost_pct']:.2f})" for s in present]  # type: ignore[index]
        row += [_ratio(data["blocker"][mix]["qps"], data[p][mix]["qps"]) for p in peers]  # type: ignore[index]
        row += [f"{data[s][mix]['cpu_us_per_query']:.1f}" for s in present]  # type: ignore[index]
        row += [_ratio(data[p][mix]["cpu_us_per_query"], data["blocker"][mix]["cpu_us_per_query"])  # type: ignore[index]
                for p in peers]
        row.append("/".join(f"{data[s][mix]['load_1min']:.2f}" for s in present))  # type: ignore[index]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| at 2,000 q/s (mix) | p50 ms | p99 ms | p99.9 ms | lost % |", "| --- | --- | --- | --- | --- |"]
    for name in present:
        at = data[name]["mix_at_2000qps"]  # type: ignore[index]
        lines.append(f"| {name} | {at.get('p50_ms', 0):.3f} | {at.get('p99_ms', 0):.3f} | "
                     f"{at.get('p999_ms', 0):.3f} | {at['lost_pct']:.2f} |")
    if "blocker_without_metrics" in results and "blocker" in data:
        off = results["blocker_without_metrics"]["mix"]  # type: ignore[index]
        on = data["blocker"]["mix"]  # type: ignore[index]
        lines += ["", f"Metrics on vs hot-path counters off (mix): {on['qps']:,.0f} vs {off['qps']:,.0f} q/s, "
                      f"{on['cpu_us_per_query']:.1f} vs {off['cpu_us_per_query']:.1f} CPU µs/query."]
    if "load_1m" in results:
        load = results["load_1m"]
        lines.append(f"1,000,000 extra names: ready in {load['load_seconds']} s (shipped lists only: "  # type: ignore[index]
                     f"{load['baseline_seconds']} s, so +{load['added_seconds']} s), RSS {load['rss_mb']} MB "  # type: ignore[index]
                     f"(shipped lists only: {load['baseline_rss_mb']} MB, so +{load['added_rss_mb']} MB).")  # type: ignore[index]
    return "\n".join(lines)


README_START = "<!-- bench:latest -->"
README_END = "<!-- /bench:latest -->"


def update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        sys.exit(f"bench: README.md has no {README_START} ... {README_END} section")
    readme.write_text(text[:start + len(README_START)] + "\n" + table + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=15, help="length of each timed dnsperf run")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, from: " + ",".join(SERVERS))
    parser.add_argument("--mixes", default=",".join(MIXES), help="comma-separated, from: " + ",".join(MIXES))
    parser.add_argument("--no-extras", action="store_true", help="skip the metrics-off run and the 1M-name load")
    parser.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record blocker with py-spy during each mix (collapsed stacks in DIR; pip install py-spy)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args()
    servers = tuple(s for s in args.servers.split(",") if s)
    mixes = tuple(m for m in args.mixes.split(",") if m)
    unknown = (set(servers) - set(SERVERS)) | (set(mixes) - set(MIXES))
    if unknown:
        parser.error(f"unknown server or mix: {', '.join(sorted(unknown))}")
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs two cores (one for the server, one for dnsperf)")
    with tempfile.TemporaryDirectory(prefix="blocker-bench-") as tmp:
        bench = Bench(Path(tmp), args.seconds, args.profile)
        try:
            results = bench.run(servers, mixes, not args.no_extras)
        finally:
            bench.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    table = report(results)
    print(table)
    if args.update_readme:
        update_readme(table)
    print(f"\nraw results: {args.out}")


if __name__ == "__main__":
    main()
