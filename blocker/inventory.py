"""The device inventory: who each handset is (id, group, static addresses, MDM attributes), apart from the policy.

`policy.inventory` names CSV files (an MDM export: a header row with at least `id` and `group`,
optional `addresses`, any other column kept as an attribute) or YAML files (a list of mappings,
or `devices:` holding one). Inline `policy.devices` join the same inventory. 100,000 devices must
load in well under a second, so the hot loop parses addresses with `inet_pton` into integers and
never builds `ipaddress` objects; the lookup table is keyed by those integers.
"""

from __future__ import annotations

import csv
import gc
import io
import socket
import sys
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import yaml

from blocker.config import Device
from blocker.errors import ConfigError, Problem
from blocker.yamlfile import Collector, Reader, compose, discard

T = TypeVar("T")
Network = tuple[int, int, int]  # (IP version, network as an integer, prefix length)

MAX_OVERLAP_WARNINGS = 50  # a 30,000-device pool overlap must not print 30,000 lines
_V4_MAPPED = 0xFFFF << 32


class InventoryDevice:
    """One handset. Attribute values share their column names per file (a tuple, not a dict per device)."""

    # No addresses here: they live only in the address table (memory: 100,000 devices in under 50 MB).
    __slots__ = ("_columns", "_values", "file", "group", "id", "line")

    def __init__(self, device_id: str, group: str, file: str, line: int,
                 columns: tuple[str, ...] = (), values: tuple[str, ...] = ()) -> None:
        self.id = device_id
        self.group = group
        self.file = file
        self.line = line
        self._columns = columns
        self._values = values

    @property
    def attributes(self) -> dict[str, str]:
        return dict(zip(self._columns, self._values, strict=True))

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def __repr__(self) -> str:
        return f"InventoryDevice({self.id!r}, {self.group!r}, {self.where})"


def parse_network(text: str) -> Network | None:
    """`10.8.0.23`, `10.8.0.0/24`, `2001:db8::/64` as (version, int, prefix); host bits are cleared; None if bad."""
    address, slash, length = text.partition("/")
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
        version, bits = 4, 32
    except OSError:
        try:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
        except OSError:
            return None
        version, bits = 6, 128
    if slash:
        if not length.isdigit() or len(length) > 3:
            return None
        prefix = int(length)
        if prefix > bits:
            return None
    else:
        prefix = bits
    if version == 6 and prefix >= 96 and value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d is the IPv4 client
        version, value, prefix, bits = 4, value & 0xFFFFFFFF, prefix - 96, 32
    host = bits - prefix
    return version, value >> host << host, prefix


def parse_address(text: str) -> tuple[int, int] | None:
    """A single address (no prefix) as (version, int); IPv4-mapped IPv6 becomes IPv4; a zone (%eth0) is dropped."""
    text = text.split("%", 1)[0]
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except OSError:
        pass
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except OSError:
        return None
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


def format_network(network: Network) -> str:
    version, value, prefix = network
    family, size, bits = (socket.AF_INET, 4, 32) if version == 4 else (socket.AF_INET6, 16, 128)
    text = socket.inet_ntop(family, value.to_bytes(size, "big"))
    return text if prefix == bits else f"{text}/{prefix}"


def with_prefix(network: Network) -> str:
    """`10.8.0.1/32`: the form `ipaddress` networks print, for messages that compare with theirs."""
    text = format_network(network)
    return text if "/" in text else f"{text}/{network[2]}"


def _other(device: InventoryDevice, file: str) -> str:
    """Where another device is: its line in the same file, else FILE:LINE."""
    return f"line {device.line}" if device.file == file else device.where


