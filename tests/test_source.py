"""The one reload path (PolicySource), in-process on real files: coalescing, list reuse, rejection,
an edit made while a reload reads, and stopping."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blocker.clients import identify
from blocker.clock import Clock
from blocker.errors import ConfigError
from blocker.policy import Action, Policy, decide
from blocker.source import PolicySource


class Owner:
    """What the daemon and the addon do with the source's outcomes: remember them."""

    def __init__(self) -> None:
        self.loaded: list[tuple[Policy, str]] = []
        self.rejected: list[tuple[ConfigError | Exception, str]] = []

    def on_loaded(self, policy: Policy, why: str, milliseconds: float) -> None:
        self.loaded.append((policy, why))

    def on_rejected(self, err: ConfigError | Exception, why: str) -> None:
        self.rejected.append((err, why))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "alpha.yaml").write_text("name: alpha\ndomains: [alpha.example]\n")
    names = "".join(f"host{i}.bulk.example\n" for i in range(100_000))  # a read that takes a while
    (lists / "bulk.txt").write_text(names)
    (lists / "bulk.yaml").write_text("name: bulk\ndomains: []\ninclude: [bulk.txt]\n")
    path = tmp_path / "blocker.yaml"
    path.write_text('blocklists: lists\ndns:\n  upstreams: ["127.0.0.1:9"]\n'
                    "policy:\n  groups:\n    standard: {block: [alpha, bulk]}\n")
    return path


def source_for(config: Path) -> tuple[PolicySource, Owner]:
    owner = Owner()
    return PolicySource(config, PolicySource.load(config), owner.on_loaded, owner.on_rejected), owner


def blocked(policy: Policy, name: str) -> bool:
    return decide(policy, identify(policy, "127.0.0.1"), name, Clock().now()).action is Action.BLOCKED


def test_reload_requests_during_a_reload_are_coalesced_into_one_more(config: Path) -> None:
    source, owner = source_for(config)

    async def main() -> list[bool]:
        return await asyncio.gather(*(source.reload(f"SIGHUP {i}") for i in range(5)))

    assert asyncio.run(main()) == [True] * 5
    assert [why for _, why in owner.loaded] == ["SIGHUP 0", "SIGHUP 0, coalesced"]


def test_lists_are_reused_when_only_the_config_changed(config: Path) -> None:
    source, _owner = source_for(config)
    first = source.policy
    config.write_text(config.read_text() + "  default_group: standard\n")
    assert source.changed()
    assert asyncio.run(source.reload("file change"))
    assert source.policy.lists is first.lists and source.policy is not first
    (config.parent / "lists" / "alpha.yaml").write_text("name: alpha\ndomains: [alpha.example, beta.example]\n")
    assert asyncio.run(source.reload("file change"))
    assert source.policy.lists is not first.lists and blocked(source.policy, "beta.example")
    assert not source.changed()


def test_a_broken_edit_is_rejected_with_file_and_line_and_the_policy_stays(config: Path) -> None:
    source, owner = source_for(config)
    first = source.policy
    config.write_text(config.read_text() + "  default_group: nobody\n")
    assert not asyncio.run(source.reload("file change"))
    assert source.policy is first and not owner.loaded
    err = owner.rejected[0][0]
    assert isinstance(err, ConfigError) and err.problems[0].file == str(config)
    assert not source.changed()  # the broken file is not retried until it changes again


def test_an_edit_while_a_reload_reads_is_not_lost(config: Path) -> None:
    source, _owner = source_for(config)
    alpha = config.parent / "lists" / "alpha.yaml"

    async def main() -> None:
        config.write_text(config.read_text() + "  default_group: standard\n")
        running = asyncio.ensure_future(source.reload("file change"))
        for _ in range(3):  # reload() starts the reload task, which takes its stats and reads in a thread
            await asyncio.sleep(0)
        alpha.write_text("name: alpha\ndomains: [alpha.example, gamma.example]\n")
        assert await running

    asyncio.run(main())
    # Whether the edit landed before or after alpha.yaml was read, it is not taken as seen.
    assert source.changed()
    assert asyncio.run(source.reload("file change"))
    assert blocked(source.policy, "gamma.example")


def test_nothing_is_swapped_in_after_close(config: Path) -> None:
    source, owner = source_for(config)

    async def main() -> bool:
        running = asyncio.ensure_future(source.reload("SIGHUP"))
        for _ in range(3):
            await asyncio.sleep(0)
        source.close()
        try:
            return await running
        except asyncio.CancelledError:
            return False

    assert asyncio.run(main()) is False
    assert not owner.loaded
    assert asyncio.run(source.reload("SIGHUP")) is False


def test_lists_changed_with_a_rejected_edit_are_read_again_by_the_next_load(config: Path) -> None:
    """A list edit and a broken config in one save: rejected. When the config is fixed, the lists
    must be read again, not reused as if the rejected load had read them."""
    source, owner = source_for(config)
    original = config.read_text()
    (config.parent / "lists" / "alpha.yaml").write_text("name: alpha\ndomains: [alpha.example, beta.example]\n")
    config.write_text(original + "typo_key: 1\n")
    assert source.changed()
    assert not asyncio.run(source.reload("edit"))
    assert owner.rejected and not source.changed()  # not retried on every poll while it stays broken
    config.write_text(original)
    assert source.changed()
    assert asyncio.run(source.reload("fixed"))
    assert blocked(source.policy, "beta.example")
