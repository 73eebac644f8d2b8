"""The command line: serve, check, validate, proxy, exemptions, diff and audit; exit codes 0, 1, 2 (error).

Output to a closed pipe (`blocker validate | true`, `blocker check x | head -1`) is dropped quietly
and the command keeps its exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from blocker import __version__
from blocker.errors import BlockerError, ConfigError
from blocker.explain import build_report, find_client
from blocker.policy import Action, Policy, check_name, explain, load_policy

_DURATION = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_EXAMPLES = {
    "serve": "example:\n  blocker serve --config /etc/blocker/blocker.yaml",
    "check": "examples:\n  blocker check web.whatsapp.com --device MPS-0042 --config blocker.yaml\n"
             "  blocker check www.tiktok.com --client 10.8.0.9 --json",
    "validate": "example:\n  blocker validate --config blocker.yaml --json\n\n"
                "exit 0 when valid (warnings are printed), 1 when there are problems",
    "proxy": "example:\n  blocker proxy --config blocker.yaml -- --set confdir=/var/lib/blocker",
    "exemptions list": "example:\n  blocker exemptions list --config blocker.yaml --expiring 14d --json",
    "exemptions grant": "example:\n  blocker exemptions grant --config blocker.yaml --device MPS-0042 "
                        "--allow whatsapp --approved-by 'Insp. J. Doe' --reference CHG-2026-0042 "
                        "--reason 'Witness liaison' --for 90d --by jdoe",
    "exemptions renew": "example:\n  blocker exemptions renew --config blocker.yaml --reference CHG-2026-0042 "
                        "--for 30d --by jdoe",
    "exemptions revoke": "example:\n  blocker exemptions revoke --config blocker.yaml --reference CHG-2026-0042 "
                         "--reason 'Operation closed' --by jdoe",
    "diff": "examples:\n  blocker diff --config blocker.yaml --git HEAD~1 --names names.txt\n"
            "  blocker diff --config new/blocker.yaml --against old/blocker.yaml --json\n\n"
            "exit 0 when nothing changes for any device, 1 when something does, 2 on error",
    "console add-user": "example:\n  blocker console add-user --config blocker.yaml --role admin --role approver "
                        "--display 'Insp. J. Doe' jdoe",
    "audit verify": "examples:\n  blocker audit verify --config blocker.yaml\n"
                    "  blocker audit verify --path /var/lib/blocker/audit.jsonl\n\n"
                    "exit 0 when the chain is intact, 1 at the first broken line, 2 on error",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blocker", description="Policy-enforcing DNS resolver.")
    parser.add_argument("--version", action="version", version=f"blocker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(group: Any, name: str, help_text: str, key: str | None = None) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(
            name, help=help_text, description=help_text, epilog=_EXAMPLES[key or name],
            formatter_class=argparse.RawDescriptionHelpFormatter)
        return sub

    def config_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", type=Path, metavar="FILE",
                         help="config file (default: the embedded defaults)")

    serve = command(commands, "serve", "run the resolver and its metrics endpoint")
    config_option(serve)

    check = command(commands, "check", "explain the decision for a domain and client")
    check.add_argument("domain", help="the name to decide, e.g. web.whatsapp.com")
    who = check.add_mutually_exclusive_group()
    who.add_argument("--client", metavar="IP", help="the client's source address, e.g. 10.8.0.9")
    who.add_argument("--device", metavar="ID", help="a device id from policy.devices, e.g. MPS-0042")
    config_option(check)
    check.add_argument("--json", action="store_true", help="machine-readable output")

    validate = command(commands, "validate", "check the config, the exemptions and every list")
    config_option(validate)
    validate.add_argument("--json", action="store_true",
                          help="machine-readable output (problems, warnings, policy version)")

    proxy = command(commands, "proxy", "run mitmproxy with the blocker addon on proxy.listen")
    config_option(proxy)
    proxy.add_argument("mitmproxy_args", nargs=argparse.REMAINDER,
                       help="extra mitmdump arguments after `--` (e.g. -- --set confdir=/var/lib/blocker)")

    exemptions = command(commands, "exemptions", "list, grant, renew or revoke exemptions",
                         "exemptions list")
    actions = exemptions.add_subparsers(dest="action", required=True)
    listing = command(actions, "list", "list exemptions with their state", "exemptions list")
    config_option(listing)
    listing.add_argument("--device", metavar="ID", help="only this device's, e.g. MPS-0042")
    listing.add_argument("--expiring", nargs="?", const="", metavar="DURATION",
                         help="only those in force or pending that expire within DURATION "
                              "(e.g. 14d; without a value: policy.expiry_warning_days)")
    listing.add_argument("--state", choices=("active", "pending", "expired"), help="only in this state")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    grant = command(actions, "grant", "grant categories to a device until a date", "exemptions grant")
    config_option(grant)
    grant.add_argument("--device", required=True, metavar="ID", help="device id from policy.devices, e.g. MPS-0042")
    grant.add_argument("--allow", required=True, metavar="CATEGORY[,..]",
                       help="categories to allow, comma-separated, e.g. whatsapp,signal")
    grant.add_argument("--approved-by", required=True, metavar="NAME", help="who approved it, e.g. 'Insp. J. Doe'")
    grant.add_argument("--reference", required=True, metavar="REF", help="the unique case or change reference")
    grant.add_argument("--reason", required=True, metavar="TEXT", help="why, e.g. 'Witness liaison'")
    _expiry_options(grant)
    grant.add_argument("--starts", metavar="DATE", help="when it starts (default: now), e.g. 2026-12-01T08:00:00Z")
    grant.add_argument("--by", required=True, metavar="ACTOR", help="who runs the command (recorded), e.g. jdoe")

    renew = command(actions, "renew", "set a new expiry on an exemption", "exemptions renew")
    config_option(renew)
    renew.add_argument("--reference", required=True, metavar="REF", help="the exemption's reference")
    _expiry_options(renew)
    renew.add_argument("--by", required=True, metavar="ACTOR", help="who runs the command (recorded)")

    revoke = command(actions, "revoke", "end an exemption now (removes it from its file)", "exemptions revoke")
    config_option(revoke)
    revoke.add_argument("--reference", required=True, metavar="REF", help="the exemption's reference")
    revoke.add_argument("--reason", required=True, metavar="TEXT", help="why it ends (recorded)")
    revoke.add_argument("--by", required=True, metavar="ACTOR", help="who runs the command (recorded)")

    diff = command(commands, "diff", "what a change to config, lists or exemptions does to whom")
    diff.add_argument("--config", type=Path, metavar="FILE", required=True, help="the new config file")
    base = diff.add_mutually_exclusive_group(required=True)
    base.add_argument("--against", type=Path, metavar="FILE", help="the old config file, e.g. old/blocker.yaml")
    base.add_argument("--git", metavar="REV", help="the same config file at a git revision, e.g. HEAD~1 or main")
    diff.add_argument("--names", type=Path, metavar="FILE",
                      help="names to test, one a line: each whose decision flips for a group is listed")
    diff.add_argument("--json", action="store_true", help="machine-readable output")

    console = command(commands, "console", "the admin console's users (the console itself runs in `serve`)",
                      "console add-user")
    console_actions = console.add_subparsers(dest="action", required=True)
    add_user = command(console_actions, "add-user", "add or replace a console user (the password is read "
                       "from stdin, or asked for on a terminal)", "console add-user")
    add_user.add_argument("name", help="the login name, e.g. jdoe")
    add_user.add_argument("--role", action="append", required=True, choices=("viewer", "admin", "approver"),
                          help="viewer reads every page; admin requests changes; approver approves other "
                               "users' requests (repeat the option for several roles)")
    add_user.add_argument("--display", metavar="NAME",
                          help="the name written as approved_by, e.g. 'Insp. J. Doe' (default: the login name)")
    users_file = add_user.add_mutually_exclusive_group(required=True)
    users_file.add_argument("--config", type=Path, metavar="FILE", help="the config whose console.users to write")
    users_file.add_argument("--users", type=Path, metavar="FILE", help="the users file itself")
    add_user.add_argument("--sso-only", action="store_true",
                          help="no password: this user logs in only through console.proxy_auth")

    audit = command(commands, "audit", "check the audit trail", "audit verify")
    audit_actions = audit.add_subparsers(dest="action", required=True)
    verify = command(audit_actions, "verify", "check the hash chain of the audit trail, report the first broken line",
                     "audit verify")
    where = verify.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, metavar="FILE", help="config whose audit.path to check")
    where.add_argument("--path", type=Path, metavar="FILE", help="the trail file itself")
    return parser


def _expiry_options(sub: argparse.ArgumentParser) -> None:
    until = sub.add_mutually_exclusive_group(required=True)
    until.add_argument("--expires", metavar="DATE",
                       help="end, ISO 8601 with a zone (2026-12-31T23:59:00Z) or a day (2026-12-31: its end, UTC)")
    until.add_argument("--for", dest="duration", metavar="DURATION", help="end after this long from now, e.g. 90d")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("serve", "proxy"):
        return _run(args)  # long-running: they log to stderr and own their streams
    out = _QuietPipe(sys.stdout)
    sys.stdout = out  # type: ignore[assignment]
    try:
        code = _run(args)
    except BrokenPipeError:
        out.broken = True
        code = getattr(args, "_code", 1)
    finally:
        out.close_quietly()
        sys.stdout = out.stream
    return code


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from blocker.daemon import serve as run_server

        return run_server(args.config)
    if args.command == "check":
        return run_check(args)
    if args.command == "proxy":
        return run_proxy(args.config, [a for a in args.mitmproxy_args if a != "--"])
    if args.command == "exemptions":
        return run_exemptions(args)
    if args.command == "diff":
        return run_diff(args)
    if args.command == "audit":
        return run_audit_verify(args)
    if args.command == "console":
        from blocker.console.cli import run_add_user

        return run_add_user(args)
    return run_validate(args.config, getattr(args, "json", False))


class _QuietPipe:
    """stdout that stops writing, silently, once the reader has gone (EPIPE)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._silence()

    def _silence(self) -> None:
        self.broken = True
        try:
            # Later flushes (the interpreter's own at exit) go nowhere instead of failing.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def close_quietly(self) -> None:
        self.flush()
        if self.broken:
            self._silence()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


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
    bindings, where = None, ""
    if args.client:
        from blocker.identity import bindings_for_check

        bindings, where = bindings_for_check(policy.config.identity)
    try:
        client, identity = find_client(policy, device=args.device, address=args.client, bindings=bindings,
                                       bindings_from=where)
    except ValueError as err:
        print(f"blocker check: {err}", file=sys.stderr)
        return 2
    decision = explain(policy, client, qname, datetime.now(UTC))
    code = 0 if decision.action in (Action.ALLOWED, Action.EXEMPTED) else 1
    args._code = code  # kept if the reader of stdout goes away mid-report
    report = build_report(policy, client, qname, decision, identity)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return code


