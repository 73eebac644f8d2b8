"""`blocker serve` runs on uvloop wherever uvloop exists, and its ready line says which loop runs.

The stock asyncio loop costs several times the CPU per query (see the benchmark), so a plain
install must not fall back to it silently: uvloop is a normal dependency on every platform it
supports, and these tests fail if the server comes up on the stock loop there.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import standard_config
from helpers import ROOT, Blocker, Knot

UVLOOP_PLATFORM = sys.platform != "win32"


@pytest.fixture
def config(knot: Knot, tmp_path: Path) -> Path:
    return standard_config(tmp_path, [knot.endpoint])


@pytest.fixture
def started() -> Iterator[list[Blocker]]:
    servers: list[Blocker] = []
    yield servers
    for server in servers:
        server.stop()


def test_uvloop_is_a_plain_dependency_where_it_exists() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [requirement] = [r for r in project["dependencies"] if re.match(r"uvloop\b", r)]
    name, _, marker = requirement.partition(";")
    assert name.strip().startswith("uvloop>=")
    # Only the platform uvloop does not support is left out.
    assert marker.strip().replace('"', "'") == "sys_platform != 'win32'"
    # `pip install 'blocker[fast]'` (the old advice) still resolves.
    assert project["optional-dependencies"]["fast"] == []


def test_serve_runs_on_uvloop_and_says_so(config: Path, started: list[Blocker]) -> None:
    server = Blocker(config).start()
    started.append(server)
    ready = server.wait_for_log(r" ready ")
    loop = re.search(r" loop=(\w+)", ready)
    assert loop is not None, ready
    if UVLOOP_PLATFORM:
        assert loop.group(1) == "uvloop", f"blocker serve runs on the stock loop where uvloop exists: {ready}"
    else:
        assert loop.group(1) == "asyncio"
    assert not any("uvloop is not installed" in line for line in server.lines)
    assert server.query("www.example.test").answer


def test_without_uvloop_the_log_says_stock_loop(config: Path, tmp_path: Path, started: list[Blocker]) -> None:
    # Hide the installed uvloop the way a missing package looks to Python: the import fails.
    hidden = tmp_path / "no-uvloop"
    hidden.mkdir()
    (hidden / "uvloop.py").write_text("raise ImportError('uvloop hidden by the test')\n")
    server = Blocker(config, env={"PYTHONPATH": f"{hidden}:{ROOT}"}).start()
    started.append(server)
    ready = server.wait_for_log(r" ready ")
    assert " loop=asyncio" in ready, ready
    if UVLOOP_PLATFORM:
        warning = server.wait_for_log(r"uvloop is not installed")
        assert " WARNING " in warning
    assert server.query("www.example.test").answer
