"""Storage queues: RECORD batches waiting for their storage server, and their senders.

Each storage server id has one queue (``emond:st:<id>``) and at most one
active sender (a lease with a fencing token, like input queues). The sender
of a server hosted in this process applies batches, in queue order, to the
engines in a thread; only then does it remove them from the queue and
record each feed's last value on disk (``feed:disk:<id>``), in one fenced
script. A crash before that commit means the batch is applied again, which
gives the same files.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from emond import keys
from emond.config import EnginesSection
from emond.engine import TimeWindow
from emond.keys import storage_seq, storage_stream
from emond.queue import APPEND_SEQ, Commit, ElementHandler, Entry, Lease, LeasedReader, OneQueue, Scripts, Tenure, storage_queue
from emond.records import RECORD, Refusal
from emond.redis import Redis, RedisUnavailable
from emond.meta.refusals import Refusals, Refused
from emond.storage.location import StorageLocationService


class QueueWriter:
    """The node's feed writer: batches go to the feed's storage queue (``ok`` once Redis has them).

    Records outside the engines' time window are refused here, at once, so
    that ``feed/insert.json`` can say so; the storage server refuses anything
    else it cannot store, and that is recorded when it is found.
    """

    def __init__(self, redis: Redis, engines: EnginesSection, clock: Callable[[], float] = time.time) -> None:
        self.scripts = Scripts(redis)
        self.window = TimeWindow(engines.window_past, engines.window_future, clock)

    async def write(self, server: int, batch: np.ndarray) -> list[Refusal]:
        batch, refused = self.window.split(batch)
        if batch.shape[0]:
            await self.scripts.run(APPEND_SEQ, [storage_stream(server), storage_seq(server)], [batch.tobytes()])
        return refused


class RefusalRecorder:
    """Records a storage server's refusals against the users owning the feeds."""

    def __init__(self, refusals: Refusals, owner_of: Callable[[list[int]], Any]) -> None:
        self.refusals = refusals
        self.owner_of = owner_of

    async def record(self, refusals: list[Refusal]) -> None:
        owners = await self.owner_of(sorted({r.feed for r in refusals}))
        by_user: dict[int, list[Refused]] = {}
        for r in refusals:
            userid = owners.get(r.feed)
            if userid is not None:
                by_user.setdefault(userid, []).append(Refused(r.time, "", f"feed:{r.feed}", r.reason))
        for userid, items in by_user.items():
            await self.refusals.record(userid, items)


class SenderMetrics:
    """The hosted senders' metric families, registered once per process (a sender per
    storage location labels them with its server id)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.points = Counter("emond_points_written", "Datapoints applied to feed files", ["server"], registry=registry)
        self.errors = Counter("emond_storage_errors", "Failed attempts to apply a batch", ["server"], registry=registry)


class LocalSenderService(Service, ElementHandler):
    """Applies a hosted storage server's queue to its engines, in order (``emond.queue.LeasedReader``)."""

    log = Logger()
    doing = "applying a batch"

    def __init__(
        self,
        server_id: int,
        location: StorageLocationService,
        redis: Redis,
        blocking: Redis,
        recorder: RefusalRecorder,
        reactor: IReactorTime,
        node: str,
        metrics: "SenderMetrics",
        batch: int = 64,
        lease_ms: int = 10_000,
        block_ms: int = 500,
        clock: IReactorTime | None = None,
    ) -> None:
        """``clock``: the lease's and retries' (tests give a ``task.Clock``); default ``reactor``."""
        self.server_id = server_id
        self.location = location
        self.recorder = recorder
        clock = clock or reactor
        self.lease = Lease(Scripts(redis), storage_queue(server_id).name, f"{node}-{uuid.uuid4().hex[:8]}", lease_ms)
        self.reader = LeasedReader(
            OneQueue(self.lease, storage_queue(server_id), clock), self, blocking, clock, f"storage queue {server_id}",
            batch=batch, block_ms=block_ms,
        )
        self.points = metrics.points.labels(str(server_id))
        self.errors = metrics.errors.labels(str(server_id))

    def startService(self) -> None:
        super().startService()
        self.reader.start()

    async def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        await self.reader.stop()  # the batch in hand is applied and committed first

    def idle(self) -> defer.Deferred[None]:
        """Fires once the queue has been seen empty after this call (tests, drains)."""
        return self.reader.idle()

    def unfinished(self) -> list[str]:
        """What a stop cut short would leave undone (for the log)."""
        return self.reader.unfinished()

    async def ready(self) -> None:
        await self.location.opened

    async def handle(self, tenure: Tenure, entries: list[Entry]) -> None:
        """Apply the batches in a thread, then remove them and record the feeds' disk values, fenced."""
        ids = [entry_id for entry_id, _fields in entries]
        parts = [np.frombuffer(fields[b"b"], dtype=RECORD) for _id, fields in entries]
        batch = np.concatenate(parts) if len(parts) > 1 else parts[0]
        refusals = await self.location.apply_batch(batch)
        await tenure.commit(ids, disk_values(batch, refusals))
        self.points.inc(batch.shape[0] - len(refusals))
        if refusals:
            await self.recorder.record(refusals)

    def failed(self, tenure: Tenure | None, error: Exception) -> None:
        if not isinstance(error, RedisUnavailable):  # a disk error: nothing committed, tried again
            self.errors.inc()

    def status(self) -> dict[str, object]:
        return {"ok": self.reader.error is None, "holding": bool(self.lease.token), "error": self.reader.error}


def disk_values(batch: np.ndarray, refusals: list[Refusal]) -> Commit:
    """The commit of an applied batch: each feed's last value now on disk (``feed:disk:<id>``),
    only if newer than the one recorded."""
    commit = Commit()
    for feed, when, value in last_per_feed(batch, {(r.feed, r.time) for r in refusals}):
        commit.set_if_newer(keys.feed_disk(feed), when, repr(value))
    return commit


def last_per_feed(batch: np.ndarray, refused: set[tuple[int, int]]) -> list[tuple[int, int, float]]:
    """The latest stored (time, value) per feed in a batch (the last accepted for a time)."""
    if refused:
        wanted = np.array([(f << 32) | t for f, t in refused], dtype=np.uint64)
        batch = batch[~np.isin(_feed_time(batch), wanted)]
    n = batch.shape[0]
    if not n:
        return []
    feeds = batch["feed"]
    low = int(feeds.min())
    span = int(feeds.max()) - low + 1
    if span <= DENSE_FEEDS + 4 * n:
        # Feed ids close together (the usual case): no sort. Per feed slot, the largest
        # (time, position) — the latest time, and of its records the last accepted.
        key = (batch["time"].astype(np.uint64) << np.uint64(32)) | np.arange(1, n + 1, dtype=np.uint64)
        best = np.zeros(span, dtype=np.uint64)
        np.maximum.at(best, feeds - low, key)
        picked = (best[best != 0] & np.uint64(0xFFFFFFFF)).astype(np.intp) - 1
    else:
        order = np.lexsort((batch["time"], feeds))  # stable: the last accepted of a time stays last
        sorted_feeds = feeds[order]
        picked = order[np.flatnonzero(np.r_[sorted_feeds[1:] != sorted_feeds[:-1], True])]
    return list(zip(feeds[picked].tolist(), batch["time"][picked].tolist(), batch["value"][picked].tolist()))


DENSE_FEEDS = 1 << 16  # a span of feed ids up to this (plus 4 per record) is looked up in an array, not sorted


def _feed_time(batch: np.ndarray) -> np.ndarray:
    return (batch["feed"].astype(np.uint64) << np.uint64(32)) | batch["time"].astype(np.uint64)
