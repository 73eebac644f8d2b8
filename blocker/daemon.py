"""The life of `blocker serve`: load, bind, ready; reload on SIGHUP or a file change; stop on SIGTERM.

A reload builds a whole new policy off the event loop and swaps it in one assignment; queries in
flight finish on the snapshot they started with. A broken config or list is logged as
FILE:LINE: message, counted, and the running policy keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from blocker.audit import ExemptionAudit
from blocker.cache import AnswerCache
from blocker.config import Config
from blocker.errors import ConfigError
from blocker.httpd import OpsServer
from blocker.metrics import Gauges, Stats, make_registry
from blocker.policy import Policy, load_policy
from blocker.querylog import QueryLog
from blocker.resolver import Resolver
from blocker.server import Listeners
from blocker.upstream import Upstreams
from blocker.yamlfile import format_endpoint

log = logging.getLogger("blocker")

POLL_SECONDS = 1.0
DRAIN_SECONDS = 3.0


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s blocker %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger("blocker")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def log_problems(prefix: str, err: ConfigError) -> None:
    for problem in err.problems:
        log.error("%s: %s", prefix, problem)


class Daemon:
    """Owns the running policy, the listeners, the cache and the ops endpoint."""

    def __init__(self, config_path: Path | None, policy: Policy) -> None:
        self.config_path = config_path
        self.policy = policy
        self.stats = Stats()
        dns = policy.config.dns
        self.cache = AnswerCache(dns.cache_size)
        self.upstreams = Upstreams(dns.upstreams, dns.upstream_timeout, self.stats)
        self.resolver = Resolver(policy, self.cache, self.upstreams, self.stats)
        self.listeners = Listeners(self.resolver)
        self.audit = ExemptionAudit()
        self.querylog: QueryLog | None = None
        self._configure_querylog(policy)
        self.ops: OpsServer | None = None
        self.ready = False
        self.stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._signature = file_signature(policy)

    async def run(self) -> int:
        config = self.policy.config
        if not config.dns.upstreams:
            log.warning("no upstream servers configured or found in /etc/resolv.conf: "
                        "allowed names will get SERVFAIL")
        try:
            for host, port in config.dns.listen:
                bound = await self.listeners.bind(host, port)
                log.info("listening dns=%s (udp+tcp)", format_endpoint(*bound))
            if config.metrics.listen is not None:
                gauges = Gauges(self._cache_numbers, lambda: self.resolver.policy)
                registry = make_registry(self.stats, gauges)
                self.ops = OpsServer(*config.metrics.listen, registry, lambda: self.ready)
                self.ops.start()
                log.info("listening metrics=http://%s/metrics", format_endpoint(*self.ops.address))
        except OSError as err:
            log.error("cannot listen: %s", err)
            await self.listeners.close(0)
            return 2
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload("SIGHUP")))
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        self.stats.reloaded(True)
        self._audit(self.audit.update(self.policy.config.policy.exemptions, datetime.now(UTC), self.policy.version))
        self.ready = True
        policy = self.policy
        log.info("ready pid=%d policy=%s config=%s categories=%d rules=%d upstreams=%s loop=%s", os.getpid(),
                 policy.version, config.source_name, len(policy.lists.categories), policy.lists.index.rule_count,
                 ",".join(self.upstreams.names) or "none", loop_name(loop))
        watcher = asyncio.ensure_future(self._watch_files())
        await self.stopping.wait()
        log.info("stopping: draining queries in flight")
        self.ready = False
        watcher.cancel()
        await self.listeners.close(DRAIN_SECONDS)
        if self.ops is not None:
            self.ops.stop()
        self.upstreams.close()
        if self.querylog is not None:
            self.querylog.close()
        log.info("stopped")
        return 0

    def _configure_querylog(self, policy: Policy) -> None:
        settings = policy.config.query_log
        current = self.querylog
        if current is not None and (settings.path != current.path):
            current.close()
            current = None
        if settings.path is None:
            self.querylog = None
        elif current is None:
            self.querylog = QueryLog(settings.path, settings.only_blocked)
            self.querylog.start()
        else:
            current.only_blocked = settings.only_blocked
            current.reopen()  # after a SIGHUP from logrotate, write to the new file
        self.resolver.querylog = self.querylog
        self.stats.querylog = self.querylog

    @staticmethod
    def _audit(events: list[dict[str, object]]) -> None:
        for event in events:
            log.info("audit %s", json.dumps(event, separators=(",", ":")))

    def _cache_numbers(self) -> tuple[int, int, int, int]:
        cache = self.cache
        return len(cache), cache.hits, cache.misses, cache.evictions

    async def reload(self, why: str) -> bool:
        """Load and compile the policy again; swap it in only if it is whole."""
        async with self._reload_lock:
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            try:
                policy = await loop.run_in_executor(None, load_policy, self.config_path)
            except ConfigError as err:
                # Metrics first: whoever reads the log line may scrape at once.
                first = err.problems[0]
                self.stats.last_reload_error = (first.file, first.line, first.message)
                self.stats.reloaded(False)
                log_problems(f"reload ({why}) rejected, keeping policy {self.resolver.policy.version}", err)
                self._signature = file_signature(self.resolver.policy, self.config_path)
                return False
            except Exception as err:
                self.stats.last_reload_error = (str(self.config_path or ""), 0, f"internal error: {err}")
                self.stats.reloaded(False)
                log.exception("reload (%s) failed, keeping policy %s", why, self.resolver.policy.version)
                return False
            self._apply(policy)
            self.stats.last_reload_error = None
            self.stats.reloaded(True)
            self._signature = file_signature(policy)
            log.info("reloaded (%s) policy=%s in %.0f ms", why, policy.version,
                     (time.perf_counter() - started) * 1000)
            return True

    def _apply(self, policy: Policy) -> None:
        old: Config = self.resolver.policy.config
        new = policy.config
        if (new.dns.upstreams, new.dns.upstream_timeout) != (old.dns.upstreams, old.dns.upstream_timeout):
            previous = self.upstreams
            self.upstreams = Upstreams(new.dns.upstreams, new.dns.upstream_timeout, self.stats)
            self.resolver.upstreams = self.upstreams
            # Answers from the old upstreams may differ: start the cache afresh.
            self.cache.clear()
            asyncio.get_running_loop().call_later(new.dns.upstream_timeout * 4, previous.close)
        self.cache.size = new.dns.cache_size
        if new.dns.listen != old.dns.listen or new.metrics.listen != old.metrics.listen:
            log.warning("dns.listen or metrics.listen changed: restart blocker to apply")
        self.resolver.swap(policy)
        self.policy = policy
        self._configure_querylog(policy)
        self._audit(self.audit.update(new.policy.exemptions, datetime.now(UTC), policy.version))

    async def _watch_files(self) -> None:
        """Poll the config and list files (a Kubernetes ConfigMap swaps a symlink, no inotify event),
        and record exemptions that start or expire: they do so at their timestamps, with no reload."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            self._audit(self.audit.tick(datetime.now(UTC), self.resolver.policy.version))
            signature = file_signature(self.resolver.policy, self.config_path)
            if signature != self._signature:
                self._signature = signature
                await self.reload("file change")


