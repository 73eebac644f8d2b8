"""The device inventory: CSV and YAML files, FILE:LINE errors, duplicates and overlaps with both lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocker.config import load_config
from blocker.errors import ConfigError
from blocker.inventory import format_network, load_inventory, parse_address, parse_network

GROUPS = ("standard", "comms-team")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems(paths: list[Path]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_inventory(paths, GROUPS)
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize(("text", "expected"), [
    ("10.8.0.23", (4, 0x0A080017, 32)),
    ("10.8.0.99/24", (4, 0x0A080000, 24)),
    ("2001:db8::1/64", (6, 0x20010DB8 << 96, 64)),
    ("::ffff:10.0.0.1", (4, 0x0A000001, 32)),
    ("10.8.0.300", None), ("10.8.0.0/33", None), ("10.8.0.0/x", None), ("host", None), ("", None),
])
def test_parse_network(text: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_network(text) == expected


def test_parse_address_and_format() -> None:
    assert parse_address("::ffff:127.0.0.2") == (4, 0x7F000002)
    assert parse_address("fe80::1%eth0") == (6, (0xFE80 << 112) | 1)
    assert parse_address("nope") is None
    assert format_network((4, 0x0A080000, 24)) == "10.8.0.0/24"
    assert format_network((6, 1, 128)) == "::1"


def test_csv_inventory(tmp_path: Path) -> None:
    path = write(tmp_path / "mdm.csv", "\ufeffID, Group ,Addresses,Model,Owner\n"
                 "MPS-1,standard,10.8.0.1,iPhone 15,PC 1\n"
                 "\n"
                 "# a comment row\n"
                 "MPS-2,comms-team,10.8.0.2; 10.8.0.3 2001:db8::2,Pixel 8,\"Smith, J\"\n"
                 "MPS-3,standard,,iPhone 15,PC 3\n")
    inventory = load_inventory([path], GROUPS)
    assert set(inventory.devices) == {"MPS-1", "MPS-2", "MPS-3"}
    two = inventory.devices["MPS-2"]
    assert (two.group, two.where, two.attributes) == ("comms-team", f"{path}:5",
                                                      {"model": "Pixel 8", "owner": "Smith, J"})
    assert inventory.lookup(*parse_address("10.8.0.3")) is two  # type: ignore[misc]
    assert inventory.lookup(*parse_address("2001:db8::2")) is two  # type: ignore[misc]
    assert inventory.lookup(*parse_address("10.8.0.4")) is None  # type: ignore[misc]
    assert inventory.addresses_of(two) == ["10.8.0.2", "10.8.0.3", "2001:db8::2"]
    assert inventory.devices["MPS-3"].attributes["model"] is inventory.devices["MPS-1"].attributes["model"]


def test_csv_errors_have_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.csv", "id,group,addresses\n"
                 "MPS-1,standard,10.8.0.1\n"
                 "MPS-2,nosuchgroup,10.8.0.2\n"
                 "MPS-3,standard,10.8.0.999\n"
                 "MPS-1,standard,10.8.0.4\n"
                 "MPS-6,standard\n"
                 ",standard,10.8.0.7\n")
    assert problems([path]) == [
        f"{path}:3: device 'MPS-2': unknown group 'nosuchgroup'",
        f"{path}:4: device 'MPS-3': '10.8.0.999' is not an IP address or CIDR",
        f"{path}:5: device 'MPS-1' is listed twice (first at {path}:2)",
        f"{path}:6: row has 2 fields, the header has 3",
        f"{path}:7: device id is empty",
    ]


@pytest.mark.parametrize(("header", "message"), [
    ("name,group", "header row needs column id"),
    ("id,group,group", "header row names column group twice"),
    ("", "empty inventory: needs a header row naming id and group"),
])
def test_csv_header_errors(tmp_path: Path, header: str, message: str) -> None:
    path = write(tmp_path / "h.csv", header + "\n")
    assert problems([path]) == [f"{path}:1: {message}"]


def test_duplicate_across_files_and_inline(tmp_path: Path) -> None:
    first = write(tmp_path / "a.csv", "id,group,addresses\nMPS-1,standard,10.8.0.1\n")
    second = write(tmp_path / "b.yaml", "devices:\n  - {id: MPS-1, group: standard}\n"
                                       "  - {id: MPS-2, group: standard, addresses: [10.8.0.1]}\n")
    assert problems([first, second]) == [f"{second}:2: device 'MPS-1' is listed twice (first at {first}:2)"]
    second.write_text("devices:\n  - {id: MPS-2, group: standard, addresses: [10.8.0.1]}\n")
    inventory = load_inventory([first, second], GROUPS)
    assert [str(w) for w in inventory.warnings] == [
        f"{second}:2: device 'MPS-2': address 10.8.0.1/32 is also given to device 'MPS-1' ({first}:2), "
        "which keeps it"]


def test_overlaps_are_warnings_with_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "o.csv", "id,group,addresses\nPOOL,standard,10.8.0.0/24\nMPS-1,comms-team,10.8.0.7\n")
    inventory = load_inventory([path], GROUPS)
    assert [str(w) for w in inventory.warnings] == [
        f"{path}:3: device 'MPS-1': address 10.8.0.7/32 lies inside 10.8.0.0/24 of device 'POOL' (line 2); "
        "the narrower wins"]
    assert inventory.lookup(*parse_address("10.8.0.7")).id == "MPS-1"  # type: ignore[misc,union-attr]
    assert inventory.lookup(*parse_address("10.8.0.8")).id == "POOL"  # type: ignore[misc,union-attr]


def test_yaml_inventory(tmp_path: Path) -> None:
    path = write(tmp_path / "inv.yaml", "- id: MPS-1\n  group: comms-team\n  addresses: 10.8.0.1;10.8.0.2\n"
                                       "  owner: PC 1\n"
                                       "- {id: MPS-2, group: standard, addresses: [\"2001:db8::/64\"]}\n"
                                       "- {id: MPS-3, group: standard, addresses: [nope]}\n"
                                       "- {group: standard}\n")
    assert problems([path]) == [f"{path}:6: device 'MPS-3': 'nope' is not an IP address or CIDR",
                                f"{path}:7: device needs id"]
    path.write_text("\n".join(path.read_text().splitlines()[:5]) + "\n")
    inventory = load_inventory([path], GROUPS)
    assert inventory.devices["MPS-1"].attributes == {"owner": "PC 1"}
    assert inventory.lookup(*parse_address("2001:db8::99")).id == "MPS-2"  # type: ignore[misc,union-attr]


def test_missing_file(tmp_path: Path) -> None:
    assert problems([tmp_path / "gone.csv"]) == [f"{tmp_path / 'gone.csv'}:1: cannot read: No such file or directory"]


def test_config_names_inventory_and_identity(tmp_path: Path) -> None:
    config = write(tmp_path / "blocker.yaml", """\
