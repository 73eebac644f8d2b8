"""The query log: one JSON object per line, written by a thread behind a bounded queue.

The hot path only appends a tuple to a deque; when the writer falls behind and the deque is full,
entries are dropped and counted, and DNS answers are never delayed.

The writer never gives up: a failed write (a full disk, a lost directory) is counted and retried
with backoff, keeping what it could not write, and the file is opened again on SIGHUP, when
logrotate moved it away, and after every failure. New files are created with mode 0600 (or
`query_log.mode`): the log names every handset's lookups.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dnslib

log = logging.getLogger("blocker")

CAPACITY = 50_000
DEFAULT_MODE = 0o600
CHECK_SECONDS = 1.0  # how often the writer looks whether the file was moved away or deleted
RETRY_FIRST = 0.25  # seconds before the first retry after a failed write, doubling up to RETRY_MAX
RETRY_MAX = 4.0
_CHUNK = 1 << 20
# (time, client address, device, name, qtype, action, categories, group, exemption reference,
#  policy version, latency seconds, rcode[, the client: its identity is formatted in the writer thread])
Entry = tuple[Any, ...]


class QueryLog:
    """Appends query records to a file from a background thread."""

    def __init__(self, path: Path, only_blocked: bool, capacity: int = CAPACITY, mode: int = DEFAULT_MODE) -> None:
        self.path = path
        self.only_blocked = only_blocked
        self.capacity = capacity
        self.mode = mode
        self.written = 0
        self.dropped = 0
        self.errors = 0  # failed attempts to open or write the file (each one retried)
        self._queue: deque[Entry] = deque()
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._stop = False
        self._reopen = False
        # The writer thread's own state.
        self._fd = -1
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._pending = bytearray()  # formatted lines not yet written
        self._pending_lines = 0
        self._midline = False  # `_pending` starts inside a line whose beginning is already written
        self._failing = False
        self._next_check = 0.0
        self._thread = threading.Thread(target=self._run, name="blocker-querylog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

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
        self._halt.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = RETRY_FIRST
        while True:
            self._wake.wait(CHECK_SECONDS)
            self._wake.clear()
            try:
                self._write_out()
            except Exception as err:  # OSError above all; nothing may end the writer for good
                self.errors += 1
                self._close_file()
                if not self._failing:
                    log.error("query log %s: %s; retrying (entries waiting: %d, queue: %d)", self.path, err,
                              self._pending_lines, len(self._queue))
                    self._failing = True
                if self._stop:
                    break
                self._halt.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                self._wake.set()
                continue
            if self._failing and not self._pending:
                log.info("query log %s: writing again (%d errors so far, %d entries dropped)", self.path,
                         self.errors, self.dropped)
                self._failing = False
                delay = RETRY_FIRST
            if self._stop and not self._queue:
                break
        self._close_file()

    def _write_out(self) -> None:
        if self._reopen:
            self._reopen = False
            self._close_file()
        elif self._fd >= 0 and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + CHECK_SECONDS
            if self._moved():
                self._close_file()
        queue = self._queue
        if not queue and not self._pending:
            return
        if self._fd < 0:
            self._open_file()
        pending = self._pending
        count = 0
        # Only once what failed before is written: while the file cannot be written, new entries
        # wait in the queue (and beyond its capacity, are dropped and counted).
        while queue and not self._pending_lines and count < self.capacity:
            pending += format_entry(queue.popleft()).encode("utf-8")
            count += 1
        self._pending_lines += count
        view = memoryview(pending)
        done = 0
        try:
            while done < len(pending):
                # Each write ends at a line's end: several worker processes append to one file
                # (O_APPEND), and whole-line writes never interleave mid-line.
                end = pending.rfind(b"\n", done, done + _CHUNK) + 1 or done + _CHUNK
                done += os.write(self._fd, view[done:end])
        finally:
            view.release()
            if done:
                self._midline = pending[done - 1] != 0x0A
                written_lines = pending.count(b"\n", 0, done)
                del pending[:done]
                self.written += written_lines
                self._pending_lines -= written_lines

    def _open_file(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        if self._midline and identity != self._identity:
            # The start of that line went to the old file: drop its rest rather than garble the new one.
            cut = self._pending.find(b"\n") + 1
            del self._pending[:cut]
            self._pending_lines -= 1
            self.dropped += 1
        self._midline = False
        self._fd, self._identity = fd, identity

    def _moved(self) -> bool:
        """Whether the path no longer names the open file (logrotate moved or deleted it)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._identity

    def _close_file(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):  # (NFS, a full disk): a write error, retried anyway
                os.close(fd)


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


