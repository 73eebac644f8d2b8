"""Dynamic address -> device bindings (learned from RADIUS accounting), and their snapshot file.

The table is read on every query, so a lookup is a dict probe per prefix length in use (IPv4
bindings are all /32: one probe) and never waits on anything; expired entries are ignored at
lookup and purged by `sweep()`. Times are wall-clock seconds (time.time()): bindings are shared
with other replicas and survive restarts, so a monotonic clock would mean nothing there.

Which binding wins for one address: the one whose session began last (`since`). A late Interim
of an old session cannot take an address back from the handset that holds it now, and a Stop
only unbinds the device it names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from blocker.inventory import Network, format_network, parse_network

log = logging.getLogger("blocker.bindings")

SNAPSHOT_FORMAT = "blocker-bindings"
SNAPSHOT_VERSION = 1

# What bind() did; also the results counted per accounting packet.
BOUND, REFRESHED, REPLACED, STALE, FULL = "bound", "refreshed", "replaced", "stale", "table_full"


class Binding:
    """One address (or IPv6 prefix) held by one device, as told by one gateway."""

    __slots__ = ("device", "expires", "gateway", "network", "since")

    def __init__(self, network: Network, device: str, gateway: str, since: float, expires: float) -> None:
        self.network = network
        self.device = device
        self.gateway = gateway
        self.since = since
        self.expires = expires

    def as_row(self) -> list[object]:
        return [format_network(self.network), self.device, self.gateway, self.since, self.expires]

    @classmethod
    def from_row(cls, row: object) -> Binding | None:
        """A binding from its snapshot/store form, or None when it is not one."""
        if not isinstance(row, list) or len(row) != 5:
            return None
        text, device, gateway, since, expires = row
        if not (isinstance(text, str) and isinstance(device, str) and isinstance(gateway, str)
                and isinstance(since, int | float) and isinstance(expires, int | float)) or not device:
            return None
        network = parse_network(text)
        if network is None:
            return None
        return cls(network, device, gateway, float(since), float(expires))

    def __repr__(self) -> str:
        return f"Binding({format_network(self.network)} -> {self.device} via {self.gateway}, since {self.since:.0f})"


# ("bind" | "unbind" | "expire", binding, learned here rather than mirrored or expired)
Listener = Callable[[str, Binding, bool], None]


class BindingTable:
    """Bindings by address; capped at `capacity` entries (at the cap, new addresses are refused, see bind())."""

    def __init__(self, capacity: int = 500_000, clock: Callable[[], float] = time.time) -> None:
        self.capacity = capacity
        self.clock = clock
        self._tables: dict[tuple[int, int], dict[int, Binding]] = {}
        self._order: dict[int, tuple[tuple[int, dict[int, Binding]], ...]] = {4: (), 6: ()}
        self._size = 0
        self.listeners: list[Listener] = []
        self.version = 0  # bumped on every change (the snapshot writer compares it)
        self.expired_total = 0
        self.refused_total = 0
        self._last_full_sweep = 0.0

    def __len__(self) -> int:
        return self._size

    def lookup(self, version: int, value: int, now: float) -> Binding | None:
        """The binding holding an address now (the query path: no I/O, no lock)."""
        for host_bits, table in self._order[version]:
            found = table.get(value >> host_bits << host_bits)
            if found is not None and found.expires > now:
                return found
        return None

    def get(self, network: Network) -> Binding | None:
        table = self._tables.get((network[0], network[2]))
        return table.get(network[1]) if table is not None else None

    def bind(self, network: Network, device: str, gateway: str, since: float, expires: float,
             local: bool = True) -> str:
        """Bind (Start, Interim-Update, or a mirrored change); returns BOUND, REFRESHED, REPLACED, STALE or FULL.

        At the cap a binding for a new address is refused (FULL, counted, existing bindings kept) once
        expired entries have been purged: an accounting flood can grow memory only up to the cap, and it
        can never push out the bindings of handsets that are online.
        """
        version, start, prefix = network
        table = self._tables.get((version, prefix))
        held = table.get(start) if table is not None else None
        now = self.clock()
        if held is not None and held.expires > now:
            if held.device == device:
                if expires <= held.expires and held.gateway == gateway:
                    return REFRESHED  # nothing new (a duplicate or reordered interim)
                held.expires = max(expires, held.expires)
                held.gateway = gateway
                held.since = min(since, held.since)
                self._changed("bind", held, local)
                return REFRESHED
            if since < held.since:
                return STALE
        if held is None:
            if self._size >= self.capacity:
                self.sweep(now, force=False)
                if self._size >= self.capacity:
                    self.refused_total += 1
                    return FULL
            if table is None:
                table = self._tables[(version, prefix)] = {}
                bits = 32 if version == 4 else 128
                self._order[version] = tuple((bits - p, self._tables[(v, p)])
                                             for v, p in sorted(self._tables, reverse=True) if v == version)
            self._size += 1
        binding = Binding(network, device, gateway, since, expires)
        table[start] = binding  # type: ignore[index]
        self._changed("bind", binding, local)
        return BOUND if held is None else REPLACED

    def unbind(self, network: Network, device: str | None, since: float | None = None, local: bool = True) -> bool:
        """Stop: remove the binding if it is this device's (a Stop of an older session is ignored)."""
        held = self.get(network)
        if held is None or (device is not None and held.device != device):
            return False
        if since is not None and since < held.since - 1.0:
            return False  # the Stop of a session that ended before the current one began
        del self._tables[(network[0], network[2])][network[1]]
        self._size -= 1
        self._changed("unbind", held, local)
        return True

    def unbind_gateway(self, gateway: str) -> int:
        """Accounting-On/Off: the gateway restarted, every session it told us about is gone."""
        gone = [b for b in self.bindings() if b.gateway == gateway]
        for binding in gone:
            self.unbind(binding.network, binding.device)
        return len(gone)

    def sweep(self, now: float | None = None, force: bool = True) -> int:
        """Purge expired bindings; returns how many. Without `force`, at most once a second (called at the cap)."""
        now = self.clock() if now is None else now
        if not force and now - self._last_full_sweep < 1.0:
            return 0
        self._last_full_sweep = now
        gone: list[Binding] = []
        for table in self._tables.values():
            dead = [binding for binding in table.values() if binding.expires <= now]
            for binding in dead:
                del table[binding.network[1]]
            gone.extend(dead)
        if gone:
            self._size -= len(gone)
            self.expired_total += len(gone)
            for binding in gone:
                self._changed("expire", binding, False)
        return len(gone)

    def bindings(self) -> Iterator[Binding]:
        for table in list(self._tables.values()):
            yield from list(table.values())

    def replace_all(self, bindings: list[Binding]) -> None:
        """Load a full table (snapshot at start, the store's full load); newer-session rules still apply."""
        for binding in bindings:
            self.bind(binding.network, binding.device, binding.gateway, binding.since, binding.expires, local=False)

    def remove(self, network: Network, local: bool = False) -> bool:
        """Drop whatever binding holds this network (the store says it is gone)."""
        held = self.get(network)
        return held is not None and self.unbind(network, None, local=local)

    def mirror(self, op: str, binding: Binding) -> None:
        """Apply a change the supervisor's table made (a worker's copy follows it change by change)."""
        self.remove(binding.network)
        if op == "bind":
            self.bind(binding.network, binding.device, binding.gateway, binding.since, binding.expires, local=False)

    def _changed(self, op: str, binding: Binding, local: bool) -> None:
        self.version += 1
        for listener in self.listeners:
            listener(op, binding, local)


