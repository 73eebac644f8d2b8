"""`blocker diff`: what a change to the config, the lists or the exemptions does, for review.

Compares two compiled policies: per group the categories gained and lost; per category the rules
added and removed (with FILE:LINE); devices added, removed, moved between groups or readdressed;
exemptions granted, changed and revoked; decision settings; and, for a list of names, every name
whose decision flips for a group. `--git REV` compares with the same config file at a revision
(the tree is exported to a temporary folder, so the lists and exemptions file come from REV too).
"""

from __future__ import annotations

import filecmp
import io
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from blocker.audit import values
from blocker.clients import Client
from blocker.config import Exemption
from blocker.domains import InvalidName, normalize
from blocker.errors import BlockerError
from blocker.policy import Policy, decide_categories

TEXT_LIMIT = 50  # rules shown per category and direction in the text output (--json has all)

RuleKey = tuple[str, str, bool]  # (category, rule, allow)


@dataclass
class PolicyDiff:
    """Every difference between two policies; `changed` is what the exit code reports."""

    old_version: str
    new_version: str
    groups: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    rules: dict[str, dict[str, list[dict[str, object]]]] = field(default_factory=dict)
    devices: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    exemptions: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    settings: dict[str, list[object]] = field(default_factory=dict)
    names: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    blocked_categories: frozenset[str] = frozenset()

    @property
    def changed(self) -> bool:
        """Whether anything changes for some device (rules of a category no group blocks do not)."""
        rules = any(category in self.blocked_categories for category in self.rules)
        return bool(self.groups or rules or any(self.devices.values()) or any(self.exemptions.values())
                    or self.settings or any(self.names.values()))

    def as_json(self) -> dict[str, object]:
        return {
            "changed": self.changed,
            "policy": {"old": self.old_version, "new": self.new_version},
            "groups": self.groups,
            "rules": self.rules,
            "devices": self.devices,
            "exemptions": self.exemptions,
            "settings": self.settings,
            "names": self.names,
        }


def diff_policies(old: Policy, new: Policy, now: datetime, names: Iterable[str] = (),
                  old_label: str | None = None, old_root: Path | None = None) -> PolicyDiff:
    """The differences from `old` to `new`; `old_label`/`old_root` rename the old files (e.g. REV:path)."""
    result = PolicyDiff(old.version, new.version)
    result.blocked_categories = frozenset(c for p in (old, new) for g in p.config.policy.groups.values()
                                          for c in g.block)
    _groups(result, old, new)
    _rules(result, old, new, old_label, old_root)
    _devices(result, old, new)
    _exemptions(result, old.config.policy.exemptions, new.config.policy.exemptions)
    _settings(result, old, new)
    _names(result, old, new, names, now)
    return result


def _groups(result: PolicyDiff, old: Policy, new: Policy) -> None:
    before, after = old.config.policy.groups, new.config.policy.groups
    for name in sorted(set(before) | set(after)):
        was = set(before[name].block) if name in before else set()
        now = set(after[name].block) if name in after else set()
        entry: dict[str, list[str]] = {}
        if now - was:
            entry["gained"] = sorted(now - was)
        if was - now:
            entry["lost"] = sorted(was - now)
        if name not in before:
            entry["added"] = []
        if name not in after:
            entry["removed"] = []
        if entry:
            result.groups[name] = entry


def _kinds(entry: object, cache: dict[int, frozenset[tuple[str, bool]]]) -> frozenset[tuple[str, bool]]:
    # One shared entry stands for every rule of a bulk file: compute its kinds once.
    key = id(entry)
    found = cache.get(key)
    if found is None:
        found = cache[key] = frozenset((s.category, s.allow) for s in entry.sources)  # type: ignore[attr-defined]
    return found


