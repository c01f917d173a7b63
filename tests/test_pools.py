"""Bounded thread pools (emond.pools): real threads, the real reactor.

A job runs in its pool's own threads; a pool whose threads are all held up
holds up nothing else; beyond its queue a job is refused at once; stopping
finishes the jobs in hand and joins the threads; /metrics shows every pool.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond.pools import BoundedPool, PoolBusy, watch_pools


class Gate:
    """A job that tells the reactor it has started, then waits until ``release``."""

    def __init__(self) -> None:
        self.entered: defer.Deferred[None] = defer.Deferred()
        self._open = threading.Event()

    def __call__(self, result: object = None) -> object:
        reactor.callFromThread(self.entered.callback, None)
        if not self._open.wait(30):
            raise RuntimeError("never released")
        return result

    def release(self) -> None:
        self._open.set()


class BoundedPoolTests(unittest.TestCase):
    timeout = 60

    def pool(self, name: str, threads: int, queue: int | None) -> BoundedPool:
        pool = BoundedPool(name, threads, queue, reactor)
        pool.start()
        self.addCleanup(pool.stop)
        return pool

    def gate(self) -> Gate:
        gate = Gate()
        self.addCleanup(gate.release)  # before the pool's stop (cleanups run last first)
        return gate

    @defer.inlineCallbacks
    def test_jobs_run_in_the_pools_own_threads(self):
        pool = self.pool("kdf", 2, None)
        name = yield pool.run(lambda: threading.current_thread().name)
        self.assertTrue(name.startswith("PoolThread-kdf"), name)
        total = yield pool.run(sum, [1, 2, 3])
        self.assertEqual(total, 6)

    @defer.inlineCallbacks
    def test_an_error_comes_back_as_a_failure(self):
        pool = self.pool("p", 1, None)

        def broken() -> None:
            raise ValueError("no")

        yield self.assertFailure(pool.run(broken), ValueError)
        self.assertEqual(pool.pending, 0)

    @defer.inlineCallbacks
    def test_a_pool_held_up_holds_up_no_other(self):
        stuck, free = self.pool("stuck", 1, None), self.pool("free", 1, None)
        gate = self.gate()
        held = stuck.run(gate, "late")
        yield gate.entered
        queued = stuck.run(lambda: "queued")
        self.assertEqual((yield free.run(lambda: "answered")), "answered")
        self.assertFalse(held.called or queued.called)
        gate.release()
        self.assertEqual((yield held), "late")
        self.assertEqual((yield queued), "queued")

    @defer.inlineCallbacks
    def test_beyond_its_queue_a_job_is_refused_at_once(self):
        pool = self.pool("kdf", 1, 1)
        gate = self.gate()
        running = pool.run(gate, 1)
        yield gate.entered
        waiting = pool.run(lambda: 2)
        refused = pool.run(lambda: 3)
        self.assertTrue(refused.called)  # not queued: failed before returning
        yield self.assertFailure(refused, PoolBusy)
        self.assertEqual((pool.busy, pool.queued, pool.refused), (1, 1, 1))
        gate.release()
        self.assertEqual([(yield running), (yield waiting)], [1, 2])
        self.assertEqual((pool.pending, pool.queued), (0, 0))
        self.assertEqual((yield pool.run(lambda: 4)), 4)  # room again

    @defer.inlineCallbacks
    def test_stop_finishes_the_jobs_in_hand_then_joins(self):
        pool = BoundedPool("p", 2, None, reactor)
        pool.start()
        gate = self.gate()
        running = pool.run(gate, "done")
        yield gate.entered
        waiting = pool.run(lambda: "also done")
        threads = list(pool._pool.threads)
        stopped = pool.stop()
        self.assertFalse(stopped.called)  # the reactor goes on meanwhile
        yield self.assertFailure(pool.run(lambda: None), PoolBusy)  # nothing new once stopping
        gate.release()
        yield stopped
        self.assertEqual([running.result, waiting.result], ["done", "also done"])
        self.assertFalse(any(t.is_alive() for t in threads))

    @defer.inlineCallbacks
    def test_metrics_show_each_pool(self):
        kdf, reads = self.pool("kdf", 2, 1), self.pool("storage0-read", 1, 8)
        registry = CollectorRegistry()
        watch_pools(registry, [kdf, reads])
        gate = self.gate()
        running = reads.run(gate)
        yield gate.entered
        waiting = [reads.run(lambda: None) for _ in range(3)]
        text = generate_latest(registry).decode()
        for line in (
            'emond_pool_busy{pool="storage0-read"} 1.0',
            'emond_pool_queued{pool="storage0-read"} 3.0',
            'emond_pool_threads{pool="storage0-read"} 1.0',
            'emond_pool_busy{pool="kdf"} 0.0',
            'emond_pool_queued{pool="kdf"} 0.0',
            'emond_pool_threads{pool="kdf"} 2.0',
            'emond_pool_refused_total{pool="kdf"} 0.0',
        ):
            self.assertIn(line, text.splitlines())
        gate.release()
        yield defer.gatherResults([running, *waiting])
