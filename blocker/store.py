"""Bindings shared by every replica through Redis/Valkey (redis-py's asyncio client).

Each binding is a key `<prefix>:binding:<address>` holding its JSON row, with the binding's TTL;
every change is also published on `<prefix>:bindings`, and every replica mirrors that feed into
its own BindingTable. The query path only ever reads the local table: the store is never waited
on. At (re)connection a replica subscribes first, then pushes what it learned while the store was
away, then loads the whole store, so replicas converge whichever came back first.

If the store lost its data (restarted without persistence: its `<prefix>:epoch` key changed or
vanished), each replica pushes its whole table back instead of dropping bindings the store no
longer has. While the store is down, replicas keep their last table, accounting still binds
locally, and the outage is logged and exported (`up` is 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from blocker.bindings import Binding, BindingTable
from blocker.config import StoreConfig
from blocker.inventory import Network, format_network

log = logging.getLogger("blocker.store")

BATCH = 1000
RETRY_MAX = 10.0

# Put back a binding this replica held while the store lost its data, unless the store has it already
# or a tombstone says its session was stopped (by a replica that saw the Stop while we did not).
# KEYS: binding key, tombstone key; ARGV: row JSON, TTL ms, session start, device, channel, message.
_SEED = """
local gone = redis.call('GET', KEYS[2])
if gone then
  local row = cjson.decode(gone)
  if row[2] == ARGV[4] and tonumber(row[4]) >= tonumber(ARGV[3]) then return 0 end
end
if redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
  return 1
