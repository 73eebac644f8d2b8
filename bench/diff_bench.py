"""How long `blocker diff` takes on a fleet-sized policy: 30,000 devices, 1,000,000 rules.

Writes two versions of a generated policy into a temporary folder (the second with 1,000 rules
added, 1,000 removed, 300 devices moved, 100 exemptions granted, 50 revoked, 50 renewed) and
times `blocker diff --against` (text and --json) and `blocker validate` as real processes.
Usage: python3 bench/diff_bench.py [--devices N] [--rules N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_version(folder: Path, devices: int, rules: int, changed: bool) -> Path:
    lists = folder / "lists"
    lists.mkdir(parents=True)
    for category in ("tiktok", "twitter", "facebook", "instagram", "snapchat", "threads", "whatsapp", "telegram",
                     "signal", "doh"):
        (lists / f"{category}.yaml").write_text(f"name: {category}\ndomains:\n  - {category}.example\n"
                                                + ("include: [bulk.txt]\n" if category == "doh" else ""))
    with (lists / "bulk.txt").open("w") as out:
        start = 1000 if changed else 0  # 1,000 removed at the start, 1,000 added at the end
        for index in range(start, rules + start):
            out.write(f"host{index}.bulk{index % 997}.test\n")
    with (folder / "blocker.yaml").open("w") as out:
        out.write("blocklists: lists\npolicy:\n  exemptions_file: exemptions.yaml\n  devices:\n")
        for index in range(devices):
            group = "comms-team" if (index % 10 == 0) != (changed and index % 100 == 1) else "standard"
            out.write(f"    - {{id: MPS-{index:05d}, addresses: [\"10.{8 + index // 65536}.{index // 256 % 256}."
                      f"{index % 256}\"], group: {group}}}\n")
    with (folder / "exemptions.yaml").open("w") as out:
        out.write("exemptions:\n")
        first = 50 if changed else 0
        for index in range(first, 290 + (100 if changed else 0)):
            year = 2098 if changed and index < 100 else 2099
            out.write(f"  - {{device: MPS-{index * 7:05d}, allow: [whatsapp], approved_by: Insp. X, "
                      f"reference: CHG-{index:05d}, reason: case, expires: \"{year}-01-01T00:00:00Z\"}}\n")
    return folder / "blocker.yaml"


def timed(args: list[str]) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Wall-clock and CPU seconds (user+sys) of one command: on a shared machine the CPU time is the
    figure to compare."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "blocker", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=1200)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return f"{wall:.1f} s wall, {cpu:.1f} s cpu", result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=30_000, help="devices in each version")
    parser.add_argument("--rules", type=int, default=1_000_000, help="rules in the bulk list of each version")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blocker-diff-bench-") as temp:
        old = write_version(Path(temp) / "old", args.devices, args.rules, changed=False)
        new = write_version(Path(temp) / "new", args.devices, args.rules, changed=True)
        validate_s, _ = timed(["validate", "--config", str(new)])
        text_s, text = timed(["diff", "--config", str(new), "--against", str(old)])
        (Path(temp) / "same").mkdir()
        same = Path(temp) / "same"
        for name in ("blocker.yaml", "exemptions.yaml"):
            (same / name).write_bytes((new.parent / name).read_bytes())
        (same / "lists").symlink_to(new.parent / "lists")
        lists_same_s, _ = timed(["diff", "--config", str(same / "blocker.yaml"), "--against", str(new)])
        json_s, as_json = timed(["diff", "--config", str(new), "--against", str(old), "--json"])
        assert text.returncode == 1, text.stderr
        diff = json.loads(as_json.stdout)
        summary = {
            "devices": args.devices,
            "rules": args.rules,
            "validate": validate_s,
            "diff_text": text_s,
            "diff_json": json_s,
            "diff_same_lists": lists_same_s,
            "rules_added": sum(len(v.get("added", [])) for v in diff["rules"].values()),
            "rules_removed": sum(len(v.get("removed", [])) for v in diff["rules"].values()),
            "devices_moved": len(diff["devices"].get("moved", [])),
            "exemptions": {k: len(v) for k, v in diff["exemptions"].items()},
        }
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
