"""A reload runs without the cyclic garbage collector and freezes what it loaded; collection is on
again afterwards, whether the new policy loaded or was rejected."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from conftest import standard_config

from blocker.errors import ConfigError
from blocker.policy import Policy
from blocker.source import PolicySource


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

    try:
        good, after_good, bad, after_bad = asyncio.run(run())
    finally:
        gc.unfreeze()
    assert good and after_good and len(loaded) == 1
    assert not bad and after_bad and len(rejected) == 1
