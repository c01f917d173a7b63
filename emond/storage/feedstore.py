"""Where feed data is read and written: one interface over every storage server.

``FeedStore`` answers reads and file management (create, delete) for a feed
on any storage server, asynchronously (every method is a coroutine; nothing
here blocks the reactor or waits on another thread): a server hosted in this
process through its engines in the location's own threads (reads in its read
pool, creating and deleting files in its write thread); a remote one with ONE
read request over the stream per call, the storage server doing the whole
read (a data query with its DMY days, averages and splits, a value at a time,
the summaries of many feeds) and answering once. Every call has a timeout: a
server that does not answer in ``read_timeout`` seconds is a 504, one not
connected (or not open) a 503, one whose read queue is full a 503 as well.
``FeedWriter`` is what takes RECORD batches (the node's is
``sender.QueueWriter``: into the storage queue).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Awaitable, Callable, NamedTuple, Protocol, TypeVar

import numpy as np
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from emond.engine import COPY_CHUNK, DataQuery, FeedError, NoSuchFeed, RowLimit, Series, disk_summary, encode_chunk
from emond.errors import EmondError, TimedOut, Unavailable
from emond.meta.feeds import Feed
from emond.phpfina import FeedMeta
from emond.phptimeseries import SeriesMeta
from emond.pools import BoundedPool, PoolBusy
from emond.records import ENGINE_PHPFINA, Refusal
from emond.storage.remote import RemoteReadError, RemoteTimeout, RemoteUnavailable
from emond.storage.location import StorageEngines, StorageLocationService

T = TypeVar("T")

READ_TIMEOUT = 30.0  # seconds a remote storage server has to answer a read
COPY_READ = 1 << 20  # bytes read from a copy's source per request
COPY_WINDOW = 8  # chunks of a copy in flight to its target at once


class CopyReport(NamedTuple):
    """A feed copied to another storage server: its data file's size and SHA-256, the same
    at the source before the copy, in the bytes sent, and at the target after it."""

    size: int
    sha256: str


class DiskSummary(NamedTuple):
    """What is on disk for a feed: its files' size (None if unknown) and last point."""

    size: int | None
    last: tuple[int, float | None] | None


class FeedWriter(Protocol):
    async def write(self, server: int, batch: np.ndarray) -> list[Refusal]: ...


