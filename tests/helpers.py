"""Test helpers that run real processes: Knot DNS as the upstream, and `blocker serve` itself."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import dns.exception
import dns.message
import dns.query
import dns.rcode

ROOT = Path(__file__).resolve().parent.parent
ZONES = Path(__file__).resolve().parent / "zones"


def require_tool(name: str) -> str:
    """The path of a tool the tests need; a missing tool fails the test (never a silent skip)."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        raise AssertionError(f"{name} is not installed: run .ci/run (it installs the test tools)")
    return path


@contextlib.contextmanager
def network_namespace(tag: str) -> Iterator[tuple[str, ...]]:
    """A fresh network namespace with only loopback up, for the test's life: yields the command
    prefix that runs a program inside it."""
    ip = require_tool("ip")
    name = f"{tag}{uuid.uuid4().hex[:6]}"
    subprocess.run([ip, "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        subprocess.run([ip, "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True, timeout=30)
        yield (ip, "netns", "exec", name)
    finally:
        subprocess.run([ip, "netns", "delete", name], capture_output=True, timeout=30)


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> T:
    """Call `check` until it returns a truthy value, which is returned; an AssertionError or OSError
    it raises counts as "not yet". After `timeout` seconds, fail with the last reason."""
    end = time.monotonic() + timeout
    last: object = "returned a false value"
    while True:
        try:
            result = check()
            if result:
                return result
            last = f"returned {result!r}"
        except (AssertionError, OSError, dns.exception.Timeout) as err:  # not Exited: that is final
            last = err
        if time.monotonic() >= end:
            raise AssertionError(f"{what or getattr(check, '__name__', 'check')} not true within {timeout}s: {last}")
        time.sleep(interval)


def wait_for_dns(port: int, name: str, deadline: float = 10.0, host: str = "127.0.0.1") -> None:
    def answers() -> bool:
        dns.query.udp(dns.message.make_query(name, "SOA"), host, port=port, timeout=0.3)
        return True

    eventually(answers, deadline, what=f"a DNS server answering on {host}:{port}")


class Knot:
    """A real authoritative server (Knot DNS) on loopback, serving zones from tests/zones."""

    def __init__(self, workdir: Path, zones: list[str], port: int | None = None,
                 prefix: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.zones = zones
        self.port = port or free_port()
        self.prefix = prefix  # e.g. ("ip", "netns", "exec", NAME) to run it in a network namespace
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Knot:
        knotd = require_tool("knotd")
        self.workdir.mkdir(parents=True, exist_ok=True)
        zone_lines = "\n".join(f"  - domain: {zone}" for zone in self.zones)
        conf = self.workdir / "knot.conf"
        conf.write_text(textwrap.dedent(f"""\
            server:
                rundir: "{self.workdir}"
                listen: 127.0.0.1@{self.port}
            database:
                storage: "{self.workdir}/db"
            log:
              - target: stderr
                any: warning
            template:
              - id: default
                storage: "{ZONES}"
                file: "%s.zone"
                zonefile-sync: -1
                journal-content: none
            """) + ("zone:\n" + zone_lines + "\n" if self.zones else ""))
        self.process = subprocess.Popen([*self.prefix, knotd, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        if wait:
            wait_for_dns(self.port, self.zones[0] if self.zones else "invalid")
        return self

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class BlackHole:
    """A UDP socket that reads queries and never answers: an upstream that is down but not refusing."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            try:
                self.sock.recv(4096)
            except OSError:
                return
            self.received += 1

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


class Exited(Exception):
    """The process under test exited while we waited for it: waiting longer cannot help."""


class Process:
    """A real process of ours (`blocker serve`, `blocker proxy`), its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = env
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> Process:
        self.process = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, **(self.env or {})})
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.process and self.process.stdout
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.on_line(line)
            self.lines.append(line)

    def on_line(self, line: str) -> None:
        """Called for every line of output, before it is added to `lines`."""

    def running(self) -> bool:
        """True while the process runs; raises Exited (with its output) once it has exited."""
        if self.process is not None and self.process.poll() is not None:
            time.sleep(0.1)  # let the reader thread take the last lines
            raise Exited(f"{self.args[2:4]} exited ({self.process.returncode}):\n" + "\n".join(self.lines))
        return True

    def wait_for_log(self, pattern: str, timeout: float = 15.0, after: int = 0) -> str:
        regex = re.compile(pattern)

        def logged() -> str | None:
            found = next((line for line in self.lines[after:] if regex.search(line)), None)
            if found is None and self.process and self.process.poll() is not None:
                time.sleep(0.1)
                found = next((line for line in self.lines[after:] if regex.search(line)), None)
                if found is None:
                    raise Exited(f"exited ({self.process.returncode}) before logging {pattern!r}:\n"
                                 + "\n".join(self.lines))
            return found

        try:
            return eventually(logged, timeout, 0.02, f"log line {pattern!r}")
        except AssertionError:
            raise AssertionError(f"no log line {pattern!r} within {timeout}s:\n" + "\n".join(self.lines)) from None

    def signal(self, signum: int) -> None:
        assert self.process
        self.process.send_signal(signum)

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Blocker(Process):
    """The real `blocker serve` as a subprocess, on ephemeral loopback ports read back from its log."""

    def __init__(self, config: Path | None, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> None:
        # `prefix`: e.g. ("ip", "netns", "exec", NAME) to run it in a network namespace.
        args = [*prefix, sys.executable, "-m", "blocker", "serve"]
        if config is not None:
            args += ["--config", str(config)]
        super().__init__(args, env)
        self.config = config
        self.port = 0
        self.metrics_port = 0
        self.dns_endpoints: list[tuple[str, int]] = []

    def start(self, expect_ready: bool = True) -> Blocker:
        super().start()
        if expect_ready:
            self.wait_for_log(r" ready ")
        return self

    def on_line(self, line: str) -> None:
        found = re.search(r"listening dns=\[?([0-9a-f.:]+?)\]?:(\d+) ", line)
        if found:
            self.dns_endpoints.append((found.group(1), int(found.group(2))))
            if not self.port:
                self.port = int(found.group(2))
        found = re.search(r"listening metrics=http://\S+:(\d+)/", line)
        if found:
            self.metrics_port = int(found.group(1))

    def query(self, name: str, rdtype: str = "A", tcp: bool = False, source: str | None = None,
              use_edns: int | bool = 0, payload: int = 1232, timeout: float = 3.0,
              **kwargs: object) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, use_edns=use_edns, payload=payload, **kwargs)
        send = dns.query.tcp if tcp else dns.query.udp
        return send(q, "127.0.0.1", port=self.port, timeout=timeout, source=source)

    def metrics(self) -> str:
        return scrape(self.metrics_port)


def scrape(port: int) -> str:
    """One scrape of a /metrics endpoint on loopback."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if labels is None or all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


def write_config(directory: Path, body: str, name: str = "blocker.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


def edes(response: dns.message.Message) -> list[tuple[int, str]]:
    return [(int(e.code), e.text or "") for e in response.extended_errors()]


def rcode_text(response: dns.message.Message) -> str:
    return dns.rcode.to_text(response.rcode())


class FaultyUpstream:
    """tests/faulty_upstream.py as a subprocess: a real UDP/TCP DNS server that misbehaves on purpose."""

    def __init__(self, mode: str = "ok", address: str = "192.0.2.1", ttl: int = 300, delay: float = 0.5,
                 port: int | None = None, blackhole_zone: str = "") -> None:
        self.port = port or free_port()
        script = Path(__file__).resolve().parent / "faulty_upstream.py"
        self.process = subprocess.Popen(
            [sys.executable, str(script), "--port", str(self.port), "--mode", mode, "--address", address,
             "--ttl", str(ttl), "--delay", str(delay), "--blackhole-zone", blackhole_zone],
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("ready"):
            self.process.kill()
            raise AssertionError(f"faulty upstream did not start: {line!r}")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _control(self, name: str) -> str:
        query = dns.message.make_query(f"{name}.faulty.control", "TXT", "CH")
        response = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=2)
        return b"".join(response.answer[0][0].strings).decode()

    def set_mode(self, mode: str) -> None:
        assert self._control(f"mode.{mode}") == "ok"

    def count(self) -> int:
        """How many ordinary queries it has received so far."""
        return int(self._control("count"))

    def names(self) -> list[str]:
        """The last question names it received, exactly as spelled."""
        return self._control("names").split()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
