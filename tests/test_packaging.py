"""A wheel install carries the shipped blocklists: the embedded defaults work outside a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import ROOT


def test_wheel_install_finds_shipped_blocklists(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = wheels.glob("blocker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "blocker/console/templates/overview.html" in names and "blocker/console/static/console.css" in names
    venv = tmp_path / "venv"
    # System site-packages give the venv its dependencies; the project itself comes only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Without PYTHONPATH: pointing at a checkout (as when testing a worktree), it would show pip the
    # checkout's blocker.egg-info (left by the wheel build above) as blocker already installed.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300, env=clean)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([str(venv / "bin" / "blocker"), "validate"], cwd=elsewhere, capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "site-packages/blocker/blocklists/tiktok.yaml: category tiktok:" in result.stdout
    where = subprocess.run([str(python), "-c", "import blocker; print(blocker.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True, env=clean).stdout
    assert str(venv) in where  # the installed copy, not the checkout
