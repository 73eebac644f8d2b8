"""The life of `blocker serve`: load, bind, ready; reload on SIGHUP or a file change; stop on SIGTERM.

A reload (see source.py) builds a whole new policy off the event loop and swaps it in one
assignment; queries in flight finish on the snapshot they started with. A broken config or list
is logged as FILE:LINE: message, counted, and the running policy keeps serving.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from blocker.audit import ExemptionAudit
from blocker.cache import AnswerCache, cache_share
from blocker.clock import Clock
from blocker.config import Config, DnsConfig, IdentityConfig
from blocker.errors import ConfigError
from blocker.gcstats import GcPauses, release, settle
from blocker.httpd import OpsServer
from blocker.identity import IdentityCollector, IdentityService
from blocker.logs import setup_logging
from blocker.metrics import Gauges, MemoryCounts, Stats, make_registry
from blocker.policy import Policy
from blocker.querylog import QueryLog
from blocker.recorder import Recorder
from blocker.resolver import Resolver
from blocker.server import Listeners
from blocker.source import PolicySource
from blocker.upstream import follow_config
from blocker.yamlfile import format_endpoint

if TYPE_CHECKING:
    from blocker.workers import WorkerSeat

log = logging.getLogger("blocker")

DRAIN_SECONDS = 3.0


def log_problems(prefix: str, err: ConfigError) -> None:
    for problem in err.problems:
        log.error("%s: %s", prefix, problem)


def bind_error(what: str, endpoint: str, err: OSError) -> str:
    """A bind failure with its reason and what usually causes it."""
    # uvloop raises "could not bind to local_addr" with the real OSError as its cause.
    while err.errno is None and isinstance(err.__cause__, OSError):
        err = err.__cause__
    if err.errno == errno.EADDRINUSE:
        reason = "address already in use: another process holds this port (find it with `ss -lupn`)"
    elif err.errno == errno.EACCES:
        reason = "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE"
    elif err.errno == errno.EADDRNOTAVAIL:
        reason = "address not available: no interface of this host has that address"
    else:
        reason = err.strerror or str(err)
    return f"cannot listen {what} on {endpoint}: {reason}"


class PolicyOwner:
    """What a `Daemon` and a workers' `Supervisor` (workers.py) share: the policy source and the outcome
    of its reloads, the exemption audit, and the identity service."""

    clock: Clock
    stats: Stats
    source: PolicySource
    audit: ExemptionAudit
    identity: IdentityService | None
    ops: OpsServer | None
    console: Any  # the admin console (blocker.console.app.ConsoleServer) when enabled

    @property
    def policy(self) -> Policy:
        raise NotImplementedError

    async def _stop_services(self) -> None:
        """Stop what runs beside the resolving: accounting, the ops endpoint, the console."""
        if self.identity is not None:
            await self.identity.stop()
        if self.ops is not None:
            self.ops.stop()
        if self.console is not None:
            self.console.stop()

    async def _start_identity(self) -> bool:
        """Restore bindings, bind the RADIUS accounting port, start the store mirror; False (logged) on failure."""
        if self.identity is None:
            return True
        radius = self.policy.config.identity.radius_accounting
        try:
            await self.identity.start()
        except ConfigError as err:
            log_problems("cannot start", err)
            return False
        except OSError as err:
            assert radius is not None
            log.error("%s", bind_error("for RADIUS accounting (udp)", format_endpoint(*radius.listen), err))
            return False
        if self.identity.radius_address is not None:
            log.info("listening radius=%s (udp)", format_endpoint(*self.identity.radius_address))
        return True

    @staticmethod
    def _audit(events: list[dict[str, object]]) -> None:
        for event in events:
            log.info("audit %s", json.dumps(event, separators=(",", ":")))

    def tick(self) -> None:
        """Every poll: record exemptions that started or expired (they do so with no reload)."""
        self._audit(self.audit.tick(self.clock.now(), self.policy.version))

    def _rejected(self, err: ConfigError | Exception, why: str) -> None:
        keeping = f"keeping policy {self.policy.version}"
        # Metrics first: whoever reads the log line may scrape at once.
        if isinstance(err, ConfigError):
            first = err.problems[0]
            self.stats.last_reload_error = (first.file, first.line, first.message)
            self.stats.reloaded(False)
            log_problems(f"reload ({why}) rejected, {keeping}", err)
        else:
            self.stats.last_reload_error = (str(self.source.config_path or ""), 0, f"internal error: {err}")
            self.stats.reloaded(False)
            log.error("reload (%s) failed, %s", why, keeping, exc_info=err)


class Daemon(PolicyOwner):
    """Owns the running policy, the listeners, the cache and the ops endpoint.

    With a `seat` it is one worker of a supervisor (workers.py): it serves the sockets and the
    binding table it was handed, reloads when the supervisor says so, and leaves the audit trail,
    the accounting listener, the console and the public metrics endpoint to the supervisor.
    """

    def __init__(self, config_path: Path | None, policy: Policy, clock: Clock | None = None,
                 seat: WorkerSeat | None = None) -> None:
        self.clock = clock or Clock()
        self.seat = seat
        self.started_with = RestartOnly.of(policy.config)
        self.gc_pauses = GcPauses()  # times collections and freezes their survivors while running
        self.stats = Stats()
        self.stats.prepare(policy.group_order, policy.lists.categories)
        dns = policy.config.dns
        self.cache = AnswerCache(*self._cache_bounds(dns))
        self.cache.stale_window = dns.serve_stale
        self.upstreams = follow_config(None, dns, self.stats)
        self.recorder = Recorder(self.stats, self.clock)
        identity = policy.config.identity
        if seat is None:
            self.identity = IdentityService(identity, self.clock.time) if IdentityService.wanted(identity) else None
            bindings = self.identity.table if self.identity else None
        else:
            self.identity, bindings = None, seat.bindings
        self.resolver = Resolver(policy, self.cache, self.upstreams, self.recorder, self.clock, bindings,
                                 seat.count if seat is not None else 1)
        # Exported (at zero) even when identity is off: dashboards and alerts see a series, not a gap.
        self._identity_metrics = IdentityCollector(self.identity or IdentityService(identity, self.clock.time))
        self.listeners = Listeners(self.resolver)
        self.source = PolicySource(config_path, policy, self._loaded, self._rejected,
                                   seat.signature if seat is not None else None)
        # audit.path: read at start only. A worker records nothing: its supervisor keeps the trail.
        self.audit = ExemptionAudit(policy.config.audit.path if seat is None else None)
        self.querylog: QueryLog | None = None
        self._configure_querylog(policy)
        self.ops: OpsServer | None = None
        self.console: Any = None  # the admin console (blocker.console.app.ConsoleServer) when enabled
        self.ready = False
        self.stopping = asyncio.Event()

    @property
    def policy(self) -> Policy:
        return self.resolver.policy

    def _cache_bounds(self, dns: DnsConfig) -> tuple[int, int]:
        """(entries, bytes) of the answer cache: a worker holds its share of the server's bounds."""
        share = self.seat.count if self.seat is not None else 1
        return dns.cache_size // share, cache_share(dns.cache_bytes // share)

    async def run(self) -> int:
        config = self.policy.config
        self.gc_pauses.install()
        if self.seat is None:
            warn_no_upstreams(config)
        if not await self._listen() or not await self._start_identity():
            await self.listeners.close(0)
            if self.ops is not None:
                self.ops.stop()
            return 2
        loop = asyncio.get_running_loop()
        # A worker's reloads come from its supervisor (one at a time, all to one version); a SIGHUP sent
        # to the whole process group (logrotate's killall -HUP) only reopens its query log.
        loop.add_signal_handler(signal.SIGHUP, self._sighup if self.seat is None else self.reopen_querylog)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        self.stats.reloaded(True)
        if self.seat is None:
            self._audit(self.audit.update(self.policy.config.policy.exemptions, self.clock.now(), self.policy.version))
        self.ready = True
        policy = self.policy
        if self.seat is None:
            log.info("ready pid=%d loop=%s policy=%s config=%s categories=%d rules=%d upstreams=%s", os.getpid(),
                     loop_name(loop), policy.version, config.source_name, len(policy.lists.categories),
                     policy.lists.index.rule_count, ",".join(self.upstreams.names) or "none")
            watcher = asyncio.ensure_future(self.source.watch(self.tick))
        else:  # the supervisor watches the files and tells every worker when to reload
            log.info("serving pid=%d loop=%s policy=%s", os.getpid(), loop_name(loop), policy.version)
            watcher = asyncio.ensure_future(self.seat.follow(self, self.ops.address[1] if self.ops else 0))
        await self.stopping.wait()
        log.info("stopping: draining queries in flight")
        self.ready = False
        watcher.cancel()
        self.source.close()  # a reload still running swaps nothing in now
        await self.listeners.close(DRAIN_SECONDS)
        await self._stop_services()
        self.upstreams.close()
        if self.querylog is not None:
            self.querylog.close()
        log.info("stopped")
        return 0

    async def _listen(self) -> bool:
        """Bind every DNS address and the ops endpoint; False (logged with the reason) if one fails."""
        config = self.policy.config
        if self.seat is not None:
            for udp, tcp in self.seat.sockets:
                await self.listeners.adopt(udp, tcp)
        for host, port in config.dns.listen if self.seat is None else ():
            try:
                bound = await self.listeners.bind(host, port)
            except OSError as err:
                log.error("%s", bind_error("for DNS (udp+tcp)", format_endpoint(host, port), err))
                return False
            log.info("listening dns=%s (udp+tcp)", format_endpoint(*bound))
        if config.metrics.listen is not None:
            gauges = Gauges(self._cache_numbers, lambda: self.resolver.policy, lambda: self.querylog,
                            self._memory_numbers)
            # A worker's metrics go to its supervisor only, which serves every worker's as one scrape.
            listen = config.metrics.listen if self.seat is None else ("127.0.0.1", 0)
            try:
                extra = (self._identity_metrics,) if self.seat is None else ()
                registry = make_registry(self.stats, gauges, *extra)
                registry.register(self.gc_pauses)
                self.ops = OpsServer(*listen, registry, lambda: self.ready)
            except OSError as err:
                log.error("%s", bind_error("for metrics (http)", format_endpoint(*listen), err))
                return False
            self.ops.start()
            if self.seat is None:
                log.info("listening metrics=http://%s/metrics", format_endpoint(*self.ops.address))
        if config.console.enabled and self.seat is None:
            from blocker.console import start_console

            self.console = start_console(self, config.console)
            return self.console is not None
        return True

    def _configure_querylog(self, policy: Policy) -> None:
        settings = policy.config.query_log
        current = self.querylog
        if current is not None and (settings.path != current.path):
            current.close()
            current = None
        if settings.path is None:
            self.querylog = None
        elif current is None:
            self.querylog = QueryLog(settings.path, settings.only_blocked, mode=int(settings.mode, 8))
            self.querylog.start()
        else:
            current.only_blocked = settings.only_blocked
            current.mode = int(settings.mode, 8)
            current.reopen()  # after a SIGHUP from logrotate, write to the new file
        self.recorder.querylog = self.querylog

    def _cache_numbers(self) -> tuple[int, int, int, int]:
        cache = self.cache
        return len(cache), cache.hits, cache.misses, cache.evictions

    def _memory_numbers(self) -> MemoryCounts:
        cache, memo = self.cache, self.resolver.memo
        return MemoryCounts(cache.bytes, cache.max_bytes, cache.too_large, memo.bytes, memo.max_bytes)

    def _sighup(self) -> None:
        # The query log follows logrotate whatever becomes of the reload (a broken config included).
        self.reopen_querylog()
        _spawn(self.reload("SIGHUP"))

    def reopen_querylog(self) -> None:
        if self.querylog is not None:
            self.querylog.reopen()

    async def reload(self, why: str) -> bool:
        """Load and compile the policy again; swap it in only if it is whole."""
        return await self.source.reload(why)

    def _rejected(self, err: ConfigError | Exception, why: str) -> None:
        super()._rejected(err, why)
        if self.seat is not None:
            self.seat.tell({"op": "rejected", "version": self.policy.version})

    def _loaded(self, policy: Policy, why: str, milliseconds: float) -> None:
        new = policy.config
        lists = "reused" if policy.lists is self.policy.lists else "reloaded"
        upstreams = follow_config(self.upstreams, new.dns, self.stats)
        if upstreams is not self.upstreams:
            self.upstreams = self.resolver.upstreams = upstreams
            # Answers from the old upstreams may differ: start the cache afresh.
            self.cache.clear()
        self.cache.resize(*self._cache_bounds(new.dns))
        self.cache.stale_window = new.dns.serve_stale
        if self.seat is None:
            warn_restart_needed(self.started_with, new)
        if new.identity != self.started_with.identity and self.seat is None:
            log.warning("identity changed: restart blocker to apply (bindings, accounting and store keep running "
                        "as they started)")
        self.stats.prepare(policy.group_order, policy.lists.categories)
        # The old memo (up to hundreds of thousands of entries) freed at once would stall the loop.
        box: list[object] = [self.resolver.swap(policy)]
        asyncio.get_running_loop().run_in_executor(None, release, box)
        self._configure_querylog(policy)
        self.stats.last_reload_error = None
        self.stats.reloaded(True)
        log.info("reloaded (%s) policy=%s in %.0f ms (lists %s, %d devices)", why, policy.version, milliseconds, lists,
                 len(policy.devices))
        if self.seat is None:
            self._audit(self.audit.update(new.policy.exemptions, self.clock.now(), policy.version))
        else:
            self.seat.tell({"op": "loaded", "version": policy.version})


