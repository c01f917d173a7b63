"""A storage location: the engines on one data directory, driven from its own threads.

Every storage location keeps PHPFina files in ``<datadir>/phpfina/`` and
PHPTimeSeries files in ``<datadir>/phptimeseries/`` (an emoncms server's
directories can be used as they are). Disk work runs in the location's own
thread pools (``emond.pools``), so the reactor never waits on the disk and a
slow disk holds up nothing but its own location.
"""

from __future__ import annotations

import os
import resource
from typing import Any

import numpy as np
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from emond.config import EnginesSection
from emond.phpfina import PHPFina
from emond.phptimeseries import PHPTimeSeries
from emond.pools import BoundedPool
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES, REASON_WRONG_ENGINE, Refusal, refusals_from


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one (engines pool handles); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


class StorageEngines:
    """Both engines of one data directory; ``apply_batch`` splits a batch by engine."""

    def __init__(self, datadir: str, settings: EnginesSection) -> None:
        self.datadir = datadir
        common = dict(window_past=settings.window_past, window_future=settings.window_future)
        self.phpfina = PHPFina(
            os.path.join(datadir, "phpfina"),
            max_padding=settings.max_padding,
            open_files=settings.open_files,
            sync=settings.sync,
            **common,
        )
        self.phptimeseries = PHPTimeSeries(os.path.join(datadir, "phptimeseries"), **common)
        self._unsynced: set[PHPFina | PHPTimeSeries] = set()  # written by apply_batch(sync=False) since the last sync_written

    def engine(self, engine_id: int) -> PHPFina | PHPTimeSeries:
        if engine_id == ENGINE_PHPFINA:
            return self.phpfina
        if engine_id == ENGINE_PHPTIMESERIES:
            return self.phptimeseries
        raise KeyError(engine_id)

    def apply_batch(self, batch: np.ndarray, sync: bool = True) -> list[Refusal]:
        """``sync=False``: written, made durable by a later ``sync_written``."""
        fina = batch["engine"] == ENGINE_PHPFINA
        series = batch["engine"] == ENGINE_PHPTIMESERIES
        refusals = refusals_from(batch, ~(fina | series), REASON_WRONG_ENGINE)
        if fina.any():
            if not sync:
                self._unsynced.add(self.phpfina)
            refusals += self.phpfina.apply_batch(batch if fina.all() else batch[fina], sync)  # no copy of a PHPFina-only batch
        if series.any():
            if not sync:
                self._unsynced.add(self.phptimeseries)
            refusals += self.phptimeseries.apply_batch(batch[series], sync)
        return refusals

    def sync_written(self) -> None:
        """Sync what was applied without a sync pass, in the engines that got any: an engine
        not written to is left alone (a read stuck holding its lock holds up no write)."""
        while self._unsynced:
            engine = next(iter(self._unsynced))
            engine.sync_written()
            self._unsynced.discard(engine)  # only once its pass succeeded

    def close(self) -> None:
        self.phpfina.close()
        self.phptimeseries.close()


