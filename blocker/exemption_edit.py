"""Granting, renewing and revoking exemptions: edits of the file that holds them, checked and recorded.

Owns the `blocker exemptions grant|renew|revoke` logic (the CLI and the admin console call it). Each
edit round-trips the YAML with ruamel.yaml, so comments, order, quoting and layout survive and the
rest of the file stays byte for byte; the whole resulting policy (config, exemptions and every list)
is compiled before anything is written; the file is replaced atomically (temp file in the same
folder, fsync, rename) so a running server never reads half a file; and with `audit.path` set the
event is appended to the trail, under the trail's lock, with the actor who asked.
"""

from __future__ import annotations

import fcntl
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.tokens import CommentToken
from ruamel.yaml.util import load_yaml_guess_indent

from blocker.audit import make_event, record_event, state, values
from blocker.audit_trail import AuditTrail
from blocker.config import Config, Exemption, load_config
from blocker.errors import ConfigError, ExemptionEditError
from blocker.policy import compile_policy


def timestamp_text(moment: datetime) -> str:
    """The form written to the file: ISO 8601 in UTC with a Z (2026-12-31T23:59:00Z)."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def grant(config_path: Path, *, device: str, allow: list[str], approved_by: str, reference: str, reason: str,
          expires: datetime, starts: datetime | None = None, actor: str,
          now: datetime | None = None) -> Exemption:
    """Add an exemption; refuses an unknown device, a used reference, a past expiry or a missing field."""
    now = now or datetime.now(UTC)
    config = _load(config_path)
    _need(actor=actor, approved_by=approved_by, reference=reference, reason=reason, device=device)
    categories = [c.strip() for c in allow if c.strip()]
    if not categories:
        raise ExemptionEditError("--allow needs at least one category")
    if device not in {d.id for d in config.policy.devices}:
        raise ExemptionEditError(f"unknown device '{device}' (not in policy.devices of {config.source_name})")
    used = [e for e in config.policy.exemptions if e.reference == reference]
    if used:
        raise ExemptionEditError(f"reference {reference} is already used by the exemption at "
                                 f"{used[0].file}:{used[0].line}")
    _aware(expires, "expires")
    if expires <= now:
        raise ExemptionEditError(f"expiry {timestamp_text(expires)} is in the past")
    if starts is not None:
        _aware(starts, "starts")
        if starts >= expires:
            raise ExemptionEditError("--starts must be before the expiry")
    target = config.policy.exemptions_file or config_path
    document = _Document(target, in_config=target == config_path)
    entry = CommentedMap()
    entry["device"] = device
    entry["allow"] = document.list_like(categories)
    entry["approved_by"] = approved_by
    entry["reference"] = reference
    entry["reason"] = reason
    if starts is not None:
        entry["starts"] = timestamp_text(starts)
    entry["expires"] = timestamp_text(expires)
    document.append(entry)
    new = _commit(config_path, config, document, reference, device)

    def event(version: str) -> dict[str, object]:
        return make_event("grant", actor, None, values(new), state(new, now), version, new)
    _write(config, document, event, config_path)
    return new


def renew(config_path: Path, *, reference: str, expires: datetime, actor: str,
          now: datetime | None = None) -> Exemption:
    """Set a new expiry on the exemption with this reference (later or earlier, but not past)."""
    now = now or datetime.now(UTC)
    config = _load(config_path)
    _need(actor=actor, reference=reference)
    old = _find(config, reference)
    _aware(expires, "expires")
    if expires <= now:
        raise ExemptionEditError(f"expiry {timestamp_text(expires)} is in the past")
    if old.starts is not None and expires <= old.starts:
        raise ExemptionEditError(f"expiry {timestamp_text(expires)} is before the exemption starts "
                                 f"({timestamp_text(old.starts)})")
    document = _Document(Path(old.file), in_config=old.file == str(config_path))
    item = document.item_at(old.line)
    item["expires"] = timestamp_text(expires)
    new = _commit(config_path, config, document, reference, old.device)

    def event(version: str) -> dict[str, object]:
        return make_event("renew", actor, values(old), values(new), state(new, now), version, new)
    _write(config, document, event, config_path)
    return new


def revoke(config_path: Path, *, reference: str, reason: str, actor: str,
           now: datetime | None = None) -> Exemption:
    """Remove the exemption with this reference from its file; the trail keeps it, with the reason."""
    now = now or datetime.now(UTC)
    config = _load(config_path)
    _need(actor=actor, reference=reference, reason=reason)
    old = _find(config, reference)
    document = _Document(Path(old.file), in_config=old.file == str(config_path))
    document.remove(old.line)
    try:
        policy = compile_policy(load_config(config_path, {document.path: document.text()}))
    except ConfigError as err:
        raise ExemptionEditError(f"the change would break the policy: {err.problems[0]}") from None
    if any(e.reference == reference for e in policy.config.policy.exemptions):
        raise ExemptionEditError(f"exemption {reference} is still in the policy after the edit")

    def event(version: str) -> dict[str, object]:
        return make_event("revoke", actor, values(old), None, "revoked", version, reason=reason)
    _write(config, document, event, config_path, policy.version)
    return old


def _load(config_path: Path) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as err:
        raise ExemptionEditError(f"the policy has problems already, fix them first: {err.problems[0]}") from None


def _need(**fields: str) -> None:
    for name, value in fields.items():
        if not value or not value.strip():
            flag = {"actor": "by"}.get(name, name).replace("_", "-")
            raise ExemptionEditError(f"--{flag} is required and must not be empty")


def _aware(moment: datetime, what: str) -> None:
    if moment.tzinfo is None:
        raise ExemptionEditError(f"{what} needs a time zone (e.g. 2026-12-31T23:59:00Z)")


def _find(config: Config, reference: str) -> Exemption:
    found = [e for e in config.policy.exemptions if e.reference == reference]
    if not found:
        raise ExemptionEditError(f"no exemption has reference {reference}")
    if len(found) > 1:
        raise ExemptionEditError(f"reference {reference} is used {len(found)} times "
                                 f"({', '.join(f'{e.file}:{e.line}' for e in found)}): edit the file by hand")
    return found[0]


def _commit(config_path: Path, config: Config, document: _Document, reference: str, device: str) -> Exemption:
    """Compile the policy the edit gives (nothing is written yet); the edited exemption as loaded."""
    try:
        policy = compile_policy(load_config(config_path, {document.path: document.text()}))
    except ConfigError as err:
        raise ExemptionEditError(f"the change would break the policy: {err.problems[0]}") from None
    document.version = policy.version
    for exemption in policy.config.policy.exemptions:
        if exemption.reference == reference and exemption.device == device:
            return exemption
    raise ExemptionEditError(f"exemption {reference} is not in the policy after the edit")


def _write(config: Config, document: _Document, event: Any, config_path: Path, version: str | None = None) -> None:
    trail = AuditTrail(config.audit.path) if config.audit.path is not None else None
    with trail.locked() if trail is not None else nullcontext(), _file_lock(document.path):
        # Two edits at once: the second finds the file replaced under it and refuses.
        if document.changed_on_disk():
            raise ExemptionEditError(f"{document.path} changed while editing it: run the command again")
        atomic_write(document.path, document.text())
        if trail is not None:
            record_event(trail, event(version or document.version))


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on the file being replaced (held until the new one is in place)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    """Replace a file's content at once: temp file in the same folder, fsync, rename (mode kept)."""
    folder = path.parent
    temp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    try:
        with temp.open("w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


@dataclass
class _Slot:
    """Where ruamel keeps the comment that follows a node's last line: ca.items[key][position]."""

    items: dict[Any, list[Any]]
    key: Any
    position: int


class _Document:
    """One YAML file loaded for a round-trip edit of its exemptions list."""

    def __init__(self, path: Path, in_config: bool) -> None:
        self.path = path
        self.in_config = in_config
        self.version = ""
        try:
            self.original = path.read_text(encoding="utf-8")
            self._stat = _signature(path)
        except FileNotFoundError:
            self.original, self._stat = "", None
        except OSError as err:
            raise ExemptionEditError(f"cannot read {path}: {err.strerror or err}") from None
        try:
            _, indent, offset = load_yaml_guess_indent(self.original) if self.original.strip() else (None, 4, 2)
        except YAMLError as err:
            raise ExemptionEditError(f"{path}: not valid YAML: {err}") from None
        yaml = YAML()
        yaml.preserve_quotes = True
        yaml.width = 100_000  # never fold a long reason onto two lines
        indent = indent or 2
        offset = offset or 0
        yaml.indent(mapping=max(indent - offset, 2) if offset else indent, sequence=indent, offset=offset)
        self.yaml = yaml
        self.root = yaml.load(self.original) if self.original.strip() else CommentedMap()
        if self.root is None:
            self.root = CommentedMap()
        if not isinstance(self.root, CommentedMap):
            raise ExemptionEditError(f"{path}: the file must be a mapping")

    def changed_on_disk(self) -> bool:
        try:
            return _signature(self.path) != self._stat
        except FileNotFoundError:
            return self._stat is not None

    def _sequence(self, create: bool) -> CommentedSeq:
        return self._holder_and_sequence(create)[1]

    def _holder_and_sequence(self, create: bool) -> tuple[CommentedMap, CommentedSeq]:
        holder = self.root
        if self.in_config:
            holder = holder.get("policy")
            if holder is None:
                if not create:
                    raise ExemptionEditError(f"{self.path}: no policy section")
                holder = self.root["policy"] = CommentedMap()
        seq = holder.get("exemptions")
        if seq is None:
            if not create:
                raise ExemptionEditError(f"{self.path}: no exemptions list")
            seq = holder["exemptions"] = CommentedSeq()
        if not isinstance(seq, CommentedSeq):
            raise ExemptionEditError(f"{self.path}: exemptions must be a list")
        return holder, seq

    def list_like(self, values: list[str]) -> CommentedSeq:
        """A list of categories in the style the file already uses (flow `[a, b]` or block)."""
        seq = CommentedSeq(values)
        existing = [item.get("allow") for item in self._sequence(create=True) if isinstance(item, CommentedMap)]
        if not existing or any(isinstance(a, CommentedSeq) and a.fa.flow_style() for a in existing[-1:]):
            seq.fa.set_flow_style()
        return seq

    def append(self, entry: CommentedMap) -> None:
        seq = self._sequence(create=True)
        if seq.fa.flow_style():
            seq.fa.set_block_style()
        if len(seq):
            # Blank lines between entries as the file has them; what followed the last entry
            # (a closing comment) follows the new one.
            separator = "\n" * (len(_peek_tail(seq[-2])) - len(_peek_tail(seq[-2]).lstrip("\n"))) \
                if len(seq) > 1 else ""
            rest = _take_tail(seq[-1])
            if separator:
                _set_tail(seq[-1], separator)
            if rest:
                _set_tail(entry, rest)
        seq.append(entry)

    def _index_at(self, line: int) -> int:
        seq = self._sequence(create=False)
        for index, item in enumerate(seq):
            if isinstance(item, CommentedMap) and item.lc.line + 1 == line:
                return index
        raise ExemptionEditError(f"{self.path}:{line}: no exemption starts on this line")

    def item_at(self, line: int) -> CommentedMap:
        return self._sequence(create=False)[self._index_at(line)]  # type: ignore[no-any-return]

    def remove(self, line: int) -> None:
        holder, seq = self._holder_and_sequence(create=False)
        index = self._index_at(line)
        rest = _take_tail(seq[index])
        if index == 0 and not rest.strip():
            rest = ""  # the first entry goes with the blank lines after it
        if len(seq) == 1:
            # The list becomes `exemptions: []`; the comments above its entry stay below that line.
            comment = seq.ca.comment
            above = comment[1] if comment and len(comment) > 1 and comment[1] else []
            before = "".join(" " * t.column + t.value for t in above)
            seq.ca.comment = None
            seq.fa.set_flow_style()
            holder.ca.items["exemptions"] = [None, None, CommentToken("\n" + before + rest, _mark(), None), None]
        elif index > 0:
            # The entry goes with the blank lines before it; comments around it stay.
            before = _take_tail(seq[index - 1])
            if before.strip():
                rest = before + rest.lstrip("\n")
            if rest:
                _set_tail(seq[index - 1], rest)
        elif rest:
            _prepend_comment(seq, rest)
        del seq[index]

    def text(self) -> str:
        out = io.StringIO()
        self.yaml.dump(self.root, out)
        return out.getvalue()


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


def _mark() -> Any:
    from ruamel.yaml.error import CommentMark

    return CommentMark(0)


def _tail_slot(node: Any) -> _Slot | None:
    """The comment slot after a node's last line (descending into its last block child)."""
    if isinstance(node, CommentedMap) and len(node):
        key = list(node.keys())[-1]
        child = node[key]
        if isinstance(child, CommentedMap | CommentedSeq) and len(child) and not child.fa.flow_style():
            return _tail_slot(child)
        return _Slot(node.ca.items, key, 2)
    if isinstance(node, CommentedSeq) and len(node):
        child = node[-1]
        if isinstance(child, CommentedMap | CommentedSeq) and len(child) and not child.fa.flow_style():
            return _tail_slot(child)
        return _Slot(node.ca.items, len(node) - 1, 0)
    return None


def _peek_tail(node: Any) -> str:
    """What follows a node's last line, left in place."""
    slot = _tail_slot(node)
    tokens = slot.items.get(slot.key) if slot is not None else None
    if not tokens or tokens[slot.position] is None:  # type: ignore[union-attr]
        return ""
    return str(tokens[slot.position].value).partition("\n")[2]  # type: ignore[union-attr]


def _set_tail(node: Any, rest: str) -> None:
    """Put text after a node's last line (after that line's own end and inline comment)."""
    slot = _tail_slot(node)
    if slot is None:
        return
    tokens = slot.items.setdefault(slot.key, [None, None, None, None])
    while len(tokens) <= slot.position:
        tokens.append(None)
    current = tokens[slot.position]
    head = str(current.value).partition("\n")[0] + "\n" if current is not None else "\n"
    tokens[slot.position] = CommentToken(head + rest, _mark(), None)


def _take_tail(node: Any) -> str:
    """Detach what follows a node's last line (keeping that line's own end and inline comment)."""
    slot = _tail_slot(node)
    if slot is None:
        return ""
    tokens = slot.items.get(slot.key)
    if not tokens or tokens[slot.position] is None:
        return ""
    token = tokens[slot.position]
    value = token.value
    head, newline, rest = value.partition("\n")
    if not newline or not rest:
        return ""
    token.value = head + newline
    return str(rest)


def _prepend_comment(seq: CommentedSeq, rest: str) -> None:
    """Put text before a sequence's (new) first item: the comment slot of the list itself."""
    comment = seq.ca.comment
    if comment is None:
        seq.ca.comment = [None, [CommentToken(rest, _mark(), None)]]
        return
    while len(comment) < 2:
        comment.append(None)
    tokens = comment[1] or []
    comment[1] = [*tokens, CommentToken(rest, _mark(), None)]
