"""Where feed data is read and written: one interface over every storage server.

``FeedStore`` answers reads and file management (create, delete) for a feed
on any storage server: a server hosted in this process through its engines
in a thread; a remote one through the stream (later). ``FeedWriter`` takes
RECORD batches; its first implementation applies them to a hosted server's
engines directly.
"""

from __future__ import annotations

import math
from datetime import datetime, tzinfo
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np
from twisted.internet import defer, threads

from emond.api import ApiError
from emond.engine import MAX_DATAPOINTS, FeedError, NoSuchFeed, php_round
from emond.feeds import Feed
from emond.phpfina import FeedMeta
from emond.phptimeseries import SeriesMeta
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES, Refusal
from emond.remote import RemoteReadError, RemoteUnavailable
from emond.storage import StorageEngines, StorageLocationService

CSV_LIMIT = 25 * 1048576  # bytes, as emoncms.org
CSV_BYTES_PER_POINT = 17  # emoncms.org's estimate
CSV_CHUNK = MAX_DATAPOINTS - 1  # samples per engine read


class DiskSummary(NamedTuple):
    """What is on disk for a feed: its files' size (None if unknown) and last point."""

    size: int | None
    last: tuple[int, float | None] | None


class FeedWriter(Protocol):
    async def write(self, server: int, batch: np.ndarray) -> list[Refusal]: ...


class RemoteEngine:
    """A remote storage server's engine, for code that runs in a thread: each call
    is a read request over the stream, made from the reactor while the thread waits."""

    def __init__(self, link: Any, engine: int) -> None:
        self.link = link
        self.engine_id = engine

    def _request(self, op: str, feedid: int, *args: Any) -> Any:
        from twisted.internet import reactor

        try:
            return threads.blockingCallFromThread(
                reactor, lambda: defer.ensureDeferred(self.link.request(op, feedid, self.engine_id, *args))
            )
        except RemoteReadError as e:
            raise (NoSuchFeed(feedid) if e.kind == "NoSuchFeed" else FeedError(str(e)))
        except RemoteUnavailable as e:
            raise ApiError(str(e), 503)

    def create(self, feedid: int, *args: Any) -> None:
        self._request("create", feedid, *args)

    def delete(self, feedid: int) -> None:
        self._request("delete", feedid)

    def read(self, feedid: int, *args: Any) -> list:
        return self._request("data", feedid, *args)

    def read_average(self, feedid: int, *args: Any) -> list:
        return self._request("average", feedid, *args)

    def lastvalue(self, feedid: int) -> Any:
        last = self._request("value", feedid)
        return tuple(last) if last is not None else None

    def meta(self, feedid: int) -> Any:
        fields = self._request("meta", feedid)
        return FeedMeta(*fields) if self.engine_id == ENGINE_PHPFINA else SeriesMeta(*fields)

    def export(self, feedid: int, *args: Any) -> bytes:
        return self._request("export", feedid, *args)


class RemoteEngines:
    def __init__(self, link: Any) -> None:
        self.link = link

    def engine(self, engine: int) -> RemoteEngine:
        if engine not in (ENGINE_PHPFINA, ENGINE_PHPTIMESERIES):
            raise KeyError(engine)
        return RemoteEngine(self.link, engine)


class FeedStore:
    def __init__(self, locations: dict[int, StorageLocationService]) -> None:
        self._locations = locations
        self.remotes: dict[int, Any] = {}  # storage server id -> RemoteLink (the stream)

    def _engines(self, server: int) -> StorageEngines | RemoteEngines:
        remote = self.remotes.get(server)
        if remote is not None:
            return RemoteEngines(remote)
        location = self._locations.get(server)
        if location is None or location.engines is None:
            raise ApiError(f"storage server {server} is not available", 503)
        return location.engines

    def _call(self, feed: Feed, method: str, *args: Any) -> Any:
        engine = self._engines(feed.server).engine(feed.engine)
        call: Callable[..., Any] = getattr(engine, method)
        return threads.deferToThread(call, feed.id, *args)

    def _run(self, feed: Feed, work: Callable[..., Any], *args: Any) -> Any:
        """``work(engine, feed, *args)`` in a thread, on the feed's engine."""
        engine = self._engines(feed.server).engine(feed.engine)
        return threads.deferToThread(work, engine, feed, *args)

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

    async def summaries(self, feeds: list[Feed]) -> dict[int, DiskSummary]:
        """Size and last point on disk of many feeds: one thread call per storage server.

        A feed whose server is not available here, or whose files are
        missing, gets ``DiskSummary(None, None)``.
        """
        out = {feed.id: DiskSummary(None, None) for feed in feeds}
        by_server: dict[int, list[Feed]] = {}
        for feed in feeds:
            by_server.setdefault(feed.server, []).append(feed)
        for server, group in by_server.items():
            try:
                engines = self._engines(server)
            except ApiError:
                continue
            out.update(await threads.deferToThread(_summaries, engines, group))
        return out

    async def values_at(self, feed: Feed, times: list[int], steps: list[int]) -> list[float | None]:
        """The value at each time: the nearest slot (PHPFina) or the nearest
        record closer than its step (PHPTimeSeries), None if missing."""
        return await self._run(feed, _values_at, times, steps)

    async def averages_over(self, feed: Feed, times: list[int], steps: list[int]) -> list[float | None]:
        """The mean of the slots in each [time, time + step) (PHPFina only)."""
        if feed.engine != ENGINE_PHPFINA:
            raise ApiError("This request is only supported by PHPFina")
        return await self._run(feed, _averages_over, times, steps)

    async def csv(self, feed: Feed, start: int, end: int, interval: int, zone: tzinfo | None = None) -> bytes:
        """``time,value`` lines from ``start`` to ``end`` (seconds, inclusive),
        one every ``interval``; times as unix seconds, or local
        ``d/m/Y H:i:s`` in ``zone``. Refused (FeedError) above 25 MiB."""
        return await self._run(feed, _csv, start, end, interval, zone)


