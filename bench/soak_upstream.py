"""Soak: rerun the upstream rows of issue 10's table against the real `blocker serve` and print them.

Rows (each bounded in time, loopback only):
  forgery   3 names, 65,536 forged answers each from tests/spoofer.py while the real (slow) upstream
            is still thinking; how many names end up poisoned in the cache
  dead      first upstream black-holed, second healthy (Knot): miss latency over time, and SERVFAIL
            at 3,000 misses/s (dnsperf)
  fairness  one client asking random subdomains of a zone whose servers never answer at 8,000 q/s;
            SERVFAIL among another client's misses
  stale     answers expire while every upstream is dead: stale answers served vs SERVFAIL
  reload    30,000 devices and 5,000 exemptions, 10 SIGHUPs one second apart under 2,000 q/s:
            queries lost, p50/p99/longest latency, server CPU per query, and how long the reloads took
  quiet     the reload row without SIGHUPs: its baseline
  reload-edit  the reload row with an edit of one exemption before each SIGHUP (a real difference)
  cost      CPU cost of the spoof-resistant upstream path: q/s of blocker pinned to one core on the
            80/20 mix (cached allowed / blocked) and on misses only (every name new), for /work/main's
            code and this tree's, 0x20 on and off (`--main DIR` names the other tree)

Usage: python3 bench/soak_upstream.py [--rows forgery,dead,fairness,stale,reload,quiet,reload-edit,cost]
Needs root (raw socket for the spoofer), dnsperf and knotd.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402
from helpers import Blocker, FaultyUpstream, Knot, metric_value  # noqa: E402
from spoofer import spray  # noqa: E402

FORGED = "203.0.113.66"


def config(directory: Path, upstreams: list[str], timeout: float, extra: str = "") -> Path:
    path = directory / "blocker.yaml"
    listed = ", ".join(f'"{u}"' for u in upstreams)
    path.write_text(f'dns:\n  listen: ["127.0.0.1:0"]\n  upstreams: [{listed}]\n  upstream_timeout: {timeout}\n'
                    + extra + 'metrics:\n  listen: "127.0.0.1:0"\n'
                    + f'blocklists: "{ROOT / "blocklists"}"\n')
    return path


def query(port: int, name: str, timeout: float = 5.0, source: str | None = None) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=timeout, source=source)


def addresses(response: dns.message.Message) -> list[str]:
    return [rr.to_text() for rrset in response.answer for rr in rrset]


def row_forgery(work: Path, ports: str, extra: str = "") -> str:
    upstream = FaultyUpstream("slow", delay=1.0)
    server = Blocker(config(work, [upstream.endpoint], 3.0, extra)).start()
    poisoned = 0
    sent_total = 0
    spent = 0.0
    try:
        query(server.port, "warm-up.example.test")  # an attacker's own query: teaches it the source port
        for index in range(3):
            name = f"victim-{index}-{random.randrange(10**6)}.example.test"
            before = upstream.count()
            first: list[dns.message.Message] = []
            asker = threading.Thread(target=lambda n=name, out=first: out.append(query(server.port, n)))
            asker.start()
            end = time.monotonic() + 2
            while upstream.count() == before and time.monotonic() < end:
                time.sleep(0.005)
            result = spray(("127.0.0.1", upstream.port), "127.0.0.1", name, FORGED, 65536, 5.0, ports)
            sent_total += int(result["sent"])
            spent += result["seconds"]
            asker.join(10)
            again = query(server.port, name)
            if FORGED in addresses(again) or (first and FORGED in addresses(first[0])):
                poisoned += 1
    finally:
        server.stop()
        upstream.stop()
    return f"forgery ({ports} ports{', ' + extra.strip() if extra else ''}): {sent_total} forged answers in " \
           f"{spent:.2f} s, poisoned {poisoned} of 3 names"


def dnsperf(port: int, names: list[str], qps: int | None, seconds: int, source: str | None = None,
            pin: str | None = None, outstanding: int = 40000) -> dict[str, float]:
    tool = shutil.which("dnsperf")
    if tool is None:
        sys.exit("soak: dnsperf is missing (apt-get install dnsperf)")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as data:
        data.write("".join(f"{name} A\n" for name in names))
    args = [tool, "-s", "127.0.0.1", "-p", str(port), "-d", data.name, "-l", str(seconds),
            "-c", "4", "-q", str(outstanding), "-t", "3", "-n", "1"]
    if qps:
        args += ["-Q", str(qps)]
    if source:
        args += ["-a", source]
    if pin:
        args = ["taskset", "-c", pin, *args]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout
    os.unlink(data.name)
    found: dict[str, float] = {}
    for key, pattern in (("sent", r"Queries sent:\s+(\d+)"), ("completed", r"Queries completed:\s+(\d+)"),
                         ("lost", r"Queries lost:\s+(\d+)"), ("servfail", r"SERVFAIL (\d+)"),
                         ("qps", r"Queries per second:\s+([\d.]+)"),
                         ("latency", r"Average Latency \(s\):\s+([\d.]+)")):
        match = re.search(pattern, out)
        found[key] = float(match.group(1)) if match else 0.0
    return found


def row_dead(work: Path) -> str:
    knot = Knot(work / "knot", ["example.test"]).start()
    hole = FaultyUpstream("blackhole")
    server = Blocker(config(work, [hole.endpoint, knot.endpoint], 2.0)).start()
    try:
        latencies = []
        started = time.monotonic()
        for index in range(100):
            if index:
                time.sleep(0.1)
            began = time.monotonic()
            try:
                query(server.port, f"miss-{index}-{random.randrange(10**9)}.example.test", timeout=5)
                latencies.append((began - started, time.monotonic() - began))
            except dns.exception.Timeout:
                latencies.append((began - started, float("inf")))
            if time.monotonic() - started > 6:
                break
        settled = [lat for at, lat in latencies if at > 3.0]
        slow_after = sum(1 for lat in settled if lat > 0.1)
        server.stop()
        # The load on a fresh blocker: it meets the black hole first under 3,000 misses/s.
        (work / "fresh").mkdir()
        server = Blocker(config(work / "fresh", [hole.endpoint, knot.endpoint], 2.0)).start()
        names = [f"load-{i}-{random.randrange(10**9)}.example.test" for i in range(3000 * 10)]
        result = dnsperf(server.port, names, 3000, 10)
        text = server.metrics()
        capped = metric_value(text, "blocker_dns_client_limited_total")
        hole_timeouts = metric_value(text, "blocker_upstream_queries_total", {"upstream": hole.endpoint,
                                                                            "result": "timeout"})
    finally:
        server.stop()
        hole.stop()
        knot.stop()
    first = ", ".join(f"{lat * 1000:.0f}" for _, lat in latencies[:5])
    median = sorted(settled)[len(settled) // 2] * 1000 if settled else float("nan")
    servfail = 100 * result["servfail"] / max(1, result["sent"])
    return (f"dead first upstream: first misses {first} ms; after 3 s median {median:.1f} ms, {slow_after} of "
            f"{len(settled)} over 100 ms; at 3,000 misses/s for 10 s: {result['completed']:.0f}/{result['sent']:.0f} "
            f"answered, {servfail:.2f} % SERVFAIL, {result['lost']:.0f} lost; blocker counted {hole_timeouts:.0f} "
            f"timeouts at the black hole, {capped:.0f} misses over the per-client cap")


def row_fairness(work: Path, extra: str = "") -> str:
    upstream = FaultyUpstream("ok", blackhole_zone="never.test")
    server = Blocker(config(work, [upstream.endpoint], 2.0, extra)).start()
    try:
        attacker_names = [f"r{random.randrange(10**12)}.never.test" for _ in range(8000 * 12)]
        box: dict[str, dict[str, float]] = {}
        attacker = threading.Thread(target=lambda: box.update(a=dnsperf(server.port, attacker_names, 8000, 12,
                                                                       source="127.0.0.2")))
        attacker.start()
        time.sleep(2)
        victim_names = [f"v{random.randrange(10**12)}.example.test" for _ in range(200 * 8)]
        victim = dnsperf(server.port, victim_names, 200, 8, source="127.0.0.1")
        attacker.join(60)
        text = server.metrics()
        counts = {key: metric_value(text, name, labels) for key, name, labels in (
            ("timeouts", "blocker_upstream_queries_total", {"result": "timeout"}),
            ("gave way", "blocker_upstream_queries_total", {"result": "gave_way"}),
            ("client cap", "blocker_dns_client_limited_total", None),
            ("rate limited", "blocker_dns_rate_limited_total", {"action": "refused"}))}
    finally:
        server.stop()
        upstream.stop()
    servfail = 100 * victim["servfail"] / max(1, victim["sent"])
    lost = 100 * victim["lost"] / max(1, victim["sent"])
    a = box.get("a", {})
    return (f"fairness{' (' + extra.strip() + ')' if extra else ''}: attacker {a.get('sent', 0):.0f} sent at "
            f"8,000 q/s; other client's misses: {victim['sent']:.0f} sent, {servfail:.2f} % SERVFAIL, {lost:.2f} % "
            f"lost, mean latency {victim['latency'] * 1000:.1f} ms; blocker counted "
            + ", ".join(f"{key} {value:.0f}" for key, value in counts.items()))


def row_stale(work: Path) -> str:
    upstream = FaultyUpstream("ok", ttl=1)
    server = Blocker(config(work, [upstream.endpoint], 0.5)).start()
    try:
        names = [f"stale-{i}.example.test" for i in range(20)]
        for name in names:
            query(server.port, name)
        upstream.set_mode("blackhole")
        time.sleep(2.2)
        rcodes: dict[str, int] = {}
        for name in names:
            response = query(server.port, name)
            text = dns.rcode.to_text(response.rcode())
            stale = any(int(e.code) == 3 for e in response.extended_errors())
            key = f"{text}{' (stale, EDE 3)' if stale else ''}"
            rcodes[key] = rcodes.get(key, 0) + 1
    finally:
        server.stop()
        upstream.stop()
    return f"serve-stale: 20 expired names, every upstream dead: {rcodes}"


def start_tree(tree: Path, config_path: Path) -> tuple[subprocess.Popen[str], int]:
    """`blocker serve` from the source tree `tree`, pinned to CPU 0; returns it and its DNS port."""
    process = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "blocker", "serve", "--config",
                                str(config_path)], cwd=tree, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True, env={**os.environ, "PYTHONPATH": str(tree)})
    assert process.stderr is not None
    port = 0
    end = time.monotonic() + 30
    while time.monotonic() < end:
        line = process.stderr.readline()
        found = re.search(r"listening dns=\S+:(\d+) ", line)
        if found:
            port = int(found.group(1))
        if " ready " in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, port
    process.kill()
    raise SystemExit(f"soak: blocker from {tree} did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def row_cost(work: Path, main_tree: Path) -> list[str]:
    knot = Knot(work / "knot", ["example.test"]).start()
    allowed = [f"a{i}.example.test" for i in range(2000)]
    blocked = ["www.tiktok.com", "api.tiktok.com", "m.facebook.com", "www.instagram.com", "web.whatsapp.com"]
    rng = random.Random(1)
    mix = [rng.choice(blocked) if i % 5 == 0 else rng.choice(allowed) for i in range(10_000)]
    lines = []
    try:
        for label, tree, flag in (("main", main_tree, None), ("this tree, 0x20 off", ROOT, "false"),
                                  ("this tree, 0x20 on", ROOT, "true")):
            extra = f"  upstream_0x20: {flag}\n" if flag else ""
            directory = work / label.replace(" ", "_").replace(",", "")
            directory.mkdir()
            process, port = start_tree(tree, config(directory, [knot.endpoint], 2.0, extra))
            try:
                dnsperf(port, allowed, 5000, 2, pin="1")  # warm the cache
                before = cpu_seconds(process.pid)
                mixed = dnsperf(port, mix, 10_000, 10, pin="1", outstanding=500)
                mix_cpu = (cpu_seconds(process.pid) - before) / max(1.0, mixed["completed"]) * 1e6
                misses = [f"m{i}-{rng.randrange(10**9)}.example.test" for i in range(30_000)]
                before = cpu_seconds(process.pid)
                missed = dnsperf(port, misses, 2_000, 10, pin="1", outstanding=500)
                miss_cpu = (cpu_seconds(process.pid) - before) / max(1.0, missed["completed"]) * 1e6
            finally:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            lines.append(f"cost ({label}): 80/20 mix at 10,000 q/s {mix_cpu:.1f} us CPU per query; misses at "
                         f"2,000 q/s {miss_cpu:.1f} us CPU per miss ({missed['lost']:.0f} lost)")
    finally:
        knot.stop()
    return lines


def fleet_config(directory: Path, upstream: str) -> Path:
    """A config with 30,000 devices and 5,000 exemptions (synthetic ids and addresses)."""
    lines = [f'dns:\n  listen: ["127.0.0.1:0"]\n  upstreams: ["{upstream}"]\n  upstream_timeout: 2\n'
             f'metrics:\n  listen: "127.0.0.1:0"\nblocklists: "{ROOT / "blocklists"}"\n'
             "policy:\n  default_group: standard\n  devices:\n"]
    for i in range(30_000):
        group = "comms-team" if i % 10 == 0 else "standard"
        lines.append(f'    - {{id: MPS-{i:06d}, addresses: ["10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"], '
                     f"group: {group}}}\n")
    lines.append("  exemptions:\n")
    for i in range(5_000):
        lines.append(f'    - {{device: MPS-{i * 6:06d}, allow: [tiktok], expires: "2099-06-01T00:00:00Z", '
                     f'approved_by: "Insp. Example", reference: "CASE-{i}", reason: "soak"}}\n')
    path = directory / "blocker.yaml"
    path.write_text("".join(lines))
    return path


def row_reload(work: Path, reloads: int = 10, edit: bool = False) -> str:
    """`reloads` SIGHUPs one second apart under 2,000 q/s (0: the same load and policy, no reload:
    the baseline the reloads are compared with); with `edit`, each SIGHUP follows an edit of one
    exemption's reason (a real difference: one audit event per reload)."""
    import signal

    knot = Knot(work / "knot", ["example.test"]).start()
    config_path = fleet_config(work, knot.endpoint)
    original = config_path.read_text()
    server = Blocker(config_path).start(expect_ready=False)
    server.wait_for_log(r" ready ", timeout=120)  # the first load logs 5,000 audit events
    assert server.process is not None
    try:
        names = ["www.tiktok.com", "www.example.test", "m.facebook.com", "nothing.example.test"] * 500
        box: dict[str, object] = {}

        def load() -> None:
            tool = shutil.which("dnsperf") or "dnsperf"
            data = work / "names.txt"
            data.write_text("".join(f"{name} A\n" for name in names))
            box["out"] = subprocess.run([tool, "-s", "127.0.0.1", "-p", str(server.port), "-d", str(data), "-l", "25",
                                         "-Q", "2000", "-c", "4", "-q", "2000", "-t", "2", "-v"],
                                        capture_output=True, text=True, timeout=60).stdout

        cpu_before = cpu_seconds(server.process.pid)
        runner = threading.Thread(target=load)
        runner.start()
        time.sleep(2)
        mark = len(server.lines)
        for index in range(reloads):
            if edit:
                config_path.write_text(original.replace('reference: "CASE-7", reason: "soak"',
                                                        f'reference: "CASE-7", reason: "soak, edit {index}"'))
            server.signal(signal.SIGHUP)
            time.sleep(1)
        runner.join(60)
        cpu = cpu_seconds(server.process.pid) - cpu_before
        end = time.monotonic() + 30
        while reloads and time.monotonic() < end and sum("reloaded" in line for line in server.lines[mark:]) < 1:
            time.sleep(0.2)
        durations = [float(m) for line in server.lines[mark:] for m in re.findall(r"reloaded .* in (\d+) ms", line)]
    finally:
        server.stop()
        knot.stop()
    out = str(box.get("out", ""))
    latencies = sorted(float(m) for m in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M))
    p50, p99 = (latencies[int(len(latencies) * q)] * 1000 if latencies else float("nan") for q in (0.5, 0.99))
    longest = latencies[-1] * 1000 if latencies else float("nan")
    sent = re.search(r"Queries sent:\s+(\d+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    # The server's CPU over the whole load (answers and reloads together), per answered query.
    per_query = cpu / max(1, len(latencies)) * 1e6
    head = (f"reload{' after an edit' if edit else ''}: {reloads} SIGHUPs under 2,000 q/s" if reloads
            else "reload baseline: no SIGHUP, 2,000 q/s") + " with 30,000 devices and 5,000 exemptions: "
    tail = (f"; {len(durations)} reloads ran (coalesced), taking {', '.join(f'{r:.0f}' for r in durations)} ms"
            if reloads else "")
    return (head + f"{lost.group(1) if lost else '?'} of {sent.group(1) if sent else '?'} queries lost, "
            f"p50 {p50:.2f} ms, p99 {p99:.1f} ms, longest {longest:.0f} ms; server CPU {cpu:.1f} s, "
            f"{per_query:.0f} us per answered query" + tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="forgery,dead,fairness,stale")
    parser.add_argument("--main", type=Path, default=Path("/work/main"), help="the tree to compare costs with")
    args = parser.parse_args()
    rows = args.rows.split(",")
    with tempfile.TemporaryDirectory(prefix="i10b-soak-") as tmp:
        work = Path(tmp)
        lines = []
        for row in rows:
            directory = work / row
            directory.mkdir()
            if row == "forgery":
                lines.append(row_forgery(directory, "learned"))
                print(lines[-1], flush=True)
                (directory / "live").mkdir()
                lines.append(row_forgery(directory / "live", "live"))
            elif row == "dead":
                lines.append(row_dead(directory))
            elif row == "fairness":
                lines.append(row_fairness(directory))
                print(lines[-1], flush=True)
                for name, extra in (("nocap", "  max_outstanding_per_client: 0\n"),
                                    ("ratelimit", "  rate_limit: {qps: 200, burst: 400, action: refused}\n")):
                    (directory / name).mkdir()
                    lines.append(row_fairness(directory / name, extra))
                    print(lines[-1], flush=True)
                continue
            elif row == "stale":
                lines.append(row_stale(directory))
            elif row == "reload":
                lines.append(row_reload(directory))
            elif row == "quiet":
                lines.append(row_reload(directory, reloads=0))
            elif row == "reload-edit":
                lines.append(row_reload(directory, edit=True))
            elif row == "cost":
                for line in row_cost(directory, args.main):
                    lines.append(line)
                    print(line, flush=True)
                continue
            print(lines[-1], flush=True)
    print("\n| row | measured |\n| --- | --- |")
    for line in lines:
        name, _, text = line.partition(": ")
        print(f"| {name} | {text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