def write_snapshot(rows: list[list[object]], path: Path, written: float) -> None:
    """Write the rows atomically (temporary file in the same folder, fsync, rename); raises OSError."""
    payload = json.dumps({"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "written": written,
                          "bindings": rows}, separators=(",", ":"))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


def read_snapshot(path: Path, now: float) -> list[Binding]:
    """The unexpired bindings of a snapshot; a missing or corrupt file is logged and gives none (never fatal)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        log.info("bindings snapshot %s: not there yet, starting with no bindings", path)
        return []
    except (OSError, UnicodeDecodeError) as err:
        log.warning("bindings snapshot %s: cannot read (%s), starting with no bindings", path, err)
        return []
    try:
        data = json.loads(text)
    except ValueError as err:
        log.warning("bindings snapshot %s: corrupt (%s), starting with no bindings", path, err)
        return []
    if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT or not isinstance(data.get("bindings"),
                                                                                               list):
        log.warning("bindings snapshot %s: not a blocker bindings snapshot, starting with no bindings", path)
        return []
    out = []
    bad = 0
    for row in data["bindings"]:
        binding = Binding.from_row(row)
        if binding is None:
            bad += 1
        elif binding.expires > now:
            out.append(binding)
    if bad:
        log.warning("bindings snapshot %s: %d unreadable entries skipped", path, bad)
    log.info("bindings snapshot %s: %d bindings restored", path, len(out))
    return out


class SnapshotWriter:
    """Writes the table to its snapshot at most every `interval` seconds while it changes, and at stop."""

    def __init__(self, table: BindingTable, path: Path, interval: float = 5.0) -> None:
        self.table = table
        self.path = path
        self.interval = interval
        self._written_version = -1
        self.failures = 0

    def restore(self) -> int:
        bindings = read_snapshot(self.path, self.table.clock())
        self.table.replace_all(bindings)
        self._written_version = self.table.version
        return len(bindings)

    def rows(self) -> list[list[object]] | None:
        """What to write now, or None if nothing changed since the last write (runs on the event loop: cheap)."""
        if self.table.version == self._written_version:
            return None
        self._written_version = self.table.version
        now = self.table.clock()
        return [b.as_row() for b in self.table.bindings() if b.expires > now]

    def write(self, rows: list[list[object]]) -> bool:
        """Write rows (call off the event loop); a failure is logged and retried at the next interval."""
        try:
            write_snapshot(rows, self.path, self.table.clock())
            return True
        except OSError as err:
            self.failures += 1
            self._written_version = -1
            log.warning("bindings snapshot %s: cannot write (%s)", self.path, err)
            return False

    async def run(self) -> None:
        """Until cancelled: write when changed, every interval; the final write happens in `flush()`."""
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            rows = self.rows()
            if rows is not None:
                await loop.run_in_executor(None, self.write, rows)

    def flush(self) -> None:
        """At stop: write whatever changed (blocking is fine then)."""
        rows = self.rows()
        if rows is not None:
            self.write(rows)
