"""Where the running policy comes from: load, file signature, watch, and swap — for the daemon and the proxy.

`PolicySource` owns the one reload path. A reload reads and compiles off the event loop, and is
swapped in by the owner's `on_loaded` callback only when it is whole; a broken config or list
goes to `on_rejected` with every FILE:LINE problem and the running policy keeps serving.
Reload requests that arrive while one runs are coalesced into one more run. When no list file
changed, the compiled lists are reused, so an edit of devices or exemptions does not recompile a
million-rule index.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from blocker.blocklists import Blocklists
from blocker.errors import ConfigError
from blocker.gcstats import loading, release
from blocker.policy import Policy, load_policy

log = logging.getLogger("blocker")

POLL_SECONDS = 1.0
LOAD_SWITCH_INTERVAL = 0.0002  # seconds (default 0.005)
Signature = tuple[object, ...]


class PolicySource:
    """The config file (or embedded defaults) and the policy compiled from it."""

    def __init__(self, config_path: Path | None, policy: Policy,
                 on_loaded: Callable[[Policy, str, float], None],
                 on_rejected: Callable[[ConfigError | Exception, str], None],
                 signature: Signature | None = None) -> None:
        """`signature`: the files' signature when `policy` was read, if that was before now (a
        forked worker), so a file changed since is seen as changed."""
        self.config_path = config_path
        self.policy = policy
        self._on_loaded = on_loaded
        self._on_rejected = on_rejected
        # What the running policy was read from (lists are reused only when theirs still match), and
        # what the last load, good or not, read (a broken edit is not retried until the files change).
        self._signature = signature if signature is not None else file_signature(policy, config_path)
        self._seen = self._signature
        self._running: asyncio.Task[bool] | None = None
        self._again = False
        self._closed = False

    @staticmethod
    def load(config_path: Path | None) -> Policy:
        """The first load, synchronous (before anything serves); raises ConfigError."""
        with loading():
            return load_policy(config_path)

    @property
    def signature(self) -> Signature:
        """The files' signature when the running policy was read."""
        return self._signature

    def changed(self) -> bool:
        """Whether any file of the policy changed since it was last read."""
        return file_signature(self.policy, self.config_path) != self._seen

    async def reload(self, why: str) -> bool:
        """Load again; requests during a running reload are coalesced into one more run after it."""
        if self._closed:
            return False
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._settle(why))
        else:
            self._again = True
        return await asyncio.shield(self._running)

    def close(self) -> None:
        """Stop: a reload still running is cancelled and nothing is swapped in after this."""
        self._closed = True
        if self._running is not None:
            self._running.cancel()

    async def _settle(self, why: str) -> bool:
        ok = await self._reload_once(why)
        while self._again and not self._closed:
            self._again = False
            ok = await self._reload_once(f"{why}, coalesced")
        return ok

    async def _reload_once(self, why: str) -> bool:
        # The load and the freeing of the old policy hold the GIL in slices of the switch interval;
        # the listeners wait for the GIL after every socket call, so meanwhile slices are kept short
        # enough for them to keep up. The collector is off during the load, and the new policy is
        # frozen at its end (gcstats).
        interval = sys.getswitchinterval()
        sys.setswitchinterval(LOAD_SWITCH_INTERVAL)
        try:
            return await self._load_and_swap(why)
        finally:
            sys.setswitchinterval(interval)

    async def _load_and_swap(self, why: str) -> bool:
        started = time.perf_counter()
        old = self.policy
        # Stats taken before reading: a file changed while it is being read then differs from what
        # is recorded, and the next poll reloads it (and does not reuse lists read half-old).
        known = dict(_stats(_all_files(old, self.config_path)))
        listing = _listing(old.lists.folder)
        before = file_signature(old, self.config_path, known, listing)
        reuse = old.lists if before[0] == self._signature[0] else None
        loop = asyncio.get_running_loop()
        try:
            with loading():
                policy = await loop.run_in_executor(None, load_policy, self.config_path, reuse)
        except Exception as err:  # ConfigError, or a bug: either way the running policy stays
            if not self._closed:
                self._seen = before  # the running policy's own signature stays: its lists may be stale now
                self._on_rejected(err, why)
            return False
        if self._closed:
            return False
        self.policy = policy
        # Files the new policy reads for the first time (a new include) are stat'ed now.
        self._signature = self._seen = file_signature(policy, self.config_path, known,
                                                      listing if policy.lists.folder == old.lists.folder else None)
        self._on_loaded(policy, why, (time.perf_counter() - started) * 1000)
        # The old policy, freed at once here on the loop, would be a 25 ms pause at fleet size.
        box = [old]
        del old
        await loop.run_in_executor(None, release, box)
        return True

    async def watch(self, tick: Callable[[], None] | None = None) -> None:
        """Poll the files every second (a Kubernetes ConfigMap swaps a symlink: no inotify event)
        and reload on a change; `tick` runs on every poll (the daemon's exemption transitions).
        An error in one round is logged and the next round runs: watching never stops by itself."""
        while not self._closed:
            await asyncio.sleep(POLL_SECONDS)
            try:
                if tick is not None:
                    tick()
                if self.changed():
                    await self.reload("file change")
            except Exception:
                log.exception("policy watch: error in one round (the next runs in %.0f s)", POLL_SECONDS)


def _stat(path: Path) -> object:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _stats(paths: list[Path], known: dict[str, object] | None = None) -> tuple[tuple[str, object], ...]:
    """(path, stat) per path; a stat in `known` (taken earlier, before a read) is used as it is."""
    return tuple((str(path), known[str(path)] if known is not None and str(path) in known else _stat(path))
                 for path in paths)


def _listing(folder: Path) -> tuple[str, ...]:
    try:
        return tuple(sorted(p.name for p in folder.glob("*.yaml")))
    except OSError:
        return ()


def _own_files(policy: Policy, config_path: Path | None) -> list[Path]:
    """The files of a policy besides its lists: the config and the files it names."""
    source = config_path or policy.config.source
    paths = [source] if source is not None else []
    if policy.config.policy.exemptions_file is not None:
        paths.append(policy.config.policy.exemptions_file)
    paths.extend(policy.inventory.files)
    return paths


def _all_files(policy: Policy, config_path: Path | None) -> list[Path]:
    return [*policy.lists.files, *_own_files(policy, config_path)]


def lists_signature(lists: Blocklists, known: dict[str, object] | None = None,
                    listing: tuple[str, ...] | None = None) -> Signature:
    """What changes when a list file, an included file or the set of list files changes."""
    return (listing if listing is not None else _listing(lists.folder), _stats(list(lists.files), known))


def file_signature(policy: Policy, config_path: Path | None = None, known: dict[str, object] | None = None,
                   listing: tuple[str, ...] | None = None) -> Signature:
    """What changes when any file of the policy changes (content, symlink target, new list files);
    its first element is the lists' own signature."""
    return (lists_signature(policy.lists, known, listing), _stats(_own_files(policy, config_path), known))