class AddressTable(Generic[T]):
    """Longest-prefix match over integer networks: one dict per (version, prefix length)."""

    def __init__(self) -> None:
        self._tables: dict[tuple[int, int], dict[int, T]] = {}
        self._prefixes: dict[int, tuple[tuple[int, dict[int, T]], ...]] = {4: (), 6: ()}
        self.size = 0

    def add(self, network: Network, value: T) -> T | None:
        """Insert; returns the value that already holds this exact network (and keeps it), else None."""
        version, start, prefix = network
        table = self._tables.get((version, prefix))
        if table is None:
            table = self._tables[(version, prefix)] = {}
            bits = 32 if version == 4 else 128
            self._prefixes[version] = tuple(
                (bits - p, self._tables[(v, p)]) for v, p in sorted(self._tables, reverse=True) if v == version)
        held = table.get(start)
        if held is not None:
            return held
        table[start] = value
        self.size += 1
        return None

    def lookup(self, version: int, value: int) -> T | None:
        for host_bits, table in self._prefixes[version]:
            found = table.get(value >> host_bits << host_bits)
            if found is not None:
                return found
        return None

    def lookup_network(self, version: int, value: int, prefix: int) -> tuple[Network, T] | None:
        """The most specific entry strictly wider than (or equal to) `prefix` that contains the network."""
        bits = 32 if version == 4 else 128
        for host_bits, table in self._prefixes[version]:
            if bits - host_bits > prefix:
                continue
            start = value >> host_bits << host_bits
            found = table.get(start)
            if found is not None:
                return (version, start, bits - host_bits), found
        return None

    def prefix_lengths(self, version: int) -> list[int]:
        """The distinct prefix lengths of one IP version, longest first: one dict probe each per lookup."""
        bits = 32 if version == 4 else 128
        return [bits - host for host, _ in self._prefixes[version]]

    def items(self) -> Iterator[tuple[Network, T]]:
        for (version, prefix), table in self._tables.items():
            for start, value in table.items():
                yield (version, start, prefix), value

    def has_networks(self) -> bool:
        """Whether any entry is wider than one address (only then can entries overlap)."""
        return any(prefix < (32 if version == 4 else 128) for version, prefix in self._tables)


class Inventory:
    """Every known device by id, and the static address table; built once per load."""

    def __init__(self, devices: dict[str, InventoryDevice], table: AddressTable[InventoryDevice],
                 files: tuple[Path, ...], warnings: tuple[Problem, ...]) -> None:
        self.devices = devices
        self.table = table
        self.files = files
        self.warnings = warnings

    def __len__(self) -> int:
        return len(self.devices)

    def lookup(self, version: int, value: int) -> InventoryDevice | None:
        return self.table.lookup(version, value)

    def addresses_by_device(self) -> dict[str, list[str]]:
        """Every device's static addresses as `ADDRESS/PREFIX` text, by id (one pass; for `diff`)."""
        out: dict[str, list[str]] = {}
        for network, device in self.table.items():
            out.setdefault(device.id, []).append(with_prefix(network))
        return {key: sorted(value) for key, value in out.items()}

    def addresses_of(self, device: InventoryDevice) -> list[str]:
        """The static addresses of one device (slow path: scans the table; for `blocker check`)."""
        return sorted(format_network(network) for network, held in self.table.items() if held is device)


def load_inventory(paths: Sequence[Path], groups: Collection[str], inline: Iterable[Device] = (),
                   config_file: str = "<config>") -> Inventory:
    """Read every inventory file plus the inline devices; raises ConfigError with every problem (FILE:LINE)."""
    # The load allocates ~300,000 objects that form no cycles: the cyclic GC would only rescan them.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _load(paths, groups, inline, config_file)
    finally:
        if enabled:
            gc.enable()


def _load(paths: Sequence[Path], groups: Collection[str], inline: Iterable[Device], config_file: str) -> Inventory:
    loader = _Loader({name: sys.intern(name) for name in groups})
    for device in inline:
        networks = []
        for network in device.addresses:
            networks.append((network.version, int(network.network_address), network.prefixlen))
        loader.add(device.id, device.group, tuple(networks), config_file, device.line)
    for path in paths:
        if path.suffix.lower() in (".yaml", ".yml"):
            loader.read_yaml(path)
        else:
            loader.read_csv(path)
    if loader.problems:
        raise ConfigError(loader.problems)
    warnings = loader.duplicates[:MAX_OVERLAP_WARNINGS] + loader.overlaps()
    loader._strings.clear()
    return Inventory(loader.devices, loader.table, tuple(paths), tuple(warnings))


