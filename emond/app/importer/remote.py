"""Feed files sent to a storage server reached over the stream (``[storage.servers]``).

The storage server installs a copy as a user move's (``FeedStore.install``): it receives the
data file in chunks, installs it only if its size and SHA-256 are those read from the source,
writes the PHPFina meta from the interval and start_time sent, and its file is checked once
more after. The meta is not sent as bytes: the server writes ``0, 0, interval, start_time``,
and its fields read back are compared with the source's.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import task, threads

from emond.app.importer.files import META, FeedFiles, FileResult, digest, engine_dir
from emond.config import NodeConfig
from emond.errors import EmondError
from emond.meta.feeds import Feed
from emond.phpfina import FeedMeta
from emond.records import ENGINE_PHPFINA
from emond.storage.feedstore import COPY_READ, FeedStore
from emond.storage.remote import LinkMetrics, StreamLink

WRITTEN = "copied over the stream"


class StreamUnavailable(Exception):
    """A storage server could not be reached, or refused the copy."""


def read_chunk(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def display(server: int, engine: int, name: str) -> str:
    """Where a file is on a storage server, for the report."""
    return f"storage{server}:{engine_dir(engine)}/{name}"


class StreamTargets:
    """Links to the storage servers of ``[storage.servers]`` the import writes to, opened
    as they are first needed."""

    def __init__(self, config: NodeConfig, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.store = FeedStore({}, reactor, config.feeds.read_timeout)
        self.links: dict[int, StreamLink] = {}
        self.metrics = LinkMetrics(CollectorRegistry())

    async def _link(self, server: int) -> FeedStore:
        if server in self.links:
            return self.store
        assert self.config.tls is not None  # required by the config with [storage.servers]
        link = StreamLink(server, self.config.storage_servers[server], self.config.tls, self.config.node.name, self.metrics, self.reactor)
        self.links[server] = link
        link.startService()
        self.store.remotes[server] = link
        deadline = self.reactor.seconds() + self.config.feeds.read_timeout
        while link.protocol is None:
            if self.reactor.seconds() > deadline:
                raise StreamUnavailable(f"storage server {server}: no stream within {self.config.feeds.read_timeout:g} s")
            await task.deferLater(self.reactor, 0.1, lambda: None)
        return self.store

    async def close(self) -> None:
        for link in self.links.values():
            await link.stopService()

    async def put(self, feed: Feed, files: FeedFiles, source_dir: str) -> list[FileResult]:
        """Send the feed's files to its storage server; the report of each."""
        store = await self._link(feed.server)
        data = os.path.join(source_dir, files.names[0])
        size, sha256 = await threads.deferToThread(digest, data)
        meta = [files.interval, files.start_time] if feed.engine == ENGINE_PHPFINA else []

        def read(offset: int) -> Any:
            return threads.deferToThread(read_chunk, data, offset, COPY_READ)

        try:
            await store.install(feed, read, size, sha256, meta)
            results = [FileResult(f"{engine_dir(feed.engine)}/{files.names[0]}", data, display(feed.server, feed.engine, files.names[0]),
                                  size, sha256, sha256, WRITTEN)]  # (install raises unless the server's checksum is this)
            if feed.engine == ENGINE_PHPFINA:
                results.append(await self._meta(store, feed, files, source_dir))
        except EmondError as e:
            raise StreamUnavailable(f"feed {feed.id}: storage server {feed.server}: {e.message}") from e
        return results

    async def _meta(self, store: FeedStore, feed: Feed, files: FeedFiles, source_dir: str) -> FileResult:
        name = files.names[1]
        path = os.path.join(source_dir, name)
        size, sha256 = await threads.deferToThread(digest, path)
        got = await store.meta(feed)
        assert isinstance(got, FeedMeta)
        held = hashlib.sha256(META.pack(0, 0, got.interval, got.start_time)).hexdigest()
        same = (got.interval, got.start_time, got.npoints) == (files.interval, files.start_time, files.points)
        return FileResult(f"phpfina/{name}", path, display(feed.server, feed.engine, name), size, sha256, held,
                          "written over the stream from interval and start_time", same)

    async def check(self, feed: Feed, files: FeedFiles, source_dir: str) -> list[FileResult]:
        """An imported feed's data file there against the source (its meta is not compared)."""
        store = await self._link(feed.server)
        out = []
        for index, name in enumerate(files.names):
            path = os.path.join(source_dir, name)
            size, sha256 = await threads.deferToThread(digest, path)
            there: str | None = None
            if index == 0:
                try:
                    there = (await store.checksum(feed))[1]
                except EmondError:
                    there = ""
            out.append(FileResult(f"{engine_dir(feed.engine)}/{name}", path, display(feed.server, feed.engine, name), size, sha256, there,
                                  "already imported"))
        return out
