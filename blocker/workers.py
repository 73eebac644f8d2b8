"""`dns.workers: N`: one supervisor and N resolver processes sharing the listen sockets (SO_REUSEPORT).

`blocker serve` with more than one worker becomes the supervisor. It loads the policy and then
forks every worker, so the compiled lists are shared copy-on-write until a reload. The kernel
spreads queries (by client address and port) and TCP connections over the workers' sockets.

The supervisor owns everything there is one of:
- the files: it watches them and takes SIGHUP; it compiles a reload first and only a policy that
  loads is announced to the workers, one after another, which then load the same files (one
  version: it is derived from the files' content). A broken edit reaches no worker.
- the audit trail, the RADIUS accounting listener, the binding snapshot and store: every change to
  its binding table is sent to every worker, which applies it to the copy it was forked with;
- the console, and the public metrics endpoint (see `WorkersCollector`);
- the workers' lives: SIGTERM reaches every worker, which drains as a single server does; a worker
  that dies is logged and forked again (after a pause that doubles, up to 30 s, while it keeps
  dying young); a worker that answers no ping for 5 s (stopped, deadlocked) is killed, since it
  would keep its share of the sockets and leave its clients unanswered.

Each worker is a `Daemon` with a `WorkerSeat`: its own sockets of the group, its own answer cache
(1/N of `dns.cache_size` and `dns.cache_bytes`, so the server's memory bound stays the configured
one), its upstream sockets and its query-log writer (the workers append whole lines to one file).

Supervisor and worker talk over a socketpair, one JSON object per line. To a worker: reload, reopen
(the query log, after a SIGHUP), bind/unbind/expire (a binding), ping. From a worker: ready (its private
metrics port, policy version and loop), loaded/rejected (the version it now runs), pong. A worker whose
supervisor goes away (its channel closes) stops.

Metrics: every worker serves its registry on a private port on 127.0.0.1; a scrape of the public
endpoint reads each of them and sums what is the same series (counters, histograms and gauges:
cache bytes, connections…; process start time is the oldest, max fds the largest), adds what only the
supervisor knows (policy, reloads, bindings, build) and per-worker series (`blocker_worker_*`).
The counters of a worker that died, or could not be read, are kept at their last read value (read
every 5 s), so a sum never goes down; what a worker counted after that read and before it died is lost.
prometheus-client's multiprocess mode was not used: it supports neither custom collectors (every
blocker_* family is one, read from plain integers that the hot path adds to) nor the process
collector, and it writes each increment to a memory-mapped file under a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from blocker.audit import ExemptionAudit
from blocker.bindings import Binding, BindingTable
from blocker.clock import Clock
from blocker.daemon import (
    DRAIN_SECONDS,
    Daemon,
    PolicyOwner,
    RestartOnly,
    _spawn,
    bind_error,
    event_loop_runner,
    loop_name,
    warn_no_upstreams,
    warn_restart_needed,
)
from blocker.httpd import OpsServer
from blocker.identity import IdentityCollector, IdentityService
from blocker.logs import setup_logging
from blocker.metrics import Stats, build_info, policy_families, reload_families
from blocker.policy import Policy
from blocker.server import reuseport_pair, shared_port
from blocker.source import PolicySource, Signature
from blocker.yamlfile import format_endpoint

log = logging.getLogger("blocker")

CONTROL_BACKLOG = 64 * 1024 * 1024  # bytes waiting for a worker that does not read: then it is stuck
START_TIMEOUT = 60.0  # seconds for every worker to be serving at start
RESTART_PAUSE_MAX = 30.0
YOUNG = 10.0  # a worker that dies sooner after its start is restarted after a growing pause
STOP_GRACE = DRAIN_SECONDS + 5.0  # after SIGTERM, seconds before a worker is killed
SCRAPE_TIMEOUT = 2.0
PING_SECONDS = 1.0
ROLL_TIMEOUT = 120.0  # seconds one worker may take to load a policy before the next one is told
SILENCE_LIMIT = 5.0  # a serving worker that answers no ping for this long is killed (and restarted)
START_LIMIT = 15.0  # a worker not serving this long after its fork is killed (and restarted)
REFRESH_ROUNDS = 5  # pings between reads of the workers' counters
# Families only the supervisor has the truth of; the workers' copies are not merged.
SUPERVISOR_FAMILIES = ("blocker_config_", "blocker_policy", "blocker_blocklist_", "blocker_exemptions_",
                       "blocker_devices", "blocker_build", "blocker_bindings_", "blocker_radius_",
                       "blocker_binding_store_")
LOWEST = {"process_start_time_seconds"}
HIGHEST = {"process_max_fds", "blocker_gc_pause_longest_seconds"}
COUNTING = ("counter", "histogram", "summary")
PR_SET_PDEATHSIG = 1


def encode(message: dict[str, object]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


PING = encode({"op": "ping"})


class WorkerSeat:
    """What one worker is handed at its fork: its number, its sockets, the bindings, the way home."""

    def __init__(self, index: int, count: int, control: socket.socket,
                 sockets: list[tuple[socket.socket, socket.socket]], bindings: BindingTable | None,
                 signature: Signature) -> None:
        self.index = index
        self.signature = signature  # of the files when the policy it is forked with was read
        self.count = count
        self.control = control
        self.sockets = sockets
        self.bindings = bindings
        self._writer: asyncio.StreamWriter | None = None

    def tell(self, message: dict[str, object]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode(message))

    async def follow(self, daemon: Daemon, metrics_port: int) -> None:
        """Do what the supervisor says until its channel closes; then the worker stops."""
        reader, self._writer = await asyncio.open_unix_connection(sock=self.control)
        self.tell({"op": "ready", "metrics": metrics_port, "version": daemon.policy.version,
                   "loop": loop_name(asyncio.get_running_loop())})
        try:
            while line := await reader.readline():
                self._apply(daemon, json.loads(line))
        except (ConnectionError, ValueError) as err:
            log.error("control channel: %s", err)
        finally:
            daemon.stopping.set()

    def _apply(self, daemon: Daemon, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "reload":
            _spawn(daemon.reload(str(message.get("why", "supervisor"))))
        elif op == "ping":
            self.tell({"op": "pong"})
        elif op == "reopen":
            daemon.reopen_querylog()
        elif op in ("bind", "unbind", "expire") and self.bindings is not None:
            binding = Binding.from_row(message.get("row"))
            if binding is not None:
                self.bindings.mirror(op, binding)


@dataclass
class Worker:
    """The supervisor's record of one running worker."""

    index: int
    pid: int
    started: float
    outbox: list[bytes] = field(default_factory=list)  # written once the channel is set up
    writer: asyncio.StreamWriter | None = None
    task: asyncio.Future[None] | None = None
    ready: bool = False
    version: str = ""
    loop: str = ""
    metrics_port: int = 0
    pinged: float = 0.0  # monotonic time of the oldest ping it has not answered (0: none)
    killed: bool = False
    loading: asyncio.Future[None] | None = None  # set when it reports the reload it was told of
    expected: str = ""  # the version it was told to load
    last_scrape: list[Metric] = field(default_factory=list)

    def send(self, data: bytes) -> None:
        if self.writer is None:
            self.outbox.append(data)
            return
        if self.writer.is_closing():
            return
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > CONTROL_BACKLOG:
            log.error("worker %d (pid %d) does not read its control channel: killing it", self.index, self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class Supervisor(PolicyOwner):
    """`blocker serve` with dns.workers > 1: forks the workers and owns what there is one of."""

    def __init__(self, config_path: Path | None, policy: Policy, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.config_path = config_path
        self._policy = policy
        self.started_with = RestartOnly.of(policy.config)
        self.count = policy.config.dns.workers
        self.stats = Stats()
        self.source = PolicySource(config_path, policy, self._loaded, self._rejected)
        self.audit = ExemptionAudit(policy.config.audit.path)
        identity = policy.config.identity
        self.identity = IdentityService(identity, self.clock.time) if IdentityService.wanted(identity) else None
        self.identity_metrics = IdentityCollector(self.identity or IdentityService(identity, self.clock.time))
        self.workers: dict[int, Worker] = {}
        self.retiring: dict[int, Worker] = {}  # by pid: replaced, draining until they exit
        self.restarts = dict.fromkeys(range(self.count), 0)
        self._pauses = dict.fromkeys(range(self.count), 0.0)
        self.endpoints: list[tuple[str, int]] = []
        self.ops: OpsServer | None = None
        self.console: Any = None
        self.ready = False
        self.stopping = asyncio.Event()
        self._start_failed = False
        self._rolling = False
        self._roll_again: str | None = None
        self.collector = WorkersCollector(self)

    @property
    def policy(self) -> Policy:
        return self._policy

    async def run(self) -> int:
        config = self.policy.config
        warn_no_upstreams(config)
        if not self._check_ports() or not await self._start_identity() or not self._start_endpoints():
            await self._stop_services()
            return 2
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        self.stats.reloaded(True)
        self._audit(self.audit.update(config.policy.exemptions, self.clock.now(), self.policy.version))
        if self.identity is not None:
            self.identity.table.listeners.append(self._binding_changed)
        for index in range(self.count):
            self._fork(index)
        for endpoint in self.endpoints:
            log.info("listening dns=%s (udp+tcp, %d workers)", format_endpoint(*endpoint), self.count)
        if not await self._started():
            await self._stop_workers()
            await self._stop_services()
            return 2
        self.ready = True
        policy = self.policy
        log.info("ready pid=%d workers=%d loop=%s policy=%s config=%s categories=%d rules=%d", os.getpid(),
                 self.count, self.workers[0].loop, policy.version, config.source_name,
                 len(policy.lists.categories), policy.lists.index.rule_count)
        watcher = asyncio.ensure_future(self.source.watch(self.tick))
        watchdog = asyncio.ensure_future(self._watch_workers())
        await self.stopping.wait()
        watchdog.cancel()
        log.info("stopping: draining queries in flight in %d workers", len(self.workers))
        self.ready = False
        watcher.cancel()
        self.source.close()
        await self._stop_workers()
        await self._stop_services()
        log.info("stopped")
        return 0

    def _check_ports(self) -> bool:
        """Every DNS address free (a port 0 made concrete), before any worker binds its share."""
        for host, port in self.policy.config.dns.listen:
            try:
                self.endpoints.append((host, shared_port(host, port)))
            except OSError as err:
                log.error("%s", bind_error("for DNS (udp+tcp)", format_endpoint(host, port), err))
                return False
        return True

    def _start_endpoints(self) -> bool:
        config = self.policy.config
        if config.metrics.listen is not None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(self.collector)
            try:
                self.ops = OpsServer(*config.metrics.listen, registry, self._serving)
            except OSError as err:
                log.error("%s", bind_error("for metrics (http)", format_endpoint(*config.metrics.listen), err))
                return False
            self.ops.start()
            log.info("listening metrics=http://%s/metrics", format_endpoint(*self.ops.address))
        if config.console.enabled:
            from blocker.console import start_console

            self.console = start_console(self, config.console)
            return self.console is not None
        return True

    def _serving(self) -> bool:
        """/readyz: started, not stopping, and at least one worker answering."""
        return self.ready and any(worker.ready for worker in list(self.workers.values()))

    # -- the workers' lives

    def _fork(self, index: int) -> None:
        try:
            sockets = [reuseport_pair(host, port) for host, port in self.endpoints]
        except OSError as err:
            log.error("worker %d: %s", index, bind_error("for DNS (udp+tcp)", format_endpoint(*self.endpoints[0]),
                                                         err))
            if self.ready:
                self._restart_later(index, time.monotonic())
            else:  # at start: fail now, as a single server would
                self._start_failed = True
            return
        ours, theirs = socket.socketpair()
        seat = WorkerSeat(index, self.count, theirs, sockets, self.identity.table if self.identity else None,
                          self.source.signature)
        # No thread may be writing a log line at the fork: the child would inherit the stream's lock held.
        handlers = logging.getLogger("blocker").handlers
        for handler in handlers:
            handler.acquire()
        try:
            pid = os.fork()
        finally:
            if pid != 0:  # in the child, logging's own fork hook gives every handler a new lock
                for handler in handlers:
                    handler.release()
        if pid == 0:
            self._become_worker(seat)
        theirs.close()
        for udp, tcp in sockets:  # the supervisor must not hold a share of the group: it reads none
            udp.close()
            tcp.close()
        worker = self.workers[index] = Worker(index, pid, time.monotonic())
        worker.task = asyncio.ensure_future(self._follow(worker, ours))

    def _become_worker(self, seat: WorkerSeat) -> NoReturn:
        """The child's side of the fork: never returns into the supervisor's code."""
        code = 70
        try:
            # The supervisor's loop is inherited but never run here; the worker starts its own.
            asyncio.events._set_running_loop(None)
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            stop_with_parent()
            keep = {seat.control.fileno(), *(s.fileno() for pair in seat.sockets for s in pair)}
            close_inherited(keep)
            if seat.bindings is not None:
                seat.bindings.listeners.clear()
            # A stream object of its own: whatever lock another thread held in the old one stays behind.
            sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
            setup_logging()
            name_worker_logs(seat.index)
            gc.freeze()  # what the supervisor built stays shared: the collector never touches it
            code = event_loop_runner()(Daemon(self.config_path, self.policy, seat=seat).run())
        except BaseException:
            log.exception("worker %d failed", seat.index)
        finally:
            logging.shutdown()
            os._exit(code)

    async def _follow(self, worker: Worker, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        worker.writer = writer
        for data in worker.outbox:
            worker.send(data)
        worker.outbox.clear()
        try:
            while line := await reader.readline():
                self._heard(worker, json.loads(line))
        except (ConnectionError, ValueError) as err:
            log.error("worker %d (pid %d) control channel: %s", worker.index, worker.pid, err)
        writer.close()
        await self._reap(worker)

    def _heard(self, worker: Worker, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "pong":
            worker.pinged = 0.0
        if op == "ready":
            worker.ready = True
            worker.metrics_port = int(message.get("metrics", 0))
            worker.version = str(message.get("version", ""))
            worker.loop = str(message.get("loop", ""))
            if self.ready:
                log.info("worker %d (pid %d) serving again", worker.index, worker.pid)
            for old in [w for w in self.retiring.values() if w.index == worker.index]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old.pid, signal.SIGTERM)
            if worker.version != self.policy.version:  # the supervisor reloaded since its fork
                self._tell_reload(worker, "catching up")
        elif op in ("loaded", "rejected"):
            worker.version = str(message.get("version", ""))
            if worker.loading is not None and not worker.loading.done():
                worker.loading.set_result(None)
            if worker.version != worker.expected and worker.expected == self.policy.version:
                # It read other files than the supervisor did (edited again, broken meanwhile) or could
                # not load them: a fork of the supervisor runs exactly the policy it compiled.
                log.warning("worker %d (pid %d) runs policy %s, not %s: replacing it with a fresh fork",
                            worker.index, worker.pid, worker.version, worker.expected)
                self._replace(worker)

    def _tell_reload(self, worker: Worker, why: str) -> None:
        worker.loading = asyncio.get_running_loop().create_future()
        worker.expected = self.policy.version
        worker.send(encode({"op": "reload", "why": why}))

    def _replace(self, worker: Worker) -> None:
        """Fork a new worker for this seat; the old one is told to stop once the new one serves."""
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self.retiring[worker.pid] = worker
        self._fork(worker.index)

    async def _reap(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        _pid, status = await loop.run_in_executor(None, os.waitpid, worker.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        how = f"signal {-code}" if code < 0 else f"exit {code}"
        self.collector.retire(worker)
        if worker.loading is not None and not worker.loading.done():
            worker.loading.set_result(None)
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        lived = time.monotonic() - worker.started
        if self.retiring.pop(worker.pid, None) is not None:
            log.info("worker %d (pid %d) replaced (%s)", worker.index, worker.pid, how)
        elif self.stopping.is_set():
            log.info("worker %d (pid %d) stopped (%s)", worker.index, worker.pid, how)
        elif not self.ready:
            log.error("worker %d (pid %d) %s while starting: giving up", worker.index, worker.pid, how)
            self._start_failed = True
        else:
            log.error("worker %d (pid %d) died (%s) after %.1f s: restarting", worker.index, worker.pid, how, lived)
            self._restart_later(worker.index, worker.started)

    async def _watch_workers(self) -> None:
        """Ping every worker. One that leaves a ping unanswered for SILENCE_LIMIT, or is not serving
        START_LIMIT after its fork (stopped, deadlocked, stuck), still holds its share of the listen
        sockets and its clients would get no answer: it is killed, and restarted. Every few rounds the
        workers' counters are read, so a worker that dies loses at most that long of its counts."""
        loop = asyncio.get_running_loop()
        rounds = 0
        reading: asyncio.Future[object] | None = None
        while True:
            slept = time.monotonic()
            await asyncio.sleep(PING_SECONDS)
            now = time.monotonic()
            overslept = now - slept > 2 * PING_SECONDS  # the supervisor itself was paused: judge nobody
            for worker in list(self.workers.values()):
                if overslept:
                    worker.pinged = 0.0
                elif not worker.ready and now - worker.started > START_LIMIT:
                    self._kill(worker, f"not serving {now - worker.started:.0f} s after its start")
                    continue
                elif worker.pinged and now - worker.pinged > SILENCE_LIMIT:
                    self._kill(worker, f"unresponsive for {now - worker.pinged:.0f} s")
                    continue
                if worker.ready:
                    if not worker.pinged:
                        worker.pinged = now
                    worker.send(PING)
            rounds += 1
            if rounds % REFRESH_ROUNDS == 0 and (reading is None or reading.done()):
                reading = loop.run_in_executor(None, self.collector.refresh)

    def _kill(self, worker: Worker, why: str) -> None:
        if worker.killed:
            return
        log.error("worker %d (pid %d) %s: killing it", worker.index, worker.pid, why)
        worker.killed = True
        worker.ready = False
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)

    def _restart_later(self, index: int, started: float) -> None:
        young = time.monotonic() - started < YOUNG
        pause = min(max(1.0, 2 * self._pauses[index]), RESTART_PAUSE_MAX) if young else 0.0
        self._pauses[index] = pause
        self.restarts[index] += 1
        if pause:
            log.warning("worker %d: restarting in %.0f s", index, pause)

        def again() -> None:
            if not self.stopping.is_set() and index not in self.workers:
                self._fork(index)

        asyncio.get_running_loop().call_later(pause, again)

    async def _started(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and not self._start_failed and not self.stopping.is_set():
            if len(self.workers) == self.count and all(w.ready for w in self.workers.values()):
                return True
            await asyncio.sleep(0.02)
        if not self._start_failed and not self.stopping.is_set():
            log.error("workers not serving after %.0f s", START_TIMEOUT)
        return False

    async def _stop_workers(self) -> None:
        every = [*self.workers.values(), *self.retiring.values()]
        for worker in every:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        tasks = [w.task for w in every if w.task is not None]
        if tasks:
            _done, late = await asyncio.wait(tasks, timeout=STOP_GRACE)
            for worker in every:
                if worker.task in late:
                    log.error("worker %d (pid %d) still running %.0f s after SIGTERM: killing it", worker.index,
                              worker.pid, STOP_GRACE)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
            if late:
                await asyncio.wait(late, timeout=5.0)

    def _broadcast(self, message: dict[str, object]) -> None:
        data = encode(message)
        for worker in [*self.workers.values(), *self.retiring.values()]:  # a replaced one serves until it stops
            worker.send(data)

    def _binding_changed(self, op: str, binding: Binding, _local: bool) -> None:
        self._broadcast({"op": op, "row": binding.as_row()})

    # -- the policy

    def _sighup(self) -> None:
        self._broadcast({"op": "reopen"})
        _spawn(self.source.reload("SIGHUP"))

    def _loaded(self, policy: Policy, why: str, milliseconds: float) -> None:
        self._policy = policy
        warn_restart_needed(self.started_with, policy.config)
        if policy.config.identity != self.started_with.identity:
            log.warning("identity changed: restart blocker to apply")
        self.stats.last_reload_error = None
        self.stats.reloaded(True)
        log.info("reloaded (%s) policy=%s in %.0f ms (%d devices): %d workers follow", why, policy.version,
                 milliseconds, len(policy.devices), len(self.workers))
        self._audit(self.audit.update(policy.config.policy.exemptions, self.clock.now(), policy.version))
        _spawn(self._roll_out(why))

    async def _roll_out(self, why: str) -> None:
        """Tell the workers to reload one after another: while one compiles, the others answer at
        full speed and the cores are not shared by N compiles at once. A reload during a rollout
        starts one more rollout after it."""
        if self._rolling:
            self._roll_again = why
            return
        self._rolling = True
        try:
            while True:
                for index in range(self.count):
                    worker = self.workers.get(index)
                    if worker is None or not worker.ready:  # it catches up when it reports ready
                        continue
                    self._tell_reload(worker, why)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(worker.loading), ROLL_TIMEOUT)
                if self._roll_again is None or self.stopping.is_set():
                    break
                why, self._roll_again = f"{self._roll_again}, coalesced", None
        finally:
            self._rolling = False


class WorkersCollector(Collector):
    """The one scrape of a server with workers: theirs merged, the supervisor's own, and per-worker series."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.process = ProcessCollector(registry=None)
        self._lock = threading.Lock()
        self._retired: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        self._retired_families: dict[str, Metric] = {}

    def retire(self, worker: Worker) -> None:
        """A worker died: keep its counters at their last scraped values, so no sum goes down."""
        with self._lock:
            for family in worker.last_scrape:
                if family.type not in COUNTING or family.name.startswith(SUPERVISOR_FAMILIES):
                    continue
                self._retired_families.setdefault(family.name, family)
                for sample in family.samples:
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    self._retired[key] = self._retired.get(key, 0.0) + sample.value

    def refresh(self) -> list[tuple[Worker, list[Metric] | None]]:
        """Read every serving worker's metrics (at once: a slow one costs SCRAPE_TIMEOUT at most)."""
        serving = [w for w in sorted(self.supervisor.workers.values(), key=lambda w: w.index)
                   if w.ready and w.metrics_port]
        if not serving:
            return []
        with ThreadPoolExecutor(len(serving), thread_name_prefix="blocker-scrape") as pool:
            results = list(pool.map(scrape_worker, [w.metrics_port for w in serving]))
        for worker, families in zip(serving, results, strict=True):
            if families is not None:
                worker.last_scrape = families
        return list(zip(serving, results, strict=True))

    def collect(self) -> Iterator[object]:
        supervisor = self.supervisor
        read = self.refresh()
        scraped = [(worker, families) for worker, families in read if families is not None]
        # A worker alive but not read this time (slow, stopped): its counters as last read, so no sum
        # goes down (Prometheus would take that for a reset); its gauges are left out.
        unread = [[f for f in worker.last_scrape if f.type in COUNTING] for worker, families in read
                  if families is None]
        with self._lock:
            yield from merge([families for _worker, families in scraped] + unread + [list(self.process.collect())],
                             self._retired, self._retired_families)
        yield from reload_families(supervisor.stats)
        yield from policy_families(supervisor.policy)
        yield build_info()
        yield from supervisor.identity_metrics.collect()
        yield from worker_families(supervisor, scraped)


def scrape_worker(port: int) -> list[Metric] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT) as response:
            text = response.read().decode("utf-8")
        return list(text_string_to_metric_families(text))
    except (OSError, ValueError) as err:
        log.warning("metrics of a worker (port %d) not read: %s", port, err)
        return None


def merge(sources: Iterable[list[Metric]], retired: dict[tuple[str, str, tuple[tuple[str, str], ...]], float],
          retired_families: dict[str, Metric]) -> Iterator[Metric]:
    """One family per name, each series the sum over the sources (a few gauges: the lowest or highest)."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in sources:
        for family in families:
            if family.name.startswith(SUPERVISOR_FAMILIES):
                continue
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            series = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                held = series.get(key)
                if held is None:
                    series[key] = sample.value
                elif family.name in LOWEST:
                    series[key] = min(held, sample.value)
                elif family.name in HIGHEST:
                    series[key] = max(held, sample.value)
                else:
                    series[key] = held + sample.value
    for (name, sample_name, labels), value in retired.items():
        if name not in merged:
            old = retired_families[name]
            merged[name] = Metric(old.name, old.documentation, old.type, old.unit)
            values[name] = {}
        series = values[name]
        series[(sample_name, labels)] = series.get((sample_name, labels), 0.0) + value
    for name, family in merged.items():
        family.samples = [Sample(sample_name, dict(labels), value) for (sample_name, labels), value
                          in values[name].items()]
        yield family


def worker_families(supervisor: Supervisor, scraped: list[tuple[Worker, list[Metric]]]) -> Iterator[Metric]:
    yield GaugeMetricFamily("blocker_workers", "Resolver worker processes configured (dns.workers).",
                            value=supervisor.count)
    up = GaugeMetricFamily("blocker_worker_up", "1 while the worker serves and its metrics were read.",
                           labels=["worker"])
    read = {worker.index for worker, _families in scraped}
    for index in range(supervisor.count):
        up.add_metric([str(index)], 1 if index in read else 0)
    yield up
    restarts = CounterMetricFamily("blocker_worker_restarts", "Workers that died and were started again.",
                                   labels=["worker"])
    for index in range(supervisor.count):
        restarts.add_metric([str(index)], supervisor.restarts[index])
    yield restarts
    queries = CounterMetricFamily("blocker_worker_queries", "DNS queries answered by each worker (since its start).",
                                  labels=["worker"])
    policies = InfoMetricFamily("blocker_worker_policy", "The policy version each worker runs.", labels=["worker"])
    for worker, families in scraped:
        answered = sum(sample.value for family in families if family.name == "blocker_dns_queries"
                       for sample in family.samples if sample.name == "blocker_dns_queries_total")
        queries.add_metric([str(worker.index)], answered)
        policies.add_metric([str(worker.index)], {"version": worker.version})
    yield queries
    yield policies
    pids = [os.getpid(), *(w.pid for w in list(supervisor.workers.values()))]
    yield GaugeMetricFamily("blocker_workers_memory_pss_bytes", "Memory of the supervisor and its workers "
                            "together, pages shared copy-on-write counted once (Linux Pss; process_resident_"
                            "memory_bytes sums each process's own and counts shared pages once per process).",
                            value=sum(proportional_memory(pid) for pid in pids))


def proportional_memory(pid: int) -> int:
    """A process's Pss in bytes (0 where /proc/PID/smaps_rollup cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def stop_with_parent() -> None:
    """Linux: SIGTERM when the supervisor dies, even if the control channel cannot tell (a stopped child)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def close_inherited(keep: set[int]) -> None:
    """Close every descriptor a worker inherited but does not own (the supervisor's sockets, its loop's
    epoll instance, other workers' channels): a worker must never hold a port or an fd it does not use."""
    try:
        open_fds = sorted(int(name) for name in os.listdir("/proc/self/fd"))
    except OSError:  # no /proc
        open_fds = list(range(3, 4096))
    for fd in open_fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def name_worker_logs(index: int) -> None:
    """A worker's log lines say which worker wrote them."""
    prefix = f"worker {index}: "

    def add_prefix(record: logging.LogRecord) -> bool:
        record.msg = prefix + str(record.msg)
        return True

    for handler in logging.getLogger("blocker").handlers:
        handler.addFilter(add_prefix)