def _print_report(report: dict[str, object]) -> None:
    print(f"{report['domain']}: {str(report['action']).upper()}")
    print(f"  client:   {report['client']}  device: {report['device'] or '-'}  group: {report['group']}")
    if report.get("identity"):
        print(f"  identity: {report['identity']}")
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


def expiry_notes(policy: Policy, now: datetime) -> list[tuple[str, str]]:
    """(kind, text) for exemptions expired, pending, or expiring within policy.expiry_warning_days."""
    window = timedelta(days=policy.config.policy.expiry_warning_days)
    notes: list[tuple[str, str]] = []
    for exemption in policy.config.policy.exemptions:
        where = f"{exemption.file}:{exemption.line}"
        if exemption.expires <= now:
            notes.append(("warning", f"{where}: exemption {exemption.reference} for {exemption.device} expired on "
                                     f"{exemption.expires.isoformat()}"))
        elif exemption.starts is not None and exemption.starts > now:
            notes.append(("note", f"{where}: exemption {exemption.reference} for {exemption.device} starts on "
                                  f"{exemption.starts.isoformat()}"))
        elif exemption.expires - now <= window:
            notes.append(("warning", f"{where}: exemption {exemption.reference} for {exemption.device} expires on "
                                     f"{exemption.expires.isoformat()}, within {window.days} days"))
    return notes