def _rules(result: PolicyDiff, old: Policy, new: Policy, old_label: str | None, old_root: Path | None) -> None:
    """Rules added and removed per category: key-set differences of the two indexes (C speed), then
    a comparison of the names both have, and the patterns."""
    if old.lists is new.lists:
        return  # the same files (see `load_old`): no rule differs
    before, after = old.lists.index, new.lists.index
    b_exact, a_exact = before.exact_rules(), after.exact_rules()
    added: dict[RuleKey, tuple[str, int]] = {}
    removed: dict[RuleKey, tuple[str, int]] = {}
    for name in a_exact.keys() - b_exact.keys():
        for src in after.sources(name):
            added[(src.category, name, src.allow)] = (src.file, src.line)
    for name in b_exact.keys() - a_exact.keys():
        for src in before.sources(name):
            removed[(src.category, name, src.allow)] = (src.file, src.line)
    b_cache: dict[int, frozenset[tuple[str, bool]]] = {}
    a_cache: dict[int, frozenset[tuple[str, bool]]] = {}
    for name in a_exact.keys() & b_exact.keys():
        was, now = _kinds(b_exact[name], b_cache), _kinds(a_exact[name], a_cache)
        if was != now:
            for src in after.sources(name):
                if (src.category, src.allow) not in was:
                    added[(src.category, name, src.allow)] = (src.file, src.line)
            for src in before.sources(name):
                if (src.category, src.allow) not in now:
                    removed[(src.category, name, src.allow)] = (src.file, src.line)
    b_patterns = {(src.category, text, src.allow): (src.file, src.line) for text, src in before.pattern_rules()}
    a_patterns = {(src.category, text, src.allow): (src.file, src.line) for text, src in after.pattern_rules()}
    added.update({k: v for k, v in a_patterns.items() if k not in b_patterns})
    removed.update({k: v for k, v in b_patterns.items() if k not in a_patterns})
    if not added and not removed:
        return
    for direction, found, relabel in (("added", _resolve_lines(added), False),
                                      ("removed", _resolve_lines(removed), True)):
        for key in sorted(found):
            category, rule, allow = key
            file, line = found[key]
            shown = _relabel(file, old_label, old_root) if relabel else file
            result.rules.setdefault(category, {}).setdefault(direction, []).append(
                {"rule": rule, "except": allow, "file": shown, "line": line})


def _relabel(file: str, label: str | None, root: Path | None) -> str:
    if label is None or root is None:
        return file
    try:
        return f"{label}:{Path(file).relative_to(root)}"
    except ValueError:
        return file


def _resolve_lines(found: dict[RuleKey, tuple[str, int]]) -> dict[RuleKey, tuple[str, int]]:
    """Fill in the lines bulk lists do not keep: one pass over each file, whatever the count."""
    missing: dict[str, set[str]] = {}
    for (_category, rule, _allow), (file, line) in found.items():
        if line == 0:
            missing.setdefault(file, set()).add(rule)
    lines: dict[tuple[str, str], int] = {}
    for file, rules in missing.items():
        try:
            with open(file, encoding="utf-8") as text:
                for number, raw in enumerate(text, start=1):
                    plain = raw.strip().lower()
                    if plain in rules:  # the common line: one plain name
                        lines.setdefault((file, plain), number)
                        continue
                    if not any(c in plain for c in "#|^ \t."):
                        continue
                    words = plain.split("#", 1)[0].strip().rstrip(".")
                    for word in words.replace("||", " ").replace("^", " ").split():
                        if word in rules:
                            lines.setdefault((file, word), number)
        except (OSError, UnicodeDecodeError):
            continue
    return {key: (file, line or lines.get((file, key[1]), 0)) for key, (file, line) in found.items()}


def _devices(result: PolicyDiff, old: Policy, new: Policy) -> None:
    before, after = old.devices, new.devices
    was_at, now_at = old.inventory.addresses_by_device(), new.inventory.addresses_by_device()
    added = [{"id": d.id, "group": d.group, "addresses": now_at.get(k, []), "file": d.file, "line": d.line}
             for k, d in sorted(after.items()) if k not in before]
    removed = [{"id": d.id, "group": d.group, "addresses": was_at.get(k, [])}
               for k, d in sorted(before.items()) if k not in after]
    moved: list[dict[str, object]] = []
    readdressed: list[dict[str, object]] = []
    for key in sorted(set(before) & set(after)):
        was, now = before[key], after[key]
        if was.group != now.group:
            moved.append({"id": key, "from": was.group, "to": now.group, "file": now.file, "line": now.line})
        if was_at.get(key, []) != now_at.get(key, []):
            readdressed.append({"id": key, "from": was_at.get(key, []), "to": now_at.get(key, []), "file": now.file,
                                "line": now.line})
    for name, items in (("added", added), ("removed", removed), ("moved", moved), ("readdressed", readdressed)):
        if items:
            result.devices[name] = items


