"""The policy: a compiled snapshot of config and lists, and the one pure decision function.

`decide(policy, client, qname, now)` is shared by the resolver (as its two memoised halves,
`Policy.categorize` and `decide_categories`) and the proxy addon; `explain` adds the rule's file
and line for `blocker check`. No DNS wire format and no I/O on the decision path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from blocker.blocklists import Blocklists, find_line, load_blocklists
from blocker.clients import Client
from blocker.config import Config, Exemption, IPNetwork
from blocker.domains import Match, is_valid_name, normalize
from blocker.errors import ConfigError, Problem
from blocker.inventory import AddressTable, Inventory, InventoryDevice, load_inventory, parse_address

# Firefox's DoH canary and Apple's iCloud Private Relay: NXDOMAIN switches the bypass off.
CANARY_NAMES = frozenset({"use-application-dns.net", "mask.icloud.com", "mask-h2.icloud.com"})
CANARY_CATEGORY = "doh"


class Action(StrEnum):
    """What happened to a query; also the `action` label of the metrics and the query log."""

    ALLOWED = "allowed"
    BLOCKED = "blocked"
    EXEMPTED = "exempted"
    REFUSED = "refused"
    ERROR = "error"  # never a decision: an answer that failed (SERVFAIL, FORMERR, ...)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one name for one client, and why."""

    action: Action
    group: str
    categories: frozenset[str] = frozenset()
    category: str | None = None  # the category that blocked (or was exempted)
    exemption: Exemption | None = None
    expires_in: float | None = None  # seconds an exempted answer may live
    canary: bool = False
    rule: Match | None = None  # the matching rule with file and line (filled by `decide`, not the hot path)


@dataclass(frozen=True, slots=True)
class Policy:
    """Everything a decision needs, compiled once per (re)load; never mutated."""

    config: Config
    lists: Blocklists
    version: str
    group_blocks: dict[str, frozenset[str]]
    group_order: dict[str, tuple[str, ...]]
    devices: dict[str, InventoryDevice]  # the inventory's and policy.devices', by id
    inventory: Inventory
    allow_table: AddressTable[bool]
    trusted_table: AddressTable[bool]
    vpn_table: AddressTable[bool]
    exemptions: dict[str, tuple[Exemption, ...]]
    warnings: tuple[Problem, ...]

    def categorize(self, qname: str) -> frozenset[str]:
        """Categories of a normalised name (the canaries count as `doh`)."""
        categories = self.lists.index.classify(qname)
        if qname in CANARY_NAMES:
            return categories | {CANARY_CATEGORY}
        return categories

    def is_trusted(self, address: str) -> bool:
        """Whether a source is a trusted forwarder (its ECS option names the real client)."""
        source = parse_address(address)
        return source is not None and self.trusted_table.lookup(*source) is not None

    def explain(self, qname: str) -> Match:
        """The matching rule with its file and line (slow path: may read a list file)."""
        match = self.lists.index.lookup(qname)
        if any(source.line == 0 for source in match.sources):
            sources = tuple(replace(s, line=find_line(s.file, s.text)) if s.line == 0 else s for s in match.sources)
            match = replace(match, sources=sources)
        return match