def run_validate(config: Path | None, as_json: bool = False) -> int:
    try:
        policy = load_policy(config)
    except ConfigError as err:
        if as_json:
            print(json.dumps({"ok": False, "policy": None,
                              "problems": [_problem(p) for p in err.problems], "warnings": []}, indent=2))
            return 1
        for problem in err.problems:
            print(problem)
        print(f"{len(err.problems)} problem(s) found", file=sys.stderr)
        return 1
    sizes = policy.lists.index.categories_sizes()
    now = datetime.now(UTC)
    notes = expiry_notes(policy, now)
    exemption_count = len(policy.config.policy.exemptions)
    if as_json:
        print(json.dumps({
            "ok": True,
            "policy": policy.version,
            "source": policy.config.source_name,
            "problems": [],
            "warnings": [_problem(w) for w in policy.warnings],
            "notes": [{"kind": kind, "text": text} for kind, text in notes],
            "categories": {name: sizes.get(name, 0) for name in sorted(policy.lists.categories)},
            "rules": policy.lists.index.rule_count,
            "devices": len(policy.devices),
            "exemptions": exemption_count,
            "expiry_warning_days": policy.config.policy.expiry_warning_days,
        }, indent=2))
        return 0
    for name, category in sorted(policy.lists.categories.items()):
        print(f"{category.file}: category {name}: {sizes.get(name, 0)} rules")
    for warning in policy.warnings:
        print(f"{warning} (warning)")
    radius = policy.config.identity.radius_accounting
    if radius is not None:
        from blocker.radius import load_secret

        try:
            load_secret(radius.secret_file)
        except ConfigError as err:  # a warning: the secret is often mounted only where blocker runs
            print(f"{err.problems[0]} (warning: `blocker serve` will not start without it)")
    for kind, text in notes:
        print(f"{text} ({kind})")
    print(f"OK: policy {policy.version} from {policy.config.source_name}: {len(policy.lists.categories)} "
          f"categories, {policy.lists.index.rule_count} rules, {len(policy.devices)} devices, "
          f"{exemption_count} exemptions")
    return 0


