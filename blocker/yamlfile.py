"""Strict YAML reading: every value keeps its line, duplicate keys and YAML 1.1 traps are errors.

PyYAML silently keeps the last of two duplicate keys and reads `yes`, `on` and `0755` as a
boolean and an octal number. A policy file must not be weakened by a typo, so values are read
from the node tree with explicit expectations instead of `safe_load`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from blocker.errors import Problem

try:
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml missing
    _Loader = yaml.SafeLoader

_BOOL_TAG = "tag:yaml.org,2002:bool"
_NULL_TAG = "tag:yaml.org,2002:null"
_INT_TAG = "tag:yaml.org,2002:int"
_STR_TAG = "tag:yaml.org,2002:str"
_PLAIN_INT = re.compile(r"^(0|[1-9][0-9]*)$")
_PLAIN_FLOAT = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)$")


class Collector:
    """Gathers problems found while reading one or more files."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, file: str, node: yaml.Node | None, message: str, line: int | None = None) -> None:
        if line is None:
            line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(Problem(file, line, message))


def compose(path: Path, problems: Collector, text: str | None = None) -> yaml.Node | None:
    """Parse a YAML file (or `text` standing in for its content) into a node tree; syntax errors become problems."""
    try:
        if text is None:
            text = path.read_text(encoding="utf-8")
    except OSError as err:
        problems.add(str(path), None, f"cannot read: {err.strerror or err}")
        return None
    except UnicodeDecodeError as err:
        problems.add(str(path), None, f"not UTF-8 text: {err.reason}")
        return None
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else 1
        problems.add(str(path), None, f"YAML syntax: {err.problem or err}", line=line)
    except yaml.YAMLError as err:
        problems.add(str(path), None, f"YAML syntax: {err}")
    return None


def discard(root: yaml.Node | None, piece: int = 50) -> None:
    """Free a node tree a little at a time (a long list of nodes `piece` entries at a time, each with
    what hangs from it): freed at once, a fleet-size file's tree (~1 million objects, 70 ms) would
    hold the GIL against the listeners while a reload reads it in a thread. Empties every node."""
    stack = [root] if root is not None and not isinstance(root, yaml.ScalarNode) else []
    while stack:
        node = stack.pop()
        children = node.value
        node.value = []
        if len(children) <= piece:
            for child in children:  # a mapping's entries are (key, value) pairs
                if isinstance(child, tuple):
                    stack.extend(c for c in child if not isinstance(c, yaml.ScalarNode))
                elif not isinstance(child, yaml.ScalarNode):
                    stack.append(child)
            continue
        while children:
            del children[-piece:]


