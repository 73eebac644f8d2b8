"""The explanation of one decision, shared by `blocker check` and the console's explain page.

`find_client` turns what a person typed (a device id or an address) into the client a query would
be, and says how it was identified; `build_report` is the decision with its rule, file and line,
group and exemption, as one dictionary (`blocker check --json` prints it as it is).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import TYPE_CHECKING

from blocker.clients import Client, identify
from blocker.inventory import InventoryDevice
from blocker.policy import Action, Decision, Policy

if TYPE_CHECKING:
    from blocker.bindings import BindingTable


def find_client(policy: Policy, device: str | None = None, address: str | None = None,
                bindings: BindingTable | None = None, bindings_from: str = "") -> tuple[Client, str]:
    """The client for a device id or a source address, and the identity source; raises ValueError.

    An address is identified as a query would be: a binding (from `bindings`, read by the caller
    from the store or the snapshot: `bindings_from` says which), then a static inventory address,
    then the default group."""
    if device:
        found = policy.devices.get(device)
        if found is None:
            raise ValueError(f"unknown device '{device}'")
        addresses = policy.inventory.addresses_of(found)
        return (Client(addresses[0] if addresses else "-", found.id, found.group, True, "inventory", found),
                f"device id {found.id} ({_kind(policy, found)}, {found.where})")
    if address:
        try:
            source = ipaddress.ip_address(address.strip().split("%", 1)[0])
        except ValueError:
            raise ValueError(f"'{address}' is not an IP address") from None
        client = identify(policy, str(source), bindings=bindings)
        if client.origin == "binding":
            known = policy.devices.get(client.device or "")
            note = f"{bindings_from}" + ("" if known else "; the device is not in the inventory: default group")
            client = replace(client, note=note)
            return client, (f"source address {source} is bound to device {client.device} by RADIUS accounting: "
                            f"{client.detail}")
        if client.device is None:
            return client, f"source address {source}: no device has it, so policy.default_group"
        found = policy.devices[client.device]
        return client, f"source address {source} matches device {client.device} ({_kind(policy, found)}, {found.where})"
    return (Client("-", None, policy.config.policy.default_group, True),
            "no client given: policy.default_group")


def _kind(policy: Policy, device: InventoryDevice) -> str:
    return "policy.devices" if device.file == policy.config.source_name else "policy.inventory"


def build_report(policy: Policy, client: Client, qname: str, decision: Decision,
                 identity: str | None = None) -> dict[str, object]:
    match = decision.rule or policy.explain(qname)
    report: dict[str, object] = {
        "domain": qname,
        "action": decision.action.value,
        "client": client.address,
        "device": client.device,
        "identity": identity,
        "identity_origin": client.origin,  # binding, inventory or default
        "identity_source": client.detail or None,  # the gateway and since when, or FILE:LINE
        "group": decision.group,
        "category": decision.category,
        "categories": sorted(decision.categories),
        "rule": None,
        "policy": policy.version,
        "exemption": None,
    }
    if match.sources:
        report["rule"] = {
            "rule": match.rule,
            "allow": match.allow,
            "sources": [{"category": s.category, "file": s.file, "line": s.line, "except": s.allow}
                        for s in match.sources],
        }
    if decision.canary:
        report["note"] = "bypass canary: answered NXDOMAIN so the client turns its own DNS bypass off"
    if decision.action is Action.REFUSED:
        report["note"] = "the client address is outside dns.allow_networks"
    if decision.exemption is not None:
        exemption = decision.exemption
        report["exemption"] = {
            "device": exemption.device,
            "allow": list(exemption.allow),
            "approved_by": exemption.approved_by,
            "reference": exemption.reference,
            "reason": exemption.reason,
            "expires": exemption.expires.isoformat(),
            "starts": exemption.starts.isoformat() if exemption.starts else None,
            "file": exemption.file,
            "line": exemption.line,
        }
    return report


