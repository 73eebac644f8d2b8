"""Metrics scraped from the real server over HTTP: exact counts per label, promtool lint, a real Prometheus."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import standard_config
from helpers import Blocker, Knot, eventually, free_port, metric_value, rcode_text, require_tool
from test_deploy import dashboard_expressions


@pytest.fixture(scope="module")
def counted(knot: Knot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Blocker, str]]:
    """A fresh server that receives a known set of queries; yields it and its exposition afterwards."""
    directory = tmp_path_factory.mktemp("metrics")
    config = standard_config(directory, [knot.endpoint],
                             extra_dns='allow_networks: ["127.0.0.1/32", "127.0.0.2/32"]', policy="""\
policy:
  devices:
    - {id: MPS-EXEMPT, addresses: ["127.0.0.2"], group: standard}
  exemptions:
    - {device: MPS-EXEMPT, allow: [whatsapp], approved_by: "Insp. J. Doe", reference: "CHG-1", reason: "Test",
       expires: 2099-01-01T00:00:00Z}
""")
    server = Blocker(config).start()
    for _ in range(7):
        assert rcode_text(server.query("www.tiktok.com")) == "NXDOMAIN"
    for _ in range(3):
        assert rcode_text(server.query("api.twitter.com", tcp=True)) == "NXDOMAIN"
    for _ in range(5):
        assert rcode_text(server.query("www.example.test")) == "NOERROR"
    for _ in range(2):
        assert rcode_text(server.query("web.whatsapp.com", source="127.0.0.2")) == "NOERROR"
    for _ in range(4):
        assert rcode_text(server.query("www.example.test", source="127.0.0.8")) == "REFUSED"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        for i in range(6):
            sock.sendto(bytes([0, i, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]), ("127.0.0.1", server.port))  # no question
            assert sock.recv(512)[3] & 0xF == 1  # FORMERR
    yield server, server.metrics()
    server.stop()


@pytest.mark.parametrize(("name", "labels", "value"), [
    ("blocker_dns_queries_total", {"transport": "udp", "action": "blocked"}, 7),
    ("blocker_dns_queries_total", {"transport": "tcp", "action": "blocked"}, 3),
    ("blocker_dns_queries_total", {"transport": "udp", "action": "allowed"}, 5),
    ("blocker_dns_queries_total", {"transport": "udp", "action": "exempted"}, 2),
    ("blocker_dns_queries_total", {"transport": "udp", "action": "refused"}, 4),
    ("blocker_dns_queries_total", {"transport": "udp", "action": "error"}, 6),
    ("blocker_dns_blocked_total", {"category": "tiktok", "group": "standard"}, 7),
    ("blocker_dns_blocked_total", {"category": "twitter", "group": "standard"}, 3),
    ("blocker_dns_exempted_total", {"category": "whatsapp"}, 2),
    ("blocker_dns_malformed_packets_total", {"transport": "udp"}, 6),
    ("blocker_dns_request_duration_seconds_count", None, 27),
    ("blocker_dns_cache_misses_total", None, 2),  # www.example.test and web.whatsapp.com, once each
    ("blocker_dns_cache_hits_total", None, 5),
    ("blocker_dns_cache_entries", None, 2),
    ("blocker_upstream_request_duration_seconds_count", None, 2),
    ("blocker_config_reloads_total", {"result": "success"}, 1),
    ("blocker_config_reloads_total", {"result": "failure"}, 0),
    ("blocker_exemptions_active", None, 1),
    ("blocker_exemptions_expiring", None, 0),
    ("blocker_devices", None, 1),
    ("blocker_dns_internal_errors_total", None, 0),
])
def test_counters_move_by_exactly_what_was_sent(counted: tuple[Blocker, str], name: str,
                                                labels: dict[str, str] | None, value: int) -> None:
    _server, text = counted
    assert metric_value(text, name, labels) == value


def test_upstream_and_list_series(counted: tuple[Blocker, str], knot: Knot) -> None:
    server, text = counted
    assert metric_value(text, "blocker_upstream_queries_total", {"upstream": knot.endpoint, "result": "ok"}) == 2
    assert metric_value(text, "blocker_blocklist_domains", {"category": "tiktok"}) > 100
    version = re.search(r"ready .*policy=(\w+)", "\n".join(server.lines)).group(1)  # type: ignore[union-attr]
    assert metric_value(text, "blocker_policy_info", {"version": version}) == 1
    assert metric_value(text, "blocker_config_last_reload_success_timestamp_seconds") > time.time() - 3600


def test_no_label_holds_a_client_device_or_domain(counted: tuple[Blocker, str]) -> None:
    _server, text = counted
    # The upstream label names a configured server (Knot on 127.0.0.1 here); no client address may appear.
    samples = [re.sub(r'upstream="[^"]*"', "", line) for line in text.splitlines() if not line.startswith("#")]
    for forbidden in ("127.0.0.", "MPS-", "tiktok.com", "example.test", "whatsapp.com"):
        assert not any(forbidden in line for line in samples), forbidden


def test_exposition_passes_promtool(counted: tuple[Blocker, str]) -> None:
    _server, text = counted
    result = subprocess.run([require_tool("promtool"), "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_health_and_readiness_endpoints(counted: tuple[Blocker, str]) -> None:
    server, _text = counted
    base = f"http://127.0.0.1:{server.metrics_port}"
    for path, body in (("/healthz", b"ok\n"), ("/readyz", b"ready\n")):
        with urllib.request.urlopen(base + path, timeout=5) as response:
            assert response.status == 200 and response.read() == body
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(base + "/nothing", timeout=5)
    assert caught.value.code == 404


def test_a_rejected_reload_shows_file_and_line_in_metrics(knot: Knot, tmp_path: Path) -> None:
    config = standard_config(tmp_path, [knot.endpoint])
    server = Blocker(config).start()
    try:
        good = config.read_text()
        config.write_text(good + "policy:\n  default_group: nobody\n")
        server.wait_for_log(r"reload \(file change\) rejected")
        text = server.metrics()
        line = len(good.splitlines()) + 2
        assert metric_value(text, "blocker_config_last_reload_error",
                            {"file": str(config), "line": str(line)}) == 1
        assert metric_value(text, "blocker_config_reloads_total", {"result": "failure"}) == 1
        mark = len(server.lines)
        config.write_text(good)
        server.wait_for_log(r"reloaded \(file change\)", after=mark)
        text = server.metrics()
        assert "blocker_config_last_reload_error{" not in text
        assert metric_value(text, "blocker_config_reloads_total", {"result": "success"}) == 2
    finally:
        server.stop()


def test_a_real_prometheus_scrapes_blocker(counted: tuple[Blocker, str], tmp_path: Path) -> None:
    server, _text = counted
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""\
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: blocker
    static_configs:
      - targets: ["127.0.0.1:{server.metrics_port}"]
""")
    process = subprocess.Popen([require_tool("prometheus"), f"--config.file={config}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def prometheus(expr: str) -> list[dict[str, object]]:
            promql = urllib.parse.quote(expr)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query={promql}", timeout=5) as r:
                answer = json.load(r)
            assert answer["status"] == "success", answer
            return answer["data"]["result"]  # type: ignore[no-any-return]

        # Every series exists from the start at 0; only the blocked ones have counted.
        results = eventually(lambda: prometheus('blocker_dns_blocked_total{job="blocker"} > 0'), 60, 0.5,
                             "blocked queries scraped")
        by_category = {r["metric"]["category"]: float(r["value"][1]) for r in results}  # type: ignore[index]
        assert by_category == {"tiktok": 7.0, "twitter": 3.0}
        zeros = prometheus('blocker_dns_blocked_total{job="blocker", group="standard"} == 0')
        assert {r["metric"]["category"] for r in zeros} == {  # type: ignore[index]
            "doh", "facebook", "instagram", "signal", "snapchat", "telegram", "threads", "whatsapp"}

        # The dashboard fills in: every panel's expression returns data from this Prometheus once a
        # few scrapes give rates over 10s two samples (the last-reload-error panel is empty while
        # reloads succeed, as it should be).
        def empty_panels() -> list[str]:
            return [expr for expr in dashboard_expressions() if "blocker_config_last_reload_error" not in expr
                    and not prometheus(expr.replace("$__rate_interval", "10s").replace("$instance", ".*"))]

        eventually(lambda: not empty_panels(), 30, 0.5, "every dashboard panel has data")
    finally:
        process.terminate()
        process.wait(20)


def test_a_scrape_before_any_query_shows_every_known_series_at_zero(knot: Knot, tmp_path: Path) -> None:
    """Series that exist only after their first increment lose it in rate(): they all start at 0."""
    server = Blocker(standard_config(tmp_path, [knot.endpoint])).start()
    try:
        text = server.metrics()
    finally:
        server.stop()
    for transport in ("udp", "tcp"):
        for action in ("allowed", "blocked", "exempted", "refused", "error"):
            assert f'blocker_dns_queries_total{{action="{action}",transport="{transport}"}} 0.0' in text
        assert f'blocker_dns_malformed_packets_total{{transport="{transport}"}} 0.0' in text
    for category in ("tiktok", "twitter", "facebook", "instagram", "snapchat", "threads", "whatsapp", "telegram",
                     "signal", "doh"):
        assert f'blocker_dns_blocked_total{{category="{category}",group="standard"}} 0.0' in text
        assert f'blocker_dns_exempted_total{{category="{category}"}} 0.0' in text
    for result in ("ok", "servfail", "refused", "timeout", "error", "truncated"):
        assert f'blocker_upstream_queries_total{{result="{result}",upstream="{knot.endpoint}"}} 0.0' in text
    assert 'blocker_config_reloads_total{result="failure"} 0.0' in text
    assert metric_value(text, "process_resident_memory_bytes") > 0
    assert metric_value(text, "process_open_fds") > 0