def _exemptions(result: PolicyDiff, old: Iterable[Exemption], new: Iterable[Exemption]) -> None:
    before = {(e.device, e.reference): e for e in old}
    after = {(e.device, e.reference): e for e in new}
    granted = [{**values(e), "file": e.file, "line": e.line} for k, e in sorted(after.items()) if k not in before]
    revoked = [values(e) for k, e in sorted(before.items()) if k not in after]
    changed: list[dict[str, object]] = []
    for key in sorted(set(before) & set(after)):
        was, now = values(before[key]), values(after[key])
        if was != now:
            changed.append({"device": key[0], "reference": key[1], "file": after[key].file, "line": after[key].line,
                            "changes": {k: [was[k], now[k]] for k in now if was[k] != now[k]}})
    for name, items in (("granted", granted), ("changed", changed), ("revoked", revoked)):
        if items:
            result.exemptions[name] = items


def _settings(result: PolicyDiff, old: Policy, new: Policy) -> None:
    a, b = old.config, new.config
    pairs: dict[str, tuple[object, object]] = {
        "policy.default_group": (a.policy.default_group, b.policy.default_group),
        "dns.block_response": (_response(a.dns.block_response), _response(b.dns.block_response)),
        "dns.block_ttl": (a.dns.block_ttl, b.dns.block_ttl),
        "dns.allow_networks": ([str(n) for n in a.dns.allow_networks], [str(n) for n in b.dns.allow_networks]),
        "dns.trusted_forwarders": ([str(n) for n in a.dns.trusted_forwarders],
                                   [str(n) for n in b.dns.trusted_forwarders]),
    }
    for name, (was, now) in pairs.items():
        if was != now:
            result.settings[name] = [was, now]


def _response(response: object) -> str:
    kind = getattr(response, "kind", "")
    addresses = [a for a in (getattr(response, "ipv4", None), getattr(response, "ipv6", None)) if a]
    return f"{kind}:{','.join(addresses)}" if addresses else str(kind)


def _names(result: PolicyDiff, old: Policy, new: Policy, names: Iterable[str], now: datetime) -> None:
    groups = sorted(set(old.config.policy.groups) | set(new.config.policy.groups))
    for text in names:
        try:
            name = normalize(text)
        except InvalidName:
            continue
        before_categories, after_categories = old.categorize(name), new.categorize(name)
        for group in groups:
            was = _action(old, group, name, before_categories, now)
            is_ = _action(new, group, name, after_categories, now)
            if was != is_:
                result.names.setdefault(group, []).append({"name": name, "old": was, "new": is_})


def _action(policy: Policy, group: str, name: str, categories: frozenset[str], now: datetime) -> str:
    if group not in policy.config.policy.groups:
        return "no group"
    decision = decide_categories(policy, Client("-", None, group, True), name, categories, now)
    return f"{decision.action.value} ({decision.category})" if decision.category else decision.action.value


def load_old(config: Path, new: Policy) -> Policy:
    """The old policy; its lists are the new ones, not compiled again, when the two lists folders
    hold the same files with the same bytes (a change of devices or exemptions only)."""
    from blocker.config import load_config
    from blocker.policy import compile_policy

    old_config = load_config(config)
    lists = new.lists if _same_tree(old_config.blocklists, new.lists.folder, new.lists.files) else None
    return compile_policy(old_config, lists)


def _same_tree(old: Path, new: Path, files: tuple[Path, ...]) -> bool:
    try:
        if any(not path.resolve().is_relative_to(new.resolve()) for path in files):
            return False  # an include outside the folder: compare by compiling
        names = sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file())
        if names != sorted(p.relative_to(old) for p in old.rglob("*") if p.is_file()):
            return False
        return all(filecmp.cmp(old / name, new / name, shallow=False) for name in names)
    except OSError:
        return False


