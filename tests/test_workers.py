"""`dns.workers`: the real `blocker serve` with two worker processes sharing the listen sockets.

Both workers answer (per-worker counters), the merged counters are the sum of the workers', a
reload reaches both with one policy version, a binding learned from real radclient reaches both,
a killed worker comes back and the sums never go down, both write one query log, SIGTERM drains
them all, and the merged scrape passes promtool.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest
from conftest import standard_config
from helpers import ROOT, Blocker, Knot, eventually, metric_value, network_namespace, require_tool
from radius_tools import SECRET, radclient

from blocker.cache import DEFAULT_BYTES, MEMO_SHARE
from blocker.server import reuseport_pair

QUERIES = 60  # from as many random source ports: both workers get some (chance of not: 2**-59)

POLICY = """\
policy:
  inventory: [devices.csv]
identity:
  radius_accounting:
    listen: "127.0.0.1:0"
    secret_file: radius.secret
    clients: ["127.0.0.1/32"]
    device_attribute: {attribute: User-Name, regex: '^(?P<device>[^@]+)@'}
query_log:
  path: queries.jsonl
"""


def metric_sum(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if line.startswith("#") or metric != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if labels is None or all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def worker_pids(server: Blocker) -> dict[int, int]:
    pids: dict[int, int] = {}
    for line in server.lines:
        found = re.search(r"worker (\d+): serving pid=(\d+) ", line)
        if found:
            pids[int(found.group(1))] = int(found.group(2))
    return pids


def ask(server: Blocker, name: str, source: str = "127.0.0.1", count: int = QUERIES) -> list[str]:
    return [dns.rcode.to_text(server.query(name, source=source).rcode()) for _ in range(count)]


@pytest.fixture(scope="module")
def served(knot: Knot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blocker]:
    directory = tmp_path_factory.mktemp("workers")
    (directory / "radius.secret").write_text(SECRET + "\n")
    (directory / "devices.csv").write_text("id,group,addresses\nMPS-COMMS,comms-team,\n")
    config = standard_config(directory, [knot.endpoint], extra_dns="workers: 2", policy=POLICY)
    server = Blocker(config).start()
    yield server
    server.stop()


def test_both_workers_answer_and_the_counters_sum(served: Blocker) -> None:
    before = served.metrics()
    assert metric_value(before, "blocker_workers") == 2
    assert set(ask(served, "www.example.test")) == {"NOERROR"}
    assert set(ask(served, "www.tiktok.com")) == {"NXDOMAIN"}
    text = served.metrics()
    per_worker = [metric_value(text, "blocker_worker_queries_total", {"worker": str(i)})
                  - metric_value(before, "blocker_worker_queries_total", {"worker": str(i)}) for i in (0, 1)]
    assert all(count > 0 for count in per_worker), per_worker
    assert sum(per_worker) == 2 * QUERIES
    total = metric_sum(text, "blocker_dns_queries_total") - metric_sum(before, "blocker_dns_queries_total")
    assert total == 2 * QUERIES
    blocked = metric_sum(text, "blocker_dns_blocked_total", {"category": "tiktok"}) \
        - metric_sum(before, "blocker_dns_blocked_total", {"category": "tiktok"})
    assert blocked == QUERIES
    # Each worker holds half of the server's bounds; the merged gauges are the configured bounds.
    assert metric_value(text, "blocker_dns_memo_max_bytes") == DEFAULT_BYTES // MEMO_SHARE
    assert metric_value(text, "blocker_dns_cache_max_bytes") == DEFAULT_BYTES - DEFAULT_BYTES // MEMO_SHARE
    assert metric_value(text, "blocker_worker_up", {"worker": "0"}) == 1
    assert metric_value(text, "blocker_worker_up", {"worker": "1"}) == 1
    # The lists are shared copy-on-write: the three processes' Pss is below the sum of their RSS.
    pss = metric_value(text, "blocker_workers_memory_pss_bytes")
    assert 0 < pss < metric_value(text, "process_resident_memory_bytes")
    # One series per family: the supervisor's own (policy, build) are not doubled by the workers'.
    assert text.count("\nblocker_build_info{") == 1
    assert text.count("\nblocker_policy_info{") == 1
    assert text.count("# TYPE blocker_dns_queries_total counter") == 1


def test_the_merged_scrape_passes_promtool(served: Blocker) -> None:
    promtool = require_tool("promtool")
    text = served.metrics()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tcp_is_answered_by_the_workers(served: Blocker) -> None:
    answers = [served.query("www.example.test", tcp=True) for _ in range(10)]
    assert {dns.rcode.to_text(a.rcode()) for a in answers} == {"NOERROR"}


def test_a_binding_from_radius_reaches_every_worker(served: Blocker) -> None:
    line = served.wait_for_log(r"listening radius=")
    port = int(re.search(r"radius=\S+:(\d+) ", line).group(1))  # type: ignore[union-attr]
    assert set(ask(served, "www.tiktok.com", source="127.0.0.2", count=20)) == {"NXDOMAIN"}
    before = served.metrics()
    assert radclient(port, {"User-Name": "MPS-COMMS@force.test", "Acct-Status-Type": "Start",
                            "Framed-IP-Address": "127.0.0.2", "Acct-Session-Id": "s-1", "NAS-Identifier": "gw-a"})
    # comms-team may reach TikTok: every worker must know who 127.0.0.2 is now.
    eventually(lambda: set(ask(served, "www.tiktok.com", source="127.0.0.2", count=5)) == {"NOERROR"}, 5)
    assert set(ask(served, "www.tiktok.com", source="127.0.0.2")) == {"NOERROR"}
    text = served.metrics()
    for index in ("0", "1"):
        assert metric_value(text, "blocker_worker_queries_total", {"worker": index}) \
            > metric_value(before, "blocker_worker_queries_total", {"worker": index})
    assert metric_value(text, "blocker_bindings_active") == 1
    assert radclient(port, {"User-Name": "MPS-COMMS@force.test", "Acct-Status-Type": "Stop",
                            "Framed-IP-Address": "127.0.0.2", "Acct-Session-Id": "s-1", "NAS-Identifier": "gw-a"})
    eventually(lambda: set(ask(served, "www.tiktok.com", source="127.0.0.2", count=QUERIES)) == {"NXDOMAIN"}, 5)


def test_a_reload_reaches_both_workers_with_one_version(served: Blocker) -> None:
    assert served.config is not None
    old = metric_value_label(served.metrics(), "blocker_policy_info", "version")
    original = served.config.read_text()
    served.config.write_text(original.replace("policy:\n", "policy:\n  default_group: comms-team\n", 1))
    try:
        def both_follow() -> bool:
            text = served.metrics()
            new = metric_value_label(text, "blocker_policy_info", "version")
            workers = {metric_value_label(text, "blocker_worker_policy_info", "version", {"worker": i})
                       for i in ("0", "1")}
            return new != old and workers == {new}

        eventually(both_follow, 15, 0.2, "both workers on the new policy")
        assert set(ask(served, "www.tiktok.com")) == {"NOERROR"}  # comms-team: TikTok allowed
    finally:
        served.config.write_text(original)
        eventually(lambda: metric_value_label(served.metrics(), "blocker_policy_info", "version") == old, 15, 0.2)
    eventually(lambda: set(ask(served, "www.tiktok.com", count=10)) == {"NXDOMAIN"}, 15, 0.2)
    assert set(ask(served, "www.tiktok.com")) == {"NXDOMAIN"}


def test_a_broken_edit_reaches_no_worker(served: Blocker) -> None:
    assert served.config is not None
    version = metric_value_label(served.metrics(), "blocker_policy_info", "version")
    original = served.config.read_text()
    mark = len(served.lines)
    served.config.write_text(original + "dns_typo: 1\n")
    try:
        served.wait_for_log(r"reload \(file change\) rejected", after=mark)
        text = served.metrics()
        assert metric_value(text, "blocker_config_last_reload_error") == 1
        assert {metric_value_label(text, "blocker_worker_policy_info", "version", {"worker": i})
                for i in ("0", "1")} == {version}
        assert not any(re.search(r"worker \d+: reload", line) for line in served.lines[mark:])
        assert set(ask(served, "www.example.test", count=10)) == {"NOERROR"}
    finally:
        served.config.write_text(original)
        served.wait_for_log(r" reloaded \(file change\)", after=mark)


def test_a_killed_worker_comes_back_and_no_sum_goes_down(served: Blocker) -> None:
    ask(served, "www.example.test")
    before = served.metrics()
    pid = worker_pids(served)[1]
    mark = len(served.lines)
    os.kill(pid, signal.SIGKILL)
    served.wait_for_log(rf"worker 1 \(pid {pid}\) died \(signal 9\)", after=mark)
    served.wait_for_log(r"worker 1 \(pid \d+\) serving again", after=mark)
    assert worker_pids(served)[1] != pid
    text = served.metrics()
    assert metric_value(text, "blocker_worker_restarts_total", {"worker": "1"}) == 1
    assert metric_value(text, "blocker_worker_up", {"worker": "1"}) == 1
    assert metric_value_label(text, "blocker_worker_policy_info", "version", {"worker": "1"}) \
        == metric_value_label(text, "blocker_policy_info", "version")
    assert metric_sum(text, "blocker_dns_queries_total") >= metric_sum(before, "blocker_dns_queries_total")
    assert set(ask(served, "www.example.test")) == {"NOERROR"}
    after = served.metrics()
    assert metric_value(after, "blocker_worker_queries_total", {"worker": "1"}) > 0
    assert metric_sum(after, "blocker_dns_queries_total") == metric_sum(text, "blocker_dns_queries_total") + QUERIES


def test_a_worker_that_stops_answering_is_killed_and_restarted(served: Blocker) -> None:
    pid = worker_pids(served)[0]
    mark = len(served.lines)
    os.kill(pid, signal.SIGSTOP)  # alive, holding its sockets, answering nothing
    served.wait_for_log(rf"worker 0 \(pid {pid}\) unresponsive for \d+ s: killing it", after=mark)
    served.wait_for_log(rf"worker 0 \(pid {pid}\) died \(signal 9\)", after=mark)
    served.wait_for_log(r"worker 0 \(pid \d+\) serving again", after=mark)
    assert set(ask(served, "www.example.test")) == {"NOERROR"}


def test_a_worker_that_loads_other_files_than_the_supervisor_is_replaced(served: Blocker) -> None:
    """An operator's two saves: a good edit, then a broken one while a worker has not read the first
    yet. That worker must not stay on the old policy while the supervisor runs the new one."""
    assert served.config is not None
    original = served.config.read_text()
    pid = worker_pids(served)[1]
    mark = len(served.lines)
    os.kill(pid, signal.SIGSTOP)
    try:
        served.config.write_text(original.replace("policy:\n", "policy:\n  default_group: comms-team\n", 1))
        line = served.wait_for_log(r"worker 0: reloaded \(file change\) policy=\w+", after=mark)
        version = re.search(r"policy=(\w+)", line).group(1)  # type: ignore[union-attr]
        served.config.write_text(original + "dns_typo: 1\n")
        served.wait_for_log(r"reload \(file change\) rejected", after=mark)
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        served.wait_for_log(rf"worker 1 \(pid {pid}\) runs policy \w+, not {version}: replacing it", after=mark)
        served.wait_for_log(rf"worker 1 \(pid {pid}\) replaced \(exit 0\)", after=mark)

        def versions() -> set[str]:
            text = served.metrics()
            return {metric_value_label(text, "blocker_worker_policy_info", "version", {"worker": i}) for i in "01"}

        eventually(lambda: versions() == {version}, 10, 0.2, "both workers on the supervisor's policy")
        assert set(ask(served, "www.tiktok.com")) == {"NOERROR"}  # comms-team, in every worker
    finally:
        served.config.write_text(original)
        eventually(lambda: set(ask(served, "www.tiktok.com", count=10)) == {"NXDOMAIN"}, 15, 0.2)


def test_a_paused_supervisor_kills_no_worker(served: Blocker) -> None:
    """A frozen container (docker pause, the cgroup freezer) stops the supervisor with its workers:
    on waking, silence it did not wait for is no reason to kill anyone."""
    assert served.process is not None
    pids = worker_pids(served)
    mark = len(served.lines)
    everyone = (served.process.pid, *pids.values())
    for pid in everyone:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(6)  # longer than a worker may stay silent
    for pid in everyone:
        os.kill(pid, signal.SIGCONT)
    assert set(ask(served, "www.example.test", count=20)) == {"NOERROR"}
    time.sleep(1)  # a watchdog round after the wake-up
    assert not any("killing it" in line for line in served.lines[mark:]), served.lines[mark:]


def test_both_workers_write_whole_lines_to_one_query_log(served: Blocker) -> None:
    assert served.config is not None
    path = served.config.parent / "queries.jsonl"
    ask(served, "log-check.example.test")

    def logged() -> list[dict[str, object]]:
        entries = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole JSON
        return [e for e in entries if str(e.get("name", "")).startswith("log-check.example.test")]

    eventually(lambda: len(logged()) == QUERIES, 10, 0.1, "every query of both workers in the log")


def metric_value_label(text: str, name: str, label: str, labels: dict[str, str] | None = None) -> str:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels is None or all(found.get(k) == v for k, v in labels.items()):
                return found.get(label, "")
    return ""


def test_sigterm_stops_every_worker(knot: Knot, tmp_path: Path) -> None:
    config = standard_config(tmp_path, [knot.endpoint], extra_dns="workers: 2")
    server = Blocker(config).start()
    pids = worker_pids(server)
    assert len(pids) == 2
    assert set(ask(server, "www.example.test", count=10)) == {"NOERROR"}
    assert server.stop() == 0
    for index, pid in pids.items():
        assert any(f"worker {index} (pid {pid}) stopped (exit 0)" in line for line in server.lines), server.lines
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_workers_stop_when_their_supervisor_is_killed(knot: Knot, tmp_path: Path) -> None:
    config = standard_config(tmp_path, [knot.endpoint], extra_dns="workers: 2")
    server = Blocker(config).start()
    pids = worker_pids(server)
    assert len(pids) == 2
    server.signal(signal.SIGKILL)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    eventually(lambda: all(gone(pid) for pid in pids.values()), 10, 0.1, "workers gone")
    server.stop()


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        found |= {int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()}
    return found


def test_a_restarted_worker_that_never_serves_is_killed(knot: Knot, tmp_path: Path) -> None:
    """Its socket joins the group at the fork: stuck before it serves, it would drop its share of queries."""
    config = standard_config(tmp_path, [knot.endpoint], extra_dns="workers: 2")
    server = Blocker(config).start()
    try:
        assert server.process is not None
        before = children(server.process.pid)
        os.kill(worker_pids(server)[0], signal.SIGKILL)
        stuck = eventually(lambda: next(iter(children(server.process.pid) - before), None), 10, 0.001)
        os.kill(stuck, signal.SIGSTOP)
        server.wait_for_log(rf"worker 0 \(pid {stuck}\) not serving \d+ s after its start: killing it", timeout=30)
        server.wait_for_log(r"worker 0 \(pid \d+\) serving again", timeout=30)
        assert set(ask(server, "www.example.test")) == {"NOERROR"}
    finally:
        server.stop()


def test_a_port_held_by_another_process_is_refused_even_with_reuseport(knot: Knot, tmp_path: Path) -> None:
    udp, tcp = reuseport_pair("127.0.0.1", 0)  # another program sharing nothing with us, SO_REUSEPORT set
    try:
        port = udp.getsockname()[1]
        config = standard_config(tmp_path, [knot.endpoint], extra_dns="workers: 2")
        config.write_text(config.read_text().replace('"127.0.0.1:0"]', f'"127.0.0.1:{port}"]', 1))
        server = Blocker(config).start(expect_ready=False)
        assert server.process is not None
        assert server.process.wait(20) == 2
        assert any(f"cannot listen for DNS (udp+tcp) on 127.0.0.1:{port}: address already in use" in line
                   for line in server.lines), server.lines
    finally:
        udp.close()
        tcp.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_container_listen_shape_ipv4_and_ipv6_wildcards(tmp_path: Path, workers: int) -> None:
    """deploy/container's `listen: ["0.0.0.0:8053", "[::]:8053"]`, in a network namespace of its own."""
    with network_namespace("bwrk") as inside:
        config = tmp_path / "blocker.yaml"
        config.write_text(f'dns:\n  listen: ["0.0.0.0:8053", "[::]:8053"]\n  upstreams: ["127.0.0.1:9"]\n'
                          f'  workers: {workers}\nmetrics:\n  listen: null\nblocklists: "{ROOT / "blocklists"}"\n')
        server = Blocker(config, env={"PYTHONPATH": str(ROOT)}, prefix=inside).start()
        try:
            for address, tcp in (("127.0.0.1", ""), ("::1", ""), ("127.0.0.1", "+tcp"), ("::1", "+tcp")):
                args = [*inside, require_tool("dig"), f"@{address}", "-p", "8053", "www.tiktok.com", "+tries=1",
                        "+time=3", *([tcp] if tcp else [])]
                out = subprocess.run(args, capture_output=True, text=True, timeout=15).stdout
                assert "status: NXDOMAIN" in out, (address, tcp, out)
        finally:
            assert server.stop() == 0


