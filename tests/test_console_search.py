"""The query-log search behind the console's blocked-queries page (pure file reading, no server)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from blocker.console.querysearch import BLOCK, QueryFilter, search

START = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def write_log(path: Path, count: int) -> None:
    lines = []
    for i in range(count):
        action = ("allowed", "blocked", "exempted")[i % 3]
        lines.append(json.dumps({
            "time": (START + timedelta(seconds=i)).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "client": "10.8.0.56", "device": "MPS-000456" if i % 2 else "MPS-000123",
            "name": f"n{i}.example", "type": "A", "action": action,
            "categories": ["tiktok"] if i % 4 else ["whatsapp"], "group": "standard",
            "exemption": None, "policy": "x", "latency_ms": 0.1, "rcode": "NXDOMAIN"}) + "\n")
    path.write_text("".join(lines) + '{"time": "2026-12-01T09:00:00.000Z", "act')  # a torn last line


def test_pages_are_newest_first_without_allowed_entries(tmp_path: Path) -> None:
    log = tmp_path / "queries.jsonl"
    write_log(log, 3000)  # several read blocks
    assert log.stat().st_size > 3 * BLOCK
    seen: list[str] = []
    page = 1
    while True:
        result = search(log, QueryFilter(), page, 50)
        assert all(e["action"] in ("blocked", "exempted") for e in result.entries)
        seen += [str(e["name"]) for e in result.entries]
        if not result.more:
            break
        page += 1
    expected = [f"n{i}.example" for i in reversed(range(3000)) if i % 3]
    assert seen == expected and page == len(expected) // 50


def test_filters_by_device_category_action_and_time(tmp_path: Path) -> None:
    log = tmp_path / "queries.jsonl"
    write_log(log, 300)
    since, until = START + timedelta(seconds=100), START + timedelta(seconds=199)
    result = search(log, QueryFilter("MPS-000456", "tiktok", since, until, "exempted"), 1, 500)
    expected = [f"n{i}.example" for i in reversed(range(100, 200)) if i % 2 and i % 4 and i % 3 == 2]
    assert [e["name"] for e in result.entries] == expected and expected
    result = search(log, QueryFilter("MPS-000123", "whatsapp", since, until, "blocked"), 1, 500)
    expected = [f"n{i}.example" for i in reversed(range(100, 200)) if i % 2 == 0 and i % 4 == 0 and i % 3 == 1]
    assert [e["name"] for e in result.entries] == expected and expected
    assert search(tmp_path / "missing.jsonl", QueryFilter(), 1, 50).entries == []