policy:
  inventory: [devices.csv, more.yaml]
identity:
  snapshot: bindings.json
  vpn_networks: ["10.8.0.0/16"]
  store: {url: "valkey://127.0.0.1:6390/0"}
  radius_accounting:
    listen: "127.0.0.1"
    secret_file: radius.secret
    clients: ["127.0.0.0/8"]
    device_attribute: {attribute: Calling-Station-Id, regex: '^(?P<device>[A-Z]+-[0-9]+)'}
""")
    loaded = load_config(config)
    assert loaded.policy.inventory == (tmp_path / "devices.csv", tmp_path / "more.yaml")
    radius = loaded.identity.radius_accounting
    assert radius is not None
    assert (radius.listen, radius.device_attribute, radius.secret_file) == (
        ("127.0.0.1", 1813), "Calling-Station-Id", tmp_path / "radius.secret")
    assert loaded.identity.store is not None and loaded.identity.store.url == "redis://127.0.0.1:6390/0"


@pytest.mark.parametrize(("body", "message"), [
    ("  radius_accounting: {clients: [127.0.0.1]}\n", "identity.radius_accounting needs secret_file"),
    ("  radius_accounting: {secret_file: s, clients: [127.0.0.1], device_attribute: NAS-Port}\n",
     "identity.radius_accounting.device_attribute must be one of User-Name, Calling-Station-Id, Class, "
     "got 'NAS-Port'"),
    ("  radius_accounting: {secret_file: s, clients: [127.0.0.1], device_attribute: {attribute: Class, regex: 'x'}}\n",
     "identity.radius_accounting.device_attribute.regex needs a group that captures the device id"),
    ("  radius_acounting: {}\n", "identity: unknown key 'radius_acounting'"),
])
def test_identity_config_errors(tmp_path: Path, body: str, message: str) -> None:
    config = write(tmp_path / "blocker.yaml", "identity:\n" + body)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"{config}:")
