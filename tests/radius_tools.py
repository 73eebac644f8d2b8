"""Test tools for RADIUS accounting: real `radclient` (freeradius-utils), pyrad-built packets, and the
standalone listener `python -m blocker.radius` as a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers import ROOT, require_tool
from pyrad.packet import AcctPacket

from blocker.radius import DICTIONARY

SECRET = "i11-shared-secret"


def radclient(port: int, attributes: dict[str, str], secret: str = SECRET, code: str = "acct",
              timeout: float = 0.5, retries: int = 2, host: str = "127.0.0.1") -> bool:
    """Send one packet with the real radclient; True when the server answered (and radclient verified it)."""
    tool = require_tool("radclient")
    text = ",".join(f"{name}={value}" for name, value in attributes.items())
    done = subprocess.run([tool, "-r", str(retries), "-t", str(timeout), f"{host}:{port}", code, secret],
                          input=text, capture_output=True, text=True, timeout=30)
    if done.returncode not in (0, 1):
        raise AssertionError(f"radclient failed ({done.returncode}): {done.stderr}")
    return done.returncode == 0 and "Received Accounting-Response" in done.stdout


def acct_packet(secret: bytes = SECRET.encode(), **attributes: object) -> bytes:
    """An Accounting-Request encoded by pyrad (for crafted and bulk packets)."""
    packet = AcctPacket(secret=secret, dict=DICTIONARY)
    for name, value in attributes.items():
        packet.AddAttribute(name.replace("_", "-"), value)
    return packet.RequestPacket()


def send_from(source: str, port: int, data: bytes, wait: float = 0.3) -> bytes | None:
    """Send a datagram from a chosen loopback source; the answer or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(wait)
        sock.sendto(data, ("127.0.0.1", port))
        try:
            return sock.recv(4096)
        except TimeoutError:
            return None


class RadiusListener:
    """`python -m blocker.radius --config FILE`: prints every binding change as a JSON line."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.events: list[dict[str, object]] = []
        self.log: list[str] = []
        self.port = 0
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> RadiusListener:
        self.process = subprocess.Popen([sys.executable, "-m", "blocker.radius", "--config", str(self.config)],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})
        threading.Thread(target=self._read_events, daemon=True).start()
        threading.Thread(target=self._read_log, daemon=True).start()
        line = self.wait_for_log(r"RADIUS accounting on ")
        self.port = int(re.search(r":(\d+)$", line).group(1))  # type: ignore[union-attr]
        return self

    def _read_events(self) -> None:
        assert self.process and self.process.stdout
        for line in self.process.stdout:
            self.events.append(json.loads(line))

    def _read_log(self) -> None:
        assert self.process and self.process.stderr
        for line in self.process.stderr:
            self.log.append(line.rstrip("\n"))

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.log):
                if re.search(pattern, line):
                    return line
            if self.process and self.process.poll() is not None:
                time.sleep(0.1)
                raise AssertionError(f"listener exited ({self.process.returncode}):\n" + "\n".join(self.log))
            time.sleep(0.02)
        raise AssertionError(f"listener did not log {pattern!r}:\n" + "\n".join(self.log))

    def wait_for_events(self, count: int, timeout: float = 5.0) -> list[dict[str, object]]:
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(self.events) < count:
            time.sleep(0.02)
        return list(self.events)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(10)


class RedisServer:
    """A real redis-server on a loopback port, without persistence (a restart loses everything)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        tool = require_tool("redis-server")
        self.process = subprocess.Popen([tool, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
