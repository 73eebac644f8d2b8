"""Category lists: read `blocklists/<category>.yaml` and its `include:` files into a RuleIndex.

An included file may mix three formats line by line: plain names (`example.com`), hosts lines
(`0.0.0.0 example.com other.example`) and adblock rules (`||example.com^`, `@@||example.com^` for
an exception). Comments start with `#` (any format) or `!` (adblock).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from blocker.domains import InvalidName, RuleIndex, RuleSource, all_valid_names, is_valid_name, normalize_rule
from blocker.errors import ConfigError, Problem
from blocker.yamlfile import Collector, Reader, compose

CATEGORY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_CATEGORY_KEYS = {"name", "description", "domains", "except", "include"}
_ADBLOCK = re.compile(r"^(@@)?\|\|([^\^/$|]+)\^(\$important)?$")


@dataclass(frozen=True, slots=True)
class Category:
    """One category as loaded: its name, description and file."""

    name: str
    description: str
    file: str


@dataclass(frozen=True, slots=True)
class Blocklists:
    """Every category and the merged rule index."""

    categories: dict[str, Category]
    index: RuleIndex
    files: tuple[Path, ...]  # every category file and included file read
    folder: Path
    warnings: tuple[Problem, ...] = ()


def load_blocklists(folder: Path) -> Blocklists:
    """Load every `<category>.yaml` in a folder; raises ConfigError listing every problem."""
    problems = Collector()
    index = RuleIndex()
    categories: dict[str, Category] = {}
    files: list[Path] = []
    if not folder.is_dir():
        problems.add(str(folder), None, "blocklists folder not found")
        raise ConfigError(problems.problems)
    notes = _Notes()
    for path in sorted(folder.glob("*.yaml")):
        files.append(path)
        category = _load_category(path, index, problems, files, notes)
        if category is not None:
            categories[category.name] = category
    if not categories and not problems.problems:
        problems.add(str(folder), None, "no category files (<name>.yaml) in the blocklists folder")
    if problems.problems:
        raise ConfigError(problems.problems)
    for rule, source in notes.wildcards:
        # `*.x` covers every name under x but not x itself (a plain `x` rule covers both).
        parent = rule[2:]
        if source.category not in {s.category for s in index.lookup(parent).sources if s.allow == source.allow}:
            notes.add(source.file, source.line, f"'{rule}' does not cover '{parent}' itself; the rule "
                                                f"'{parent}' covers both")
    index.compact()
    return Blocklists(categories, index, tuple(files), folder, notes.finish())


class _Notes:
    """Warnings found while loading (duplicates at most 20 per file, then a count)."""

    LIMIT = 20

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.wildcards: list[tuple[str, RuleSource]] = []
        self._duplicates: dict[str, int] = {}

    def add(self, file: str, line: int, message: str) -> None:
        self.problems.append(Problem(file, line, message))

    def duplicate(self, file: str, line: int, rule: str, category: str) -> None:
        count = self._duplicates.get(file, 0) + 1
        self._duplicates[file] = count
        if count <= self.LIMIT:
            self.add(file, line, f"duplicate rule '{rule}' (category {category} has it already)")

    def finish(self) -> tuple[Problem, ...]:
        for file, count in self._duplicates.items():
            if count > self.LIMIT:
                self.add(file, 1, f"{count - self.LIMIT} more duplicate rules in this file")
        return tuple(self.problems)


def _load_category(path: Path, index: RuleIndex, problems: Collector, files: list[Path],
                   notes: _Notes) -> Category | None:
    file = str(path)
    read = Reader(file, problems)
    root = compose(path, problems)
    if root is None:
        if not any(p.file == file for p in problems.problems):
            problems.add(file, None, "empty category file")
        return None
    fields = read.mapping(root, "category file", _CATEGORY_KEYS)
    name_node = fields.get("name")
    if name_node is None:
        read.error(root, "category file needs 'name'")
        return None
    name = read.string(name_node, "name")
    if name is None:
        return None
    if not CATEGORY_NAME.match(name):
        read.error(name_node, f"category name '{name}' must be lower-case letters, digits, '-' or '_'")
        return None
    if name != path.stem:
        read.error(name_node, f"category name '{name}' must match the file name '{path.stem}.yaml'")
        return None
    description = ""
    if "description" in fields:
        description = read.string(fields["description"], "description") or ""
    for allow, key in ((False, "domains"), (True, "except")):
        for text, node in read.strings(fields.get(key), key):
            try:
                rule = normalize_rule(text)
            except InvalidName as err:
                read.error(node, f"{key}: {err}")
                continue
            source = RuleSource(name, file, node.start_mark.line + 1, rule, allow)
            if not index.add(rule, source):
                notes.duplicate(file, source.line, rule, name)
            elif rule.startswith("*.") and "*" not in rule[2:]:
                notes.wildcards.append((rule, source))
    for text, node in read.strings(fields.get("include"), "include"):
        included = (path.parent / text).resolve()
        if not included.is_file():
            read.error(node, f"include: file not found: {text}")
            continue
        files.append(included)
        _load_include(included, name, index, problems, notes)
    return Category(name, description, file)


_CHUNK = 1 << 20  # characters of an included file read at once
_SLICE = 512  # lines checked together: one odd line sends only its slice name by name


def _load_include(path: Path, category: str, index: RuleIndex, problems: Collector, notes: _Notes) -> None:
    file = str(path)
    bulk = RuleSource(category, file, 0, "")
    try:
        # A few megabytes at a time: a list of a million names must not sit in memory twice.
        with path.open(encoding="utf-8") as handle:
            first = 1
            for chunk in iter(lambda: handle.readlines(_CHUNK), []):
                _load_lines(chunk, first, file, category, bulk, index, problems, notes)
                first += len(chunk)
    except (OSError, UnicodeDecodeError) as err:
        problems.add(file, None, f"cannot read: {err}")


def _load_lines(chunk: list[str], first: int, file: str, category: str, bulk: RuleSource, index: RuleIndex,
                problems: Collector, notes: _Notes) -> None:
    # Plain names are by far the most common line: they are checked and added all at once, with no
    # line number kept (`blocker check` finds it again with `find_line`). Every other line (comments,
    # hosts and adblock lines, a trailing dot, bad names) goes through `_load_line`, after them.
    names = list(map(str.strip, map(str.lower, chunk)))
    plain: list[str] = []
    numbers: list[int] = []
    odd: list[int] = []
    for start in range(0, len(names), _SLICE):
        part = names[start:start + _SLICE]
        if all_valid_names(part):
            plain += part
            numbers += range(first + start, first + start + len(part))
            continue
        for offset, name in enumerate(part, start):
            if is_valid_name(name):
                plain.append(name)
                numbers.append(first + offset)
            else:
                odd.append(offset)
    duplicates = [(numbers[position], plain[position]) for position in index.add_names(plain, bulk)]
    for offset in odd:
        _load_line(chunk[offset], first + offset, file, category, bulk, index, problems, notes, duplicates)
    for number, rule in sorted(duplicates):
        notes.duplicate(file, number, rule, category)


def _load_line(raw: str, number: int, file: str, category: str, bulk: RuleSource, index: RuleIndex,
               problems: Collector, notes: _Notes, duplicates: list[tuple[int, str]]) -> None:
    line = raw.strip()
    if not line or line[0] in "#![":
        return
    if "#" in line:
        line = line.split("#", 1)[0].strip()
    name = line.lower().rstrip(".")
    if is_valid_name(name):
        if not index.add(name, bulk, keep_line=False):
            duplicates.append((number, name))
        return
    for rule_text, allow in _parse_other_line(line, file, number, problems):
        try:
            rule = normalize_rule(rule_text)
        except InvalidName as err:
            problems.add(file, None, str(err), line=number)
            continue
        source = RuleSource(category, file, number, rule, allow)
        if not index.add(rule, source):
            duplicates.append((number, rule))
        elif rule.startswith("*.") and "*" not in rule[2:]:
            notes.wildcards.append((rule, source))


def find_line(file: str, rule: str) -> int:
    """The line of an included file that holds a rule (0 if it is no longer there)."""
    try:
        with open(file, encoding="utf-8") as lines:
            for number, raw in enumerate(lines, start=1):
                if rule in raw.lower():
                    text = raw.split("#", 1)[0].strip().lower().rstrip(".")
                    fields = text.replace("||", " ").replace("^", " ").split()
                    if rule in fields:
                        return number
    except (OSError, UnicodeDecodeError):
        pass
    return 0


def _parse_other_line(line: str, file: str, number: int, problems: Collector) -> list[tuple[str, bool]]:
    if line.startswith(("||", "@@")):
        match = _ADBLOCK.match(line)
        if match is None:
            problems.add(file, None, f"unsupported adblock rule '{line}' (only ||name^ and @@||name^)",
                         line=number)
            return []
        return [(match.group(2), match.group(1) is not None)]
    fields = line.split()
    if len(fields) >= 2:
        try:
            ipaddress.ip_address(fields[0])
        except ValueError:
            pass
        else:
            # hosts format: the address is ignored; localhost entries are not rules.
            return [(host, False) for host in fields[1:]
                    if host not in ("localhost", "localhost.localdomain", "local", "broadcasthost")]
    return [(line, False)]
