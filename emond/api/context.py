"""What a node's API handlers work with, built once per process and passed down.

A node has one ``NodeContext`` per shard: the database, the accounts (on the central
Redis), feed storage, the render pool and the metrics are shared; the shard's Redis and
what lives in it (feed and input last values, refusals, the storage queues a feed write
goes to) are that shard's. ``ShardContexts`` holds them all and finds a user's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from prometheus_client import CollectorRegistry

from emond.cluster.shardmap import ShardMap
from emond.config import DEFAULT_SHARD, NodeConfig
from emond.errors import Unavailable
from emond.meta.auth import Authenticator
from emond.meta.db import Database
from emond.meta.feeds import Feeds
from emond.storage.feedstore import FeedStore, FeedWriter
from emond.meta.inputs import Inputs
from emond.pools import BoundedPool
from emond.redis import Redis
from emond.meta.refusals import Refusals
from emond.meta.users import Users


@dataclass
class NodeContext:
    config: NodeConfig
    db: Database
    redis: Redis  # the shard's: ``feeds``, ``inputs``, ``refusals`` and ``writer`` use it
    users: Users
    auth: Authenticator  # on the central Redis
    feeds: Feeds
    inputs: Inputs
    store: FeedStore
    render: BoundedPool  # threads formatting read answers
    writer: FeedWriter
    refusals: Refusals
    registry: CollectorRegistry
    shard: str = DEFAULT_SHARD
    shards: "ShardContexts | None" = None  # every shard's context (set by ShardContexts)

    async def of_user(self, userid: int) -> "NodeContext":
        """The context of the shard ``userid`` is on: where that user's last values are."""
        return self if self.shards is None else await self.shards.of_user(userid)


class ShardContexts:
    """Every shard's context in this process, and which one serves a user (``ShardMap``)."""

    def __init__(self, contexts: Mapping[str, NodeContext], default: str, shardmap: ShardMap) -> None:
        self._contexts = dict(contexts)
        self.default = self._contexts[default]
        self.shardmap = shardmap
        for ctx in self._contexts.values():
            ctx.shards = self

    def __getitem__(self, shard: str) -> NodeContext:
        return self._contexts[shard]

    def __iter__(self) -> Iterator[NodeContext]:
        return iter(self._contexts.values())

    def __len__(self) -> int:
        return len(self._contexts)

    async def of_user(self, userid: int) -> NodeContext:
        if len(self._contexts) == 1:
            return self.default
        shard = await self.shardmap.shard_of(userid)
        ctx = self._contexts.get(shard)
        if ctx is None:  # the topology check at start refuses this; a user moved to a new shard since
            raise Unavailable(f"this process does not know shard {shard!r}: its config needs updating")
        return ctx

    async def of_call(self, call: Any) -> NodeContext:
        """The context of an API call: its authenticated user's shard's, else the default one
        (what such a call touches is shared, or found by owner: ``of_user``)."""
        return self.default if call.auth is None else await self.of_user(call.auth.userid)
