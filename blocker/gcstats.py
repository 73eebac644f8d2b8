"""Garbage-collector pauses: timed with `gc.callbacks`, and kept short by freezing survivors.

A full collection stops the event loop for as long as it takes to walk every tracked object, and
the answer cache and memo hold ~100,000 of them: measured under a unique-name flood, 38 full
collections in 120 s took 13 s together, the longest 0.7 s. What survives a full collection is
long-lived (cache and memo entries, the policy), so it is frozen (`gc.freeze`): the next full
collections walk only what came since. Frozen objects are still freed by reference counting;
only garbage cycles among them wait, for the thaw every THAW_SECONDS (one full walk then).

Exported as `blocker_gc_pause_seconds{generation}` and `blocker_gc_pause_longest_seconds`.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from blocker.metrics import Histogram

THAW_SECONDS = 900.0
# Troubleshooting switch (and the soak's A/B): BLOCKER_GC_FREEZE=0 times collections without freezing.
FREEZE = os.environ.get("BLOCKER_GC_FREEZE", "1") != "0"


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