def read_names(path: Path) -> list[str]:
    """Names to test, one a line (`#` comments and blank lines ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BlockerError(f"{path}: cannot read: {err}") from None
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def export_revision(config: Path, revision: str, into: Path) -> Path:
    """Export the git tree at `revision` into a folder; the config file's path inside it."""
    folder = config.resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel"], check=True,
                             capture_output=True, text=True).stdout.strip()
        archive = subprocess.run(["git", "-C", top, "archive", "--format=tar", revision], check=True,
                                 capture_output=True).stdout
    except FileNotFoundError:
        raise BlockerError("blocker diff --git needs git") from None
    except subprocess.CalledProcessError as err:
        message = (err.stderr.decode() if isinstance(err.stderr, bytes) else str(err.stderr)).strip()
        raise BlockerError(f"git: {message.splitlines()[-1] if message else err}") from None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / config.resolve().relative_to(Path(top).resolve())


def temporary_folder() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="blocker-diff-")


def render_text(diff: PolicyDiff) -> list[str]:
    """The diff for people, section by section."""
    out = [f"policy {diff.old_version} -> {diff.new_version}"]
    for name, entry in diff.groups.items():
        parts = []
        if "added" in entry:
            parts.append("new group")
        if "removed" in entry:
            parts.append("group removed")
        parts += [f"+{c}" for c in entry.get("gained", [])] + [f"-{c}" for c in entry.get("lost", [])]
        out.append(f"group {name}: {' '.join(parts)}")
    for category, entry in sorted(diff.rules.items()):
        added, removed = entry.get("added", []), entry.get("removed", [])
        note = "" if category in diff.blocked_categories else "  (no group blocks it)"
        out.append(f"category {category}: {len(added)} rule(s) added, {len(removed)} removed{note}")
        for sign, items in (("+", added), ("-", removed)):
            for item in items[:TEXT_LIMIT]:
                kind = " (except)" if item["except"] else ""
                out.append(f"  {sign} {item['rule']}{kind}  {item['file']}:{item['line']}")
            if len(items) > TEXT_LIMIT:
                out.append(f"  {sign} ... and {len(items) - TEXT_LIMIT} more (--json lists every one)")
    for item in diff.devices.get("added", []):
        out.append(f"device added: {item['id']} in {item['group']} {', '.join(item['addresses'])}  "  # type: ignore[arg-type]
                   f"{item['file']}:{item['line']}")
    for item in diff.devices.get("removed", []):
        out.append(f"device removed: {item['id']} (was in {item['group']})")
    for item in diff.devices.get("moved", []):
        out.append(f"device moved: {item['id']} {item['from']} -> {item['to']}  {item['file']}:{item['line']}")
    for item in diff.devices.get("readdressed", []):
        out.append(f"device readdressed: {item['id']} {', '.join(item['from'])} -> "  # type: ignore[arg-type]
                   f"{', '.join(item['to'])}")  # type: ignore[arg-type]
    for item in diff.exemptions.get("granted", []):
        out.append(f"exemption granted: {item['reference']} for {item['device']}: "
                   f"{', '.join(item['categories'])} until {item['expires']}, approved by "  # type: ignore[arg-type]
                   f"{item['approved_by']}  {item['file']}:{item['line']}")
    for item in diff.exemptions.get("changed", []):
        changes = "; ".join(f"{k} {v[0]} -> {v[1]}" for k, v in item["changes"].items())  # type: ignore[attr-defined]
        out.append(f"exemption changed: {item['reference']} for {item['device']}: {changes}  "
                   f"{item['file']}:{item['line']}")
    for item in diff.exemptions.get("revoked", []):
        out.append(f"exemption revoked: {item['reference']} for {item['device']} "
                   f"({', '.join(item['categories'])})")  # type: ignore[arg-type]
    for name, (was, now) in diff.settings.items():  # type: ignore[misc]
        out.append(f"setting {name}: {was} -> {now}")
    for group, flips in sorted(diff.names.items()):
        for flip in flips:
            out.append(f"name {flip['name']} for group {group}: {flip['old']} -> {flip['new']}")
    out.append("changes decisions: yes" if diff.changed else "no change for any device")
    return out
