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

    def engine(self, engine_id: int) -> PHPFina | PHPTimeSeries:
        if engine_id == ENGINE_PHPFINA:
            return self.phpfina
        if engine_id == ENGINE_PHPTIMESERIES:
            return self.phptimeseries
        raise KeyError(engine_id)

    def apply_batch(self, batch: np.ndarray) -> list[Refusal]:
        fina = batch["engine"] == ENGINE_PHPFINA
        series = batch["engine"] == ENGINE_PHPTIMESERIES
        refusals = refusals_from(batch, ~(fina | series), REASON_WRONG_ENGINE)
        if fina.any():
            refusals += self.phpfina.apply_batch(batch[fina])
        if series.any():
            refusals += self.phptimeseries.apply_batch(batch[series])
        return refusals

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
        """Apply a batch in the write thread."""
        if self.engines is None:
            return defer.fail(RuntimeError(f"storage {self.server_id} is not open"))
        return self.writes.run(self.engines.apply_batch, batch)

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
