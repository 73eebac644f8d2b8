"""Deployment files, validated offline: systemd units, the container image, the Kubernetes bases."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, require_tool

DEPLOY = ROOT / "deploy"
UNITS = ["blocker.service", "blocker-proxy.service"]


def installed_units(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at the installed entry point (verify requires it to exist)."""
    blocker = shutil.which("blocker")
    assert blocker, "the blocker console script is not installed (tests/run installs it)"
    paths = []
    for name in UNITS:
        path = tmp_path / name
        path.write_text((DEPLOY / "systemd" / name).read_text().replace("/opt/blocker/bin/blocker", blocker))
        paths.append(path)
    return paths


def test_systemd_units_verify_without_any_warning(tmp_path: Path) -> None:
    # systemd-analyze exits 0 on unknown keys and bad values, printing a warning: any output fails.
    result = subprocess.run([require_tool("systemd-analyze"), "verify", *map(str, installed_units(tmp_path))],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_units_are_hardened(tmp_path: Path, unit: str) -> None:
    [path] = [p for p in installed_units(tmp_path) if p.name == unit]
    result = subprocess.run([require_tool("systemd-analyze"), "security", "--offline=true", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    assert score <= 2.0, result.stdout
    assert f"**{score} (OK)**" in (DEPLOY / "README.md").read_text()  # the README reports what we measure
    text = path.read_text()
    for setting in ("User=blocker", "NoNewPrivileges=yes", "ProtectSystem=strict",
                    "AmbientCapabilities=CAP_NET_BIND_SERVICE", "ExecReload=/bin/kill -HUP $MAINPID",
                    "Restart=on-failure"):
        assert setting in text


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([require_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in text and 'VOLUME ["/etc/blocker"]' in text


def endpoint_port(text: str) -> int:
    return int(text.rsplit(":", 1)[1])


def test_container_ports_agree_with_its_config() -> None:
    config = yaml.safe_load((DEPLOY / "container" / "blocker.yaml").read_text())
    dns_ports = {endpoint_port(e) for e in config["dns"]["listen"]}
    metrics_port = endpoint_port(config["metrics"]["listen"])
    assert dns_ports == {8053}  # unprivileged (uid 10001 cannot bind 53), and not mDNS's 5353
    text = (ROOT / "Dockerfile").read_text()
    [expose] = re.findall(r"^EXPOSE (.+)$", text, re.M)
    assert set(expose.split()) == {f"{p}/{proto}" for p in dns_ports for proto in ("udp", "tcp")} | {
        f"{metrics_port}/tcp"}
    [health] = re.findall(r"^HEALTHCHECK .*http://127\.0\.0\.1:(\d+)/healthz", text, re.M)
    assert int(health) == metrics_port


def test_container_default_config_validates(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "blocker"
    etc.mkdir(parents=True)
    shutil.copy(DEPLOY / "container" / "blocker.yaml", etc / "blocker.yaml")
    (etc / "blocklists").symlink_to(ROOT / "blocklists")
    result = subprocess.run([sys.executable, "-m", "blocker", "validate", "--config", str(etc / "blocker.yaml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, object]]:
    result = subprocess.run([require_tool("kubectl"), "kustomize", "--load-restrictor", "LoadRestrictionsNone",
                             str(DEPLOY / "kubernetes" / "overlays" / "production")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, object]], kind: str) -> dict[str, object]:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def test_kubernetes_manifests_validate_strictly(rendered: list[dict[str, object]], tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(rendered))
    result = subprocess.run([require_tool("kubernetes-validate"), "--strict", str(path)], capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    kinds = {str(d["kind"]).lower() for d in rendered}
    assert kinds == {"namespace", "serviceaccount", "configmap", "service", "deployment", "poddisruptionbudget",
                     "horizontalpodautoscaler", "networkpolicy", "servicemonitor"}
    for kind in kinds - {"servicemonitor"}:  # a CRD: no schema is bundled, checked below instead
        assert re.search(rf"passed for resource {kind}/", output), (kind, output)
    assert "ERROR" not in output


def test_kubernetes_resources_fit_together(rendered: list[dict[str, object]]) -> None:
    deployment: dict = by_kind(rendered, "Deployment")  # type: ignore[assignment]
    service: dict = by_kind(rendered, "Service")  # type: ignore[assignment]
    monitor: dict = by_kind(rendered, "ServiceMonitor")  # type: ignore[assignment]
    policy: dict = by_kind(rendered, "NetworkPolicy")  # type: ignore[assignment]
    autoscaler: dict = by_kind(rendered, "HorizontalPodAutoscaler")  # type: ignore[assignment]
    budget: dict = by_kind(rendered, "PodDisruptionBudget")  # type: ignore[assignment]
    # The autoscaler owns the replica count: a count in the Deployment would be reset on every apply.
    assert "replicas" not in deployment["spec"]
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                    "name": deployment["metadata"]["name"]}
    assert autoscaler["spec"]["minReplicas"] >= 3 > budget["spec"]["minAvailable"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert all("subPath" not in mount for mount in container["volumeMounts"])  # subPath mounts never update
    ports = {(p["port"], p["protocol"]) for p in service["spec"]["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (1813, "UDP")} <= ports
    # The handset's source address must reach the pod: kube-proxy's default (Cluster) SNATs it away.
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert service["spec"]["type"] in ("LoadBalancer", "NodePort")
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    ingress = policy["spec"]["ingress"]
    assert {p["protocol"] for p in ingress[0]["ports"]} == {"UDP", "TCP"}
    assert ingress[1]["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    by_name = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "ConfigMap"}  # type: ignore[index]
    # Fixed names: updated in place, reloaded live; the inventory apart (30,000+ devices need their own 1 MiB).
    assert set(by_name) == {"blocker-config", "blocker-lists", "blocker-inventory"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["inventory"] == "/etc/blocker/inventory"


def test_kubernetes_configmaps_hold_every_list_and_validate(rendered: list[dict[str, object]],
                                                            tmp_path: Path) -> None:
    maps = {d["metadata"]["name"]: d["data"] for d in rendered if d["kind"] == "ConfigMap"}  # type: ignore[index]
    assert set(maps["blocker-lists"]) == {p.name for p in (ROOT / "blocklists").glob("*.yaml")}
    # Lay the ConfigMaps out as the Deployment mounts them, and validate.
    for name, folder in (("blocker-config", "config"), ("blocker-lists", "lists"), ("blocker-inventory", "inventory")):
        directory = tmp_path / "etc" / "blocker" / folder
        directory.mkdir(parents=True)
        for file, content in maps[name].items():  # type: ignore[attr-defined]
            (directory / file).write_text(content)
    result = subprocess.run([sys.executable, "-m", "blocker", "validate", "--config",
                             str(tmp_path / "etc" / "blocker" / "config" / "blocker.yaml")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_ports_and_addresses_agree_with_the_config(rendered: list[dict[str, object]]) -> None:
    """The pod listens where the config says, the Service maps 53 to it, and the NetworkPolicy lets in
    the config's handset pools and out to its upstreams, and nothing else."""
    maps = {d["metadata"]["name"]: d["data"] for d in rendered if d["kind"] == "ConfigMap"}  # type: ignore[index]
    config = yaml.safe_load(maps["blocker-config"]["blocker.yaml"])  # type: ignore[index]
    assert config == yaml.safe_load((DEPLOY / "kubernetes" / "overlays" / "production" / "blocker.yaml").read_text())
    deployment: dict = by_kind(rendered, "Deployment")  # type: ignore[assignment]
    service: dict = by_kind(rendered, "Service")  # type: ignore[assignment]
    policy: dict = by_kind(rendered, "NetworkPolicy")  # type: ignore[assignment]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    container_ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}
    [dns_port] = {endpoint_port(e) for e in config["dns"]["listen"]}
    metrics_port = endpoint_port(config["metrics"]["listen"])
    assert 1024 <= dns_port != 5353
    radius = config["identity"]["radius_accounting"]
    radius_port = endpoint_port(radius["listen"])
    assert container_ports == {"dns-udp": (dns_port, "UDP"), "dns-tcp": (dns_port, "TCP"),
                               "radius-acct": (radius_port, "UDP"), "metrics": (metrics_port, "TCP")}
    by_target = {p["targetPort"]: (p["port"], p["protocol"]) for p in service["spec"]["ports"]}
    assert by_target == {"dns-udp": (53, "UDP"), "dns-tcp": (53, "TCP"), "radius-acct": (1813, "UDP"),
                         "metrics": (metrics_port, "TCP")}
    dns_in, metrics_in, radius_in = policy["spec"]["ingress"]
    assert {(p["port"], p["protocol"]) for p in dns_in["ports"]} == {(dns_port, "UDP"), (dns_port, "TCP")}
    assert {f["ipBlock"]["cidr"] for f in dns_in["from"]} == set(config["dns"]["allow_networks"])
    assert {(p["port"], p["protocol"]) for p in metrics_in["ports"]} == {(metrics_port, "TCP")}
    # Accounting only from the gateways the config accepts it from.
    assert {(p["port"], p["protocol"]) for p in radius_in["ports"]} == {(radius_port, "UDP")}
    assert {f["ipBlock"]["cidr"] for f in radius_in["from"]} == set(radius["clients"])
    egress, store_egress = policy["spec"]["egress"]
    [store_pods] = store_egress["to"]
    labels = store_pods["podSelector"]["matchLabels"]
    assert labels["app.kubernetes.io/component"] == "binding-store"
    # The optional store's pods (deploy/kubernetes/optional/valkey.yaml) carry every label the selector asks.
    valkey = next(yaml.safe_load_all((DEPLOY / "kubernetes" / "optional" / "valkey.yaml").read_text()))
    assert labels.items() <= valkey["spec"]["template"]["metadata"]["labels"].items()
    assert config["identity"]["store"]["url"].endswith(f":{store_egress['ports'][0]['port']}/0")
    allowed = [ipaddress.ip_network(t["ipBlock"]["cidr"]) for t in egress["to"]]
    upstreams = [ipaddress.ip_address(e.rsplit(":", 1)[0].strip("[]")) for e in config["dns"]["upstreams"]]
    assert all(any(u in n for n in allowed) for u in upstreams), (upstreams, allowed)
    assert all(any(n.overlaps(ipaddress.ip_network(u)) for u in upstreams) for n in allowed), "egress to a non-upstream"
    assert {(endpoint_port(e), proto) for e in config["dns"]["upstreams"] for proto in ("UDP", "TCP")} == {
        (p["port"], p["protocol"]) for p in egress["ports"]}