def _problem(problem: object) -> dict[str, object]:
    return {"file": getattr(problem, "file", ""), "line": getattr(problem, "line", 0),
            "message": getattr(problem, "message", str(problem))}


def parse_duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `2w`; raises ValueError."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"'{text}' is not a duration like 90d, 12h, 30m or 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def parse_moment(text: str, end_of_day: bool = True) -> datetime:
    """An ISO 8601 date-time with a zone, or a day (its end, 23:59:00 UTC); raises ValueError."""
    text = text.strip()
    if re.match(r"^\d{4}-\d\d-\d\d$", text):
        day = datetime.fromisoformat(text).replace(tzinfo=UTC)
        return day.replace(hour=23, minute=59) if end_of_day else day
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"'{text}' is not an ISO 8601 date-time like 2026-12-31T23:59:00Z") from None
    if moment.tzinfo is None:
        raise ValueError(f"'{text}' needs a time zone (Z or +hh:mm)")
    return moment


def _expiry(args: argparse.Namespace, now: datetime) -> datetime:
    if args.duration is not None:
        return now + parse_duration(args.duration)
    return parse_moment(args.expires)


def run_exemptions(args: argparse.Namespace) -> int:
    from blocker import exemption_edit

    now = datetime.now(UTC)
    if args.action == "list":
        try:
            return _list_exemptions(args, now)
        except ValueError as err:
            print(f"blocker exemptions list: {err}", file=sys.stderr)
            return 2
    config = args.config
    if config is None:
        print(f"blocker exemptions {args.action}: needs --config FILE (the file to edit)", file=sys.stderr)
        return 2
    try:
        if args.action == "grant":
            exemption = exemption_edit.grant(
                config, device=args.device, allow=args.allow.split(","), approved_by=args.approved_by,
                reference=args.reference, reason=args.reason, expires=_expiry(args, now),
                starts=parse_moment(args.starts, end_of_day=False) if args.starts else None, actor=args.by,
                now=now)
            print(f"granted {exemption.reference}: {', '.join(exemption.allow)} for {exemption.device} until "
                  f"{exemption.expires.isoformat()}  ({exemption.file}:{exemption.line})")
        elif args.action == "renew":
            exemption = exemption_edit.renew(config, reference=args.reference, expires=_expiry(args, now),
                                             actor=args.by, now=now)
            print(f"renewed {exemption.reference} for {exemption.device} until {exemption.expires.isoformat()}  "
                  f"({exemption.file}:{exemption.line})")
        else:
            exemption = exemption_edit.revoke(config, reference=args.reference, reason=args.reason, actor=args.by,
                                              now=now)
            print(f"revoked {exemption.reference} for {exemption.device} (was {exemption.file}:{exemption.line})")
    except ValueError as err:
        print(f"blocker exemptions {args.action}: {err}", file=sys.stderr)
        return 2
    except BlockerError as err:
        print(f"blocker exemptions {args.action}: refused: {err}", file=sys.stderr)
        return 2
    return 0


