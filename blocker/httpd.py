"""The HTTP endpoint for operations: /metrics (Prometheus), /healthz (alive), /readyz (serving).

Each connection gets a thread and REQUEST_TIMEOUT seconds per read or write: a client that opens
a connection and sends nothing (or reads nothing) is dropped, and a scrape behind it still gets in.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

REQUEST_TIMEOUT = 5.0
ACCEPT_QUEUE = 128  # the listen backlog (socketserver's default is 5)


class OpsServer:
    """A small threaded HTTP server beside the event loop: a slow scrape never delays DNS."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, ready: Callable[[], bool],
                 timeout: float = REQUEST_TIMEOUT) -> None:
        handler = _handler(registry, ready, timeout)
        server_class = type("Server", (ThreadingHTTPServer,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
            "daemon_threads": True,
            "request_queue_size": ACCEPT_QUEUE,
        })
        self.server = server_class((host, port), handler)
        self.address = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, name="blocker-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(registry: CollectorRegistry, ready: Callable[[], bool],
             request_timeout: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = request_timeout  # socketserver sets it on the connection's socket

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, encoder(registry), content_type)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            elif path == "/readyz":
                if ready():
                    self._send(200, b"ready\n", "text/plain; charset=utf-8")
                else:
                    self._send(503, b"not ready\n", "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per start/reload/error only; scrapes are not logged

    return Handler
