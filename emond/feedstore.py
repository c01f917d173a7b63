"""Where feed data is read and written: one interface over every storage server.

``FeedStore`` answers reads and file management (create, delete) for a feed
on any storage server: a server hosted in this process through its engines
in a thread; a remote one through the stream (later). ``FeedWriter`` takes
RECORD batches; its first implementation applies them to a hosted server's
engines directly.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np
from twisted.internet import threads

from emond.api import ApiError
from emond.feeds import Feed
from emond.records import ENGINE_PHPFINA, Refusal
from emond.storage import StorageLocationService


class FeedWriter(Protocol):
    async def write(self, server: int, batch: np.ndarray) -> list[Refusal]: ...


class FeedStore:
    def __init__(self, locations: dict[int, StorageLocationService]) -> None:
        self._locations = locations

    def _call(self, feed: Feed, method: str, *args: Any) -> Any:
        location = self._locations.get(feed.server)
        if location is None or location.engines is None:
            raise ApiError(f"storage server {feed.server} is not available", 503)
        engine = location.engines.engine(feed.engine)
        call: Callable[..., Any] = getattr(engine, method)
        return threads.deferToThread(call, feed.id, *args)

    async def create(self, feed: Feed) -> None:
        if feed.engine == ENGINE_PHPFINA:
            await self._call(feed, "create", feed.interval)
        else:
            await self._call(feed, "create")

    async def delete(self, feed: Feed) -> None:
        await self._call(feed, "delete")

    async def data(self, feed: Feed, start: float, end: float, interval: float, skipmissing: bool, limitinterval: bool) -> list:
        return await self._call(feed, "read", start, end, interval, skipmissing, limitinterval)

    async def average(self, feed: Feed, start: float, end: float, interval: float, skipmissing: bool) -> list:
        if feed.engine != ENGINE_PHPFINA:
            raise ApiError("This request is only supported by PHPFina")
        return await self._call(feed, "read_average", start, end, interval, skipmissing)

    async def lastvalue(self, feed: Feed) -> tuple[int, float | None] | None:
        """The last point on disk."""
        return await self._call(feed, "lastvalue")

    async def meta(self, feed: Feed) -> Any:
        return await self._call(feed, "meta")

    async def export(self, feed: Feed, start: int, length: int | None = None) -> bytes:
        return await self._call(feed, "export", start, length)


class LocalWriter:
    """Applies a batch to a hosted storage server's engines (in a thread)."""

    def __init__(self, locations: dict[int, StorageLocationService]) -> None:
        self._locations = locations

    async def write(self, server: int, batch: np.ndarray) -> list[Refusal]:
        location = self._locations.get(server)
        if location is None:
            raise ApiError(f"storage server {server} is not available", 503)
        return await location.apply_batch(batch)
