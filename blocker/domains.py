"""Domain names: normalisation, and the rule index that finds the most specific rule for a name.

A rule `d` covers `d` and every name under it. A pattern rule has `*` inside one or more labels
(`whatsapp-cdn-shv-*.fbcdn.net`); `*` stands for any run of characters inside one label. The most
specific rule wins: the one covering the most labels of the name; at equal depth an exact rule
beats a pattern; at the same rule an `except` (allow) beats a block. The index is built once; a
lookup walks the name's suffixes, so its cost depends on the name, not on the number of rules.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
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


_NAME_CHARS = str.maketrans("", "", "abcdefghijklmnopqrstuvwxyz0123456789_-.")


def all_valid_names(names: list[str]) -> bool:
    """Whether `is_valid_name` holds for every one of these names, checked on them all at once.

    A few passes of C string methods over the names joined by dots instead of a regex per name
    (the regex was most of the time a million-name list took to load): every label of every name
    has only name characters, is not empty and neither starts nor ends with `-`. False may also
    mean "not sure" (a name longer than 63 characters): the caller then checks name by name.
    """
    if not names:
        return True
    text = ".".join(names)
    if not text or text.translate(_NAME_CHARS) or text[0] in ".-" or text[-1] in ".-":
        return False
    if ".." in text or ".-" in text or "-." in text:
        return False
    return max(map(len, names)) <= 63  # then no label is longer than 63 either


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


class CompactNames:
    """A read-only set of ASCII names (bytes) in flat buffers, for the plain names of a list file.

    A set of bytes costs a slot and an object per name, about 100 bytes; here a name costs its
    characters and a newline in one bytes blob, and 16 bytes of an open-addressing table (two 4-byte
    arrays of twice as many slots as names): under 40 bytes a name, and nothing for the garbage
    collector to walk. A slot holds where a name starts in the blob and 32 bits of its hash above
    the slot index (most other names are told apart by them alone); a match is checked on the bytes.
    """

    __slots__ = ("_blob", "_count", "_filter", "_filter_mask", "_mask", "_starts", "_tags")

    def __init__(self, names: Collection[bytes]) -> None:
        self._count = len(names)
        size = 1 << max(3, (2 * self._count).bit_length())
        self._mask = mask = size - 1
        self._blob = b"\n".join(names) + b"\n"
        tags = self._tags = array("I", bytes(4 * size))
        starts = self._starts = array("I", bytes(4 * size))
        # A byte per 4 slots' worth of hash values, set where a name's hash falls: a lookup of a name
        # not held (most lookups: every suffix of every name asked) ends there 9 times in 10.
        seen = self._filter = bytearray(4 * size)
        self._filter_mask = filter_mask = 4 * size - 1
        # 1-based: 0 marks an empty slot.
        for code, start in zip(map(hash, names), accumulate(map((1).__add__, map(len, names)), initial=1),
                               strict=False):
            tag = code >> 32 & 0xFFFFFFFF
            seen[tag & filter_mask] = 1
            slot = code & mask
            while starts[slot]:
                slot = (slot + 1) & mask
            starts[slot] = start
            tags[slot] = tag

    def deepest(self, name: bytes) -> int:
        """The length of the longest suffix of `name` (itself, or from after one of its dots) held
        here, or 0: one call per name, the probe written out, for a lookup walking every suffix."""
        mask, starts, tags, blob = self._mask, self._starts, self._tags, self._blob
        seen, filter_mask = self._filter, self._filter_mask
        begin = 0
        while True:
            suffix = name[begin:] if begin else name
            code = hash(suffix)
            tag = code >> 32 & 0xFFFFFFFF
            slot = code & mask if seen[tag & filter_mask] else -1
            while slot >= 0:
                start = starts[slot]
                if not start:
                    break
                if tags[slot] == tag and blob.startswith(suffix, start - 1) and blob[start - 1 + len(suffix)] == 10:
                    return len(suffix)
                slot = (slot + 1) & mask
            begin = name.find(b".", begin) + 1
            if not begin:
                return 0

    def __contains__(self, name: object) -> bool:
        return isinstance(name, bytes) and bool(name) and self.deepest(name) == len(name)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._blob.split(b"\n")[:-1])


def _deepest(names: set[bytes], name: bytes) -> int:
    """CompactNames.deepest for a set (a bulk list still loading)."""
    start = 0
    while True:
        if name[start:] in names:
            return len(name) - start
        start = name.find(b".", start) + 1
        if not start:
            return 0


NO_MATCH = Match(frozenset(), False, "", 0, ())
_EMPTY: frozenset[str] = frozenset()


class RuleIndex:
    """Every rule of every category, compiled for lookups that do not grow with the rule count."""

    def __init__(self) -> None:
        # Fixed rules by name. Values are shared entries: many rules of one list point to one entry
        # (the line is kept per rule in `_lines`).
        self._exact: dict[str, RuleEntry] = {}
        # The plain names of included list files, one set per shared entry (file), as ASCII bytes,
        # made CompactNames once every list is loaded (`compact`): a million-name list then costs
        # under 40 MB, where a dict of str cost 110 (bench/bench.py). A name is in `_exact` or in
        # one bulk set, never in two: a name listed again elsewhere moves to `_exact` (merged entry).
        self._bulk: list[tuple[set[bytes] | CompactNames, RuleEntry]] = []
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
        if current is None and self._bulk:
            current = self._unbulk(rule)
        if current is not None and any(s.category == source.category and s.allow == source.allow
                                       for s in current.sources):
            return False  # a duplicate (for `validate`): nothing to add
        self.rule_count += 1
        if current is None:
            self._exact[rule] = self._shared_entry(source)
            if keep_line:
                self._lines[rule] = source.line
            return True
        # A second rule for the same name (another category, or an except): give it its own entry.
        sources = self._sources_of(rule, current)
        self._exact[rule] = self._merge(current, sources, source)
        self._lines.pop(rule, None)
        return True

    def _unbulk(self, rule: str) -> RuleEntry | None:
        """Move a name out of its bulk set into `_exact` (it is about to get a second rule)."""
        if not rule.isascii():
            return None
        key = rule.encode("ascii")
        for position, (names, entry) in enumerate(self._bulk):
            if key in names:
                if isinstance(names, CompactNames):  # a rule added after `compact`: rare, so simple
                    names = set(names)
                    self._bulk[position] = (names, entry)
                names.discard(key)
                self._exact[rule] = entry
                return entry
        return None

    def compact(self) -> None:
        """Every rule is in: store the bulk names compactly (see CompactNames)."""
        self._bulk = [(names if isinstance(names, CompactNames) else CompactNames(names), entry)
                      for names, entry in self._bulk if names]

    def add_names(self, names: list[str], source: RuleSource) -> list[int]:
        """Add many plain normalised names of one list file at once, without their lines.

        The same as `add(name, source, keep_line=False)` for each in turn, but with the set work
        done in C: a million-name list loads in a fraction of the time. Returns the positions in
        `names` of the duplicates (where `add` would have returned False), in order.
        """
        entry = self._shared_entry(source)
        position = next((i for i, (_names, shared) in enumerate(self._bulk) if shared is entry), None)
        if position is None:
            bulk: set[bytes] = set()
            self._bulk.append((bulk, entry))
        else:
            found = self._bulk[position][0]
            bulk = found if isinstance(found, set) else set(found)
            self._bulk[position] = (bulk, entry)
        # Plain names are ASCII (all_valid_names): one join, one encode and one split make the bytes.
        keys = "\n".join(names).encode("ascii").split(b"\n") if names else []
        fresh = set(keys)
        duplicates: list[int] = []
        if len(fresh) != len(keys):  # a name twice in this batch: the later ones are duplicates
            seen: set[bytes] = set()
            for position, key in enumerate(keys):
                if key in seen:
                    duplicates.append(position)
                else:
                    seen.add(key)
        # Names this file listed before, in an earlier batch: duplicates too.
        again = fresh & bulk if bulk else set()
        if again:
            fresh -= again
            first_again: set[bytes] = set()
            for position, key in enumerate(keys):
                if key in again and key not in first_again:
                    first_again.add(key)
                    duplicates.append(position)
        # Names with a rule elsewhere (a category's own list, another file): the merging path, one by one.
        exact = self._exact
        if len(exact) < len(fresh):
            clashes = {key for key in map(str.encode, exact) if key in fresh}
        else:
            clashes = {key for key in fresh if key.decode("ascii") in exact}
        for other, _entry in self._bulk:
            if other is not bulk:
                clashes |= {key for key in fresh if key in other} if isinstance(other, CompactNames) else other & fresh
        fresh -= clashes
        bulk |= fresh
        self.rule_count += len(fresh)
        if clashes:
            first: dict[bytes, int] = {}
            for position, key in enumerate(keys):
                if key in clashes and key not in first:
                    first[key] = position
            for key in clashes:
                if not self.add(key.decode("ascii"), source, keep_line=False):
                    duplicates.append(first[key])
        duplicates.sort()
        return duplicates

    def _shared_entry(self, source: RuleSource) -> RuleEntry:
        """The one entry standing for every rule of one list file (category, file, allow)."""
        key = (source.category, source.file, source.allow)
        shared = self._shared.get(key)
        if shared is None:
            shared = RuleEntry(frozenset((source.category,)), source.allow,
                               [RuleSource(source.category, source.file, 0, "", source.allow)], shared=True)
            self._shared[key] = shared
        return shared

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
        # The deepest bulk rule, found first: one call per bulk file rather than a probe per suffix.
        bulk_length, bulk_entry = 0, None
        if self._bulk:
            key = name.encode("latin-1", "replace")  # a wire name is latin-1: a byte per character
            for names, shared in self._bulk:
                found = names.deepest(key) if isinstance(names, CompactNames) else _deepest(names, key)
                if found > bulk_length:
                    bulk_length, bulk_entry = found, shared
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
                if entry is None and len(suffix) == bulk_length:
                    entry = bulk_entry
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
        if not any(names for names, _entry in self._bulk):
            return MappingProxyType(self._exact)
        rules = dict(self._exact)
        for names, entry in self._bulk:
            rules.update(dict.fromkeys(b"\n".join(names).decode("ascii").split("\n"), entry) if names else {})
        return MappingProxyType(rules)

    def _entry(self, rule: str) -> RuleEntry | None:
        entry = self._exact.get(rule)
        if entry is None and self._bulk and rule.isascii():
            key = rule.encode("ascii")
            entry = next((shared for names, shared in self._bulk if key in names), None)
        return entry

    def sources(self, rule: str) -> list[RuleSource]:
        """Where a fixed rule is written (line 0 when a bulk list did not keep it: `find_line`)."""
        entry = self._entry(rule)
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
        for names, entry in self._bulk:
            for src in entry.sources:
                sizes[src.category] = sizes.get(src.category, 0) + len(names)
        for bucket in self._patterns.values():
            for pattern in bucket:
                for src in pattern.entry.sources:
                    sizes[src.category] = sizes.get(src.category, 0) + 1
        return sizes
