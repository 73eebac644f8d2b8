"""Files under deploy/: Prometheus rules and their unit tests, the dashboard's PromQL, and the compose stack,
checked offline (no Docker engine on CI machines)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import ROOT, require_tool

DEPLOY = ROOT / "deploy"


def promtool(*args: str, cwd: Path = DEPLOY / "prometheus") -> str:
    result = subprocess.run([require_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_unit_test() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]
              if case.get("exp_alerts")}
    assert alerts == tested
    assert {"BlockerDown", "BlockerUpstreamsAllFailing", "BlockerServfailRatioHigh", "BlockerLatencyHigh",
            "BlockerConfigReloadFailing", "BlockerPolicyNotLoaded", "BlockerExemptionsExpiringSoon",
            "BlockerQueryLogDropping"} <= alerts


def test_scrape_config_is_valid() -> None:
    promtool("check", "config", "prometheus.yml")


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "blocker.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 15
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*")}
        for i, expr in enumerate(expressions)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(expressions)} rules found" in promtool("check", "rules", str(path), cwd=tmp_path)


def test_dashboard_and_alerts_name_only_metrics_blocker_exports() -> None:
    """Catch a typo in a metric name, which PromQL syntax checks cannot."""
    exported = {m for line in (ROOT / "README.md").read_text().splitlines() if re.match(r"\| `(blocker|process)_", line)
                for m in re.findall(r"`((?:blocker|process)_\w+)`", line)}
    texts = "\n".join(dashboard_expressions()) + (DEPLOY / "prometheus" / "alerts.yml").read_text()
    used = set(re.findall(r"\b((?:blocker|process)_[a-z_]+)", texts))
    assert {"blocker_dns_queries_total", "blocker_upstream_queries_total"} <= used
    base = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    missing = {name for name in base if name not in exported}
    assert not missing, f"not documented/exported: {missing}"


def test_dashboard_has_a_datasource_variable() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "blocker.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_compose_stack_is_consistent(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"blocker", "prometheus", "grafana"}
    assert (DEPLOY / services["blocker"]["build"]["context"] / services["blocker"]["build"]["dockerfile"]).is_file()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [target] = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services
    blocker_config = yaml.safe_load((DEPLOY / "compose" / "blocker.yaml").read_text())
    assert blocker_config["metrics"]["listen"].endswith(f":{port}")
    assert f"127.0.0.1:{port}:{port}/tcp" in services["blocker"]["ports"]
    [dns] = blocker_config["dns"]["listen"]
    dns_port = int(dns.rsplit(":", 1)[1])
    assert dns_port == 8053  # the container's port, not mDNS's 5353
    assert {f"127.0.0.1:{dns_port}:{dns_port}/udp", f"127.0.0.1:{dns_port}:{dns_port}/tcp"} <= set(
        services["blocker"]["ports"])
    assert f"dig @127.0.0.1 -p {dns_port} " in (DEPLOY / "compose.yaml").read_text()
    assert f"dig @127.0.0.1 -p {dns_port} " in (ROOT / "README.md").read_text()
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    # blocker's config validates as the container sees it: /etc/blocker with the lists mounted beside it.
    etc = tmp_path / "etc" / "blocker"
    etc.mkdir(parents=True)
    (etc / "blocker.yaml").write_text((DEPLOY / "compose" / "blocker.yaml").read_text())
    (etc / "blocklists").symlink_to(ROOT / "blocklists")
    result = subprocess.run([sys.executable, "-m", "blocker", "validate", "--config", str(etc / "blocker.yaml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