def file_signature(policy: Policy, config_path: Path | None = None) -> tuple[object, ...]:
    """What changes when any file of the policy changes (content, symlink target, new list files)."""
    paths: list[Path] = list(policy.lists.files)
    source = config_path or policy.config.source
    if source is not None:
        paths.append(source)
    folder = policy.config.blocklists
    try:
        listing = tuple(sorted(p.name for p in folder.glob("*.yaml")))
    except OSError:
        listing = ()
    stats = []
    for path in paths:
        try:
            st = path.stat()
            stats.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            stats.append((str(path), None))
    return (listing, tuple(stats))


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """`uvloop` or `asyncio`: which event loop really runs (the ready line says it)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def serve(config_path: Path | None) -> int:
    """Run the resolver until SIGTERM/SIGINT; exit code 0 on a clean stop, 2 on a startup error."""
    setup_logging()
    try:
        policy = load_policy(config_path)
    except ConfigError as err:
        log_problems("cannot start", err)
        return 2
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
        if sys.platform != "win32":
            log.warning("uvloop is not installed: running on the stock asyncio loop, at several times "
                        "the CPU per query (install blocker's dependencies)")
    else:
        runner = uvloop.run
    for warning in policy.warnings:
        log.warning("%s", warning)

    async def main() -> int:
        return await Daemon(config_path, policy).run()

    return runner(main())