end
return 0
"""


class BindingStore:
    """Mirrors one BindingTable to and from the store; run() until cancelled."""

    def __init__(self, table: BindingTable, config: StoreConfig, clock: Callable[[], float] = time.time) -> None:
        self.table = table
        self.config = config
        self.clock = clock
        self.replica = f"{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(3)}"
        self.channel = f"{config.prefix}:bindings"
        self.key_prefix = f"{config.prefix}:binding:"
        self.gone_prefix = f"{config.prefix}:gone:"
        self.epoch_key = f"{config.prefix}:epoch"
        self.up = False
        self.errors_total = 0
        self.last_sync = 0.0  # when the last full load from the store finished
        self._epoch: str | None = None
        self._pending: dict[Network, tuple[str, Binding]] = {}  # local changes not yet in the store
        self._wake = asyncio.Event()
        self._client: aioredis.Redis | None = None
        table.listeners.append(self._local_change)

    def _local_change(self, op: str, binding: Binding, local: bool) -> None:
        if not local:
            return
        # Coalesced per address and bounded by the table's own cap: a flood for one address is one entry.
        self._pending[binding.network] = (op, binding)
        self._wake.set()

    def key(self, network: Network) -> str:
        return self.key_prefix + format_network(network)

    async def run(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._session()
            except (RedisError, OSError) as err:
                self.errors_total += 1
                if self.up:
                    delay = 0.5
                    log.warning("binding store %s lost (%s): keeping the last %d bindings, binding locally",
                                self.config.url, err, len(self.table))
                elif delay == 0.5:
                    log.warning("binding store %s unreachable (%s): binding locally, retrying", self.config.url, err)
                self.up = False
            finally:
                await self._close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def _session(self) -> None:
        client = self._client = aioredis.Redis.from_url(self.config.url, socket_timeout=5.0,
                                                        socket_connect_timeout=2.0, health_check_interval=10)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.channel)
        epoch = await client.get(self.epoch_key)
        if epoch is None:
            await client.set(self.epoch_key, secrets.token_hex(8), nx=True)
            epoch = await client.get(self.epoch_key)
        epoch_text = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        reset = self._epoch is not None and epoch_text != self._epoch
        if reset or self._epoch is None:
            # A new store (or one that lost its data): what we hold goes back in, newest session winning.
            for binding in self.table.bindings():
                self._pending.setdefault(binding.network, ("seed", binding))
        self._epoch = epoch_text
        await self._push(client)
        await self._full_load(client)
        self.up = True
        log.info("binding store %s: in sync, %d bindings", self.config.url, len(self.table))
        reader = asyncio.ensure_future(self._read_feed(pubsub, client))
        try:
            while True:
                waiter = asyncio.ensure_future(self._wake.wait())
                done, _ = await asyncio.wait({reader, waiter}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    waiter.cancel()
                    reader.result()  # raises the connection error
                    return
                waiter.cancel()
                self._wake.clear()
                await self._push(client)
                if await client.get(self.epoch_key) is None:
                    raise RedisError("store was emptied")
        finally:
            reader.cancel()
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def _push(self, client: aioredis.Redis) -> None:
        """Write pending local changes (SET with TTL or DEL, and PUBLISH); kept pending if the store fails."""
        while self._pending:
            batch = list(self._pending.items())[:BATCH]
            now = self.clock()
            pipe = client.pipeline(transaction=False)
            for network, (op, binding) in batch:
                key = self.key(network)
                ttl_ms = int((binding.expires - now) * 1000)
                value = json.dumps(binding.as_row())
                if op == "unbind":
                    pipe.delete(key)
                    if ttl_ms > 0:  # remembered as long as the binding would have lived
                        pipe.set(self.gone_prefix + format_network(network), value, px=ttl_ms)
                    pipe.publish(self.channel, self._message("unbind", binding))
                elif ttl_ms <= 0:
                    continue
                elif op == "seed":
                    pipe.eval(_SEED, 2, key, self.gone_prefix + format_network(network), value, ttl_ms,
                              repr(binding.since), binding.device, self.channel, self._message("bind", binding))
                else:
                    pipe.set(key, value, px=ttl_ms)
                    pipe.delete(self.gone_prefix + format_network(network))
                    pipe.publish(self.channel, self._message("bind", binding))
            await pipe.execute()
            for network, entry in batch:
                if self._pending.get(network) is entry:
                    del self._pending[network]

    def _message(self, op: str, binding: Binding) -> str:
        return json.dumps({"op": op, "binding": binding.as_row(), "from": self.replica})

    async def _full_load(self, client: aioredis.Redis) -> None:
        """Load every binding in the store; drop mirrored ones the store no longer has (deleted while away)."""
        seen: set[Network] = set()
        keys: list[bytes] = []
        async for key in client.scan_iter(match=self.key_prefix + "*", count=BATCH):
            keys.append(key)
            if len(keys) >= BATCH:
                await self._load_keys(client, keys, seen)
                keys = []
        if keys:
            await self._load_keys(client, keys, seen)
        for binding in list(self.table.bindings()):
            if binding.network not in seen and binding.network not in self._pending:
                self.table.remove(binding.network)
        self.last_sync = self.clock()

    async def _load_keys(self, client: aioredis.Redis, keys: list[bytes], seen: set[Network]) -> None:
        for value in await client.mget(keys):
            binding = _decode_row(value)
            if binding is not None:
                seen.add(binding.network)
                self._apply_remote("bind", binding)

    async def _read_feed(self, pubsub: aioredis.client.PubSub, client: aioredis.Redis) -> None:
        """Messages are hints: the store's key is read back and is the truth (messages can arrive stale)."""
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None or message.get("type") != "message":
                continue
            try:
                data = json.loads(message["data"])
            except (ValueError, TypeError):
                continue
            if not isinstance(data, dict) or data.get("from") == self.replica:
                continue
            hinted = Binding.from_row(data.get("binding"))
            if hinted is None:
                continue
            current = _decode_row(await client.get(self.key(hinted.network)))
            if current is not None:
                self._apply_remote("bind", current)
            else:
                self._apply_remote("unbind", hinted)

    def _apply_remote(self, op: str, binding: Binding) -> None:
        if op == "bind":
            self.table.bind(binding.network, binding.device, binding.gateway, binding.since, binding.expires,
                            local=False)
        else:
            self.table.unbind(binding.network, binding.device, binding.since, local=False)


def _decode_row(value: bytes | str | None) -> Binding | None:
    if value is None:
        return None
    try:
        return Binding.from_row(json.loads(value))
    except (ValueError, TypeError):
        return None

