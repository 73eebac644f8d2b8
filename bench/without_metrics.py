"""Run `blocker` with every hot-path counter replaced by a no-op: the bench's baseline for the cost of metrics."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blocker import metrics
from blocker.cli import main


def _nothing(*_args: object, **_kwargs: object) -> None:
    return None


for name in ("answered", "exempt", "bad_packet", "upstream"):
    setattr(metrics.Stats, name, _nothing)
metrics.Histogram.observe = _nothing  # type: ignore[method-assign]
# Left on: the answer memo's two in-place increments of pre-bound counter cells (list[0] += 1).

sys.exit(main())
