"""Who is asking: `allow_networks`, then the device, in one order of precedence:

1. a dynamic binding learned from RADIUS accounting (bindings.py), if the address has one now;
2. a static address of the inventory or of `policy.devices` (inventory.py; most specific wins);
3. otherwise the default group.

ECS from a trusted forwarder replaces the source address first. Everything is indexed by integer
address, one dict per prefix length, so a lookup costs the same with 100,000 devices as with three.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from blocker.inventory import parse_address

if TYPE_CHECKING:
    from blocker.bindings import BindingTable
    from blocker.policy import Policy


@dataclass(frozen=True, slots=True)
class Client:
    """The identified client of one query."""

    address: str
    device: str | None
    group: str
    allowed: bool
    origin: str = "default"  # where the identity came from: binding, inventory, proxyauth or default
    # The Binding or InventoryDevice it came from (formatted only when shown: `detail`).
    evidence: object = None
    unidentified_vpn: bool = False  # inside identity.vpn_networks, yet no binding and no device
    note: str = ""  # appended to `detail` (e.g. where `blocker check` read the bindings)

    @property
    def detail(self) -> str:
        """Binding: "gateway G since T"; inventory: FILE:LINE; default: empty."""
        evidence = self.evidence
        text = ""
        if self.origin == "binding" and evidence is not None:
            since = datetime.fromtimestamp(evidence.since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # type: ignore[attr-defined]
            text = f"gateway {evidence.gateway} since {since}"  # type: ignore[attr-defined]
        elif evidence is not None:
            text = evidence.where  # type: ignore[attr-defined]
        return f"{text} ({self.note})" if self.note and text else text


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


def identify(policy: Policy, address: str, ecs: bytes | None = None, bindings: BindingTable | None = None,
             now: float | None = None) -> Client:
    """Find the client behind a source address (or the ECS address a trusted forwarder sent)."""
    default = policy.config.policy.default_group
    source = parse_address(address)
    if source is None:
        return Client(address, None, default, False)
    allowed = policy.allow_table.lookup(*source) is not None
    if ecs is not None and policy.trusted_table.lookup(*source) is not None:
        subnet = parse_ecs(ecs)
        if subnet is not None:
            address = str(subnet)
            source = (subnet.version, int(subnet))
    if bindings is not None:
        binding = bindings.lookup(source[0], source[1], bindings.clock() if now is None else now)
        if binding is not None:
            known = policy.devices.get(binding.device)
            return Client(address, binding.device, known.group if known else default, allowed, "binding", binding)
    device = policy.inventory.lookup(source[0], source[1])
    if device is not None:
        return Client(address, device.id, device.group, allowed, "inventory", device)
    return Client(address, None, default, allowed,
                  unidentified_vpn=policy.vpn_table.lookup(*source) is not None)
