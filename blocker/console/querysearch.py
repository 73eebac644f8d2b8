"""Search the query log for blocked and exempted queries, newest first, one page at a time.

The file is read backwards in blocks, so the first pages of a large log cost what a small one
does; allowed entries are never returned, whatever the filter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

SHOWN_ACTIONS = ("blocked", "exempted")
BLOCK = 64 * 1024
MAX_SCANNED = 5_000_000  # lines read for one page at most: a bound on one request's work


@dataclass(frozen=True, slots=True)
class QueryFilter:
    device: str | None = None
    category: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    action: str | None = None  # blocked | exempted | None for both

    def matches(self, entry: dict[str, object], when: datetime) -> bool:
        if entry.get("action") not in SHOWN_ACTIONS or (self.action and entry.get("action") != self.action):
            return False
        if self.device and entry.get("device") != self.device:
            return False
        categories = entry.get("categories")
        if self.category and not (isinstance(categories, list) and self.category in categories):
            return False
        if self.since and when < self.since:
            return False
        return not (self.until and when > self.until)


@dataclass(frozen=True, slots=True)
class QueryPage:
    entries: list[dict[str, object]]
    page: int
    more: bool
    scanned: int


def lines_backwards(path: Path) -> Iterator[bytes]:
    """The file's lines, last first."""
    with open(path, "rb") as handle:
        position = handle.seek(0, os.SEEK_END)
        rest = b""
        while position > 0:
            step = min(BLOCK, position)
            position -= step
            handle.seek(position)
            chunk = handle.read(step) + rest
            lines = chunk.split(b"\n")
            rest = lines[0]
            for line in reversed(lines[1:]):
                if line:
                    yield line
        if rest:
            yield rest


def search(path: Path, query: QueryFilter, page: int = 1, size: int = 50) -> QueryPage:
    """One page (1-based) of matching entries, newest first."""
    skip = (page - 1) * size
    found: list[dict[str, object]] = []
    scanned = 0
    more = False
    if not path.exists():
        return QueryPage([], page, False, 0)
    for line in lines_backwards(path):
        scanned += 1
        if scanned > MAX_SCANNED:
            break
        if b'"blocked"' not in line and b'"exempted"' not in line:
            continue  # most lines are allowed queries: skip them before parsing
        try:
            entry = json.loads(line)
            when = datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00"))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line while the writer appends
        if query.since and when < query.since:
            break  # the log is written in time order: everything further back is older still
        if not query.matches(entry, when):
            continue
        if skip:
            skip -= 1
            continue
        if len(found) == size:
            more = True
            break
        entry["_when"] = when
        found.append(entry)
    return QueryPage(found, page, more, scanned)
