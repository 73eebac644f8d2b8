"""The exemption commands on real files: comments and layout survive, refusals leave the file as it
was, a grant reaches a running server (dig before and after), and the audit trail records each
change once with its actor and catches edited and deleted lines."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import SHIPPED, standard_config
from helpers import ROOT, Blocker, Knot, eventually, require_tool

from blocker.audit_trail import read_events, verify

EXEMPTIONS = """\
# Exemptions of the messaging policy. One entry per approved request; keep the ticket number.
exemptions:
  # Witness liaison, renewed monthly
  - device: MPS-0001
    allow: [whatsapp]
    approved_by: "Insp. J. Doe"   # duty inspector
    reference: CHG-2026-0001
    reason: 'Witness liaison'
    expires: 2099-12-31T23:59:00Z

  - device: MPS-0002
    allow: [telegram, signal]
    approved_by: Supt. A. Smith
    reference: CHG-2026-0002
    reason: Undercover contact
    expires: 2099-06-30T12:00:00Z
# end of the list: add new entries above this line
"""


def blocker(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blocker", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=check)


def fleet(directory: Path, upstream: str = "127.0.0.1:9", audit: bool = True) -> Path:
    (directory / "exemptions.yaml").write_text(EXEMPTIONS)
    audit_text = "audit:\n  path: audit/trail.jsonl\n" if audit else ""
    return standard_config(directory, [upstream], policy=f"""\
policy:
  exemptions_file: exemptions.yaml
  devices:
    - {{id: MPS-0001, addresses: ["127.0.0.21"], group: standard}}
    - {{id: MPS-0002, addresses: ["127.0.0.22"], group: standard}}
    - {{id: MPS-0003, addresses: ["127.0.0.23"], group: standard}}
{audit_text}""")


def grant_args(config: Path, **overrides: str) -> list[str]:
    values = {"--device": "MPS-0003", "--allow": "whatsapp,signal", "--approved-by": "Ch. Insp. R. Roe",
              "--reference": "CHG-2026-0003", "--reason": "Press liaison: election week", "--for": "30d",
              "--by": "rroe"}
    values.update(overrides)
    args = ["exemptions", "grant", "--config", str(config)]
    for key, value in values.items():
        args += [key, value]
    return args


def test_grant_and_revoke_keep_every_other_byte(tmp_path: Path) -> None:
    config = fleet(tmp_path)
    path = tmp_path / "exemptions.yaml"
    result = blocker(*grant_args(config))
    assert result.returncode == 0, result.stderr
    assert "granted CHG-2026-0003: whatsapp, signal for MPS-0003" in result.stdout
    text = path.read_text()
    original = EXEMPTIONS.splitlines(keepends=True)
    lines = text.splitlines(keepends=True)
    # The new entry comes after the last one, in the file's own style; every other line is unchanged.
    assert lines[:16] == original[:16]
    assert lines[-1] == original[-1]  # the closing comment stays last
    added = "".join(lines[16:-1])
    assert added.startswith("\n  - device: MPS-0003\n    allow: [whatsapp, signal]\n")
    assert "    approved_by: Ch. Insp. R. Roe\n" in added and "    reference: CHG-2026-0003\n" in added
    assert "reason: 'Press liaison: election week'" in added  # quoted where YAML needs it, by the library

    result = blocker("exemptions", "revoke", "--config", str(config), "--reference", "CHG-2026-0003",
                     "--reason", "Election over", "--by", "rroe")
    assert result.returncode == 0, result.stderr
    assert path.read_text() == EXEMPTIONS  # byte for byte: the grant is undone, the comments are there

    result = blocker("exemptions", "revoke", "--config", str(config), "--reference", "CHG-2026-0001",
                     "--reason", "Witness moved", "--by", "jdoe")
    assert result.returncode == 0, result.stderr
    remaining = path.read_text()
    assert "CHG-2026-0001" not in remaining and "Witness liaison" not in remaining.split("# Witness")[0]
    expected = EXEMPTIONS.replace("""  - device: MPS-0001
    allow: [whatsapp]
    approved_by: "Insp. J. Doe"   # duty inspector
    reference: CHG-2026-0001
    reason: 'Witness liaison'
    expires: 2099-12-31T23:59:00Z

