"""The explanation of one decision, shared by `blocker check` and the console's explain page.

`find_client` turns what a person typed (a device id or an address) into the client a query would
be, and says how it was identified; `build_report` is the decision with its rule, file and line,
group and exemption, as one dictionary (`blocker check --json` prints it as it is).
"""

from __future__ import annotations

import ipaddress

from blocker.clients import Client, identify
from blocker.policy import Action, Decision, Policy


def find_client(policy: Policy, device: str | None = None, address: str | None = None) -> tuple[Client, str]:
    """The client for a device id or a source address, and the identity source; raises ValueError."""
    if device:
        found = policy.devices.get(device)
        if found is None:
            raise ValueError(f"unknown device '{device}'")
        where = f"{policy.config.source_name}:{found.line}" if found.line else policy.config.source_name
        return (Client(str(found.addresses[0].network_address), found.id, found.group, True),
                f"device id {found.id} (policy.devices, {where})")
    if address:
        try:
            source = ipaddress.ip_address(address.strip().split("%", 1)[0])
        except ValueError:
            raise ValueError(f"'{address}' is not an IP address") from None
        client = identify(policy, str(source))
        if client.device is None:
            return client, f"source address {source}: no device has it, so policy.default_group"
        found = policy.devices[client.device]
        return client, (f"source address {source} matches device {client.device} "
                        f"(policy.devices, {policy.config.source_name}:{found.line})")
    return (Client("-", None, policy.config.policy.default_group, True),
            "no client given: policy.default_group")


def build_report(policy: Policy, client: Client, qname: str, decision: Decision,
                 identity: str | None = None) -> dict[str, object]:
    match = decision.rule or policy.explain(qname)
    report: dict[str, object] = {
        "domain": qname,
        "action": decision.action.value,
        "client": client.address,
        "device": client.device,
        "identity": identity,
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


