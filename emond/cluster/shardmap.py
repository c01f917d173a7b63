"""Which shard a user is on: ``users.shard`` in the central database, cached per process.

Every front resolves the caller's shard on every call, so the answer is cached (an LRU of
``CACHE_SIZE`` users). A user who moves is announced on the central Redis channel
``keys.USER_MOVED`` (payload: the user id), and each process forgets that user. Messages
published while a process is not subscribed are lost, so the cache is only used while the
subscription is live: it is dropped when the subscription ends, bypassed (every lookup
asks the database) until it is back, and dropped again when it is back.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from emond import keys
from emond.errors import NotFound
from emond.meta.db import Database
from emond.redis import Redis, RedisTLS, Subscription

CACHE_SIZE = 100_000  # users whose shard is remembered (a few MB)


class ShardMap:
    """``await shard_of(userid)``: the name of the user's shard.

    With one configured shard there is nothing to look up: every user is on it (the
    topology check refuses a database whose users are elsewhere)."""

    log = Logger()

    def __init__(self, db: Database, shards: Sequence[str], size: int = CACHE_SIZE) -> None:
        self.db = db
        self.only = shards[0] if len(shards) == 1 else None
        self.size = size
        self._cache: OrderedDict[int, str] = OrderedDict()
        # Bumped by every forget/clear: a lookup that was in flight across one is not cached
        # (it may have read the row before the move).
        self._generation = 0
        self._live = False  # subscribed to USER_MOVED: the cache may be used
        self._changes: list[defer.Deferred[str]] = []

    def listen(self, url: str, timeout: float, reactor: Any, tls: RedisTLS | None = None) -> Subscription:
        """The subscription to ``keys.USER_MOVED`` on the central Redis at ``url`` (``tls``:
        for a ``rediss://`` url) that keeps this map current (opened and closed by its owner,
        ``NodeAppService``)."""
        return Subscription(url, keys.USER_MOVED, self._moved, self._subscribed, self._lost, timeout, reactor, tls)

    async def shard_of(self, userid: int) -> str:
        if self.only is not None:
            return self.only
        found = self._cache.get(userid)
        if found is not None:
            self._cache.move_to_end(userid)
            return found
        generation = self._generation
        row = await self.db.one("SELECT shard FROM users WHERE id = ?", userid)
        if row is None:
            raise NotFound("User does not exist")
        shard = str(row[0])
        if self._live and generation == self._generation:
            self._cache[userid] = shard
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return shard

    def cached(self, userid: int) -> str | None:
        """The cached shard of a user, if any (tests, tools)."""
        return self._cache.get(userid)

    def forget(self, userid: int) -> None:
        self._generation += 1
        self._cache.pop(userid, None)

    def clear(self) -> None:
        self._generation += 1
        self._cache.clear()

    def next_change(self) -> defer.Deferred[str]:
        """Fires after the next message or (re)subscription has been applied, with
        ``"moved"``, ``"subscribed"`` or ``"lost"`` (tests, tools)."""
        d: defer.Deferred[str] = defer.Deferred()
        self._changes.append(d)
        return d

    def _changed(self, what: str) -> None:
        waiting, self._changes = self._changes, []
        for d in waiting:
            d.callback(what)

    def _moved(self, payload: bytes) -> None:
        try:
            userid = int(payload)
        except ValueError:
            self.log.warn("{channel}: not a user id: {payload!r}; forgetting every user's shard", channel=keys.USER_MOVED, payload=payload[:64])
            self.clear()
        else:
            self.forget(userid)
        self._changed("moved")

    def _subscribed(self) -> None:
        self.clear()  # a move may have been announced while not subscribed
        self._live = True
        self._changed("subscribed")

    def _lost(self) -> None:
        self._live = False
        self.clear()
        self._changed("lost")


async def announce_moved(central: Redis, userid: int) -> None:
    """Tell every process that ``userid`` is on another shard now (after the database says so)."""
    await central.call("PUBLISH", keys.USER_MOVED, str(int(userid)))
