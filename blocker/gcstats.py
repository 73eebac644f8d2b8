"""Garbage-collector pauses, timed with `gc.callbacks`: a full collection stops the event loop,
so its length is answer latency. Exported as `blocker_gc_pause_seconds{generation}` and the
longest pause seen."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from blocker.metrics import Histogram


class GcPauses(Collector):
    """Times every collection; install once per process, register with the metrics registry."""

    def __init__(self) -> None:
        self.histograms = [Histogram() for _ in range(3)]
        self.longest = 0.0
        self._started = 0.0

    def install(self) -> GcPauses:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.histograms[info.get("generation", 2)].observe(pause)
        if pause > self.longest:
            self.longest = pause

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
