"""A storage location's group commit: batches written while others wait in its write queue
share one sync pass, and none is acknowledged (its Deferred fired) before the pass that
covers it; a pass that fails fails every batch it covers (they are sent again)."""

from __future__ import annotations

import errno
import os

import numpy as np
from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond.config import EnginesSection
from emond.records import ENGINE_PHPTIMESERIES, make_records
from emond.storage.location import StorageLocationService

T0 = 1_750_000_000


class GroupSyncTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def open(self, **settings):
        self.datadir = os.path.abspath(self.mktemp())
        location = StorageLocationService(1, self.datadir, EnginesSection(window_past=10**10, **settings), reactor)
        location.startService()
        self.addCleanup(location.stopService)
        engines = yield location.opened
        for feedid in (1, 2, 3):
            engines.phpfina.create(feedid, 10)
        engines.phptimeseries.create(9)
        # Each feed's first write (its start_time: synced at once whatever the policy).
        yield location.apply_batch(make_records(np.array([1, 2, 3]), np.full(3, T0), np.zeros(3)))
        self.events: list[object] = []
        sync_written = engines.sync_written

        def counting() -> None:
            self.events.append("sync start")
            sync_written()
            self.events.append("synced")

        engines.sync_written = counting  # type: ignore[method-assign]
        return location, engines

    def batch(self, k: int) -> np.ndarray:
        return make_records(np.array([1, 2, 3]), np.full(3, T0 + 10 * k), np.full(3, float(k)))

    @defer.inlineCallbacks
    def test_batches_queued_together_share_one_pass_and_wait_for_it(self):
        location, engines = yield self.open()
        done = []
        for k in range(1, 5):
            d = location.apply_batch(self.batch(k))
            d.addCallback(lambda refusals, k=k: self.events.append(("acknowledged", k, refusals)))
            done.append(d)
        yield defer.gatherResults(done)
        self.assertEqual(self.events, ["sync start", "synced"] + [("acknowledged", k, []) for k in range(1, 5)])
        start, interval, values = engines.phpfina.raw(2)
        self.assertEqual((start, interval, values.tolist()), (T0, 10, [0.0, 1.0, 2.0, 3.0, 4.0]))

        # One batch alone: its own pass, after it is written, before it is acknowledged.
        self.events.clear()
        yield location.apply_batch(self.batch(5)).addCallback(lambda _: self.events.append("acknowledged"))
        self.assertEqual(self.events, ["sync start", "synced", "acknowledged"])

    @defer.inlineCallbacks
    def test_a_failed_pass_fails_every_batch_it_covers(self):
        location, engines = yield self.open()

        def failing() -> None:
            raise OSError(errno.EIO, "Input/output error")

        engines.sync_written = failing  # type: ignore[method-assign]
        done = [location.apply_batch(self.batch(k)) for k in range(1, 4)]
        for d in done:
            yield self.assertFailure(d, OSError)

    @defer.inlineCallbacks
    def test_a_batch_that_fails_to_be_written_holds_up_no_other(self):
        location, engines = yield self.open()
        apply_batch = engines.apply_batch

        def failing_on_2(batch, sync=True):
            if batch["value"][0] == 2.0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return apply_batch(batch, sync)

        engines.apply_batch = failing_on_2  # type: ignore[method-assign]
        first, second = location.apply_batch(self.batch(1)), location.apply_batch(self.batch(2))
        yield self.assertFailure(second, OSError)
        self.assertEqual((yield first), [])
        self.assertEqual(self.events, ["sync start", "synced"])

    @defer.inlineCallbacks
    def test_sync_group_1_is_a_pass_per_batch(self):
        location, engines = yield self.open(sync_group=1)
        done = [location.apply_batch(self.batch(k)) for k in range(1, 4)]
        yield defer.gatherResults(done)
        self.assertEqual(self.events, [])  # each synced by its own apply_batch

    @defer.inlineCallbacks
    def test_only_the_engines_written_are_synced(self):
        location, engines = yield self.open()
        self.events.clear()
        calls = []
        for engine in (engines.phpfina, engines.phptimeseries):
            original = engine.sync_written
            engine.sync_written = lambda original=original, engine=engine: (calls.append(engine), original())[1]
        yield location.apply_batch(self.batch(1))
        self.assertEqual(calls, [engines.phpfina])
        series = make_records(9, [T0 + 5], [1.5], ENGINE_PHPTIMESERIES)
        yield location.apply_batch(series)
        self.assertEqual(calls, [engines.phpfina, engines.phptimeseries])