class StorageLocationService(Service):
    """Opens a storage location at start (completing interrupted writes) and closes it at stop.

    Its disk work runs in two pools of its own, started and stopped with it:
    ``writes``, one thread (a location applies one batch at a time; opening,
    closing, creating and deleting files take their turn with the batches), and
    ``reads``, ``[engines] read_threads`` threads with a bounded queue. A slow
    read never holds up a write, and neither waits for another location, a
    login or a rendering.
    """

    log = Logger()

    def __init__(self, server_id: int, datadir: str, settings: EnginesSection, reactor: IReactorFromThreads) -> None:
        self.server_id = server_id
        self.datadir = datadir
        self._settings = settings
        self.engines: StorageEngines | None = None
        self.opened: defer.Deferred[StorageEngines] = defer.Deferred()
        self._opening: defer.Deferred[None] | None = None
        self._error: str | None = None
        # Group commit (see apply_batch): batches in the write queue, written ones waiting
        # for a sync pass (with their number), the pass running, and batches written so far.
        self._queued = 0
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []
        self._syncing = False
        self._written = 0
        self.writes = BoundedPool(f"storage{server_id}-write", 1, None, reactor)
        self.reads = BoundedPool(f"storage{server_id}-read", settings.read_threads, settings.read_queue, reactor)

    @property
    def pools(self) -> list[BoundedPool]:
        return [self.reads, self.writes]

    def startService(self) -> None:
        super().startService()
        raise_open_files_limit()
        for pool in self.pools:
            pool.start()
        self._opening = self.writes.run(StorageEngines, self.datadir, self._settings)
        self._opening.addCallbacks(self._opened, self._failed)

    def _opened(self, engines: StorageEngines) -> None:
        self.engines = engines
        self.log.info("storage {id} open on {datadir}", id=self.server_id, datadir=self.datadir)
        self.opened.callback(engines)

    def _failed(self, failure: Any) -> None:
        self._error = str(failure.value)
        self.log.failure("storage {id}: cannot open {datadir}", failure, id=self.server_id, datadir=self.datadir)
        self.opened.errback(failure)
        self.opened.addErrback(lambda _: None)  # reported; callers see the health check

    def apply_batch(self, batch: np.ndarray) -> defer.Deferred[list[Refusal]]:
        """Apply a batch in the write thread; fires once it is durable (its refusals).

        Group commit: the batch is written without a sync pass; the pass runs in the
        write thread once no other batch is queued for writing (or ``[engines]
        sync_group`` batches wait for it), and covers every batch written before
        it. A batch is acknowledged (this fires) only after the pass that covers it:
        a crash loses no acknowledged point, and a scattered load pays one pass for
        several batches instead of one each (the same dirty pages flushed once)."""
        if self.engines is None:
            return defer.fail(RuntimeError(f"storage {self.server_id} is not open"))
        return defer.ensureDeferred(self._apply(batch))

    async def _apply(self, batch: np.ndarray) -> list[Refusal]:
        refusals, durable = await self.write_batch(batch)
        await durable
        return refusals

    def write_batch(self, batch: np.ndarray) -> defer.Deferred[tuple[list[Refusal], defer.Deferred[None]]]:
        """``apply_batch`` in two steps: fires once the batch is written (its refusals, and
        a Deferred that fires once it is durable), so that a caller that orders batches
        (the stream server) can let the next one be written while this one waits."""
        if self.engines is None:
            return defer.fail(RuntimeError(f"storage {self.server_id} is not open"))
        return defer.ensureDeferred(self._write(self.engines, batch))

    async def _write(self, engines: StorageEngines, batch: np.ndarray) -> tuple[list[Refusal], defer.Deferred[None]]:
        if self._settings.sync_group <= 1:
            return await self.writes.run(engines.apply_batch, batch), defer.succeed(None)
        self._queued += 1
        try:
            refusals = await self.writes.run(engines.apply_batch, batch, False)
        except BaseException:
            self._queued -= 1
            self._written += 1  # a batch that failed half way may have written some
            self._sync_when_due(engines)  # the batches waiting behind this one are not held up
            raise
        self._queued -= 1
        self._written += 1
        durable: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((self._written, durable))
        self._sync_when_due(engines)
        return refusals, durable

    def _sync_when_due(self, engines: StorageEngines) -> None:
        if self._syncing or not self._waiting:
            return
        if self._queued and len(self._waiting) < self._settings.sync_group:
            return  # a batch is still to be written: one pass after it covers both
        self._syncing = True
        covered = self._written
        done = self.writes.run(engines.sync_written)
        done.addBoth(self._synced, engines, covered)

    def _synced(self, result: Any, engines: StorageEngines, covered: int) -> None:
        self._syncing = False
        ready = [d for n, d in self._waiting if n <= covered]
        self._waiting = [(n, d) for n, d in self._waiting if n > covered]
        for durable in ready:
            if isinstance(result, Failure):
                durable.errback(result)  # not acknowledged: the batch is sent or read again
            else:
                durable.callback(None)
        self._sync_when_due(engines)

    def status(self) -> dict[str, object]:
        return {"ok": self.engines is not None, "datadir": self.datadir, "error": self._error}

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        """The reads in hand finish, then the writes queued before this; the files are
        closed after them, in the write thread; then both pools' threads are joined."""
        if self._opening is not None:
            await self._opening  # an open still in progress finishes first
        await self.reads.stop()
        engines, self.engines = self.engines, None
        try:
            if engines is not None:
                await self.writes.run(engines.close)
        finally:
            await self.writes.stop()


def location_dir(datadir: str, server_id: int, first: bool) -> str:
    """Where a node keeps a hosted storage server: the first in ``datadir`` itself
    (the emoncms layout), others in ``<datadir>/storage<id>``."""
    return datadir if first else os.path.join(datadir, f"storage{server_id}")
