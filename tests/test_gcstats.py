"""GC pauses are timed per generation, and what survives a full collection is frozen, so the next
full collection walks only what came since (in-process: this is the interpreter's own GC)."""

from __future__ import annotations

import gc

from blocker.gcstats import GcPauses


def test_full_collections_are_timed_and_their_survivors_frozen() -> None:
    pauses = GcPauses().install()
    gc.unfreeze()
    try:
        survivors = [[i] for i in range(200_000)]  # tracked, long-lived: like cache and memo entries
        gc.collect()
        # Frozen: the next full collection does not walk them again (how much faster that is, is
        # for a benchmark to say, not a test on a shared machine).
        assert gc.get_freeze_count() >= len(survivors)
        gc.collect()
        counts = pauses.histograms[2].counts
        assert sum(counts) >= 2 and pauses.longest > 0
        families = {family.name: family for family in pauses.collect()}  # type: ignore[attr-defined]
        assert {"blocker_gc_pause_seconds", "blocker_gc_pause_longest_seconds"} <= set(families)
        del survivors
    finally:
        pauses.uninstall()
        gc.unfreeze()