def compile_policy(config: Config, lists: Blocklists | None = None) -> Policy:
    """Load the lists (unless already loaded ones are given) and check config against them;
    raises ConfigError with every problem."""
    if lists is None:
        lists = load_blocklists(config.blocklists)
    problems: list[Problem] = []
    source = config.source_name
    known = set(lists.categories) | {CANARY_CATEGORY}
    for group in config.policy.groups.values():
        for category in group.block:
            if category not in known:
                line = config.lines.get(f"group:{group.name}:{category}", group.line) or 1
                problems.append(Problem(source, line, f"group '{group.name}' blocks unknown category '{category}'"))
    for exemption in config.policy.exemptions:
        for category in exemption.allow:
            if category not in known:
                problems.append(Problem(exemption.file or source, exemption.line,
                                        f"exemption {exemption.reference} allows unknown category '{category}'"))
    try:
        inventory = load_inventory(config.policy.inventory, config.policy.groups, config.policy.devices, source)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    devices = inventory.devices
    warnings: list[Problem] = [*config.warnings, *lists.warnings, *inventory.warnings]
    exemptions: dict[str, list[Exemption]] = {}
    references: dict[str, Exemption] = {}
    for exemption in config.policy.exemptions:
        if exemption.device not in devices:
            warnings.append(Problem(exemption.file or source, exemption.line,
                                    f"exemption {exemption.reference} names unknown device '{exemption.device}'"))
        first = references.setdefault(exemption.reference, exemption)
        if first is not exemption:
            warnings.append(Problem(exemption.file or source, exemption.line,
                                    f"exemption reference {exemption.reference} is used twice (first at "
                                    f"{first.file}:{first.line}): the commands cannot tell them apart"))
        exemptions.setdefault(exemption.device, []).append(exemption)
    blocked = {c for g in config.policy.groups.values() for c in g.block}
    for name, category in sorted(lists.categories.items()):
        if name not in blocked:
            warnings.append(Problem(category.file, 1, f"category '{name}' is blocked by no group "
                                                      f"(its rules decide nothing)"))
    return Policy(
        config=config,
        lists=lists,
        version=policy_version(config, lists.files + inventory.files),
        group_blocks={name: frozenset(g.block) for name, g in config.policy.groups.items()},
        group_order={name: g.block for name, g in config.policy.groups.items()},
        devices=devices,
        inventory=inventory,
        allow_table=_table(config.dns.allow_networks),
        trusted_table=_table(config.dns.trusted_forwarders),
        vpn_table=_table(config.identity.vpn_networks),
        exemptions={device: tuple(sorted(items, key=lambda e: e.expires)) for device, items in exemptions.items()},
        warnings=tuple(warnings),
    )


def _table(networks: tuple[IPNetwork, ...]) -> AddressTable[bool]:
    table: AddressTable[bool] = AddressTable()
    for network in networks:
        table.add((network.version, int(network.network_address), network.prefixlen), True)
    return table


def policy_version(config: Config, files: tuple[Path, ...]) -> str:
    """A short hash of what decides: list files by their name relative to the lists folder, and the
    decision settings (groups, devices, exemptions, networks, block response). Paths, comments of the
    config and settings that decide nothing (listen addresses, logs) do not change it, so `check`,
    `validate`, `serve` and the proxy agree on the same files wherever they are."""
    digest = hashlib.sha256()
    policy = config.policy
    dns = config.dns
    settings = {
        "default_group": policy.default_group,
        "groups": {name: list(g.block) for name, g in sorted(policy.groups.items())},
        # By id alone (ids are unique): the same order, without a fleet-size sort holding the GIL.
        "devices": sorted(([d.id, [str(a) for a in d.addresses], d.group] for d in policy.devices), key=_first),
        "exemptions": sorted([e.device, e.reference, list(e.allow), e.approved_by, e.reason,
                              e.expires.isoformat(), e.starts.isoformat() if e.starts else None]
                             for e in policy.exemptions),
        "allow_networks": [str(n) for n in dns.allow_networks],
        "trusted_forwarders": [str(n) for n in dns.trusted_forwarders],
        "block_response": [dns.block_response.kind, dns.block_response.ipv4, dns.block_response.ipv6],
        "block_ttl": dns.block_ttl,
    }
    pieces: list[bytes] = []
    _canonical_json(settings, pieces)
    digest.update(b"".join(pieces))
    folder = config.blocklists
    for name, path in sorted((_relative(path, folder), path) for path in files):
        digest.update(b"\0" + name.encode() + b"\0")
        try:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            digest.update(b"?")
    return digest.hexdigest()[:10]


def _first(item: list[object]) -> str:
    return str(item[0])


