"""`blocker check` and `blocker validate` run as a user would run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def blocker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blocker", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_check_blocked_name_explains_rule_file_and_line() -> None:
    result = blocker("check", "WWW.TikTok.com.")
    assert result.returncode == 1
    assert "www.tiktok.com: BLOCKED" in result.stdout
    assert "group: standard" in result.stdout
    tiktok = ROOT / "blocklists" / "tiktok.yaml"
    line = tiktok.read_text().splitlines().index("  - tiktok.com") + 1
    assert f"tiktok.com  [tiktok]  {tiktok}:{line}" in result.stdout


def test_check_allowed_name_exits_zero() -> None:
    result = blocker("check", "teams.microsoft.com")
    assert result.returncode == 0
    assert "ALLOWED" in result.stdout and "the name is in no category" in result.stdout


def test_check_json_for_an_exempt_device(tmp_path: Path) -> None:
    config = tmp_path / "blocker.yaml"
    config.write_text(f"""\
blocklists: "{ROOT / 'blocklists'}"
policy:
  devices:
    - {{id: MPS-000456, addresses: ["10.8.0.56"], group: standard}}
  exemptions:
    - device: MPS-000456
      allow: [whatsapp]
      approved_by: "Insp. J. Doe"
      reference: "CHG-2023-0042"
      reason: "Witness liaison"
      expires: 2099-12-31T23:59:00Z
""")
    result = blocker("check", "whatsapp-cdn-shv-01-lhr8.fbcdn.net", "--device", "MPS-000456",
                     "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["action"] == "exempted" and report["category"] == "whatsapp"
    assert report["exemption"]["reference"] == "CHG-2023-0042"
    assert report["exemption"]["approved_by"] == "Insp. J. Doe"
    assert report["exemption"]["line"] == 6
    by_address = blocker("check", "scontent-lhr8-1.xx.fbcdn.net", "--client", "10.8.0.56", "--config", str(config))
    assert by_address.returncode == 1 and "category: facebook" in by_address.stdout


def test_check_errors_exit_two(tmp_path: Path) -> None:
    assert blocker("check", "bad..name").returncode == 2
    assert blocker("check", "x.com", "--device", "nope").returncode == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("dns:\n  cache_size: lots\n")
    result = blocker("check", "x.com", "--config", str(broken))
    assert result.returncode == 2 and f"{broken}:2: dns.cache_size" in result.stderr


def test_validate_clean_config_prints_counts() -> None:
    result = blocker("validate")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "category tiktok:" in result.stdout and "category whatsapp:" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("OK: policy ")


def test_validate_reports_every_problem_with_file_and_line(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "social.yaml").write_text("name: social\ndomains:\n  - ok.example\n  - bad..example\n")
    config = tmp_path / "blocker.yaml"
    config.write_text("blocklists: lists\ndns:\n  block_ttl: yes\n")
    result = blocker("validate", "--config", str(config))
    assert result.returncode == 1
    assert f"{config}:3: dns.block_ttl must be a whole number" in result.stdout
    config.write_text("blocklists: lists\npolicy:\n  groups:\n    standard: {block: [social]}\n")
    result = blocker("validate", "--config", str(config))
    assert result.returncode == 1
    assert f"{lists / 'social.yaml'}:4: domains: 'bad..example' is not a valid domain name" in result.stdout


def test_validate_warns_of_exemptions_expiring_soon(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    soon = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0).isoformat()
    config = tmp_path / "blocker.yaml"
    config.write_text(f"""\
blocklists: "{ROOT / 'blocklists'}"
policy:
  devices:
    - {{id: MPS-1, addresses: ["10.8.0.1"], group: standard}}
  exemptions:
    - {{device: MPS-1, allow: [whatsapp], approved_by: a, reference: REF-1, reason: r, expires: "{soon}"}}
""")
    result = blocker("validate", "--config", str(config))
    assert result.returncode == 0
    assert f"{config}:6: exemption REF-1 for MPS-1 expires on" in result.stdout and "within 14 days" in result.stdout


def test_python_dash_m_and_version() -> None:
    result = blocker("--version")
    assert result.returncode == 0 and result.stdout.startswith("blocker ")


def test_check_finds_the_line_of_a_rule_in_a_bulk_include(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "bulk.txt").write_text("# bulk list\n" + "".join(f"filler{i}.example\n" for i in range(500))
                                    + "Target.Example.\n")
    (lists / "bulk.yaml").write_text("name: bulk\ninclude: [bulk.txt]\n")
    config = tmp_path / "blocker.yaml"
    config.write_text("blocklists: lists\npolicy:\n  groups:\n    standard: {block: [bulk]}\n")
    result = blocker("check", "www.target.example", "--config", str(config))
    assert result.returncode == 1
    assert f"target.example  [bulk]  {lists / 'bulk.txt'}:502" in result.stdout
