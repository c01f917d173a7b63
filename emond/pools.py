"""Bounded thread pools: one for each kind of blocking work, so one kind cannot starve another.

Twisted's default pool (``deferToThread``) is shared by everything in the
process: a storage location whose disk hangs, or a burst of logins (scrypt,
16 MiB and ~0.1 s of CPU per hash), would hold all its threads and stall the
rest. Instead each storage location has a pool for its reads and one for its
writes, and a node has one for the password KDF and one for rendering reads.

A pool runs at most ``threads`` jobs at once; with ``queue`` set, at most that
many more wait, and a job beyond them is refused at once (``PoolBusy``, a 503
at the API) rather than queued without bound. Its owner starts it in
``startService`` and stops it in ``stopService``: ``stop`` lets the jobs in hand
finish and joins the threads, off the reactor thread. ``/metrics`` shows each
pool's waiting jobs and busy threads (``watch_pools``).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class PoolBusy(Exception):
    """A pool's queue is full (or the pool is not running): the job was not started."""


class BoundedPool:
    """A ``ThreadPool`` of ``threads`` workers whose queue holds at most ``queue`` jobs
    (None: no bound). Jobs are counted on the reactor thread, so the bound is exact."""

    def __init__(self, name: str, threads: int, queue: int | None, reactor: IReactorFromThreads) -> None:
        self.name = name
        self.threads = threads
        self.queue = queue
        self.reactor = reactor
        self.pending = 0  # jobs submitted whose results have not reached the reactor yet
        self.refused = 0
        self._pool: ThreadPool | None = None

    @property
    def busy(self) -> int:
        """Threads working now."""
        return len(self._pool.working) if self._pool is not None else 0

    @property
    def queued(self) -> int:
        """Jobs waiting for a thread."""
        return max(self.pending - self.threads, 0)

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPool(0, self.threads, name=self.name)  # threads start when work comes
            self._pool.start()

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """``f(*args, **kwargs)`` in one of the pool's threads; PoolBusy (failed) when full."""
        if self._pool is None:
            return defer.fail(PoolBusy(f"{self.name}: not running"))
        if self.queue is not None and self.pending >= self.threads + self.queue:
            self.refused += 1
            return defer.fail(PoolBusy(f"{self.name}: {self.pending} jobs already in hand"))
        self.pending += 1
        d: defer.Deferred[T] = defer.Deferred()

        def done(ok: bool, result: Any) -> None:
            self.pending -= 1
            if ok:
                d.callback(result)
            else:
                d.errback(result)

        self._pool.callInThreadWithCallback(lambda ok, result: self.reactor.callFromThread(done, ok, result), f, *args, **kwargs)
        return d

    def stop(self) -> defer.Deferred[None]:
        """Refuse new jobs, finish those in hand, join the threads; fires once they are joined.

        The join happens in a thread of its own: it waits for the jobs in hand,
        which must not hold up the reactor (their results come through it)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return defer.succeed(None)
        stopped: defer.Deferred[None] = defer.Deferred()

        def join() -> None:
            pool.stop()
            self.reactor.callFromThread(stopped.callback, None)

        threading.Thread(target=join, name=f"{self.name}-join").start()
        return stopped


class PoolCollector:
    """``/metrics`` of the watched pools: waiting jobs, busy threads, size, refusals (label ``pool``)."""

    def __init__(self, pools: list[BoundedPool]) -> None:
        self.pools = pools

    def collect(self) -> Iterable[Any]:
        queued = GaugeMetricFamily("emond_pool_queued", "Jobs waiting for a thread of the pool", labels=["pool"])
        busy = GaugeMetricFamily("emond_pool_busy", "Threads of the pool working now", labels=["pool"])
        size = GaugeMetricFamily("emond_pool_threads", "Threads the pool may run at once", labels=["pool"])
        refused = CounterMetricFamily("emond_pool_refused", "Jobs refused because the pool's queue was full", labels=["pool"])
        for pool in self.pools:
            queued.add_metric([pool.name], pool.queued)
            busy.add_metric([pool.name], pool.busy)
            size.add_metric([pool.name], pool.threads)
            refused.add_metric([pool.name], pool.refused)
        return [queued, busy, size, refused]


def watch_pools(registry: CollectorRegistry, pools: Iterable[BoundedPool]) -> None:
    """Show ``pools`` in ``registry``'s ``/metrics``; once per registry, with all its pools."""
    registry.register(PoolCollector(list(pools)))  # type: ignore[arg-type]


class PoolsService(Service):
    """Starts its pools with it and stops (joins) them when it stops."""

    def __init__(self, pools: Iterable[BoundedPool]) -> None:
        self.pools = list(pools)

    def startService(self) -> None:
        super().startService()
        for pool in self.pools:
            pool.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.gatherResults([pool.stop() for pool in self.pools]).addCallback(lambda _: None)