""", "")
    assert remaining == expected


def test_renew_changes_only_the_expiry_line(tmp_path: Path) -> None:
    config = fleet(tmp_path)
    path = tmp_path / "exemptions.yaml"
    result = blocker("exemptions", "renew", "--config", str(config), "--reference", "CHG-2026-0002",
                     "--expires", "2100-01-31T00:00:00Z", "--by", "asmith")
    assert result.returncode == 0, result.stderr
    assert path.read_text() == EXEMPTIONS.replace("expires: 2099-06-30T12:00:00Z", "expires: '2100-01-31T00:00:00Z'")


def test_inline_exemptions_in_the_config_are_edited_in_place(tmp_path: Path) -> None:
    config = standard_config(tmp_path, ["127.0.0.1:9"], policy="""\
policy:
  devices:
    - {id: MPS-0001, addresses: ["127.0.0.21"], group: standard}
  # no exemptions yet
  exemptions: []
""")
    before = config.read_text()
    result = blocker(*grant_args(config, **{"--device": "MPS-0001"}))
    assert result.returncode == 0, result.stderr
    after = config.read_text()
    assert after.startswith(before.split("  exemptions: []")[0] + "  exemptions:\n")
    check = blocker("check", "web.whatsapp.com", "--device", "MPS-0001", "--config", str(config), "--json")
    report = json.loads(check.stdout)
    assert report["action"] == "exempted" and report["exemption"]["reference"] == "CHG-2026-0003"
    assert report["exemption"]["file"] == str(config)


@pytest.mark.parametrize(("overrides", "message"), [
    pytest.param({"--device": "MPS-9999"}, "unknown device 'MPS-9999'", id="unknown-device"),
    pytest.param({"--reference": "CHG-2026-0001"}, "reference CHG-2026-0001 is already used", id="duplicate"),
    pytest.param({"--expires": "2020-01-01T00:00:00Z", "--for": ""}, "is in the past", id="past-expiry"),
    pytest.param({"--approved-by": " "}, "--approved-by is required", id="no-approver"),
    pytest.param({"--allow": "whatsap"}, "allows unknown category 'whatsap'", id="unknown-category"),
    pytest.param({"--by": ""}, "--by is required", id="no-actor"),
])
def test_refusals_leave_the_file_and_the_trail_untouched(tmp_path: Path, overrides: dict[str, str],
                                                         message: str) -> None:
    config = fleet(tmp_path)
    args = grant_args(config, **overrides)
    if overrides.get("--for") == "":
        index = args.index("--for")
        del args[index:index + 2]
    result = blocker(*args)
    assert result.returncode == 2
    assert message in result.stderr and "refused" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line a person can act on
    assert (tmp_path / "exemptions.yaml").read_text() == EXEMPTIONS
    assert not (tmp_path / "audit" / "trail.jsonl").exists()


def test_exemptions_file_errors_point_at_that_file(tmp_path: Path) -> None:
    config = fleet(tmp_path)
    (tmp_path / "exemptions.yaml").write_text(
        "exemptions:\n  - device: MPS-0001\n    allow: []\n    approved_by: ''\n    expires: 2099-01-01T00:00:00\n")
    result = blocker("validate", "--config", str(config))
    assert result.returncode == 1
    file = tmp_path / "exemptions.yaml"
    # Every problem of the one exemption, each at its own line of the exemptions file.
    assert f"{file}:2: exemption needs reference, reason (no defaults: every grant is on record)" in result.stdout
    assert f"{file}:3: exemption allow needs at least one category" in result.stdout
    assert f"{file}:4: exemption approved_by must not be empty" in result.stdout
    assert f"{file}:5: exemption expires needs a time zone" in result.stdout


def test_list_filters_by_device_state_and_expiry(tmp_path: Path) -> None:
    config = fleet(tmp_path)
    soon = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    assert blocker(*grant_args(config, **{"--for": "3d"})).returncode == 0
    listed = json.loads(blocker("exemptions", "list", "--config", str(config), "--json", check=True).stdout)
    assert [e["reference"] for e in listed] == ["CHG-2026-0003", "CHG-2026-0002", "CHG-2026-0001"]
    assert {e["state"] for e in listed} == {"active"}
    expiring = json.loads(blocker("exemptions", "list", "--config", str(config), "--expiring", "--json").stdout)
    assert [e["reference"] for e in expiring] == ["CHG-2026-0003"]  # within the default 14 days
    assert abs(datetime.fromisoformat(expiring[0]["expires"]) - soon) < timedelta(seconds=10)
    assert json.loads(blocker("exemptions", "list", "--config", str(config), "--expiring", "2d",
                              "--json").stdout) == []
    mine = json.loads(blocker("exemptions", "list", "--config", str(config), "--device", "MPS-0002",
                              "--json").stdout)
    assert [e["reference"] for e in mine] == ["CHG-2026-0002"]
    assert json.loads(blocker("exemptions", "list", "--config", str(config), "--state", "expired",
                              "--json").stdout) == []
    text = blocker("exemptions", "list", "--config", str(config), "--expiring").stdout
    assert text.startswith("CHG-2026-0003  MPS-0003  whatsapp,signal  active  until ")


def test_commands_record_the_trail_and_verify_catches_tampering(tmp_path: Path) -> None:
    config = fleet(tmp_path)
    trail = tmp_path / "audit" / "trail.jsonl"
    assert blocker(*grant_args(config)).returncode == 0
    assert blocker("exemptions", "renew", "--config", str(config), "--reference", "CHG-2026-0003",
                   "--for", "60d", "--by", "asmith").returncode == 0
    assert blocker("exemptions", "revoke", "--config", str(config), "--reference", "CHG-2026-0003",
                   "--reason", "Election over", "--by", "jdoe").returncode == 0
    events = read_events(trail)
    assert [(e["event"], e["actor"]) for e in events] == [("grant", "rroe"), ("renew", "asmith"), ("revoke", "jdoe")]
    grant, renew, revoke = events
    assert grant["approved_by"] == "Ch. Insp. R. Roe" and grant["old"] is None
    assert grant["new"]["categories"] == ["whatsapp", "signal"]  # type: ignore[index]
    assert renew["old"]["expires"] != renew["new"]["expires"]  # type: ignore[index]
    assert revoke["reason"] == "Election over" and revoke["new"] is None and revoke["state"] == "revoked"
    assert all(len(str(e["policy"])) == 10 for e in events)
    assert renew["prev"] == grant["hash"] and revoke["prev"] == renew["hash"]
    ok = blocker("audit", "verify", "--config", str(config))
    assert ok.returncode == 0 and "3 line(s), chain intact" in ok.stdout

    lines = trail.read_text().splitlines(keepends=True)
    trail.write_text(lines[0] + lines[1].replace("asmith", "nobody") + lines[2])
    edited = blocker("audit", "verify", "--path", str(trail))
    assert edited.returncode == 1 and f"{trail}:2: hash does not match" in edited.stdout

    trail.write_text(lines[0] + lines[2])
    deleted = blocker("audit", "verify", "--path", str(trail))
    assert deleted.returncode == 1 and f"{trail}:2: prev does not match" in deleted.stdout

    trail.write_text(lines[0] + lines[1])
    cut = blocker("audit", "verify", "--path", str(trail))
    assert cut.returncode == 1 and f"{trail}:3: 1 line(s) missing at the end" in cut.stdout
    assert not verify(trail).ok


def dig_status(port: int, name: str, source: str) -> str:
    dig = require_tool("dig")
    out = subprocess.run([dig, "@127.0.0.1", "-p", str(port), "-b", source, name, "A", "+tries=1", "+time=2"],
                         capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    raise AssertionError(f"dig printed no status:\n{out}")


def wait_for_status(port: int, name: str, source: str, want: str, seconds: float = 10.0) -> str:
    eventually(lambda: dig_status(port, name, source) == want, seconds, 0.2, f"{name} answered {want}")
    return want


def test_a_grant_reaches_the_running_server_and_is_recorded_once(knot: Knot, tmp_path: Path) -> None:
    config = fleet(tmp_path, knot.endpoint)
    trail = tmp_path / "audit" / "trail.jsonl"
    server = Blocker(config).start()
    try:
        first = read_events(trail)
        # The first start with a trail records what the file holds, once, as a file edit.
        assert sorted((e["event"], e["reference"], e["actor"]) for e in first) == [
            ("grant", "CHG-2026-0001", "file-edit"), ("grant", "CHG-2026-0002", "file-edit")]
        assert dig_status(server.port, "web.whatsapp.com", "127.0.0.23") == "NXDOMAIN"
        mark = len(server.lines)
        result = blocker(*grant_args(config))
        assert result.returncode == 0, result.stderr
        server.wait_for_log(r"reloaded \(file change\)", after=mark)
        assert wait_for_status(server.port, "web.whatsapp.com", "127.0.0.23", "NOERROR") == "NOERROR"
        mark = len(server.lines)
        result = blocker("exemptions", "revoke", "--config", str(config), "--reference", "CHG-2026-0003",
                         "--reason", "Election over", "--by", "rroe")
        assert result.returncode == 0, result.stderr
        # The server compares the trail with the new policy as it swaps it in, before this log line.
        server.wait_for_log(r"reloaded \(file change\)", after=mark)
        assert wait_for_status(server.port, "web.whatsapp.com", "127.0.0.23", "NXDOMAIN") == "NXDOMAIN"
    finally:
        server.stop()
    events = read_events(trail)
    # The command's events, with their actor; the server saw the same change and added nothing.
    assert [(e["event"], e["actor"]) for e in events[2:]] == [("grant", "rroe"), ("revoke", "rroe")]

    again = Blocker(config).start()  # the start's comparison with the trail runs before " ready "
    again.stop()
    assert read_events(trail) == events  # a restart adds nothing
    assert verify(trail).ok


def test_policy_version_depends_on_content_not_paths(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        (folder / "lists").mkdir()
        for category in SHIPPED.glob("*.yaml"):
            (folder / "lists" / category.name).write_bytes(category.read_bytes())
        (folder / "exemptions.yaml").write_text(EXEMPTIONS)
        (folder / "blocker.yaml").write_text(
            "blocklists: lists\npolicy:\n  exemptions_file: exemptions.yaml\n  devices:\n"
            "    - {id: MPS-0001, addresses: [10.8.0.1], group: standard}\n"
            "    - {id: MPS-0002, addresses: [10.8.0.2], group: standard}\n")
    versions = set()
    for config in (one / "blocker.yaml", two / "blocker.yaml"):
        for given in (str(config), str(config.relative_to(tmp_path))):
            out = subprocess.run([sys.executable, "-m", "blocker", "validate", "--config", given, "--json"],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=60)
            versions.add(json.loads(out.stdout)["policy"])
            check = subprocess.run([sys.executable, "-m", "blocker", "check", "x.test", "--config", given,
                                    "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
            versions.add(json.loads(check.stdout)["policy"])
    assert len(versions) == 1
    (two / "exemptions.yaml").write_text(EXEMPTIONS.replace("2099-06-30", "2099-07-31"))
    changed = blocker("validate", "--config", str(two / "blocker.yaml"), "--json")
    assert json.loads(changed.stdout)["policy"] not in versions


def test_concurrent_grants_never_lose_one_silently(tmp_path: Path) -> None:
    config = fleet(tmp_path)
    runs = [subprocess.Popen([sys.executable, "-m", "blocker", *grant_args(config, **{"--reference": f"CHG-P{i}"})],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outcomes = []
    for index, run in enumerate(runs):
        _out, err = run.communicate(timeout=120)
        outcomes.append((index, run.returncode, err))
    granted = {f"CHG-P{i}" for i, code, _ in outcomes if code == 0}
    refused = [err for _, code, err in outcomes if code != 0]
    assert all("changed while editing it: run the command again" in err for err in refused), refused
    assert granted  # at least one gets through; each other one is refused, never overwritten
    listed = json.loads(blocker("exemptions", "list", "--config", str(config), "--json", check=True).stdout)
    assert {e["reference"] for e in listed} - {"CHG-2026-0001", "CHG-2026-0002"} == granted
    assert sorted(e["reference"] for e in read_events(tmp_path / "audit" / "trail.jsonl")) == sorted(granted)
