"""`blocker diff` on real git history in a temporary repository, and against another file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, require_tool

CONFIG = """\
blocklists: lists
policy:
  exemptions_file: exemptions.yaml
  groups:
    standard: {block: [chat, video]}
    comms: {block: [chat]}
  devices:
    - {id: MPS-1, addresses: ["10.8.0.1"], group: standard}
    - {id: MPS-2, addresses: ["10.8.0.2"], group: standard}
    - {id: MPS-3, addresses: ["10.8.0.3"], group: comms}
"""
EXEMPTIONS = """\
exemptions:
  - {device: MPS-1, allow: [chat], approved_by: A, reference: R-1, reason: liaison, expires: "2099-01-01T00:00:00Z"}
  - {device: MPS-2, allow: [chat], approved_by: A, reference: R-2, reason: liaison, expires: "2099-01-01T00:00:00Z"}
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run([require_tool("git"), "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.test",
                                          "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.test",
                                          "HOME": str(repo), "PATH": "/usr/bin:/bin"}).stdout


def blocker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blocker", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def write_repo(repo: Path) -> Path:
    (repo / "lists").mkdir(parents=True)
    (repo / "lists" / "chat.yaml").write_text("name: chat\ndomains:\n  - chat.test\n  - talk.test\n")
    (repo / "lists" / "video.yaml").write_text("name: video\ndomains:\n  - video.test\ninclude: [video.txt]\n")
    (repo / "lists" / "video.txt").write_text("# bulk list\nclips.test\nreels.test\n")
    (repo / "exemptions.yaml").write_text(EXEMPTIONS)
    config = repo / "blocker.yaml"
    config.write_text(CONFIG)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "first")
    return config


def test_diff_against_a_git_revision(tmp_path: Path) -> None:
    repo = tmp_path / "policy"
    config = write_repo(repo)
    same = blocker("diff", "--config", str(config), "--git", "HEAD")
    assert same.returncode == 0, same.stderr
    assert "no change for any device" in same.stdout

    (repo / "lists" / "chat.yaml").write_text("name: chat\ndomains:\n  - chat.test\n  - gossip.test\n")
    (repo / "lists" / "video.txt").write_text("# bulk list\nclips.test\nshorts.test\n")
    (repo / "blocker.yaml").write_text(CONFIG.replace("comms: {block: [chat]}", "comms: {block: [chat, video]}")
                                       .replace('"10.8.0.2"], group: standard', '"10.8.0.2"], group: comms')
                                       .replace('    - {id: MPS-3, addresses: ["10.8.0.3"], group: comms}\n',
                                                '    - {id: MPS-4, addresses: ["10.8.0.4"], group: comms}\n'))
    (repo / "exemptions.yaml").write_text(EXEMPTIONS.replace('reference: R-1, reason: liaison, expires: "2099',
                                                             'reference: R-1, reason: liaison, expires: "2098')
                                          .replace("reference: R-2", "reference: R-3"))
    git(repo, "commit", "-qam", "second")
    names = tmp_path / "names.txt"
    names.write_text("# names to watch\nchat.test\ngossip.test\ntalk.test\nwww.clips.test\nunlisted.test\n")

    result = blocker("diff", "--config", str(config), "--git", "HEAD~1", "--names", str(names), "--json")
    assert result.returncode == 1, result.stderr
    diff = json.loads(result.stdout)
    assert diff["changed"] is True
    assert diff["groups"] == {"comms": {"gained": ["video"]}}
    chat = diff["rules"]["chat"]
    assert chat["added"] == [{"rule": "gossip.test", "except": False, "file": str(repo / "lists" / "chat.yaml"),
                              "line": 4}]
    assert chat["removed"] == [{"rule": "talk.test", "except": False, "file": "HEAD~1:lists/chat.yaml", "line": 4}]
    video = diff["rules"]["video"]
    assert video["added"] == [{"rule": "shorts.test", "except": False, "file": str(repo / "lists" / "video.txt"),
                               "line": 3}]  # a bulk list keeps no lines: found again for the diff
    assert video["removed"] == [{"rule": "reels.test", "except": False, "file": "HEAD~1:lists/video.txt",
                                 "line": 3}]
    assert [d["id"] for d in diff["devices"]["added"]] == ["MPS-4"]
    assert [d["id"] for d in diff["devices"]["removed"]] == ["MPS-3"]
    assert diff["devices"]["moved"] == [{"id": "MPS-2", "from": "standard", "to": "comms",
                                         "file": str(config), "line": 9}]
    assert [e["reference"] for e in diff["exemptions"]["granted"]] == ["R-3"]
    assert [e["reference"] for e in diff["exemptions"]["revoked"]] == ["R-2"]
    [changed] = diff["exemptions"]["changed"]
    assert changed["reference"] == "R-1" and changed["changes"] == {
        "expires": ["2099-01-01T00:00:00+00:00", "2098-01-01T00:00:00+00:00"]}
    flips = {(group, f["name"]): (f["old"], f["new"]) for group, items in diff["names"].items() for f in items}
    assert flips == {
        ("standard", "gossip.test"): ("allowed", "blocked (chat)"),
        ("comms", "gossip.test"): ("allowed", "blocked (chat)"),
        ("standard", "talk.test"): ("blocked (chat)", "allowed"),
        ("comms", "talk.test"): ("blocked (chat)", "allowed"),
        ("comms", "www.clips.test"): ("allowed", "blocked (video)"),
    }

    text = blocker("diff", "--config", str(config), "--git", "HEAD~1", "--names", str(names))
    assert text.returncode == 1
    assert "group comms: +video" in text.stdout
    assert f"  + gossip.test  {repo / 'lists' / 'chat.yaml'}:4" in text.stdout
    assert "  - talk.test  HEAD~1:lists/chat.yaml:4" in text.stdout
    assert "device moved: MPS-2 standard -> comms" in text.stdout
    assert "exemption revoked: R-2 for MPS-2 (chat)" in text.stdout
    assert "name www.clips.test for group comms: allowed -> blocked (video)" in text.stdout


def test_diff_against_a_file_and_its_errors(tmp_path: Path) -> None:
    repo = tmp_path / "policy"
    config = write_repo(repo)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in ("blocker.yaml", "exemptions.yaml"):
        (copy / path).write_text((repo / path).read_text() + "# a comment changes nothing\n")
    (copy / "lists").symlink_to(repo / "lists")
    same = blocker("diff", "--config", str(config), "--against", str(copy / "blocker.yaml"))
    assert same.returncode == 0 and "no change for any device" in same.stdout
    # A rule in a category no group blocks is listed, but changes nothing for any device.
    (repo / "lists" / "spare.yaml").write_text("name: spare\ndomains: [spare.test]\n")
    (copy / "lists").unlink()
    (copy / "lists").mkdir()
    for path in ("chat.yaml", "video.yaml", "video.txt"):
        (copy / "lists" / path).write_text((repo / "lists" / path).read_text())
    unblocked = blocker("diff", "--config", str(config), "--against", str(copy / "blocker.yaml"), "--json")
    assert unblocked.returncode == 0, unblocked.stderr
    assert json.loads(unblocked.stdout)["rules"]["spare"]["added"][0]["rule"] == "spare.test"

    (copy / "blocker.yaml").write_text("policy: [\n")
    broken = blocker("diff", "--config", str(config), "--against", str(copy / "blocker.yaml"))
    assert broken.returncode == 2 and f"{copy / 'blocker.yaml'}:" in broken.stderr
    bad_rev = blocker("diff", "--config", str(config), "--git", "no-such-rev")
    assert bad_rev.returncode == 2 and "git:" in bad_rev.stderr
