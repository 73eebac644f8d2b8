"""The query log: one JSON object per line, written by a thread behind a bounded queue.

The hot path only appends a tuple to a deque; when the writer falls behind and the deque is full,
entries are dropped and counted, and DNS answers are never delayed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import dnslib

log = logging.getLogger("blocker")

CAPACITY = 50_000
# (time, client address, device, name, qtype, action, categories, group, exemption reference,
#  policy version, latency seconds, rcode[, the client: its identity is formatted in the writer thread])
Entry = tuple[Any, ...]


class QueryLog:
    """Appends query records to a file from a background thread."""

    def __init__(self, path: Path, only_blocked: bool, capacity: int = CAPACITY) -> None:
        self.path = path
        self.only_blocked = only_blocked
        self.capacity = capacity
        self.written = 0
        self.dropped = 0
        self._queue: deque[Entry] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._reopen = False
        self._thread = threading.Thread(target=self._run, name="blocker-querylog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, entry: Entry) -> None:
        """Queue one record (called on the event loop; never blocks)."""
        if len(self._queue) >= self.capacity:
            self.dropped += 1
            return
        self._queue.append(entry)
        if len(self._queue) == 1:
            self._wake.set()

    def reopen(self) -> None:
        """Open the file again at the next write (after log rotation)."""
        self._reopen = True
        self._wake.set()

    def close(self, timeout: float = 2.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        out: TextIO | None = None
        try:
            while True:
                self._wake.wait(0.5)
                self._wake.clear()
                if self._reopen and out is not None:
                    out.close()
                    out = None
                    self._reopen = False
                if self._queue:
                    if out is None:
                        self.path.parent.mkdir(parents=True, exist_ok=True)
                        out = self.path.open("a", encoding="utf-8")
                    self._drain(out)
                if self._stop and not self._queue:
                    return
        except OSError as err:
            log.error("query log %s: %s; further entries are dropped", self.path, err)
            self.capacity = 0
            self._queue.clear()
        finally:
            if out is not None:
                out.close()

    def _drain(self, out: TextIO) -> None:
        queue = self._queue
        lines = []
        while queue:
            lines.append(format_entry(queue.popleft()))
        out.write("".join(lines))
        out.flush()
        self.written += len(lines)


def format_entry(entry: Entry) -> str:
    (when, address, device, name, qtype, action, categories, group, reference, version, latency, rcode) = entry[:12]
    client = entry[12] if len(entry) > 12 else None  # type: ignore[misc]
    origin = client.origin if client is not None else "default"
    detail = client.detail if client is not None else ""
    record = {
        "time": datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "client": address,
        "device": device,
        "identity": origin,  # binding (from RADIUS accounting), inventory, or default
        "identity_source": detail or None,  # the gateway and since when, or the inventory FILE:LINE
        "name": name,
        "type": dnslib.QTYPE.get(qtype, f"TYPE{qtype}"),
        "action": action,
        "categories": list(categories),
        "group": group,
        "exemption": reference,
        "policy": version,
        "latency_ms": round(latency * 1000, 3),
        "rcode": dnslib.RCODE.get(rcode, str(rcode)),
    }
    return json.dumps(record, separators=(",", ":")) + "\n"


