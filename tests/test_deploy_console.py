"""The admin console on Kubernetes, validated offline: the production-console overlay renders and
passes strict schema validation, the console is reachable only from the admin network, and both
configs it carries (resolvers', console pod's) validate with blocker itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, require_tool

OVERLAY = ROOT / "deploy" / "kubernetes" / "overlays" / "production-console"


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    result = subprocess.run([require_tool("kubectl"), "kustomize", "--load-restrictor", "LoadRestrictionsNone",
                             str(OVERLAY)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def named(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_console_overlay_validates_strictly(rendered: list[dict], tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(rendered))
    result = subprocess.run([require_tool("kubernetes-validate"), "--strict", str(path)], capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ERROR" not in output, output
    for resource in ("deployment/blocker-console", "service/blocker-console", "networkpolicy/blocker-console",
                     "persistentvolumeclaim/blocker-state", "configmap/blocker-console-config"):
        assert f"passed for resource {resource} " in output, (resource, output)


def test_console_is_reachable_only_from_the_admin_network(rendered: list[dict]) -> None:
    service = named(rendered, "Service", "blocker-console")
    deployment = named(rendered, "Deployment", "blocker-console")
    policy = named(rendered, "NetworkPolicy", "blocker-console")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(9155, "console")]
    assert ports["console"] == 9155
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert all(labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    console_rules = [rule for rule in policy["spec"]["ingress"] if any(p["port"] == 9155 for p in rule["ports"])]
    assert [rule["from"] for rule in console_rules] == [[{"ipBlock": {"cidr": "10.20.0.0/24"}}]]
    # The resolvers' own policy does not open the console port, and they mount the state read-only.
    resolver_policy = named(rendered, "NetworkPolicy", "blocker")
    assert all(p["port"] != 9155 for rule in resolver_policy["spec"]["ingress"] for p in rule["ports"])
    [resolver] = named(rendered, "Deployment", "blocker")["spec"]["template"]["spec"]["containers"]
    assert {"name": "state", "mountPath": "/var/lib/blocker", "readOnly": True} in resolver["volumeMounts"]
    assert {"name": "state", "mountPath": "/var/lib/blocker"} in container["volumeMounts"]


def test_console_overlay_configs_validate(rendered: list[dict], tmp_path: Path) -> None:
    maps = {d["metadata"]["name"]: d["data"] for d in rendered if d["kind"] == "ConfigMap"}
    state = tmp_path / "state"
    state.mkdir()
    (state / "exemptions.yaml").write_text("exemptions: []\n")
    lists = tmp_path / "etc" / "lists"
    lists.mkdir(parents=True)
    for file, content in maps["blocker-lists"].items():
        (lists / file).write_text(content)
    for name in ("blocker-config", "blocker-console-config"):
        folder = tmp_path / "etc" / name
        folder.mkdir()
        config = folder / "blocker.yaml"
        config.write_text(maps[name]["blocker.yaml"].replace("/var/lib/blocker", str(state)))
        result = subprocess.run([sys.executable, "-m", "blocker", "validate", "--config", str(config)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (name, result.stdout + result.stderr)
    assert "enabled: true" in maps["blocker-console-config"]["blocker.yaml"]
    assert "console:" not in maps["blocker-config"]["blocker.yaml"]
