"""The garbage collector: the one strategy of the process, and the pauses it still makes (measured).

A collection stops the event loop while it walks every tracked object it looks at. What lives long
here is large: the policy (30,000 devices: ~500,000 objects), the lists' index, the answer cache
and the memo. Measured: a full collection over a fleet-size policy 47-138 ms; 38 full collections
in 120 s of a unique-name flood took 13 s together. So the collector walks only what is young:

1. Frozen, not walked. What survives is moved out of the collector's reach (`gc.freeze`) at these
   points only: at start before anything is served (`settle`: one full collection, then freeze),
   and in each forked worker for what it inherits (workers.py); at the end of every policy load,
   before the new policy is swapped in (`loading`); and after each full collection the
   interpreter runs by itself (`GcPauses`, which also times them).
2. A policy load runs with the collector off (`loading`, whatever thread builds it): its
   objects all survive, so collecting during the build would only walk them again and again.
   First the young generations are collected (cheap), so little garbage is frozen with it.
3. No full collection on the event loop after a reload: the loaded policy is frozen instead.
   A policy holds no reference cycles (tests/test_reload_gc.py), so the old one is freed by
   reference counting once the last query using it is done, frozen or not.
4. Frozen objects are freed by reference counting as usual; only garbage cycles among them wait,
   for the thaw every THAW_SECONDS (then the next full collection walks everything once).
5. Freeing is a pause too: the old policy (25 ms at fleet size, on the loop when its last
   reference goes) is freed in a thread a little at a time (`release`), so no single free holds
   the GIL long; the same for a loaded file's YAML node tree (`yamlfile.discard`, 70 ms at once).

Exported as `blocker_gc_pause_seconds{generation}` and `blocker_gc_pause_longest_seconds`.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from blocker.metrics import Histogram

THAW_SECONDS = 900.0
# Troubleshooting switch (and the soak's A/B): BLOCKER_GC_FREEZE=0 times collections without freezing.
FREEZE = os.environ.get("BLOCKER_GC_FREEZE", "1") != "0"


def settle() -> None:
    """At start, before anything is served: collect everything once, then freeze what is alive."""
    gc.collect()
    if FREEZE:
        gc.freeze()


@contextmanager
def loading() -> Iterator[None]:
    """Around one policy load: the young generations collected, then the collector off until the
    load ends; what is alive when it succeeds (the new policy with it) is frozen before the collector
    is on again. A failed load freezes nothing: its garbage (a traceback) is young and collected."""
    collecting = gc.isenabled()
    gc.collect(1)
    gc.disable()
    try:
        yield
        if FREEZE:
            gc.freeze()
    finally:
        if collecting:
            gc.enable()


_CONTAINERS = (tuple, list, dict, set, frozenset)


def release(box: list[Any], piece: int = 64) -> None:
    """Free what `box` holds, emptying it (the caller keeps no other reference), a little at a time:
    for a thread that shares the GIL with the listeners. Each object only this holds is taken
    apart first (its referents kept on a stack, so freeing it frees it alone); a large container's
    items are freed `piece` at a time with whatever small objects hang from them. Objects others
    still reference are only let go of: nothing is changed in place, shared parts stay whole."""
    hubs = list(box)
    box.clear()
    while hubs:
        item = hubs.pop()
        # 2: `item` and getrefcount's own argument. Anyone else's reference: not ours to take apart.
        if sys.getrefcount(item) > 2 or not gc.is_tracked(item):
            continue
        if isinstance(item, _CONTAINERS) and len(item) > piece:
            children = gc.get_referents(item)
            hubs.extend(c for c in children if isinstance(c, _CONTAINERS) and len(c) > piece)
            del item  # the container alone: `children` still holds its items
            while children:
                del children[-piece:]
        else:
            hubs.extend(gc.get_referents(item))


class GcPauses(Collector):
    """Times every collection and freezes what survives full ones; install once per process."""

    def __init__(self, freeze: bool = FREEZE) -> None:
        self.histograms = [Histogram() for _ in range(3)]
        self.longest = 0.0
        self.freeze = freeze
        self._started = 0.0
        self._thawed = time.monotonic()

    def install(self) -> GcPauses:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        pause = now - self._started
        generation = info.get("generation", 2)
        self.histograms[generation].observe(pause)
        if pause > self.longest:
            self.longest = pause
        if generation == 2 and self.freeze:
            if time.monotonic() - self._thawed >= THAW_SECONDS:
                gc.unfreeze()  # the next full collection walks everything once, cycles included
                self._thawed = time.monotonic()
            else:
                gc.freeze()

    def collect(self) -> Iterator[object]:
        histogram = HistogramMetricFamily("blocker_gc_pause_seconds",
                                          "Garbage collections, by generation, and how long each stopped the loop.",
                                          labels=["generation"])
        for generation, hist in enumerate(self.histograms):
            histogram.add_metric([str(generation)], hist.buckets(), hist.sum)
        yield histogram
        longest = GaugeMetricFamily("blocker_gc_pause_longest_seconds", "The longest collection pause so far.")
        longest.add_metric([], self.longest)
        yield longest
