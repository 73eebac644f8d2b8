"""blocker's own log lines: one per start, reload and error, on stderr, UTC timestamps."""

from __future__ import annotations

import logging
import sys
import time


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s blocker %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger("blocker")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