class Reader:
    """Typed access to the nodes of one file, recording problems instead of raising."""

    def __init__(self, file: str, problems: Collector) -> None:
        self.file = file
        self.problems = problems

    def error(self, node: yaml.Node | None, message: str) -> None:
        self.problems.add(self.file, node, message)

    def mapping(self, node: yaml.Node | None, where: str, allowed: set[str]) -> dict[str, yaml.Node]:
        """A mapping's entries by key; unknown and duplicate keys are problems."""
        if node is None or _is_null(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{where} must be a mapping")
            return {}
        entries: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                self.error(key_node, f"{where}: keys must be plain names")
                continue
            if key in entries:
                self.error(key_node, f"{where}: duplicate key '{key}'")
                continue
            if allowed and key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.error(key_node, f"{where}: unknown key '{key}' (expected one of: {hint})")
                continue
            entries[key] = value_node
        return entries

    def free_mapping(self, node: yaml.Node | None, where: str) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
        """Entries of a mapping whose keys are names chosen by the user (e.g. group names)."""
        if node is None or _is_null(node):
            return
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{where} must be a mapping")
            return
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = self.string(key_node, f"{where} key")
            if key is None:
                continue
            if key in seen:
                self.error(key_node, f"{where}: duplicate key '{key}'")
                continue
            seen.add(key)
            yield key, key_node, value_node

    def sequence(self, node: yaml.Node | None, where: str) -> list[yaml.Node]:
        if node is None or _is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{where} must be a list")
            return []
        return list(node.value)

    def string(self, node: yaml.Node, where: str) -> str | None:
        """A string; an unquoted yes/no/on/off/null is refused rather than turned into a bool."""
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, f"{where} must be a string")
            return None
        if (node.style is None or node.style == "") and node.tag in (_BOOL_TAG, _NULL_TAG):
            self.error(node, f"{where}: '{node.value}' reads as a YAML boolean or null; quote it")
            return None
        # An unquoted 000123 stays the text 000123 (not the octal number 83).
        return node.value

    def strings(self, node: yaml.Node | None, where: str) -> list[tuple[str, yaml.Node]]:
        out = []
        for item in self.sequence(node, where):
            value = self.string(item, f"{where} entry")
            if value is not None:
                out.append((value, item))
        return out

    def integer(self, node: yaml.Node, where: str, minimum: int = 0, maximum: int | None = None) -> int | None:
        """A plain decimal integer; `0755`, `1_000` and `0x10` are refused."""
        if not isinstance(node, yaml.ScalarNode) or node.tag not in (_INT_TAG, _STR_TAG) \
                or not _PLAIN_INT.match(node.value):
            self.error(node, f"{where} must be a whole number written in decimal, got '{_show(node)}'")
            return None
        value = int(node.value)
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and {maximum}" if maximum is not None else ""
            self.error(node, f"{where} must be between {minimum}{upper}, got {value}")
            return None
        return value

    def number(self, node: yaml.Node, where: str, minimum: float = 0.0) -> float | None:
        if not isinstance(node, yaml.ScalarNode) or not _PLAIN_FLOAT.match(node.value):
            self.error(node, f"{where} must be a number, got '{_show(node)}'")
            return None
        value = float(node.value)
        if value < minimum:
            self.error(node, f"{where} must be at least {minimum}, got {value}")
            return None
        return value

    def boolean(self, node: yaml.Node, where: str) -> bool | None:
        """Only `true` and `false`: YAML 1.1's yes/no/on/off are refused as ambiguous."""
        if isinstance(node, yaml.ScalarNode) and node.value in ("true", "false"):
            return node.value == "true"
        self.error(node, f"{where} must be true or false, got '{_show(node)}'")
        return None

    def timestamp(self, node: yaml.Node, where: str) -> datetime | None:
        """An ISO 8601 date-time with a time zone (e.g. 2026-12-31T23:59:00Z)."""
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, f"{where} must be a date-time")
            return None
        try:
            value = datetime.fromisoformat(node.value.strip())
        except ValueError:
            self.error(node, f"{where} must be an ISO 8601 date-time like 2026-12-31T23:59:00Z, "
                             f"got '{node.value}'")
            return None
        if value.tzinfo is None:
            self.error(node, f"{where} needs a time zone (Z or +hh:mm), got '{node.value}'")
            return None
        return value

    def endpoint(self, node: yaml.Node, where: str, allow_zero_port: bool = True) -> tuple[str, int] | None:
        """`host:port`, IPv6 as `[::1]:53`; the host must be an IP address."""
        text = self.string(node, where)
        if text is None:
            return None
        parsed = parse_endpoint(text)
        if parsed is None:
            self.error(node, f"{where} must be IP:PORT (IPv6 as [::1]:53), got '{text}'")
            return None
        if parsed[1] == 0 and not allow_zero_port:
            self.error(node, f"{where}: port 0 is not allowed here")
            return None
        return parsed

    def network(self, node: yaml.Node, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        text = self.string(node, where)
        if text is None:
            return None
        try:
            return ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            self.error(node, f"{where} must be an IP address or CIDR, got '{text}'")
            return None


def parse_endpoint(text: str) -> tuple[str, int] | None:
    """Split `1.2.3.4:53` or `[::1]:53` into host and port; None if malformed."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            return None
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, int(port)


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG and node.value in ("", "~", "null")


def _show(node: yaml.Node) -> Any:
    return node.value if isinstance(node, yaml.ScalarNode) else type(node).__name__