def _list_exemptions(args: argparse.Namespace, now: datetime) -> int:
    from blocker.audit import describe, state

    try:
        policy = load_policy(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    window = None
    if args.expiring is not None:
        window = (parse_duration(args.expiring) if args.expiring
                  else timedelta(days=policy.config.policy.expiry_warning_days))
    rows = []
    for exemption in sorted(policy.config.policy.exemptions, key=lambda e: (e.expires, e.reference)):
        current = state(exemption, now)
        if args.device and exemption.device != args.device:
            continue
        if args.state and current != args.state:
            continue
        if window is not None and (current == "expired" or exemption.expires - now > window):
            continue
        rows.append({**describe(exemption), "state": current})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['reference']}  {row['device']}  {','.join(row['categories'])}  {row['state']}  "  # type: ignore[arg-type]
              f"until {row['expires']}  approved by {row['approved_by']}  {row['file']}:{row['line']}")
    print(f"{len(rows)} exemption(s)", file=sys.stderr)
    return 0


def run_diff(args: argparse.Namespace) -> int:
    from blocker import policydiff

    try:
        new = load_policy(args.config)
        names = policydiff.read_names(args.names) if args.names else []
        if args.against is not None:
            old = policydiff.load_old(args.against, new)
            result = policydiff.diff_policies(old, new, datetime.now(UTC), names)
        else:
            with policydiff.temporary_folder() as folder:
                old_config = policydiff.export_revision(args.config, args.git, Path(folder))
                old = policydiff.load_old(old_config, new)
                result = policydiff.diff_policies(old, new, datetime.now(UTC), names, old_label=args.git,
                                                  old_root=Path(folder))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except BlockerError as err:
        print(f"blocker diff: {err}", file=sys.stderr)
        return 2
    code = 1 if result.changed else 0
    args._code = code
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        for line in policydiff.render_text(result):
            print(line)
    return code


def run_audit_verify(args: argparse.Namespace) -> int:
    from blocker.audit_trail import verify
    from blocker.config import load_config

    path = args.path
    if path is None:
        try:
            path = load_config(args.config).audit.path
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 2
        if path is None:
            print(f"blocker audit verify: {args.config} sets no audit.path", file=sys.stderr)
            return 2
    if not path.exists():
        print(f"blocker audit verify: {path}: no such file", file=sys.stderr)
        return 2
    result = verify(path)
    if result.ok:
        print(f"{path}: OK, {result.reason}")
        return 0
    print(f"{path}:{result.first_bad_line}: {result.reason}")
    return 1


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
