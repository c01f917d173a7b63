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
from prometheus_client import Counter
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from emond.config import EnginesSection
from emond.engine import TimeWindow
from emond.queue import APPEND_SEQ, Commit, Lease, LeaseLost, Scripts, storage_seq, storage_stream
from emond.records import RECORD, Refusal
from emond.redis import Redis, RedisUnavailable
from emond.refusals import Refusals, Refused
from emond.storage import StorageLocationService


def disk_key(feedid: int) -> str:
    return f"feed:disk:{feedid}"


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


class LocalSenderService(Service):
    """Applies a hosted storage server's queue to its engines, in order."""

    log = Logger()

    def __init__(
        self,
        server_id: int,
        location: StorageLocationService,
        redis: Redis,
        blocking: Redis,
        recorder: RefusalRecorder,
        reactor: IReactorTime,
        node: str,
        registry: Any,
        batch: int = 64,
        lease_ms: int = 10_000,
        block_ms: int = 500,
    ) -> None:
        self.server_id = server_id
        self.location = location
        self.redis = redis
        self.blocking = blocking
        self.recorder = recorder
        self.reactor = reactor
        self.batch = batch
        self.block_ms = block_ms
        self.lease = Lease(Scripts(redis), f"st:{server_id}", f"{node}-{uuid.uuid4().hex[:8]}", lease_ms)
        self.lease_ms = lease_ms
        self._stopping = False
        self._loop: defer.Deferred[None] | None = None
        self._idle: list[defer.Deferred[None]] = []
        self._busy = False
        self.error: str | None = None
        self.points = Counter("emond_points_written", "Datapoints applied to feed files", ["server"], registry=registry)
        self.errors = Counter("emond_storage_errors", "Failed attempts to apply a batch", ["server"], registry=registry)

    def startService(self) -> None:
        super().startService()
        self.blocking.open()  # closed again at the end of stopService
        self._stopping = False
        self._loop = defer.ensureDeferred(self._run())

    async def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        self._stopping = True
        if self._loop is not None:
            await self._loop  # the batch in hand is applied and committed first
        try:
            await self.lease.release()
        except RedisUnavailable:
            pass
        await self.blocking.disconnect()

    def idle(self) -> defer.Deferred[None]:
        """Fires once the queue has been seen empty after this call (tests, drains)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d

    async def _run(self) -> None:
        await self.location.opened
        renewed = 0.0
        while not self._stopping:
            try:
                now = self.reactor.seconds()
                if not self.lease.token or now - renewed > self.lease_ms / 3000.0:
                    if not await self.lease.acquire_or_renew():
                        await task.deferLater(self.reactor, self.lease_ms / 3000.0, lambda: None)
                        continue
                    renewed = now
                waiting, self._idle = self._idle, []
                try:
                    reply = await self.blocking.call(
                        "XREAD", "COUNT", self.batch, "BLOCK", self.block_ms, "STREAMS", storage_stream(self.server_id), "0"
                    )
                except Exception:
                    self._idle = waiting + self._idle
                    raise
                if not reply:
                    if self._busy:
                        self._busy = False
                        self.log.info("storage queue {id} drained", id=self.server_id)
                    for d in waiting:  # the queue was empty after they asked
                        d.callback(None)
                else:
                    self._idle = waiting + self._idle
                    self._busy = True
                    for _stream, entries in reply:
                        if entries:
                            await self._apply(entries)
                self.error = None
            except LeaseLost:
                self.log.warn("storage queue {id} taken over by another sender", id=self.server_id)
            except RedisUnavailable as e:
                self.error = f"redis: {e}"
                await task.deferLater(self.reactor, 1.0, lambda: None)
            except Exception as e:  # a disk error: nothing committed, try again
                self.error = str(e)
                self.errors.labels(str(self.server_id)).inc()
                self.log.failure("storage {id}: applying a batch failed; will retry", id=self.server_id)
                await task.deferLater(self.reactor, 1.0, lambda: None)

    async def _apply(self, entries: list[Any]) -> None:
        ids = [entry[0] for entry in entries]
        parts = []
        for _, fields in entries:
            fields = dict(zip(fields[::2], fields[1::2])) if isinstance(fields, list) else fields
            parts.append(np.frombuffer(fields[b"b"], dtype=RECORD))
        batch = np.concatenate(parts) if len(parts) > 1 else parts[0]
        refusals = await self.location.apply_batch(batch)
        commit = Commit()
        refused_keys = {(r.feed, r.time) for r in refusals}
        for feed, when, value in last_per_feed(batch, refused_keys):
            commit.set_if_newer(disk_key(feed), when, repr(value))
        await self.lease.commit(storage_stream(self.server_id), ids, commit)
        self.points.labels(str(self.server_id)).inc(batch.shape[0] - len(refusals))
        if refusals:
            await self.recorder.record(refusals)

    def status(self) -> dict[str, object]:
        return {"ok": self.error is None, "holding": bool(self.lease.token), "error": self.error}


def last_per_feed(batch: np.ndarray, refused: set[tuple[int, int]]) -> list[tuple[int, int, float]]:
    """The latest stored (time, value) per feed in a batch (the last accepted for a time)."""
    if refused:
        keep = np.array([(f, t) not in refused for f, t in zip(batch["feed"].tolist(), batch["time"].tolist())], dtype=bool)
        batch = batch[keep]
    if not batch.shape[0]:
        return []
    order = np.lexsort((batch["time"], batch["feed"]))  # stable: the last accepted of a time stays last
    feeds = batch["feed"][order]
    picked = order[np.flatnonzero(np.r_[feeds[1:] != feeds[:-1], True])]
    return list(zip(batch["feed"][picked].tolist(), batch["time"][picked].tolist(), batch["value"][picked].tolist()))
