"""The GC strategy of gcstats, in-process (it is the interpreter's own collector): a reload runs
without the cyclic collector and freezes what it loaded; collection is on again afterwards, whether
the new policy loaded or was rejected; the daemon runs no full collection on the loop after a
reload; a policy holds no reference cycles, so the old one is freed by reference counting (in
pieces, off the loop); a YAML tree and the policy version's JSON are handled in pieces too."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml
from conftest import standard_config

from blocker import gcstats
from blocker.daemon import Daemon
from blocker.errors import ConfigError
from blocker.policy import Policy, _canonical_json, load_policy
from blocker.source import PolicySource
from blocker.yamlfile import Collector, compose, discard


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    """Each test starts and ends with nothing frozen and the collector on, as it found it."""
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.enable()


def fleet_policy(count: int = 300) -> str:
    """A policy snippet with `count` devices (some exempted) and an inventory-style spread of groups."""
    devices = "".join(f'    - {{id: MPS-{i:04d}, addresses: ["10.1.{i >> 8}.{i & 255}"], '
                      f'group: {"comms-team" if i % 10 == 0 else "standard"}}}\n' for i in range(count))
    exemptions = "".join(f'    - {{device: MPS-{i:04d}, allow: [tiktok], expires: "2099-06-01T00:00:00Z", '
                         f'approved_by: "Insp. Example", reference: "CASE-{i}", reason: "test"}}\n'
                         for i in range(0, count, 7))
    return f"policy:\n  devices:\n{devices}  exemptions:\n{exemptions}"


def test_collection_resumes_after_a_good_and_a_broken_reload(tmp_path: Path) -> None:
    config = standard_config(tmp_path, ["127.0.0.1:53"])
    loaded: list[Policy] = []
    rejected: list[object] = []

    def on_rejected(err: ConfigError | Exception, why: str) -> None:
        rejected.append(err)

    async def run() -> tuple[bool, bool, bool, bool]:
        source = PolicySource(config, PolicySource.load(config), lambda p, why, ms: loaded.append(p), on_rejected)
        frozen = gc.get_freeze_count()
        good = await source.reload("test")
        after_good = gc.isenabled() and gc.get_freeze_count() > frozen
        config.write_text(config.read_text() + "dns: {}\n")  # a duplicate key: rejected
        bad = await source.reload("test")
        return good, after_good, bad, gc.isenabled()

    good, after_good, bad, after_bad = asyncio.run(run())
    assert good and after_good and len(loaded) == 1
    assert not bad and after_bad and len(rejected) == 1
    # Frozen: out of the collector's lists, so no collection walks the new policy.
    tracked = {id(o) for o in gc.get_objects()}
    assert id(loaded[0]) not in tracked and id(loaded[0].devices) not in tracked


def test_a_policy_makes_no_cyclic_garbage_and_is_freed_by_reference_counting(tmp_path: Path) -> None:
    config = standard_config(tmp_path, ["127.0.0.1:53"], policy=fleet_policy())
    gc.collect()
    gc.disable()
    policy = load_policy(config)
    assert gc.collect() == 0  # the load left no cycles behind
    address = weakref.ref(policy.config.policy.devices[0].addresses[0])
    gc.disable()
    del policy
    assert address() is None  # freed with the collector off: by reference counting alone
    assert gc.collect() == 0


def test_a_reload_runs_no_full_collection_and_frees_the_old_policy(tmp_path: Path) -> None:
    config = standard_config(tmp_path, ["127.0.0.1:53"], policy=fleet_policy())
    full: list[int] = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    async def run() -> tuple[bool, weakref.ref[Any]]:
        daemon = Daemon(config, PolicySource.load(config))
        assert await daemon.reload("test")  # the daemon keeps the config it started with: not this one
        old = weakref.ref(daemon.policy.config.policy.devices[0].addresses[0])
        config.write_text(config.read_text().replace("CASE-7", "CASE-7b"))  # an edit: a real diff, an event
        thresholds = gc.get_threshold()
        gc.set_threshold(10**9)  # only explicit collections now: the interpreter starts none by itself
        gc.callbacks.append(count)
        try:
            ok = await daemon.reload("test")
        finally:
            gc.callbacks.remove(count)
            gc.set_threshold(*thresholds)
        daemon.upstreams.close()
        return ok, old

    ok, old = asyncio.run(run())
    assert ok and full == []
    assert old() is None  # the old policy is gone by the time the reload is done


class Leaf:
    """A small object that notes, when it is freed, how many lines `release` had run by then."""

    freed: list[int] = []
    lines = [0]

    def __del__(self) -> None:
        Leaf.freed.append(Leaf.lines[0])


def test_release_frees_in_pieces_and_leaves_shared_parts_whole() -> None:
    shared = [Leaf() for _ in range(3)]
    private = {"big": tuple(Leaf() for _ in range(5000)), "rows": [[Leaf(), Leaf()] for _ in range(2000)],
               "shared": shared, "table": {i: Leaf() for i in range(3000)}}
    probe = weakref.ref(private["rows"][0][0])
    box: list[Any] = [private]
    del private
    Leaf.freed, Leaf.lines = [], [0]

    def trace(frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code is gcstats.release.__code__:
            if event == "line":
                Leaf.lines[0] += 1
            return trace
        return None

    sys.settrace(trace)
    try:
        gcstats.release(box, piece=100)
    finally:
        sys.settrace(None)
    assert box == [] and probe() is None
    assert len(Leaf.freed) == 5000 + 4000 + 3000
    # Leaves freed between the same two lines of `release` were freed by one statement: at most a piece
    # of a container's items with what hangs from each (a row: two leaves), never a whole container.
    per_statement: dict[int, int] = {}
    for line in Leaf.freed:
        per_statement[line] = per_statement.get(line, 0) + 1
    assert max(per_statement.values()) <= 2 * 100 and len(per_statement) >= 12000 // 200
    assert len(shared) == 3 and all(isinstance(leaf, Leaf) for leaf in shared)


def test_discard_empties_a_yaml_tree_in_pieces(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("shared: &tags [a, b]\ntop:\n  items:\n"
                    + "".join(f"    - {{id: {i}, tags: *tags}}\n" for i in range(3000)))  # aliases: one node, shared
    root = compose(path, Collector())
    assert isinstance(root, yaml.MappingNode)
    items = root.value[1][1].value[0][1]
    first = weakref.ref(items.value[0])
    assert len(items.value) == 3000
    discard(root, piece=100)
    assert root.value == [] and items.value == [] and first() is None


def test_the_policy_version_is_encoded_in_pieces_to_the_same_bytes() -> None:
    rng = random.Random(7)

    def value(depth: int = 0) -> object:
        pick = rng.random()
        if depth > 3 or pick < 0.3:
            return rng.choice([0, 17, "x", "é", None, True, 2.5, [], {}])
        if pick < 0.65:
            return [value(depth + 1) for _ in range(rng.choice([0, 1, 3, 9, 25]))]
        return {rng.choice("abcdefgh"): value(depth + 1) for _ in range(rng.choice([0, 1, 4]))}

    for _ in range(300):
        settings = {"devices": [value() for _ in range(rng.choice([0, 1, 8, 40]))], "z": value(), "a": value()}
        whole = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
        pieces: list[bytes] = []
        _canonical_json(settings, pieces, piece=4)
        assert b"".join(pieces) == whole, settings