class FeedStore:
    def __init__(
        self, locations: dict[int, StorageLocationService], reactor: IReactorTime, read_timeout: float = READ_TIMEOUT
    ) -> None:
        self._locations = locations
        self.reactor = reactor
        self.read_timeout = read_timeout
        self.remotes: dict[int, Any] = {}  # storage server id -> RemoteLink (the stream)

    # -- plumbing ------------------------------------------------------------------

    def _hosted(self, server: int) -> tuple[StorageLocationService, StorageEngines]:
        location = self._locations.get(server)
        if location is None or location.engines is None:
            raise Unavailable(f"storage server {server} is not available")
        return location, location.engines

    async def _in(self, pool: BoundedPool, server: int, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in a hosted location's pool, answered within ``read_timeout``
        (a disk that hangs holds its thread, not the request)."""
        d = pool.run(work, *args)
        d.addTimeout(self.read_timeout, self.reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise TimedOut(f"storage server {server} did not answer in {self.read_timeout:g} s") from None
        except PoolBusy:
            raise Unavailable(f"storage server {server} is busy, try again shortly") from None

    async def _remote(self, link: Any, op: str, feedid: int, engine: int, *args: Any) -> Any:
        """One read request to a remote storage server; its errors as domain errors."""
        try:
            return await link.request(op, feedid, engine, *args, timeout=self.read_timeout)
        except RemoteReadError as e:
            if e.kind == "NoSuchFeed":
                raise NoSuchFeed(feedid)
            if e.kind == "RowLimit":
                raise RowLimit(int(str(e).rsplit(" ", 1)[-1]))
            if e.kind == "PoolBusy":
                raise Unavailable(f"storage server {link.server_id} is busy, try again shortly")
            raise FeedError(str(e))
        except RemoteTimeout as e:
            raise TimedOut(str(e))
        except RemoteUnavailable as e:
            raise Unavailable(str(e))

    async def _read(
        self, feed: Feed, op: str, args: tuple[Any, ...], local: Callable[[Any], T], decode: Callable[[Any], T], write: bool = False
    ) -> T:
        """``local(engine)`` in a hosted location's read threads (``write``: its write
        thread) for a hosted feed; one ``op`` request for a remote one."""
        link = self.remotes.get(feed.server)
        if link is not None:
            return decode(await self._remote(link, op, feed.id, feed.engine, *args))
        location, engines = self._hosted(feed.server)
        engine = engines.engine(feed.engine)
        return await self._in(location.writes if write else location.reads, feed.server, local, engine)

    # -- files -----------------------------------------------------------------------

    async def create(self, feed: Feed) -> None:
        args = (feed.interval,) if feed.engine == ENGINE_PHPFINA else ()
        await self._read(feed, "create", args, lambda e: e.create(feed.id, *args), lambda _: None, write=True)

    async def delete(self, feed: Feed) -> None:
        await self._read(feed, "delete", (), lambda e: e.delete(feed.id), lambda _: None, write=True)

    async def meta(self, feed: Feed) -> FeedMeta | SeriesMeta:
        def decode(fields: Any) -> FeedMeta | SeriesMeta:
            return FeedMeta(*fields) if feed.engine == ENGINE_PHPFINA else SeriesMeta(*fields)

        return await self._read(feed, "meta", (), lambda e: e.meta(feed.id), decode)

    async def export(self, feed: Feed, start: int, length: int | None = None) -> bytes:
        return await self._read(feed, "export", (start, length), lambda e: e.export(feed.id, start, length), bytes)

    # -- copying a feed to another storage server -------------------------------------

    async def checksum(self, feed: Feed) -> tuple[int, str]:
        """Size and SHA-256 of the feed's data file."""
        return await self._read(feed, "checksum", (), lambda e: e.checksum(feed.id), lambda v: (int(v[0]), str(v[1])))

    async def copy(self, feed: Feed, target: int) -> CopyReport:
        """Copy the feed's files to storage server ``target``, verified end to end.

        The feed must not be written meanwhile (a user move holds the user's packets and
        drains the storage queue first): a file that changes during the copy fails the
        checksum and nothing is installed; running the copy again starts it afresh."""
        size, sha256 = await self.checksum(feed)
        meta = await self.meta(feed)
        args = [meta.interval, meta.start_time] if feed.engine == ENGINE_PHPFINA else []

        def read(offset: int) -> Awaitable[bytes]:
            return self._read(feed, "read_data", (offset, COPY_READ), lambda e: e.read_data(feed.id, offset, COPY_READ), bytes)

        return await self.install(dataclasses.replace(feed, server=target), read, size, sha256, args)

    async def install(
        self, there: Feed, read: Callable[[int], Awaitable[bytes]], size: int, sha256: str, meta: list[int]
    ) -> CopyReport:
        """Put a feed's data file on ``there``'s storage server, verified end to end:
        ``read(offset)`` gives the file's bytes from ``offset``, ``COPY_READ`` at a time (fewer
        at its end), which must have ``size`` and ``sha256``; the server installs what it
        received only if it has them too, with ``meta`` (PHPFina: [interval, start_time]),
        and its file is checked once more after. Nothing is installed on a mismatch."""
        sent = hashlib.sha256()
        offset = 0
        while True:
            data = await read(offset)
            sent.update(data)
            pieces = [(offset + i, data[i : i + COPY_CHUNK]) for i in range(0, len(data), COPY_CHUNK)]
            if offset == 0:  # the first chunk starts the copy afresh at the target: alone, first
                first, pieces = pieces[:1] or [(0, b"")], pieces[1:]
                await self._receive(there, *first[0])
            for i in range(0, len(pieces), COPY_WINDOW):
                try:
                    await defer.gatherResults(
                        [defer.ensureDeferred(self._receive(there, o, d)) for o, d in pieces[i : i + COPY_WINDOW]],
                        consumeErrors=True,
                    )
                except defer.FirstError as e:  # the piece's own error (the target lost, ...), not a wrapper
                    e.subFailure.raiseException()
            offset += len(data)
            if len(data) < COPY_READ:
                break
        if (offset, sent.hexdigest()) != (size, sha256):
            raise FeedError(f"feed {there.id} changed while it was copied; copy it again")
        await self._read(there, "adopt", (size, sha256, meta), lambda e: e.adopt(there.id, size, sha256, meta), lambda _: None, write=True)
        if await self.checksum(there) != (size, sha256):
            raise FeedError(f"feed {there.id}: the copy on storage server {there.server} does not match its source")
        return CopyReport(size, sha256)

    async def _receive(self, feed: Feed, offset: int, data: bytes) -> None:
        await self._read(
            feed, "receive", (offset, encode_chunk(data)), lambda e: e.receive(feed.id, offset, data), lambda _: None, write=True
        )

    # -- reads -----------------------------------------------------------------------

    async def query(self, feed: Feed, query: DataQuery) -> Series:
        """A ``feed/data.json`` read of one feed (the engine's ``query``)."""
        return await self._read(feed, "query", (query.to_wire(),), lambda e: e.query(feed.id, query), Series.from_bytes)

    async def value_at(self, feed: Feed, when: int) -> float | None:
        """``feed/value.json?time=``: the feed's value at a time (None if missing)."""
        return await self._read(feed, "value_at", (when,), lambda e: e.value_at(feed.id, when), _number)

    async def lastvalue(self, feed: Feed) -> tuple[int, float | None] | None:
        """The last point on disk."""
        return await self._read(feed, "value", (), lambda e: e.lastvalue(feed.id), _point)

    async def summaries(self, feeds: list[Feed]) -> dict[int, DiskSummary]:
        """Size and last point on disk of many feeds: one job in a hosted location's
        read threads or one stream request per storage server.

        A feed whose server is not available here, or whose files are
        missing, gets ``DiskSummary(None, None)``.
        """
        out = {feed.id: DiskSummary(None, None) for feed in feeds}
        by_server: dict[int, list[Feed]] = {}
        for feed in feeds:
            by_server.setdefault(feed.server, []).append(feed)
        for server, group in by_server.items():
            link = self.remotes.get(server)
            try:
                if link is not None:
                    answer = await self._remote(link, "summaries", 0, 0, [[f.id, f.engine] for f in group])
                    out.update({f.id: _summary(item) for f, item in zip(group, answer)})
                else:
                    location, engines = self._hosted(server)
                    out.update(await self._in(location.reads, server, _summaries, engines, group))
            except EmondError:  # unavailable, timed out, or the engine refused
                continue  # not reachable now: unknown
        return out


def _summaries(engines: StorageEngines, feeds: list[Feed]) -> dict[int, DiskSummary]:
    out: dict[int, DiskSummary] = {}
    for feed in feeds:
        try:
            out[feed.id] = DiskSummary(*disk_summary(engines.engine(feed.engine), feed.engine, feed.id))
        except (KeyError, FeedError, OSError):
            out[feed.id] = DiskSummary(None, None)
    return out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _point(value: Any) -> tuple[int, float | None] | None:
    if not isinstance(value, list) or len(value) != 2:
        return None
    return int(value[0]), _number(value[1])


def _summary(item: Any) -> DiskSummary:
    if not isinstance(item, list) or len(item) != 2:
        return DiskSummary(None, None)
    size, last = item
    return DiskSummary(int(size) if isinstance(size, int) else None, _point(last))
