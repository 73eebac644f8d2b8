"""Domain names: normalisation, and the rule index that finds the most specific rule for a name.

A rule `d` covers `d` and every name under it. A pattern rule has `*` inside one or more labels
(`whatsapp-cdn-shv-*.fbcdn.net`); `*` stands for any run of characters inside one label. The most
specific rule wins: the one covering the most labels of the name; at equal depth an exact rule
beats a pattern; at the same rule an `except` (allow) beats a block. The index is built once; a
lookup walks the name's suffixes, so its cost depends on the name, not on the number of rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NAME = re.compile(r"^(?:(?!-)[a-z0-9_-]{1,63}(?<!-)\.)*(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_PATTERN_LABEL = re.compile(r"^[a-z0-9_*-]{1,63}$")


class InvalidName(ValueError):
    """A text that is not a valid domain name or pattern."""


def normalize(name: str) -> str:
    """Lower-case, drop a trailing dot, encode IDNA labels as punycode; raises InvalidName."""
    text = name.strip().rstrip(".").lower()
    if not text:
        raise InvalidName("empty name")
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError as err:
            raise InvalidName(f"not a valid internationalised name: {err}") from None
    if len(text) > 253:
        raise InvalidName("name longer than 253 characters")
    return text


def normalize_rule(text: str) -> str:
    """Normalise a rule (a name, or a pattern with `*`); raises InvalidName when malformed."""
    if "*" not in text:
        name = normalize(text)
        if not _NAME.match(name):
            raise InvalidName(f"'{text}' is not a valid domain name")
        return name
    pattern = text.strip().rstrip(".").lower()
    labels = pattern.split(".")
    if len(labels) < 2 or not all(_PATTERN_LABEL.match(label) for label in labels):
        raise InvalidName(f"'{text}' is not a valid pattern (`*` stands for part of one label)")
    if "*" in labels[-1]:
        raise InvalidName(f"'{text}': a pattern needs a fixed top-level label")
    if "**" in pattern:
        raise InvalidName(f"'{text}': '**' is not allowed, `*` already matches any run of characters")
    return pattern


def is_valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


@dataclass(frozen=True, slots=True)
class RuleSource:
    """Where a rule was written: its category, file, line and text."""

    category: str
    file: str
    line: int
    text: str
    allow: bool = False


@dataclass(slots=True)
class RuleEntry:
    """What one rule key means once every list is merged: categories and whether it allows."""

    categories: frozenset[str]
    allow: bool
    sources: list[RuleSource] = field(default_factory=list)
    # One shared entry stands for every rule of one list file: its source names the file only.
    shared: bool = False


@dataclass(frozen=True, slots=True)
class Match:
    """The most specific rule for a name: the categories it puts the name in, or an allow."""

    categories: frozenset[str]
    allow: bool
    rule: str
    depth: int
    sources: tuple[RuleSource, ...]


@dataclass(slots=True)
class _Pattern:
    regex: re.Pattern[str]
    extra_labels: int
    entry: RuleEntry
    text: str


NO_MATCH = Match(frozenset(), False, "", 0, ())
_EMPTY: frozenset[str] = frozenset()


class RuleIndex:
    """Every rule of every category, compiled for lookups that do not grow with the rule count."""

    def __init__(self) -> None:
        # Fixed rules by name. Values are shared entries: many rules of one list point to one entry,
        # which keeps a million-name list small in memory (the line is kept per rule in `_lines`).
        self._exact: dict[str, RuleEntry] = {}
        self._lines: dict[str, int] = {}
        self._patterns: dict[str, list[_Pattern]] = {}
        self._shared: dict[tuple[str, str, bool], RuleEntry] = {}
        self.rule_count = 0

    def add(self, rule: str, source: RuleSource, keep_line: bool = True) -> bool:
        """Add a normalised rule (see `normalize_rule`); False when the category already has it.

        `keep_line=False` saves memory for bulk lists: the rule's line is then found on demand.
        """
        if "*" in rule:
            return self._add_pattern(rule, source)
        current = self._exact.get(rule)
        if current is not None and any(s.category == source.category and s.allow == source.allow
                                       for s in current.sources):
            return False  # a duplicate (for `validate`): nothing to add
        self.rule_count += 1
        if current is None:
            key = (source.category, source.file, source.allow)
            shared = self._shared.get(key)
            if shared is None:
                shared = RuleEntry(frozenset((source.category,)), source.allow,
                                   [RuleSource(source.category, source.file, 0, "", source.allow)], shared=True)
                self._shared[key] = shared
            self._exact[rule] = shared
            if keep_line:
                self._lines[rule] = source.line
            return True
        # A second rule for the same name (another category, or an except): give it its own entry.
        sources = self._sources_of(rule, current)
        self._exact[rule] = self._merge(current, sources, source)
        self._lines.pop(rule, None)
        return True

    def _sources_of(self, rule: str, entry: RuleEntry) -> list[RuleSource]:
        if not entry.shared:
            return list(entry.sources)
        src = entry.sources[0]
        return [RuleSource(src.category, src.file, self._lines.get(rule, 0), rule, src.allow)]

    @staticmethod
    def _merge(current: RuleEntry, sources: list[RuleSource], new: RuleSource) -> RuleEntry:
        merged = [*sources, new]
        allow = current.allow or new.allow
        return RuleEntry(frozenset(s.category for s in merged), allow, merged)

    def _add_pattern(self, rule: str, source: RuleSource) -> bool:
        labels = rule.split(".")
        last_wild = max(i for i, label in enumerate(labels) if "*" in label)
        anchor = ".".join(labels[last_wild + 1:])
        lead = labels[: last_wild + 1]
        regex = re.compile(r"\.".join(re.escape(label).replace(r"\*", "[a-z0-9_-]*") for label in lead) + r"\Z")
        bucket = self._patterns.setdefault(anchor, [])
        for existing in bucket:
            if existing.text == rule:
                if any(s.category == source.category and s.allow == source.allow for s in existing.entry.sources):
                    return False
                self.rule_count += 1
                existing.entry = self._merge(existing.entry, list(existing.entry.sources), source)
                return True
        self.rule_count += 1
        entry = RuleEntry(frozenset((source.category,)), source.allow, [source])
        bucket.append(_Pattern(regex, len(lead), entry, rule))
        return True

    def lookup(self, name: str) -> Match:
        """The most specific rule covering a normalised name, with its sources, or NO_MATCH."""
        entry, rule, depth = self._find(name)
        if entry is None:
            return NO_MATCH
        sources = tuple(self._sources_of(rule, entry))
        categories = frozenset() if entry.allow else entry.categories
        return Match(categories, entry.allow, rule, depth, sources)

    def classify(self, name: str) -> frozenset[str]:
        """The categories of a normalised name (empty when unlisted or allowed by an except)."""
        entry = self._find(name)[0]
        if entry is None or entry.allow:
            return _EMPTY
        return entry.categories

    def _find(self, name: str) -> tuple[RuleEntry | None, str, int]:
        exact = self._exact
        patterns = self._patterns
        labels_total = name.count(".") + 1
        best: RuleEntry | None = None
        best_rule = ""
        best_key = (0, 0)
        suffix = name
        depth = labels_total
        # Longest suffix first, so the first fixed rule found is the deepest one.
        while True:
            if best is None or best_key[1] == 0:
                entry = exact.get(suffix)
                if entry is not None and (depth, 1) > best_key:
                    best, best_rule, best_key = entry, suffix, (depth, 1)
            if patterns:
                bucket = patterns.get(suffix)
                if bucket is not None:
                    best, best_rule, best_key = self._try_patterns(
                        bucket, name, suffix, depth, labels_total, best, best_rule, best_key)
            dot = suffix.find(".")
            if dot < 0:
                break
            suffix = suffix[dot + 1:]
            depth -= 1
        return best, best_rule, best_key[0]

    @staticmethod
    def _try_patterns(bucket: list[_Pattern], name: str, anchor: str, anchor_depth: int,
                      labels_total: int, best: RuleEntry | None, best_rule: str,
                      best_key: tuple[int, int]) -> tuple[RuleEntry | None, str, tuple[int, int]]:
        head_labels = name[: len(name) - len(anchor) - 1].split(".")
        for pattern in bucket:
            depth = anchor_depth + pattern.extra_labels
            if depth > labels_total or (depth, 0) < best_key:
                continue
            tail = ".".join(head_labels[len(head_labels) - pattern.extra_labels:])
            if pattern.regex.match(tail) is None:
                continue
            if (depth, 0) == best_key and best is not None:
                # Two patterns of the same depth match: the name belongs to both.
                best = RuleEntry(best.categories | pattern.entry.categories,
                                 best.allow or pattern.entry.allow,
                                 [*best.sources, *pattern.entry.sources])
                best_rule = f"{best_rule}, {pattern.text}"
            else:
                best, best_rule, best_key = pattern.entry, pattern.text, (depth, 0)
        return best, best_rule, best_key

    def exact_rules(self) -> Mapping[str, RuleEntry]:
        """The fixed rules by name, read-only (`blocker diff` compares two indexes' key sets)."""
        return MappingProxyType(self._exact)

    def sources(self, rule: str) -> list[RuleSource]:
        """Where a fixed rule is written (line 0 when a bulk list did not keep it: `find_line`)."""
        entry = self._exact.get(rule)
        return self._sources_of(rule, entry) if entry is not None else []

    def pattern_rules(self) -> Iterator[tuple[str, RuleSource]]:
        """Every pattern rule with each of its sources."""
        for bucket in self._patterns.values():
            for pattern in bucket:
                for src in pattern.entry.sources:
                    yield pattern.text, src

    def categories_sizes(self) -> dict[str, int]:
        """Number of rules per category (for `validate` and metrics)."""
        sizes: dict[str, int] = {}
        for entry in self._exact.values():
            for src in entry.sources:
                sizes[src.category] = sizes.get(src.category, 0) + 1
        for bucket in self._patterns.values():
            for pattern in bucket:
                for src in pattern.entry.sources:
                    sizes[src.category] = sizes.get(src.category, 0) + 1
        return sizes