def test_workers_auto_and_bad_values(tmp_path: Path) -> None:
    from blocker.config import load_config, usable_cores
    from blocker.errors import ConfigError

    path = tmp_path / "blocker.yaml"
    path.write_text("dns:\n  workers: auto\n")
    assert load_config(path).dns.workers == usable_cores() == len(os.sched_getaffinity(0))
    for bad in ("0", "-1", "two", "1.5"):
        path.write_text(f"dns:\n  workers: {bad}\n")
        with pytest.raises(ConfigError, match=r"blocker.yaml:2: dns.workers"):
            load_config(path)


def test_one_worker_is_the_single_process_server(knot: Knot, tmp_path: Path) -> None:
    config = standard_config(tmp_path, [knot.endpoint], extra_dns="workers: 1")
    server = Blocker(config).start()
    try:
        assert worker_pids(server) == {}
        assert "blocker_workers" not in server.metrics()
        assert set(ask(server, "www.example.test", count=5)) == {"NOERROR"}
    finally:
        server.stop()


def test_the_console_runs_in_the_supervisor(knot: Knot, tmp_path: Path) -> None:
    from console_site import Web, add_user, console_config, start

    config = console_config(tmp_path, knot.endpoint, ROOT / "blocklists")
    text = config.read_text()
    config.write_text(text.replace("  upstream_timeout: 0.5\n", "  upstream_timeout: 0.5\n  workers: 2\n"))
    add_user(config, "alice", ["admin"], "Sgt. A. Adams")
    server, port = start(config)
    try:
        assert len(worker_pids(server)) == 2
        web = Web(port)
        web.get("/login")
        status, _headers, _page = web.login("alice")
        assert status == 303
        status, _headers, page = web.get("/explain?domain=web.whatsapp.com&who=MPS-000456")
        assert status == 200 and "whatsapp" in page
    finally:
        server.stop()
