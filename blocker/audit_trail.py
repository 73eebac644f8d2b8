"""The audit trail file (`audit.path`): append-only JSON lines, each carrying the hash of the line before.

Owns the file format, appending under a lock, reading and verifying. Every line is one JSON object
with `time`, the event's own fields, `prev` (the `hash` of the line before, 64 zeros for the first)
and `hash` (sha256 of the line's other fields as canonical JSON). Editing a line breaks its hash,
deleting one breaks the `prev` of the next; `PATH.head` remembers the count and last hash so that
lines cut from the end are found too. Writers (the exemption commands, every replica given the
same path) take the lock file `PATH.lock` (flock) for the whole read-decide-append step, so two
processes never interleave lines or record the same change twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

GENESIS = "0" * 64


def _digest(record: dict[str, object]) -> str:
    fields = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def now_text(now: datetime | None = None) -> str:
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of `verify`: `first_bad_line` is 1-based (None when the chain is whole)."""

    ok: bool
    lines: int
    first_bad_line: int | None
    reason: str


class AuditTrail:
    """Appends events to one trail file; safe across processes through `PATH.lock`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.head_path = path.with_name(path.name + ".head")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the trail's lock (re-read what others appended inside it before deciding)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def append(self, event: dict[str, object]) -> dict[str, object]:
        """Append one event (adds `time` unless given, `prev` and `hash`); returns the line written."""
        with self.locked():
            return self.append_locked([event])[0]

    def append_locked(self, events: list[dict[str, object]]) -> list[dict[str, object]]:
        """Append events; the caller holds `locked()`."""
        if not events:
            return []
        prev, count = self._tail()
        written: list[dict[str, object]] = []
        lines: list[str] = []
        for event in events:
            record: dict[str, object] = {"time": now_text()} if "time" not in event else {}
            record.update(event)
            record.pop("hash", None)
            record["prev"] = prev
            record["hash"] = prev = _digest(record)
            lines.append(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
            written.append(record)
        with self.path.open("a", encoding="utf-8") as out:
            out.write("".join(lines))
            out.flush()
            os.fsync(out.fileno())
        _write_atomic(self.head_path, json.dumps({"lines": count + len(events), "hash": prev}) + "\n")
        return written

    def _tail(self) -> tuple[str, int]:
        """The last line's hash and the number of lines (from the head file when it agrees)."""
        last = _last_line(self.path)
        if last is None:
            return GENESIS, 0
        try:
            last_hash = str(json.loads(last)["hash"])
        except (ValueError, KeyError, TypeError):
            last_hash = hashlib.sha256(last.encode("utf-8")).hexdigest()
        head = read_head(self.head_path)
        if head is not None and head[1] == last_hash:
            return last_hash, head[0]
        with self.path.open("rb") as lines:
            return last_hash, sum(1 for _ in lines)


def _last_line(path: Path) -> str | None:
    try:
        with path.open("rb") as data:
            data.seek(0, os.SEEK_END)
            end = data.tell()
            chunk = b""
            position = end
            while position > 0:
                step = min(4096, position)
                position -= step
                data.seek(position)
                chunk = data.read(step) + chunk
                if chunk.rstrip(b"\n").count(b"\n") >= 1:
                    break
    except FileNotFoundError:
        return None
    text = chunk.rstrip(b"\n")
    if not text:
        return None
    return text.rsplit(b"\n", 1)[-1].decode("utf-8", errors="replace")


def read_head(path: Path) -> tuple[int, str] | None:
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
        return int(head["lines"]), str(head["hash"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temp.open("w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)


def read_events(path: Path) -> list[dict[str, object]]:
    """Every event of a trail, in order ([] when the file does not exist yet)."""
    return list(TrailReader(path).new_events())


class TrailReader:
    """Reads a trail incrementally: each call returns the lines appended since the last one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.restarted = False  # set when the file shrank (replaced): the caller reads it afresh

    def new_events(self) -> Iterator[dict[str, object]]:
        self.restarted = False
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:
            self.offset = 0
            self.restarted = True
        with self.path.open("rb") as data:
            data.seek(self.offset)
            for raw in data:
                if not raw.endswith(b"\n"):
                    break  # a line still being written: read it next time
                self.offset += len(raw)
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    yield event


def verify(path: Path) -> VerifyResult:
    """Check every line's hash and link; reports the first broken line (1-based)."""
    prev = GENESIS
    count = 0
    try:
        data = path.open("rb")
    except OSError as err:
        return VerifyResult(False, 0, None, f"cannot read {path}: {err.strerror or err}")
    with data:
        for count, raw in enumerate(data, start=1):
            try:
                record = json.loads(raw)
            except ValueError:
                return VerifyResult(False, count, count, "not a JSON object")
            if not isinstance(record, dict) or "hash" not in record or "prev" not in record:
                return VerifyResult(False, count, count, "no hash or prev field")
            if record["prev"] != prev:
                return VerifyResult(False, count, count,
                                    "prev does not match the line before (a line was deleted or inserted)")
            if _digest(record) != record["hash"]:
                return VerifyResult(False, count, count, "hash does not match the content (the line was edited)")
            prev = str(record["hash"])
    head = read_head(path.with_name(path.name + ".head"))
    if head is not None:
        lines, last = head
        if lines > count:
            return VerifyResult(False, count, count + 1,
                                f"{lines - count} line(s) missing at the end (the head records {lines})")
        if lines == count and last != prev:
            return VerifyResult(False, count, count, "the last line differs from the one the head records")
    return VerifyResult(True, count, None, f"{count} line(s), chain intact")
