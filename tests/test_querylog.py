"""The query log writer in-process: JSON lines, a bounded queue that drops (and counts) rather than
block, and reopening after rotation."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import eventually

from blocker.querylog import Entry, QueryLog


def entry(name: str, action: str = "blocked") -> Entry:
    return (1_800_000_000.25, "10.8.0.23", "MPS-000123", name, 1, action, ("tiktok",), "standard", None,
            "0123456789", 0.0004, 3)


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_entries_are_written_as_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "queries.jsonl"
    log = QueryLog(path, only_blocked=False)
    log.start()
    try:
        log.put(entry("www.tiktok.com"))
        records = eventually(lambda: lines(path), what="the entry written")
    finally:
        log.close()
    # `identity`: where the device came from (binding, inventory, default); this entry carries no client.
    assert records == [{"time": "2027-01-15T08:00:00.250Z", "client": "10.8.0.23", "device": "MPS-000123",
                        "identity": "default", "identity_source": None, "name": "www.tiktok.com", "type": "A",
                        "action": "blocked", "categories": ["tiktok"],
                        "group": "standard", "exemption": None, "policy": "0123456789", "latency_ms": 0.4,
                        "rcode": "NXDOMAIN"}]
    assert log.written == 1 and log.dropped == 0


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    log = QueryLog(tmp_path / "q.jsonl", only_blocked=False, capacity=5)  # not started: nothing drains
    for index in range(8):
        log.put(entry(f"n{index}.example"))
    assert log.dropped == 3


def test_reopen_writes_to_a_new_file_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    log = QueryLog(path, only_blocked=False)
    log.start()
    try:
        log.put(entry("first.example"))
        eventually(lambda: lines(path), what="the first entry")
        path.rename(tmp_path / "q.jsonl.1")
        log.reopen()
        log.put(entry("second.example"))
        records = eventually(lambda: lines(path), what="the entry in the new file")
    finally:
        log.close()
    assert [r["name"] for r in records] == ["second.example"]
    assert [r["name"] for r in lines(tmp_path / "q.jsonl.1")] == ["first.example"]
