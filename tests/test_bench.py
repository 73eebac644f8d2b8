"""`bench/run` works on a fresh machine: what it runs (bench.py, and without_metrics.py, which
bench.py starts), bench/hotpath.py and bench/workers.py import only the standard library, blocker and blocker's
runtime dependencies (bench/run installs just those), never the tests' helpers or their tools.
(Other tools in bench/, such as soak_server.py, reuse the tests' helpers on purpose.)"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib

import pytest
from helpers import ROOT

BENCH = [ROOT / "bench" / name for name in ("bench.py", "without_metrics.py", "hotpath.py", "workers.py")]
# Distribution name -> the module it installs, where they differ.
MODULE_OF = {"pyyaml": "yaml", "prometheus-client": "prometheus_client"}


def runtime_modules() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!;\[ ]", requirement, maxsplit=1)[0].lower() for requirement in project["dependencies"]}
    return {MODULE_OF.get(name, name.replace("-", "_")) for name in names}


@pytest.mark.parametrize("path", BENCH, ids=[p.name for p in BENCH])
def test_bench_imports_nothing_bench_run_does_not_install(path) -> None:
    allowed = set(sys.stdlib_module_names) | {"blocker", "__future__", "bench"} | runtime_modules()
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert imported, path
    assert imported <= allowed, f"{path.name} imports {sorted(imported - allowed)}: bench/run does not install them"
    assert '"tests"' not in path.read_text(), f"{path.name} reaches into tests/"


def test_bench_starts_and_lists_its_mixes() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for mix in ("blocked", "cached", "mix", "unique_blocked", "zipf"):
        assert mix in result.stdout
