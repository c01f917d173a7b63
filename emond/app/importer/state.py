"""The old server's Redis state carried into emond's: input and feed last values, process state.

Read from emoncms's Redis (``source.EmoncmsRedis``) for the inputs and feeds that are in emond,
written to the Redis of the user's shard under emond's names (emoncms.org's, the same), each key
only where emond has none (``SET_ABSENT``): emond's own state, however old, is never replaced,
so a run again writes nothing twice. A single node's private redis-server is started for this
when the node is not running, and stopped after.
"""

from __future__ import annotations

import os
from collections import Counter
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from emond import keys
from emond.app.importer.source import EmoncmsRedis, Hash
from emond.app.node import on_central, shard_redis
from emond.app.redisproc import SOCKET, EmbeddedRedis, embedded_redis_dir, embedded_redis_url
from emond.config import NodeConfig
from emond.redis import Redis, RedisUnavailable

# KEYS: {time, value} hashes; ARGV: time, value for each. Each is written only where the key
# is absent; fires with the number written.
SET_ABSENT = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'time', ARGV[2 * i - 1], 'value', ARGV[2 * i])
    n = n + 1
  end
end
return n
"""
CHUNK = 200  # keys per script call


class StateUnavailable(Exception):
    """A Redis (the old one, or emond's) could not be used."""


class StateCopier:
    def __init__(self, config: NodeConfig, reactor: Any, url: str, dry_run: bool) -> None:
        self.config = config
        self.reactor = reactor
        self.dry_run = dry_run
        try:
            self.old = EmoncmsRedis(Redis.connect(url, config.redis.timeout, reactor, poolsize=2))
        except ValueError as e:
            raise StateUnavailable(f"--redis: {e} (redis://[:PASSWORD@]HOST:PORT/DB)") from e
        self.targets: dict[str, Redis] = {}
        self.embedded: EmbeddedRedis | None = None
        self.counts: Counter[str] = Counter()

    async def find_prefix(self, inputids: list[int], feedids: list[int]) -> str:
        try:
            return await self.old.find_prefix(inputids, feedids)
        except RedisUnavailable as e:
            raise StateUnavailable(f"emoncms redis {self.old.redis.url}: {e}") from e

    async def copy(self, userid: int, shard: str, inputs: list[int], feeds: list[int]) -> None:
        """The state of these inputs and feeds of the user (all in emond) into its shard's Redis."""
        try:
            found: list[tuple[str, str, Hash]] = []
            found += [("input", keys.input_lastvalue(i), h) for i, h in (await self.old.input_lastvalues(inputs)).items()]
            found += [("feed", keys.feed_lastvalue(f), h) for f, h in (await self.old.feed_lastvalues(feeds)).items()]
            found += [("process", keys.process_state(n, f), h) for (n, f), h in (await self.old.process_state(feeds)).items()]
        except RedisUnavailable as e:
            raise StateUnavailable(f"emoncms redis: {e}") from e
        for kind, _, _ in found:
            self.counts[kind] += 1
        if self.dry_run or not found:
            return
        try:
            target = await self._target(shard)
            for chunk in _chunks(found, CHUNK):
                args = [x for _, _, h in chunk for x in (h["time"], h["value"])]
                written = await target.call("EVAL", SET_ABSENT, len(chunk), *[k for _, k, _ in chunk], *args)
                self.counts["written"] += int(written)
            await target.call("INCR", keys.user_version(userid))  # a running consumer reloads the user
        except RedisUnavailable as e:
            raise StateUnavailable(f"emond redis (shard {shard}): {e}") from e

    async def _target(self, shard: str) -> Redis:
        client = self.targets.get(shard)
        if client is not None:
            return client
        url = self.config.redis.url
        if not url:  # a single node's private redis-server: started for the import if it is not running
            url = embedded_redis_url(self.config.node.datadir)
            directory = embedded_redis_dir(self.config.node.datadir)
            if on_central(self.config, shard) and self.embedded is None and not os.path.exists(os.path.join(directory, SOCKET)):
                self.embedded = EmbeddedRedis(directory, self.reactor)
                self.embedded.startService()
                await self.embedded.ready
        client = shard_redis(self.config, shard, url).client(self.reactor, poolsize=2)
        client.open()
        self.targets[shard] = client
        return client

    def summary(self) -> dict[str, Any]:
        found = sum(self.counts[k] for k in ("input", "feed", "process"))
        return {
            "from": "redis",
            "prefix": self.old.prefix,
            "input_lastvalues": self.counts["input"],
            "feed_lastvalues": self.counts["feed"],
            "process_state": self.counts["process"],
            "written": self.counts["written"],
            "kept": 0 if self.dry_run else found - self.counts["written"],  # emond had its own
        }

    async def close(self) -> None:
        for client in self.targets.values():
            await client.disconnect()
        await self.old.redis.disconnect()
        if self.embedded is not None:
            await self.embedded.stopService()


REBUILT: Mapping[str, str] = MappingProxyType({
    "from": "files",
    "how": "no --redis: emond rebuilds feed last values and totals from the last points on disk, "
    "and input last values from the emoncms input table's time and value (imported)",
})


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
