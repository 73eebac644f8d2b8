"""The command line: `serve`, `check` and `validate`, with exit codes 0 (allowed/clean), 1, 2 (error)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from blocker import __version__
from blocker.clients import Client, identify
from blocker.errors import ConfigError
from blocker.policy import Action, Decision, Policy, check_name, explain, load_policy

EXPIRY_WARNING = timedelta(days=14)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blocker", description="Policy-enforcing DNS resolver.")
    parser.add_argument("--version", action="version", version=f"blocker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the resolver and its metrics endpoint")
    serve.add_argument("--config", type=Path, help="config file (default: embedded defaults)")

    check = commands.add_parser("check", help="explain the decision for a domain and client")
    check.add_argument("domain")
    who = check.add_mutually_exclusive_group()
    who.add_argument("--client", help="the client's source address")
    who.add_argument("--device", help="a device id from policy.devices")
    check.add_argument("--config", type=Path)
    check.add_argument("--json", action="store_true", help="machine-readable output")

    validate = commands.add_parser("validate", help="check the config and every list")
    validate.add_argument("--config", type=Path)

    proxy = commands.add_parser("proxy", help="run mitmproxy with the blocker addon on proxy.listen")
    proxy.add_argument("--config", type=Path)
    proxy.add_argument("mitmproxy_args", nargs=argparse.REMAINDER,
                       help="extra mitmdump arguments after `--` (e.g. -- --set confdir=/var/lib/blocker)")

    args = parser.parse_args(argv)
    if args.command == "serve":
        from blocker.daemon import serve as run_server

        return run_server(args.config)
    if args.command == "check":
        return run_check(args)
    if args.command == "proxy":
        return run_proxy(args.config, [a for a in args.mitmproxy_args if a != "--"])
    return run_validate(args.config)


def run_check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        qname = check_name(args.domain)
    except ValueError as err:
        print(f"blocker check: '{args.domain}' is not a domain name: {err}", file=sys.stderr)
        return 2
    if args.device:
        device = policy.devices.get(args.device)
        if device is None:
            print(f"blocker check: unknown device '{args.device}'", file=sys.stderr)
            return 2
        addresses = policy.inventory.addresses_of(device)
        client = Client(addresses[0] if addresses else "-", device.id, device.group, True, "inventory", device)
    elif args.client:
        from blocker.identity import bindings_for_check

        bindings, where = bindings_for_check(policy.config.identity)
        client = identify(policy, args.client, bindings=bindings)
        if client.origin == "binding":
            known = "" if client.device in policy.devices else "; device not in the inventory"
            client = replace(client, note=f"{where}{known}")
        if client.address == args.client and not _is_ip(args.client):
            print(f"blocker check: '{args.client}' is not an IP address", file=sys.stderr)
            return 2
    else:
        client = Client("-", None, policy.config.policy.default_group, True)
    decision = explain(policy, client, qname, datetime.now(UTC))
    report = _report(policy, client, qname, decision)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0 if decision.action in (Action.ALLOWED, Action.EXEMPTED) else 1


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _report(policy: Policy, client: Client, qname: str, decision: Decision) -> dict[str, object]:
    match = decision.rule or policy.explain(qname)
    report: dict[str, object] = {
        "domain": qname,
        "action": decision.action.value,
        "client": client.address,
        "device": client.device,
        "identity": {"origin": client.origin, "detail": client.detail},
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


def _print_report(report: dict[str, object]) -> None:
    print(f"{report['domain']}: {str(report['action']).upper()}")
    print(f"  client:   {report['client']}  device: {report['device'] or '-'}  group: {report['group']}")
    identity = report["identity"]
    assert isinstance(identity, dict)
    origin = {"binding": "binding from", "inventory": "inventory", "default": "default group (no binding, no device)"}
    print(f"  identity: {origin[identity['origin']]} {identity['detail']}".rstrip())
    if report["categories"]:
        print(f"  category: {report['category'] or '-'}  (name is in: {', '.join(report['categories'])})")  # type: ignore[arg-type]
    rule = report["rule"]
    if isinstance(rule, dict):
        kind = "except (allows)" if rule["allow"] else "rule"
        for source in rule["sources"]:
            print(f"  {kind}:     {rule['rule']}  [{source['category']}]  {source['file']}:{source['line']}")
    else:
        print("  rule:     none (the name is in no category)")
    exemption = report["exemption"]
    if isinstance(exemption, dict):
        print(f"  exemption: {exemption['reference']} allows {', '.join(exemption['allow'])} for "
              f"{exemption['device']}; approved by {exemption['approved_by']}; reason: {exemption['reason']}; "
              f"expires {exemption['expires']}  ({exemption['file']}:{exemption['line']})")
    if "note" in report:
        print(f"  note:     {report['note']}")
    print(f"  policy:   {report['policy']}")


def run_validate(config: Path | None) -> int:
    try:
        policy = load_policy(config)
    except ConfigError as err:
        for problem in err.problems:
            print(problem)
        print(f"{len(err.problems)} problem(s) found", file=sys.stderr)
        return 1
    sizes = policy.lists.index.categories_sizes()
    for name, category in sorted(policy.lists.categories.items()):
        print(f"{category.file}: category {name}: {sizes.get(name, 0)} rules")
    now = datetime.now(UTC)
    for warning in policy.warnings:
        print(f"{warning} (warning)")
    radius = policy.config.identity.radius_accounting
    if radius is not None:
        from blocker.radius import load_secret

        try:
            load_secret(radius.secret_file)
        except ConfigError as err:  # a warning: the secret is often mounted only where blocker runs
            print(f"{err.problems[0]} (warning: `blocker serve` will not start without it)")
    for items in policy.exemptions.values():
        for exemption in items:
            where = f"{exemption.file}:{exemption.line}"
            if exemption.expires <= now:
                print(f"{where}: exemption {exemption.reference} for {exemption.device} expired on "
                      f"{exemption.expires.isoformat()} (warning)")
            elif exemption.starts is not None and exemption.starts > now:
                print(f"{where}: exemption {exemption.reference} for {exemption.device} starts on "
                      f"{exemption.starts.isoformat()} (note)")
            elif exemption.expires - now <= EXPIRY_WARNING:
                print(f"{where}: exemption {exemption.reference} for {exemption.device} expires on "
                      f"{exemption.expires.isoformat()}, within 14 days (warning)")
    print(f"OK: policy {policy.version} from {policy.config.source_name}: {len(policy.lists.categories)} "
          f"categories, {policy.lists.index.rule_count} rules, {len(policy.devices)} devices, "
          f"{sum(len(v) for v in policy.exemptions.values())} exemptions")
    return 0


def run_proxy(config: Path | None, extra: list[str]) -> int:
    """Run mitmdump with the addon, on proxy.listen in proxy.mode (needs the `proxy` extra)."""
    try:
        from mitmproxy.tools.main import mitmdump
    except ImportError:
        print("blocker proxy needs mitmproxy: pip install 'blocker[proxy]'", file=sys.stderr)
        return 2
    from blocker import mitm_addon
    from blocker.config import load_config
    from blocker.yamlfile import format_endpoint

    try:
        settings = load_config(config).proxy
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    listen = format_endpoint(*settings.listen)
    arguments = ["--quiet", "-s", str(Path(mitm_addon.__file__)), "--mode", f"{settings.mode}@{listen}",
                 "--set", "block_global=false", "--set", "connection_strategy=lazy"]
    if config is not None:
        arguments += ["--set", f"blocker_config={config.resolve()}"]
    mitmdump([*arguments, *extra])
    return 0
