"""docs/: the configuration reference names every key the code accepts, and the commented example
config uses every one of them and passes `blocker validate`.

The keys are read from the code itself (every `read.mapping(node, where, KEYS)` in the modules
that parse the config and the category files), so a key added there fails here until it is
documented.
"""

from __future__ import annotations

import ast
import dataclasses
import ipaddress
import re
import subprocess
import sys

import yaml
from helpers import ROOT

from blocker import config as config_module

DOCS = ROOT / "docs"
PARSERS = [ROOT / "blocker" / "config.py", ROOT / "blocker" / "blocklists.py"]


def _key_set(node: ast.expr, constants: dict[str, set[str]], where: str) -> set[str]:
    if isinstance(node, ast.Name):
        assert node.id in constants, f"{where}: {node.id} is not a module-level key set"
        return constants[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("set", "frozenset"):
        return set(ast.literal_eval(node.args[0])) if node.args else set()
    value = ast.literal_eval(node)  # a literal {"a", "b"}; anything else fails loudly, so it gets added here
    assert isinstance(value, set | frozenset | list | tuple), f"{where}: cannot read the key set"
    return set(value)


def accepted_keys() -> dict[str, set[str]]:
    """Every mapping the parsers read, by the name its error messages use → the keys it accepts."""
    found: dict[str, set[str]] = {}
    for path in PARSERS:
        tree = ast.parse(path.read_text())
        constants: dict[str, set[str]] = {}
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
                node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(target, ast.Name) and target.id.endswith("_KEYS") and node.value is not None:  # type: ignore[union-attr]
                constants[target.id] = _key_set(node.value, {}, f"{path.name}:{node.lineno}")  # type: ignore[union-attr]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "mapping" \
                    and len(node.args) == 3:
                where = node.args[1]
                name = where.value if isinstance(where, ast.Constant) else ast.unparse(where)
                keys = _key_set(node.args[2], constants, f"{path.name}:{node.lineno}")
                found.setdefault(str(name), set()).update(keys)
    return found


def test_the_parsers_are_read_whole() -> None:
    keys = accepted_keys()
    # The sections and records the config has today; more may come, none may go unseen.
    assert {"config", "dns", "metrics", "query_log", "proxy", "policy", "device", "exemption",
            "category file"} <= set(keys)
    assert {"listen", "upstreams", "upstream_timeout", "block_ttl"} <= keys["dns"]
    assert {"expires", "starts", "approved_by"} <= keys["exemption"]
    assert any(where.startswith("f") and "group" in where for where in keys)  # the per-group mapping


def test_every_key_is_in_the_configuration_reference() -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = sorted(f"{where}: {key}" for where, keys in accepted_keys().items() for key in keys
                     if not re.search(rf"`(?:[\w<>\[\].-]+\.)?{re.escape(key)}`", text))
    assert not missing, f"not described in docs/configuration.md: {missing}"


def mapping_keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for value in node.values() for k in mapping_keys(value)}
    if isinstance(node, list):
        return {k for value in node for k in mapping_keys(value)}
    return set()


def test_the_example_config_uses_every_key() -> None:
    used = mapping_keys(yaml.safe_load((DOCS / "blocker.example.yaml").read_text()))
    keys = accepted_keys()
    expected = {key for where, section in keys.items() if where != "category file" for key in section}
    assert expected - used == set(), "keys the example does not show"


def test_the_example_config_validates() -> None:
    result = subprocess.run([sys.executable, "-m", "blocker", "validate", "--config", "docs/blocker.example.yaml"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "docs/../blocklists/tiktok.yaml: category tiktok:" in result.stdout  # the repository's lists
    assert re.search(r"^OK: policy \w+ from docs/blocker.example.yaml: 10 categories, \d+ rules, 4 devices, "
                     r"2 exemptions$", result.stdout, re.M), result.stdout
    assert "unknown device" not in result.stdout and "overlap" not in result.stdout


# Paths of the developers' own machines, which a user's clone does not have (spelt in pieces so
# that this test itself does not name them).
OUTSIDE = ("../" + "shared", "/" + "work/")


def test_docs_and_deploy_files_stay_inside_the_repository() -> None:
    for folder in (DOCS, ROOT / "deploy"):
        for path in folder.rglob("*"):
            if path.is_file():
                text = path.read_text(errors="replace")
                assert not any(outside in text for outside in OUTSIDE), path


def test_the_readme_points_at_the_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docs/configuration.md" in readme and "docs/blocker.example.yaml" in readme
    for path in re.findall(r"\]\(([^)#:]+)\)", (DOCS / "configuration.md").read_text()):
        assert (DOCS / path).exists(), path



def rendered(value: object) -> str:
    """A default as the reference writes it (YAML flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, config_module.BlockResponse):
        return value.kind
    if isinstance(value, config_module.RateLimit):
        return "off" if value.qps <= 0 else f"{{qps: {value.qps:g}, burst: {value.burst:g}, action: {value.action}}}"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], str):
        host = f"[{value[0]}]" if ":" in value[0] else value[0]
        return f'"{host}:{value[1]}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(rendered(v) if isinstance(v, tuple) else f'"{v}"' for v in value) + "]"
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return f'"{value}"'
    return str(value)


def test_the_reference_gives_the_defaults_the_code_has() -> None:
    text = (DOCS / "configuration.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \| [^|]* \| ([^|]*) \|", text, re.M)}
    sections = {"dns": config_module.DnsConfig(), "metrics": config_module.MetricsConfig(),
                "query_log": config_module.QueryLogConfig(), "proxy": config_module.ProxyConfig()}
    checked = 0
    for section, defaults in sections.items():
        for field in dataclasses.fields(defaults):  # type: ignore[arg-type]
            key = f"{section}.{field.name}"
            if key == "dns.upstreams":  # from /etc/resolv.conf, not a constant
                continue
            assert key in rows, f"docs/configuration.md has no table row for {key}"
            expected = rendered(getattr(defaults, field.name))
            assert f"`{expected}`" in rows[key], f"{key}: the code has {expected}, the reference {rows[key]}"
            checked += 1
    assert f"`{config_module.PolicyConfig().default_group}`" in rows["policy.default_group"]
    assert checked >= 12