def _canonical_json(value: object, out: list[bytes], piece: int = 100) -> None:
    """Append `json.dumps(value, sort_keys=True, separators=(",", ":")).encode()` to `out`, the same
    bytes, in pieces: one dumps of a fleet's devices holds the GIL ~60 ms (a reload runs in a thread),
    and so would freeing them at once. Empties the long lists it encodes, a piece at a time. The
    caller hashes the pieces joined, in one update: hashlib lets the GIL go for each update of 2 KiB
    or more, and a thread letting it go and taking it back that often starves the waiting listeners."""
    if isinstance(value, dict):
        for index, key in enumerate(sorted(value)):
            out.append(("{" if index == 0 else ",").encode() + json.dumps(key).encode() + b":")
            _canonical_json(value[key], out, piece)
        out.append(b"}" if value else b"{}")
    elif isinstance(value, list) and len(value) > piece:
        opening = b"["
        while value:
            text = json.dumps(value[:piece], sort_keys=True, separators=(",", ":"))
            del value[:piece]
            out.append(opening + text[1:-1].encode())
            opening = b","
        out.append(b"]")
    else:
        out.append(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def _relative(path: Path, folder: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), folder.resolve())
    except ValueError:
        return path.name


def decide(policy: Policy, client: Client, qname: str, now: datetime) -> Decision:
    """The decision for one normalised name and one client at time `now` (timezone-aware).

    The fast path, used by the proxy addon: an index walk and a few set operations. The resolver
    runs its two steps apart (`Policy.categorize`, then `decide_categories`) to memoise the first.
    """
    if not client.allowed:
        return Decision(Action.REFUSED, client.group)
    return decide_categories(policy, client, qname, policy.categorize(qname), now)


def explain(policy: Policy, client: Client, qname: str, now: datetime) -> Decision:
    """`decide`, with the matching rule's file and line filled in (slow: may read a list file).

    For `blocker check` and the console only, never for traffic.
    """
    return replace(decide(policy, client, qname, now), rule=policy.explain(qname))


def decide_categories(policy: Policy, client: Client, qname: str, categories: frozenset[str],
                      now: datetime) -> Decision:
    """`decide` for a name whose categories are already known (the resolver's hot path)."""
    group = client.group
    if not categories:
        return Decision(Action.ALLOWED, group)
    hit = categories & policy.group_blocks.get(group, frozenset())
    if not hit:
        return Decision(Action.ALLOWED, group, categories)
    canary = qname in CANARY_NAMES
    granted = policy.exemptions.get(client.device) if client.device is not None else None
    used: list[Exemption] = []
    remaining = set(hit)
    if granted:
        for exemption in granted:
            if exemption.active(now) and remaining.intersection(exemption.allow):
                used.append(exemption)
                remaining.difference_update(exemption.allow)
    if remaining:
        first = next(c for c in policy.group_order[group] if c in remaining)
        return Decision(Action.BLOCKED, group, categories, first, canary=canary)
    # Every blocking category is granted: the answer may live no longer than the first grant to end.
    ending = min(used, key=lambda e: e.expires)
    category = next(c for c in policy.group_order[group] if c in hit)
    return Decision(Action.EXEMPTED, group, categories, category, ending,
                    (ending.expires - now).total_seconds())


def check_name(text: str) -> str:
    """Normalise a name typed by a person (for `blocker check`); raises ValueError."""
    name = normalize(text)
    if not is_valid_name(name):
        raise ValueError("labels are letters, digits, '-' or '_', 1 to 63 characters, separated by single dots")
    return name


def load_policy(path: Path | None, lists: Blocklists | None = None) -> Policy:
    """Read config and lists and compile them; raises ConfigError. `lists`, when given and loaded
    from the same folder, are used as they are (a reload whose list files did not change)."""
    from blocker.config import load_config

    config = load_config(path)
    if lists is not None and lists.folder != config.blocklists:
        lists = None
    return compile_policy(config, lists)
