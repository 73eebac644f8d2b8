"""The admin console in the browser: server-rendered pages on their own listen address.

`auth` owns users, passwords, sessions, CSRF tokens and login throttling; `approvals` the
four-eyes requests; `querysearch` reading the query log; `app` the pages and the HTTP server
that `blocker serve` starts when `console.enabled` is true.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("blocker")


def start_console(daemon: Any, settings: Any) -> Any:
    """Start the console beside a running daemon; None (logged) when it cannot start."""
    try:
        from blocker.console.app import start_console as start
    except ImportError as err:
        log.error("the console needs the console extra (Jinja2, argon2-cffi): pip install 'blocker[console]' (%s)",
                  err)
        return None
    return start(daemon, settings)
