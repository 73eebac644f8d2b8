"""`blocker validate` finds everything, at the right lines; `--json`; quiet exits on a closed pipe;
every subcommand's help documents its arguments with an example."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

SUBCOMMANDS = [["serve"], ["check"], ["validate"], ["proxy"], ["exemptions"], ["exemptions", "list"],
               ["exemptions", "grant"], ["exemptions", "renew"], ["exemptions", "revoke"], ["diff"],
               ["audit"], ["audit", "verify"]]


def blocker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blocker", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def lists(folder: Path) -> Path:
    folder.mkdir()
    (folder / "chat.yaml").write_text("name: chat\ndomains:\n  - chat.test\n  - '*.talk.test'\n  - chat.test\n"
                                      "  - '*.covered.test'\n  - covered.test\n")
    (folder / "video.yaml").write_text("name: video\ndomains:\n  - video.test\n")
    (folder / "spare.yaml").write_text("name: spare\ndomains:\n  - spare.test\n")
    return folder


def test_validate_reports_every_warning_at_its_line(tmp_path: Path) -> None:
    folder = lists(tmp_path / "lists")
    config = tmp_path / "blocker.yaml"
    config.write_text(f"""blocklists: {folder}
dns:
  allow_networks: ["10.8.0.9/24", "127.0.0.0/8"]
policy:
  default_group: standard
  expiry_warning_days: 30
  groups:
    standard: {{block: [chat, video]}}
  devices:
    - {{id: A, addresses: ["10.8.1.0/24"], group: standard}}
    - {{id: B, addresses: ["10.8.1.7"], group: standard}}
    - {{id: C, addresses: ["10.8.2.1"], group: standard}}
    - {{id: D, addresses: ["10.8.2.1"], group: standard}}
  exemptions:
    - {{device: A, allow: [chat], approved_by: X, reference: R-1, reason: y, expires: "2099-01-01T00:00:00Z"}}
""")
    result = blocker("validate", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert (f"{config}:3: dns.allow_networks: '10.8.0.9/24' has host bits set: it means 10.8.0.0/24 "
            "(256 addresses) (warning)") in out
    assert (f"{config}:11: device 'B': address 10.8.1.7/32 lies inside 10.8.1.0/24 of device 'A' (line 10); "
            "the narrower wins (warning)") in out
    assert (f"{config}:13: device 'D': address 10.8.2.1/32 is also given to device 'C' (line 12), which keeps it "
            "(warning)") in out
    chat = folder / "chat.yaml"
    assert f"{chat}:5: duplicate rule 'chat.test' (category chat has it already) (warning)" in out
    assert f"{chat}:4: '*.talk.test' does not cover 'talk.test' itself; the rule 'talk.test' covers both" in out
    assert "covered.test' itself" not in out  # covered.test is listed: no warning
    assert f"{folder / 'spare.yaml'}:1: category 'spare' is blocked by no group (its rules decide nothing)" in out
    assert out.count("(warning)") == 6
    assert "OK: policy " in out

    report = json.loads(blocker("validate", "--config", str(config), "--json").stdout)
    assert report["ok"] is True and len(report["policy"]) == 10
    assert len(report["warnings"]) == 6 and report["expiry_warning_days"] == 30
    assert {"file": str(chat), "line": 5, "message": "duplicate rule 'chat.test' (category chat has it already)"} \
        in report["warnings"]
    assert report["categories"] == {"chat": 4, "spare": 1, "video": 1}


def test_validate_json_lists_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "blocker.yaml"
    config.write_text("""policy:
  exemptions:
    - {device: A, allow: [], approved_by: "", reference: R-1, reason: y, expires: "2099-01-01T00:00:00"}
    - {device: B, reference: R-2}
""")
    result = blocker("validate", "--config", str(config), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["policy"] is None
    messages = [(p["line"], p["message"]) for p in report["problems"]]
    assert (3, "exemption allow needs at least one category") in messages
    assert (3, "exemption approved_by must not be empty") in messages
    assert any(line == 3 and "needs a time zone" in message for line, message in messages)
    assert (4, "exemption needs allow, approved_by, reason, expires (no defaults: every grant is on record)") \
        in messages


def test_validate_prints_the_policy_version(tmp_path: Path) -> None:
    result = blocker("validate")
    version = json.loads(blocker("validate", "--json").stdout)["policy"]
    assert f"OK: policy {version} from <embedded defaults>" in result.stdout


@pytest.mark.parametrize(("command", "code"), [
    pytest.param("validate | true", 0, id="validate"),
    pytest.param("check www.tiktok.com | head -1", 1, id="check-blocked"),
    pytest.param("check example.test --json | head -c 1", 0, id="check-allowed-json"),
    pytest.param("exemptions grant --help | head -1", 0, id="help"),
])
def test_a_closed_pipe_exits_quietly_with_the_right_code(command: str, code: int) -> None:
    # A big stdout so the reader is gone before the writer is done, on any pipe buffer.
    script = f"{sys.executable} -m blocker {command}; echo \"rc=${{PIPESTATUS[0]}}\" >&2"
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stderr.strip().splitlines() == [f"rc={code}"], result.stderr


def test_validate_into_a_closed_pipe_with_a_long_report(tmp_path: Path) -> None:
    folder = tmp_path / "lists"
    folder.mkdir()
    for index in range(3000):  # 3000 lines of output: more than any pipe buffer
        (folder / f"c{index:04d}.yaml").write_text(f"name: c{index:04d}\ndomains: [c{index:04d}.test]\n")
    config = tmp_path / "blocker.yaml"
    config.write_text(f"blocklists: {folder}\npolicy:\n  groups:\n    standard: {{block: [c0000]}}\n")
    script = f"{sys.executable} -m blocker validate --config {config} | head -1; echo \"rc=${{PIPESTATUS[0]}}\" >&2"
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines() == ["rc=0"], result.stderr[-2000:]
    assert result.stdout.count("\n") == 1


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=[" ".join(c) for c in SUBCOMMANDS])
def test_every_subcommand_documents_its_arguments_with_an_example(command: list[str]) -> None:
    result = blocker(*command, "--help")
    assert result.returncode == 0
    text = result.stdout
    assert "example" in text and f"blocker {' '.join(command[:1])}" in text.split("example", 1)[1]
    lines = text.split("options:", 1)[-1].split("example", 1)[0].splitlines()
    options = [line for line in lines if line.strip().startswith("--") and line.strip() != "--help"]
    for line in options:
        index = lines.index(line)
        described = line.strip().split("  ", 1)[-1] if "  " in line.strip() else lines[index + 1].strip()
        assert described and not described.startswith("--"), f"{' '.join(command)}: {line.strip()} has no help"