# -- work done in a thread, through the engines' public methods -------------


def _summaries(engines: StorageEngines | RemoteEngines, feeds: list[Feed]) -> dict[int, DiskSummary]:
    out: dict[int, DiskSummary] = {}
    for feed in feeds:
        try:
            engine = engines.engine(feed.engine)
            npoints = engine.meta(feed.id).npoints
            size = 16 + 4 * npoints if feed.engine == ENGINE_PHPFINA else 9 * npoints
            out[feed.id] = DiskSummary(size, engine.lastvalue(feed.id))
        except (KeyError, FeedError, OSError, ApiError):
            out[feed.id] = DiskSummary(None, None)
    return out


def _values_at(engine: Any, feed: Feed, times: list[int], steps: list[int]) -> list[float | None]:
    out: list[float | None] = []
    for t, step in zip(times, steps):
        step = max(int(step), 1)
        # One sample: the engine's own nearest-slot rule (limitinterval for PHPTimeSeries).
        rows = engine.read(feed.id, t * 1000, (t + step) * 1000, step, False, True)
        out.append(rows[0][1] if rows and rows[0][0] == t * 1000 else None)
    return out


def _averages_over(engine: Any, feed: Feed, times: list[int], steps: list[int]) -> list[float | None]:
    out: list[float | None] = []
    for t, step in zip(times, steps):
        step = max(int(step), 1)
        rows = engine.read_average(feed.id, t * 1000, (t + step) * 1000, step, False)
        out.append(rows[0][1] if rows else None)
    return out


def _csv(engine: Any, feed: Feed, start: int, end: int, interval: int, zone: tzinfo | None) -> bytes:
    interval = max(int(interval), 1)
    if feed.engine == ENGINE_PHPFINA:
        meta = engine.meta(feed.id)
        slot = meta.interval
        # Whole slots apart, starting on a slot: every sample is a stored slot.
        step = max(int(php_round(max(interval, slot) / slot)), 1) * slot
        if start > meta.start_time:
            start = meta.start_time + -(-(start - meta.start_time) // slot) * slot
        else:
            start = meta.start_time
    else:
        step = interval
    if end < start:
        return b""
    count = (end - start) // step + 1
    if count * CSV_BYTES_PER_POINT > CSV_LIMIT:
        raise FeedError(f"CSV download limit exceeded downloadsize={count * CSV_BYTES_PER_POINT}")
    if feed.engine == ENGINE_PHPFINA:
        if meta.npoints == 0:
            return b""
        end = min(end, meta.end_time)  # nothing stored beyond the last slot
        count = max((end - start) // step + 1, 0)
    lines: list[str] = []
    last = -1
    for a in range(0, count, CSV_CHUNK):
        b = min(a + CSV_CHUNK, count)
        lo, hi = start + a * step, start + b * step
        if feed.engine == ENGINE_PHPFINA:
            rows = engine.read(feed.id, lo * 1000, hi * 1000, step, True, True)
            points = [(t // 1000, v) for t, v in rows if t < hi * 1000]
        else:
            # The nearest record to each sample, at its own time, each once.
            rows = engine.read(feed.id, lo * 1000, hi * 1000, step, True, False)
            points = []
            for t_ms, v in rows:
                t = t_ms // 1000
                if t > last and start <= t <= end:
                    points.append((t, v))
                    last = t
        for t, v in points:
            when = datetime.fromtimestamp(t, zone).strftime("%d/%m/%Y %H:%M:%S") if zone else str(t)
            lines.append(f"{when},{float32_text(v)}\n")
    return "".join(lines).encode()


def float32_text(value: float) -> str:
    """The shortest of 7, 8 or 9 significant digits that reads back as the same float32."""
    f = np.float32(value)
    if not math.isfinite(f):
        return "nan" if f != f else ("inf" if f > 0 else "-inf")
    for digits in (7, 8):
        text = "%.*g" % (digits, f)
        if np.float32(text) == f:
            return text
    return "%.9g" % f


class LocalWriter:
    """Applies a batch to a hosted storage server's engines (in a thread)."""

    def __init__(self, locations: dict[int, StorageLocationService]) -> None:
        self._locations = locations

    async def write(self, server: int, batch: np.ndarray) -> list[Refusal]:
        location = self._locations.get(server)
        if location is None:
            raise ApiError(f"storage server {server} is not available", 503)
        return await location.apply_batch(batch)
