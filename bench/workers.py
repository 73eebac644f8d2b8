"""`dns.workers`: CPU per answered query and q/s with 1 and 2 worker processes, unbound beside.

The same Knot upstream, lists and query files as bench/bench.py (80/20 mix and the Zipf mix). The
CPU figure is the utime+stime of every blocker process (the supervisor and its workers) over the
run, divided by the answers; it is what sizes a deployment, whatever caps q/s here. With 1 worker
the server is pinned to core 0 and dnsperf to core 1; with 2 workers (or unbound with 2 threads)
the server may use both cores and dnsperf shares them, so q/s then says little on this 2-core
machine and CPU per query says whether a second worker costs more per query.

Usage: python3 bench/workers.py [--seconds 15]   (bench/run installs the tools)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (
    CLIENT_CPU,
    ROOT,
    SERVER_CPU,
    Bench,
    cpu_seconds,
    free_port,
    load_average,
    machine,
    stop,
    tool,
    wait_ready,
    wait_udp,
)


def tree_cpu(pid: int) -> float:
    """utime+stime of a process and its children (the workers), in seconds."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    return sum(sum(cpu_seconds(p)) for p in pids)


class WorkersBench(Bench):
    def start_workers(self, upstream: int, workers: int) -> tuple[int, int]:
        port = free_port()
        config = self.workdir / f"blocker-{workers}.yaml"
        config.write_text(f"dns:\n  listen: [\"127.0.0.1:{port}\"]\n  upstreams: [\"127.0.0.1:{upstream}\"]\n"
                          f"  cache_size: 100000\n  workers: {workers}\nmetrics:\n  listen: \"127.0.0.1:0\"\n"
                          f"blocklists: \"{ROOT / 'blocklists'}\"\n")
        cores = SERVER_CPU if workers == 1 else f"{SERVER_CPU},{CLIENT_CPU}"
        process = subprocess.Popen([tool("taskset"), "-c", cores, sys.executable, "-m", "blocker", "serve",
                                    "--config", str(config)], cwd=ROOT, stderr=subprocess.PIPE,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.processes.append(process)
        wait_ready(process, port)
        return port, process.pid

    def start_unbound_threads(self, upstream: int, threads: int) -> tuple[int, int]:
        port, pid = self.start_unbound(upstream)
        if threads == 1:
            return port, pid
        stop(self.processes.pop())
        conf = self.workdir / "unbound.conf"
        conf.write_text(conf.read_text().replace("num-threads: 1", f"num-threads: {threads}")
                        .replace("so-reuseport: no", "so-reuseport: yes"))
        process = subprocess.Popen([tool("taskset"), "-c", f"{SERVER_CPU},{CLIENT_CPU}", tool("unbound"), "-d",
                                    "-c", str(conf)], stderr=subprocess.DEVNULL)
        self.processes.append(process)
        wait_udp(port)
        return port, process.pid

    def measure(self, port: int, pid: int, queries: Path, once: bool, pinned_client: bool) -> dict[str, float]:
        args = [tool("dnsperf"), "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-c", "8", "-q", "500",
                "-t", "2", *(["-n", "1"] if once else ["-l", str(self.seconds)])]
        if pinned_client:
            args = [tool("taskset"), "-c", CLIENT_CPU, *args]
        load = load_average()
        before = tree_cpu(pid)
        out = subprocess.run(args, capture_output=True, text=True, timeout=600).stdout
        cpu = tree_cpu(pid) - before
        completed = float(re.search(r"Queries completed:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
        qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        lost = float(re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", out).group(1))  # type: ignore[union-attr]
        return {"qps": qps, "lost_pct": lost, "completed": completed, "cpu_s": round(cpu, 3),
                "cpu_us_per_query": round(cpu / completed * 1e6, 2) if completed else 0.0, "load_1min": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=15)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blocker-bench-workers-") as directory:
        bench = WorkersBench(Path(directory), options.seconds)
        try:
            upstream = bench.start_upstream()
            files = bench.query_files()
            results: dict[str, object] = {"machine": machine(), "seconds_per_run": options.seconds}
            for name, start in (("blocker_1_worker", lambda: bench.start_workers(upstream, 1)),
                                ("blocker_2_workers", lambda: bench.start_workers(upstream, 2)),
                                ("unbound_1_thread", lambda: bench.start_unbound_threads(upstream, 1)),
                                ("unbound_2_threads", lambda: bench.start_unbound_threads(upstream, 2))):
                port, pid = start()
                bench.warm(port, files["cached"])
                single = name.endswith(("_1_worker", "_1_thread"))
                results[name] = {mix: bench.measure(port, pid, files[mix], mix == "zipf", single)
                                 for mix in ("mix", "zipf")}
                stop(bench.processes.pop())
                print(f"{name}: {json.dumps(results[name])}", flush=True)
        finally:
            bench.close()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