def warn_no_upstreams(config: Config) -> None:
    if not config.dns.upstreams:
        log.warning("no upstream servers configured or found in /etc/resolv.conf: allowed names will get SERVFAIL")


class RestartOnly(NamedTuple):
    """The settings a reload cannot change (the sockets and processes are made once, at start)."""

    listen: tuple[tuple[str, int], ...]
    metrics: tuple[str, int] | None
    workers: int
    identity: IdentityConfig

    @classmethod
    def of(cls, config: Config) -> RestartOnly:
        return cls(config.dns.listen, config.metrics.listen, config.dns.workers, config.identity)


def warn_restart_needed(running: RestartOnly, new: Config) -> None:
    """Settings a reload cannot apply (the sockets and processes are made once, at start): warned on
    every reload while the file differs from what runs."""
    if new.dns.listen != running.listen or new.metrics.listen != running.metrics:
        log.warning("dns.listen or metrics.listen differ from what runs: restart blocker to apply")
    if new.dns.workers != running.workers:
        log.warning("dns.workers is %d, %d run: restart blocker to apply", new.dns.workers, running.workers)


_background: set[asyncio.Future[Any]] = set()


def _spawn(coroutine: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine from a signal handler, keeping a reference until it is done."""
    future = asyncio.ensure_future(coroutine)
    _background.add(future)
    future.add_done_callback(_background.discard)


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop's runner where uvloop is installed (a dependency on Linux and macOS), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: running on the stock asyncio loop, several times slower")
        return asyncio.run
    return uvloop.run


def serve(config_path: Path | None) -> int:
    """Run the resolver until SIGTERM/SIGINT; exit code 0 on a clean stop, 2 on a startup error.

    With `dns.workers` above 1 this process becomes the supervisor of that many resolver processes.
    """
    setup_logging()
    try:
        policy = PolicySource.load(config_path)
    except ConfigError as err:
        log_problems("cannot start", err)
        return 2
    settle()  # the first load, frozen before anything is served (gcstats)
    for warning in policy.warnings:
        log.warning("%s", warning)
    if policy.config.dns.workers > 1:
        from blocker.workers import Supervisor

        # The supervisor forks its workers from its running loop: the stock loop keeps no state a
        # child could trip on (libuv's thread pool is not fork-safe); every worker runs on uvloop.
        return asyncio.run(Supervisor(config_path, policy).run())
    runner = event_loop_runner()

    async def main() -> int:
        return await Daemon(config_path, policy).run()

    return runner(main())
