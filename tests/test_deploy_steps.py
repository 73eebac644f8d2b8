"""deploy/README.md's one-host steps, run as written in a clean venv under a temporary prefix, and the
query log's logrotate snippet rotating the log of a real blocker.

pip works offline here: the venv installs from a wheelhouse holding the exact distributions this
Python already has (blocker's dependencies and its build requirements), repacked as wheels.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from conftest import standard_config
from helpers import ROOT, Blocker, Knot, eventually, metric_value, rcode_text, require_tool
from packaging.requirements import Requirement

DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
# The only part of the steps the test changes: where on the file system they install.
PREFIXES = ("/opt/blocker", "/etc/blocker")


def one_host_blocks() -> list[str]:
    text = (DEPLOY / "README.md").read_text()
    section = text.split("## One host (systemd)", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.*?)^```", section, re.M | re.S)


def repack(dist: metadata.Distribution, out: Path) -> Path:
    """A wheel of an installed distribution, from the files its RECORD lists."""
    wheel_text = dist.read_text("WHEEL") or ""
    tag = next(line.split(":", 1)[1].strip() for line in wheel_text.splitlines() if line.startswith("Tag:"))
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    path = out / f"{name}-{dist.version}-{tag}.whl"
    own = re.compile(r"[^/]+\.dist-info/(RECORD|INSTALLER|REQUESTED|direct_url\.json)")
    records: list[str] = []
    info = ""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for file in dist.files or []:
            relative = file.as_posix()
            if own.fullmatch(relative):
                info = relative.split("/", 1)[0] if relative.endswith("RECORD") else info
                continue
            if relative.startswith("..") or relative.endswith(".pyc"):  # scripts are regenerated; caches
                continue
            data = Path(str(file.locate())).read_bytes()
            wheel.writestr(relative, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{relative},sha256={digest},{len(data)}")
        assert info, f"{dist.metadata['Name']}: no RECORD"
        wheel.writestr(f"{info}/RECORD", "\n".join([*records, f"{info}/RECORD,,"]) + "\n")
    return path


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of blocker[fast]'s dependencies and build requirements, with theirs, as installed here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [*project["build-system"]["requires"], *project["project"]["dependencies"],
              *project["project"]["optional-dependencies"]["fast"]]
    out = tmp_path_factory.mktemp("wheelhouse")
    done: set[str] = set()
    while wanted:
        requirement = Requirement(wanted.pop())
        key = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if key in done or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            raise AssertionError(f"{requirement.name} is not installed: run tests/run (the `test` extra)") from None
        assert requirement.specifier.contains(dist.version, prereleases=True), (requirement, dist.version)
        repack(dist, out)
        done.add(key)
        wanted += [r for r in dist.requires or [] if "extra ==" not in r]
    return out


def checkout_copy(directory: Path) -> Path:
    """The repository as a fresh clone has it (no build output, no caches)."""
    copy = directory / "checkout"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", ".ruff_cache", ".pytest_cache", "results"))
    return copy


def under(prefix: Path, text: str) -> str:
    for path in PREFIXES:
        text = re.sub(rf"(?<![\w./]){re.escape(path)}(?=[/\s'\"]|$)", f"{prefix}{path}", text, flags=re.M)
    return text


def test_the_readme_has_the_install_and_the_service_steps() -> None:
    install, service = one_host_blocks()
    assert "python3 -m venv /opt/blocker" in install
    assert "/opt/blocker/bin/blocker validate --config /etc/blocker/blocker.yaml" in install
    assert "systemctl enable --now blocker" in service
    # Everything the install writes is under the prefixes the test moves.
    targets = re.findall(r"(?<![\w.])(/[\w./-]+)", install)
    assert targets and all(t.startswith(PREFIXES) for t in targets), targets


def test_install_steps_run_as_written_in_a_clean_venv(tmp_path: Path, wheelhouse: Path) -> None:
    install, _service = one_host_blocks()
    prefix = tmp_path / "root"
    checkout = checkout_copy(tmp_path)
    script = under(prefix, install)
    assert script.count(str(prefix)) == install.count("/opt/blocker") + install.count("/etc/blocker")
    python_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{python_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "PYTHONNOUSERSITE": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(wheelhouse), "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_ROOT_USER_ACTION": "ignore"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{script}\n{output}"
    config = prefix / "etc" / "blocker" / "blocker.yaml"
    assert "OK: policy " in result.stdout and f"from {config}:" in result.stdout, output
    assert f"{prefix}/etc/blocker/blocklists/tiktok.yaml: category tiktok:" in result.stdout
    blocker = prefix / "opt" / "blocker" / "bin" / "blocker"
    where = subprocess.run([str(blocker.with_name("python")), "-c", "import blocker, uvloop; print(blocker.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0 and where.stdout.startswith(f"{prefix}/opt/blocker/lib/"), where.stderr
    # The unit starts what the install created.
    unit = (SYSTEMD / "blocker.service").read_text()
    [exec_start] = re.findall(r"^ExecStart=(\S+) serve --config (\S+)$", unit, re.M)
    assert Path(under(prefix, exec_start[0])) == blocker and blocker.is_file()
    assert Path(under(prefix, exec_start[1])) == config and config.is_file()


def test_service_steps_install_files_that_exist_and_agree() -> None:
    _install, service = one_host_blocks()
    copies = re.findall(r"^cp (\S+) (\S+)$", service, re.M)
    assert {source for source, _ in copies} == {"deploy/systemd/blocker.service", "deploy/systemd/blocker.logrotate"}
    for source, _target in copies:
        assert (ROOT / source).is_file(), source
    unit = (SYSTEMD / "blocker.service").read_text()
    [logs] = re.findall(r"^LogsDirectory=(\S+)$", unit, re.M)
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit  # what logrotate's `systemctl reload` sends
    rotate = (SYSTEMD / "blocker.logrotate").read_text()
    [rotated] = re.findall(r"^(/\S+) \{$", rotate, re.M)
    assert rotated.startswith(f"/var/log/{logs}/")
    assert "systemctl reload blocker" in rotate and "copytruncate" not in rotate
    # The shipped config names the same file where it explains how to turn the log on.
    assert f"#   path: {rotated}\n" in (SYSTEMD / "blocker.yaml").read_text()


def test_the_shipped_host_config_validates(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "blocker"
    etc.mkdir(parents=True)
    shutil.copy(SYSTEMD / "blocker.yaml", etc / "blocker.yaml")
    (etc / "blocklists").symlink_to(ROOT / "blocklists")
    result = subprocess.run([sys.executable, "-m", "blocker", "validate", "--config", str(etc / "blocker.yaml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # With the query log turned on as its comment says, it still validates.
    text = (etc / "blocker.yaml").read_text()
    (etc / "blocker.yaml").write_text(re.sub(r"^# (query_log:)\n#( +path: .*)\n#( +only_blocked: .*)$",
                                             r"\1\n\2\n\3", text, flags=re.M))
    assert "\nquery_log:\n" in (etc / "blocker.yaml").read_text()
    result = subprocess.run([sys.executable, "-m", "blocker", "validate", "--config", str(etc / "blocker.yaml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_for_lines(path: Path, count: int, deadline: float = 10.0) -> list[str]:
    return eventually(lambda: len(lines_of(path)) >= count and lines_of(path), deadline, 0.05,
                      f"{path}: {count} lines")


def test_logrotate_snippet_rotates_the_query_log_and_loses_nothing(knot: Knot, tmp_path: Path) -> None:
    logs = tmp_path / "log" / "blocker"
    logs.mkdir(parents=True)
    snippet = (SYSTEMD / "blocker.logrotate").read_text()
    [rotated] = re.findall(r"^(/\S+) \{$", snippet, re.M)
    log = logs / Path(rotated).name
    config = standard_config(tmp_path, [knot.endpoint], policy=f'query_log:\n  path: "{log}"\n')
    server = Blocker(config).start()
    try:
        assert server.process
        # The snippet as shipped, but for the log's directory and how the SIGHUP is sent (no systemd here).
        script = re.compile(r"^( +)systemctl reload blocker$", re.M)
        assert len(script.findall(snippet)) == 1
        conf = tmp_path / "logrotate.conf"
        moved = snippet.replace("/var/log/blocker/", f"{logs}/")
        conf.write_text(script.sub(rf"\1kill -HUP {server.process.pid}", moved))
        logrotate = [require_tool("logrotate"), "--state", str(tmp_path / "logrotate.state"), "--force", str(conf)]
        for round_, count in enumerate((5, 3, 2), start=1):
            mark = len(server.lines)
            for _ in range(count):
                assert rcode_text(server.query("www.tiktok.com")) == "NXDOMAIN"
            assert len(wait_for_lines(log, count)) == count
            result = subprocess.run(logrotate, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr
            server.wait_for_log(r"reloaded \(SIGHUP\)", after=mark)
            assert not log.exists()  # nocreate: blocker makes the new file at its next entry
            assert len(lines_of(logs / f"{log.name}.1")) == count  # delaycompress: the newest stays plain
            if round_ > 1:
                assert (logs / f"{log.name}.2.gz").is_file()
        for _ in range(4):
            assert rcode_text(server.query("www.tiktok.com")) == "NXDOMAIN"
        assert len(wait_for_lines(log, 4)) == 4  # written to the new file, after the reopen
        assert metric_value(server.metrics(), "blocker_querylog_written_total") == 5 + 3 + 2 + 4
    finally:
        server.stop()