class _Loader:
    def __init__(self, groups: dict[str, str]) -> None:
        self.groups = groups
        self.devices: dict[str, InventoryDevice] = {}
        self.table: AddressTable[InventoryDevice] = AddressTable()
        self.problems: list[Problem] = []
        self.duplicates: list[Problem] = []  # one address given to two devices: a warning, like an overlap
        self._strings: dict[str, str] = {}  # repeated attribute values (phone model, OS) stored once

    def add(self, device_id: str, group: str, networks: tuple[Network, ...], file: str, line: int,
            columns: tuple[str, ...] = (), values: tuple[str, ...] = ()) -> None:
        known_group = self.groups.get(group)
        if known_group is None:
            self.problems.append(Problem(file, line, f"device '{device_id}': unknown group '{group}'"))
            return
        first = self.devices.get(device_id)
        if first is not None:
            self.problems.append(Problem(file, line, f"device '{device_id}' is listed twice (first at {first.where})"))
            return
        device = InventoryDevice(device_id, known_group, file, line, columns, values)
        self.devices[device_id] = device
        for network in networks:
            held = self.table.add(network, device)
            if held is not None and held is not device:
                self.duplicates.append(Problem(file, line, f"device '{device_id}': address {with_prefix(network)} "
                                                           f"is also given to device '{held.id}' "
                                                           f"({_other(held, file)}), which keeps it"))

    def read_csv(self, path: Path) -> None:
        file = str(path)
        try:
            with path.open(encoding="utf-8-sig", newline="") as handle:
                self._read_rows(file, csv.reader(handle))
        except OSError as err:
            self.problems.append(Problem(file, 1, f"cannot read: {err.strerror or err}"))
        except UnicodeDecodeError as err:
            self.problems.append(Problem(file, 1, f"not UTF-8 text: {err.reason}"))
        except csv.Error as err:
            self.problems.append(Problem(file, 1, f"CSV: {err}"))

    def _read_rows(self, file: str, reader: Iterator[list[str]]) -> None:
        header: list[str] | None = None
        for row in reader:
            if row and any(cell.strip() for cell in row) and not row[0].lstrip().startswith("#"):
                header = [cell.strip().lower() for cell in row]
                break
        if header is None:
            self.problems.append(Problem(file, 1, "empty inventory: needs a header row naming id and group"))
            return
        header_line = reader.line_num  # type: ignore[attr-defined]
        missing = [name for name in ("id", "group") if name not in header]
        dupes = sorted({name for name in header if header.count(name) > 1})
        if missing or dupes or "" in header:
            message = "header row " + "; ".join(
                ([f"needs column {', '.join(missing)}"] if missing else [])
                + ([f"names column {', '.join(dupes)} twice"] if dupes else [])
                + (["has an empty column name"] if "" in header else []))
            self.problems.append(Problem(file, header_line, message))
            return
        i_id, i_group = header.index("id"), header.index("group")
        i_addr = header.index("addresses") if "addresses" in header else -1
        extra = tuple(i for i, name in enumerate(header) if name not in ("id", "group", "addresses"))
        columns = tuple(sys.intern(header[i]) for i in extra)
        width = len(header)
        add = self.add
        problems = self.problems
        shared = self._strings.setdefault
        for row in reader:
            if len(row) != width:
                if not row or not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
                    continue
                line = reader.line_num  # type: ignore[attr-defined]
                problems.append(Problem(file, line, f"row has {len(row)} fields, the header has {width}"))
                continue
            line = reader.line_num  # type: ignore[attr-defined]
            device_id = row[i_id].strip()
            if not device_id:
                if not any(cell.strip() for cell in row):
                    continue
                problems.append(Problem(file, line, "device id is empty"))
                continue
            if device_id[0] == "#":
                continue
            networks: tuple[Network, ...] = ()
            if i_addr >= 0:
                cell = row[i_addr]
                if cell:
                    parsed = [parse_network(text) for text in cell.replace(";", " ").split()]
                    if None in parsed:
                        bad = [t for t, n in zip(cell.replace(";", " ").split(), parsed, strict=True) if n is None]
                        problems.append(Problem(file, line, f"device '{device_id}': '{bad[0]}' is not an IP "
                                                            "address or CIDR"))
                        continue
                    networks = tuple(parsed)  # type: ignore[arg-type]
            add(device_id, row[i_group].strip(), networks, file, line, columns,
                tuple(shared(row[i], row[i]) for i in extra) if extra else ())

    def read_yaml(self, path: Path) -> None:
        file = str(path)
        collector = Collector()
        root = compose(path, collector)
        read = Reader(file, collector)
        if root is not None:
            items = root
            if isinstance(root, yaml.MappingNode):
                items = read.mapping(root, "inventory", {"devices"}).get("devices")  # type: ignore[assignment]
            for item in read.sequence(items, "inventory devices"):
                self._yaml_device(read, item)
            discard(root)
        self.problems.extend(collector.problems)

    def _yaml_device(self, read: Reader, item: yaml.Node) -> None:
        line = item.start_mark.line + 1
        fields = read.mapping(item, "device", set())
        missing = [key for key in ("id", "group") if key not in fields]
        if missing:
            read.error(item, f"device needs {', '.join(missing)}")
            return
        device_id = read.string(fields["id"], "device id")
        group = read.string(fields["group"], "device group")
        if device_id is None or group is None:
            return
        networks: list[Network] = []
        node = fields.get("addresses")
        texts = ([] if node is None else
                 [(t, node) for t in (read.string(node, "device addresses") or "").replace(";", " ").split()]
                 if isinstance(node, yaml.ScalarNode) else read.strings(node, "device addresses"))
        for text, text_node in texts:
            network = parse_network(text.strip())
            if network is None:
                read.error(text_node, f"device '{device_id}': '{text}' is not an IP address or CIDR")
                return
            networks.append(network)
        attributes = [(key, read.string(value, f"device '{device_id}' {key}")) for key, value in fields.items()
                      if key not in ("id", "group", "addresses")]
        columns = tuple(sys.intern(key) for key, value in attributes if value is not None)
        values = tuple(value for _key, value in attributes if value is not None)
        self.add(device_id.strip(), group.strip(), tuple(networks), read.file, line, columns, values)

    def overlaps(self) -> list[Problem]:
        """A device address inside another device's network (the narrower wins): both lines, as warnings."""
        if not self.table.has_networks():
            return []
        found: list[Problem] = []
        count = 0
        for (version, start, prefix), device in self.table.items():
            if prefix == 0:
                continue
            outer = self.table.lookup_network(version, start, prefix - 1)
            if outer is None or outer[1] is device:
                continue
            count += 1
            if count <= MAX_OVERLAP_WARNINGS:
                found.append(Problem(device.file, device.line,
                                     f"device '{device.id}': address {with_prefix((version, start, prefix))} lies "
                                     f"inside {with_prefix(outer[0])} of device '{outer[1].id}' "
                                     f"({_other(outer[1], device.file)}); the narrower wins"))
        if count > MAX_OVERLAP_WARNINGS:
            found.append(Problem(found[0].file, found[0].line,
                                 f"... and {count - MAX_OVERLAP_WARNINGS} more overlapping device addresses"))
        return found


def write_csv(devices: Iterable[tuple[str, str, str]], handle: io.TextIOBase) -> None:
    """Write (id, group, addresses) rows with a header (for tests and the benchmark)."""
    writer = csv.writer(handle)
    writer.writerow(["id", "group", "addresses"])
    writer.writerows(devices)
