"""Who is asking: `allow_networks`, devices by address or CIDR (most specific wins), ECS from trusted forwarders.

Everything is indexed once per policy: exact addresses in a dict, CIDRs in one dict per prefix
length, so a lookup costs the same with 30,000 devices as with three.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from blocker.config import IPNetwork

if TYPE_CHECKING:
    from blocker.policy import Policy

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Client:
    """The identified client of one query."""

    address: str
    device: str | None
    group: str
    allowed: bool


class NetworkTable(Generic[T]):
    """Longest-prefix match of an address against networks; built once, looked up often."""

    def __init__(self, entries: Iterable[tuple[IPNetwork, T]]) -> None:
        # (version, prefixlen) -> {network int: value}
        self._by_prefix: dict[tuple[int, int], dict[int, T]] = {}
        self.duplicates: list[IPNetwork] = []  # the same network given twice (the first keeps it)
        for network, value in entries:
            table = self._by_prefix.setdefault((network.version, network.prefixlen), {})
            key = int(network.network_address)
            if key in table:
                if table[key] != value:
                    self.duplicates.append(network)
                continue
            table[key] = value
        self._prefixes = {
            version: sorted((p for v, p in self._by_prefix if v == version), reverse=True)
            for version in (4, 6)
        }

    def lookup(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> T | None:
        version = address.version
        bits = 32 if version == 4 else 128
        value = int(address)
        for prefix in self._prefixes[version]:
            network = value >> (bits - prefix) << (bits - prefix) if prefix else 0
            found = self._by_prefix[(version, prefix)].get(network)
            if found is not None:
                return found
        return None

    def overlaps(self) -> list[tuple[IPNetwork, IPNetwork]]:
        """Pairs (outer, inner) where one network contains another, in O(n log n) (for `validate`)."""
        out: list[tuple[IPNetwork, IPNetwork]] = []
        for version in (4, 6):
            bits = 32 if version == 4 else 128
            spans = sorted((start, prefix) for (v, prefix), table in self._by_prefix.items() if v == version
                           for start in table)
            open_spans: list[tuple[int, int, int]] = []  # (start, end, prefix) of networks that may still contain
            for start, prefix in spans:
                end = start + (1 << (bits - prefix)) - 1
                while open_spans and open_spans[-1][1] < start:
                    open_spans.pop()
                if open_spans:
                    outer_start, _outer_end, outer_prefix = open_spans[-1]
                    out.append((ipaddress.ip_network((outer_start, outer_prefix)) if version == 4
                                else ipaddress.IPv6Network((outer_start, outer_prefix)),
                                ipaddress.ip_network((start, prefix)) if version == 4
                                else ipaddress.IPv6Network((start, prefix))))
                open_spans.append((start, end, prefix))
        return out


def parse_ecs(option: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address in an EDNS Client Subnet option's payload (RFC 7871), or None."""
    if len(option) < 4:
        return None
    family, source_prefix = int.from_bytes(option[0:2], "big"), option[2]
    address = option[4:]
    if family == 1 and source_prefix <= 32 and len(address) <= 4:
        return ipaddress.IPv4Address(address.ljust(4, b"\0"))
    if family == 2 and source_prefix <= 128 and len(address) <= 16:
        return ipaddress.IPv6Address(address.ljust(16, b"\0"))
    return None


def identify(policy: Policy, address: str, ecs: bytes | None = None) -> Client:
    """Find the client behind a source address (or the ECS address a trusted forwarder sent)."""
    try:
        source = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return Client(address, None, policy.config.policy.default_group, False)
    if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
        source = source.ipv4_mapped
    allowed = policy.allow_table.lookup(source) is not None
    if ecs is not None and policy.trusted_table.lookup(source) is not None:
        subnet = parse_ecs(ecs)
        if subnet is not None:
            source = subnet
            address = str(subnet)
    device = policy.device_table.lookup(source)
    if device is None:
        return Client(address, None, policy.config.policy.default_group, allowed)
    return Client(address, device.id, device.group, allowed)
