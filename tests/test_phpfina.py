"""PHPFina: byte-compatibility with emoncms's own files, batch semantics, crash safety, reads."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct

import numpy as np
from twisted.trial import unittest

from emond import phpfina as phpfina_module
from emond.engine import DataQuery, FeedError, NoSuchFeed, RowLimit
from emond.phpfina import PHPFina
from emond.records import (
    ENGINE_PHPTIMESERIES,
    REASON_NO_FEED,
    REASON_PADDING,
    REASON_TOO_NEW,
    REASON_TOO_OLD,
    REASON_WRONG_ENGINE,
    make_records,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "phpfina")  # written by emoncms (see its README)
NOW = 1700000000


def fixture_feeds() -> list[dict]:
    with open(os.path.join(FIXTURES, "writes.json")) as f:
        return json.load(f)["feeds"]


class Crash(Exception):
    """Stands for the process dying at a chosen step."""


class EngineCase(unittest.TestCase):
    def engine(self, directory: str | None = None, **kw) -> PHPFina:
        kw.setdefault("clock", lambda: NOW)
        kw.setdefault("sync", False)
        engine = PHPFina(directory or self.mktemp(), **kw)
        self.addCleanup(engine.close)
        return engine

    def slots(self, engine: PHPFina, feedid: int) -> list:
        start, interval, data = engine.raw(feedid)
        return [[start + i * interval, None if math.isnan(v) else v] for i, v in enumerate(data.tolist())]


class FixtureTests(EngineCase):
    def test_writes_produce_identical_files(self) -> None:
        engine = self.engine()
        for feed in fixture_feeds():
            engine.create(feed["feedid"], feed["interval"])
            writes = np.array(feed["writes"])
            refused = engine.write(feed["feedid"], writes[:, 0].astype(np.uint32), writes[:, 1], feed["padding"])
            self.assertEqual(refused, [])
        for feed in fixture_feeds():
            for suffix in (".meta", ".dat"):
                with open(os.path.join(engine.directory, f"{feed['feedid']}{suffix}"), "rb") as f:
                    ours = f.read()
                with open(os.path.join(FIXTURES, f"{feed['feedid']}{suffix}"), "rb") as f:
                    theirs = f.read()
                self.assertEqual(ours, theirs, f"feed {feed['feedid']}{suffix} differs")

    def test_writes_one_at_a_time_produce_identical_files(self) -> None:
        """A device posting every few seconds: one batch per point."""
        engine = self.engine()
        for feed in fixture_feeds():
            engine.create(feed["feedid"], feed["interval"])
            for t, v in feed["writes"]:
                engine.write(feed["feedid"], [t], [v], feed["padding"])
            with open(os.path.join(engine.directory, f"{feed['feedid']}.dat"), "rb") as f:
                ours = f.read()
            with open(os.path.join(FIXTURES, f"{feed['feedid']}.dat"), "rb") as f:
                self.assertEqual(ours, f.read(), f"feed {feed['feedid']}")

    def test_reads_emoncms_files_exactly(self) -> None:
        directory = self.mktemp()
        shutil.copytree(FIXTURES, directory)
        engine = self.engine(directory)
        for feed in fixture_feeds():
            self.assertEqual(self.slots(engine, feed["feedid"]), feed["slots"])
            meta = feed["meta"]
            self.assertEqual(
                tuple(engine.meta(feed["feedid"])),
                (meta["interval"], meta["start_time"], meta["npoints"], meta["end_time"]),
            )


class WriteTests(EngineCase):
    def setUp(self) -> None:
        self.fina = self.engine()
        self.fina.create(1, 10)

    def test_create_clamps_interval_and_leaves_meta_unstarted(self) -> None:
        self.fina.create(2, 1)
        self.assertEqual(tuple(self.fina.meta(2)), (5, 0, 0, 0))
        with open(os.path.join(self.fina.directory, "2.meta"), "rb") as f:
            self.assertEqual(f.read(), struct.pack("<IIII", 0, 0, 5, 0))
        self.assertEqual(os.path.getsize(os.path.join(self.fina.directory, "2.dat")), 0)

    def test_create_does_not_overwrite(self) -> None:
        self.fina.write(1, [NOW], [1.0])
        self.fina.create(1, 60)
        self.assertEqual(self.fina.meta(1).interval, 10)
        self.assertEqual(self.fina.meta(1).npoints, 1)

    def test_floor_alignment_and_nan_gap(self) -> None:
        self.fina.write(1, [NOW + 7, NOW + 39], [1.0, 4.0])
        self.assertEqual(self.slots(self.fina, 1), [[NOW, 1.0], [NOW + 10, None], [NOW + 20, None], [NOW + 30, 4.0]])

    def test_join_across_batches_ramps_from_stored_value(self) -> None:
        self.fina.write(1, [NOW], [10.0], "join")
        self.fina.write(1, [NOW + 40], [50.0], "join")
        self.assertEqual([v for _, v in self.slots(self.fina, 1)], [10.0, 20.0, 30.0, 40.0, 50.0])

    def test_overwrite_in_place(self) -> None:
        self.fina.write(1, np.arange(NOW, NOW + 100, 10), np.arange(10.0))
        self.fina.write(1, [NOW + 30, NOW + 31, NOW + 50], [-1.0, -2.0, -3.0])
        values = [v for _, v in self.slots(self.fina, 1)]
        self.assertEqual(values, [0.0, 1.0, 2.0, -2.0, 4.0, -3.0, 6.0, 7.0, 8.0, 9.0])

    def test_last_accepted_record_of_a_slot_wins_in_any_order(self) -> None:
        batch = make_records(1, [NOW + 20, NOW + 1, NOW + 25, NOW + 9, NOW + 21], [1.0, 2.0, 3.0, 4.0, 5.0])
        self.assertEqual(self.fina.apply_batch(batch), [])
        self.assertEqual(self.slots(self.fina, 1), [[NOW, 4.0], [NOW + 10, None], [NOW + 20, 5.0]])

    def test_many_feeds_in_one_batch(self) -> None:
        for feedid in range(2, 12):
            self.fina.create(feedid, 10)
        feeds = np.repeat(np.arange(2, 12), 3)
        times = np.tile([NOW, NOW + 10, NOW + 20], 10)
        refused = self.fina.apply_batch(make_records(feeds, times, feeds * 100 + np.tile([0, 1, 2], 10)))
        self.assertEqual(refused, [])
        for feedid in range(2, 12):
            self.assertEqual([v for _, v in self.slots(self.fina, feedid)], [feedid * 100.0, feedid * 100 + 1.0, feedid * 100 + 2.0])

    def test_contiguous_points_are_one_write(self) -> None:
        self.fina.write(1, [NOW], [0.0])
        calls = []
        real = os.pwrite

        def counting(fd, data, offset):
            calls.append(len(data))
            return real(fd, data, offset)

        self.patch(phpfina_module.os, "pwrite", counting)
        self.fina.write(1, np.arange(NOW + 10, NOW + 10010, 10), np.ones(1000))
        self.assertEqual(calls, [4000])

    def test_refusals_are_returned(self) -> None:
        batch = make_records(
            [1, 1, 1, 99, 1],
            [NOW - 5 * 365 * 86400 - 1, NOW + 48 * 3600 + 1, NOW, NOW, NOW + 10],
            [1.0, 2.0, 3.0, 4.0, 5.0],
        )
        batch["engine"][4] = ENGINE_PHPTIMESERIES
        refused = sorted(self.fina.apply_batch(batch))
        self.assertEqual(
            refused,
            sorted(
                [
                    (1, NOW - 5 * 365 * 86400 - 1, REASON_TOO_OLD),
                    (1, NOW + 48 * 3600 + 1, REASON_TOO_NEW),
                    (99, NOW, REASON_NO_FEED),
                    (1, NOW + 10, REASON_WRONG_ENGINE),
                ]
            ),
        )
        self.assertEqual(self.slots(self.fina, 1), [[NOW, 3.0]])

    def test_configurable_window(self) -> None:
        fina = self.engine(window_past=60, window_future=0)
        fina.create(1, 10)
        refused = fina.write(1, [NOW - 61, NOW - 60, NOW, NOW + 1], [1.0, 2.0, 3.0, 4.0])
        self.assertEqual([(r.time, r.reason) for r in refused], [(NOW - 61, REASON_TOO_OLD), (NOW + 1, REASON_TOO_NEW)])
        self.assertEqual(fina.meta(1).npoints, 7)

    def test_padding_limit(self) -> None:
        fina = self.engine(max_padding=5)
        fina.create(1, 10)
        fina.write(1, [NOW], [1.0])
        refused = fina.write(1, [NOW + 60, NOW + 130, NOW + 140], [2.0, 3.0, 4.0])
        # 5 missing slots are allowed; after that a 6-slot gap is refused, and so is everything later.
        self.assertEqual([(r.time, r.reason) for r in refused], [(NOW + 130, REASON_PADDING), (NOW + 140, REASON_PADDING)])
        self.assertEqual(fina.meta(1).npoints, 7)

    def test_refused_first_write_leaves_feed_unstarted(self) -> None:
        self.fina.write(1, [NOW + 10**8], [1.0])
        self.assertEqual(tuple(self.fina.meta(1)), (10, 0, 0, 0))

    def test_pool_of_handles_smaller_than_feeds(self) -> None:
        fina = self.engine(open_files=2)
        for feedid in range(1, 6):
            fina.create(feedid, 10)
            fina.write(feedid, [NOW], [float(feedid)])
        fina.apply_batch(make_records(np.arange(1, 6), np.full(5, NOW + 10), np.arange(1, 6) * 2.0))
        for feedid in range(1, 6):
            self.assertEqual([v for _, v in self.slots(fina, feedid)], [float(feedid), feedid * 2.0])

    def test_sync_pass(self) -> None:
        """The sync path (fsync, and syncfs for many files) runs without error."""
        fina = self.engine(sync=True, open_files=4)
        for feedid in range(1, 80):
            fina.create(feedid, 10)
        fina.apply_batch(make_records(np.arange(1, 80), np.full(79, NOW), np.ones(79)))
        fina.write(1, [NOW + 10], [2.0])
        self.assertEqual(fina.meta(1).npoints, 2)

    def test_unknown_feed_reads(self) -> None:
        self.assertRaises(NoSuchFeed, self.fina.meta, 42)
        self.assertRaises(NoSuchFeed, self.fina.query, 42, DataQuery(start=0, end=1000, interval=10))
        self.assertRaises(NoSuchFeed, self.fina.value_at, 42, 0)
        self.assertFalse(self.fina.exists(42))

    def test_delete(self) -> None:
        self.fina.write(1, [NOW], [1.0])
        self.fina.delete(1)
        self.assertFalse(self.fina.exists(1))
        self.assertEqual(os.listdir(self.fina.directory), [])
        self.assertEqual(self.fina.write(1, [NOW], [1.0]), [(1, NOW, REASON_NO_FEED)])


class BackfillTests(EngineCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.fina = self.engine(self.directory)
        self.fina.create(1, 10)
        self.fina.write(1, [NOW, NOW + 10], [1.0, 2.0])

    def test_write_before_start_extends_the_front(self) -> None:
        self.assertEqual(self.fina.write(1, [NOW - 30, NOW + 20], [-3.0, 3.0]), [])
        self.assertEqual(
            self.slots(self.fina, 1),
            [[NOW - 30, -3.0], [NOW - 20, None], [NOW - 10, None], [NOW, 1.0], [NOW + 10, 2.0], [NOW + 20, 3.0]],
        )
        with open(os.path.join(self.directory, "1.meta"), "rb") as f:
            self.assertEqual(f.read(), struct.pack("<IIII", 0, 0, 10, NOW - 30))
        self.assertFalse(os.path.exists(os.path.join(self.directory, "1.intent")))
        # A fresh engine (another process) agrees.
        self.assertEqual(self.slots(self.engine(self.directory), 1)[0], [NOW - 30, -3.0])

    def test_front_extension_obeys_padding_limit(self) -> None:
        fina = self.engine(max_padding=2)
        fina.create(1, 10)
        fina.write(1, [NOW], [1.0])
        refused = fina.write(1, [NOW - 40, NOW - 30], [-4.0, -3.0])
        self.assertEqual([(r.time, r.reason) for r in refused], [(NOW - 40, REASON_PADDING)])
        self.assertEqual(fina.meta(1).start_time, NOW - 30)

    def crash_at(self, method: str) -> None:
        """Write before the start with the process dying at ``method``; then reopen."""

        def die(*args, **kw):
            raise Crash(method)

        patch = self.patch(PHPFina, method, die)
        self.assertRaises(Crash, self.fina.write, 1, [NOW - 20], [-2.0])
        patch.restore()  # the next process runs the real code
        self.fina.close()

    def reopened(self) -> PHPFina:
        fina = self.engine(self.directory)
        self.assertEqual([n for n in os.listdir(self.directory) if n.endswith((".intent", ".extend"))], [])
        return fina

    def test_crash_after_intent_before_rewrite(self) -> None:
        self.crash_at("_extend_front")
        self.assertTrue(os.path.exists(os.path.join(self.directory, "1.intent")))
        fina = self.reopened()
        self.assertEqual(self.slots(fina, 1), [[NOW, 1.0], [NOW + 10, 2.0]])

    def test_crash_with_rewrite_half_done(self) -> None:
        real = os.replace

        def replace_dies(src, dst):
            raise Crash("replace")

        self.patch(phpfina_module.os, "replace", replace_dies)
        self.assertRaises(Crash, self.fina.write, 1, [NOW - 20], [-2.0])
        self.patch(phpfina_module.os, "replace", real)
        self.assertTrue(os.path.exists(os.path.join(self.directory, "1.dat.extend")))
        fina = self.reopened()
        self.assertEqual(self.slots(fina, 1), [[NOW, 1.0], [NOW + 10, 2.0]])

    def test_crash_after_rewrite_before_meta(self) -> None:
        self.crash_at("_write_meta")
        # The data file is already shifted while the meta still has the old start.
        with open(os.path.join(self.directory, "1.meta"), "rb") as f:
            self.assertEqual(struct.unpack("<IIII", f.read())[3], NOW)
        fina = self.reopened()
        self.assertEqual(self.slots(fina, 1), [[NOW - 20, -2.0], [NOW - 10, None], [NOW, 1.0], [NOW + 10, 2.0]])

    def test_crash_during_first_write(self) -> None:
        self.fina.create(2, 10)

        def die(*args, **kw):
            raise Crash()

        patch = self.patch(PHPFina, "_write_meta", die)
        self.assertRaises(Crash, self.fina.write, 2, [NOW + 5, NOW + 15], [5.0, 15.0])
        patch.restore()
        self.fina.close()
        fina = self.reopened()
        self.assertEqual(self.slots(fina, 2), [[NOW, 5.0], [NOW + 10, 15.0]])

    def test_crash_before_first_data_keeps_meta_unstarted(self) -> None:
        self.fina.create(2, 10)

        def die(*args, **kw):
            raise Crash()

        patch = self.patch(PHPFina, "_fd", die)
        self.assertRaises(Crash, self.fina.write, 2, [NOW + 5], [5.0])
        patch.restore()
        self.fina.close()
        fina = self.reopened()
        self.assertEqual(tuple(fina.meta(2)), (10, 0, 0, 0))


class ReadTests(EngineCase):
    """Reads as current emoncms's PHPFina ``get_data_combined`` computes them
    (worked by hand from its code; times in seconds)."""

    def setUp(self) -> None:
        self.fina = self.engine()
        self.fina.create(1, 10)
        # slots NOW .. NOW+90 hold 0..9, with slot NOW+50 missing
        values = np.arange(10.0)
        values[5] = np.nan
        self.fina.write(1, np.arange(NOW, NOW + 100, 10), values)

    def rows(self, start: int, end: int, interval: object, feedid: int = 1, **kw) -> list:
        series = self.fina.query(feedid, DataQuery(start=start, end=end, interval=interval, **kw))
        return [[t, None if math.isnan(v) else v] for t, v in zip(series.times.tolist(), series.values.tolist())]

    def test_data_slot_at_each_time_none_past_end(self) -> None:
        # rows start, start+10, ... while <= end (no point past end); each the
        # slot floor((t - start_time) / interval): NOW+4 -> slot 0
        self.assertEqual(self.rows(NOW + 4, NOW + 30, 10), [[NOW + 4, 0.0], [NOW + 14, 1.0], [NOW + 24, 2.0]])

    def test_value_at_rounds_halves_away_from_zero(self) -> None:
        self.assertEqual(self.fina.value_at(1, NOW + 5), 1.0)  # round(0.5) = 1
        self.assertEqual(self.fina.value_at(1, NOW + 14), 1.0)
        self.assertIsNone(self.fina.value_at(1, NOW - 5))  # round(-0.5) = -1: no slot
        self.assertIsNone(self.fina.value_at(1, NOW + 50))  # the missing slot
        self.assertIsNone(self.fina.value_at(1, NOW + 96))  # round(9.6) = 10: past the end

    def test_skipmissing_and_out_of_range(self) -> None:
        full = self.rows(NOW - 20, NOW + 110, 10)
        # before start_time and after end_time (NOW+90): null; slot 5 missing
        self.assertEqual(
            [v for _, v in full], [None, None, 0.0, 1.0, 2.0, 3.0, 4.0, None, 6.0, 7.0, 8.0, 9.0, None, None]
        )
        skipped = self.rows(NOW - 20, NOW + 110, 10, skipmissing=True)
        self.assertEqual([v for _, v in skipped], [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0])

    def test_limitinterval(self) -> None:
        # limitinterval: at least the feed's interval, then whole intervals (round(25/10) = 3 -> 30)
        self.assertEqual(self.rows(NOW, NOW + 20, 5, limitinterval=1), [[NOW, 0.0], [NOW + 10, 1.0], [NOW + 20, 2.0]])
        self.assertEqual([t for t, _ in self.rows(NOW, NOW + 60, 25, limitinterval=1)], [NOW, NOW + 30, NOW + 60])
        # off (emoncms's default): every 5 s, each the slot it falls in
        self.assertEqual([v for _, v in self.rows(NOW, NOW + 20, 5)], [0.0, 0.0, 1.0, 1.0, 2.0])

    def test_request_errors(self) -> None:
        e = self.assertRaises(FeedError, self.fina.query, 1, DataQuery(start=NOW, end=NOW, interval=10))
        self.assertEqual(str(e), "request end time before start time")
        e = self.assertRaises(RowLimit, self.fina.query, 1, DataQuery(start=0, end=30010, interval=10, max_rows=3000))
        self.assertEqual(e.requested, 3002)

    def test_average(self) -> None:
        # [NOW, NOW+30): 0, 1, 2 -> 1; [NOW+30, NOW+60): 3, 4 (the NaN skipped) -> 3.5; [NOW+60, NOW+90): 7
        self.assertEqual(self.rows(NOW, NOW + 60, 30, average=True), [[NOW, 1.0], [NOW + 30, 3.5], [NOW + 60, 7.0]])
        # a division holding one slot at most is not averaged (interval <= the feed's)
        self.assertEqual(self.rows(NOW + 45, NOW + 55, 10, average=True), [[NOW + 45, 4.0], [NOW + 55, None]])

    def test_values_that_are_not_finite_are_missing(self) -> None:
        with open(os.path.join(self.fina.directory, "1.dat"), "r+b") as f:  # an older version wrote inf
            f.seek(4 * 9)
            f.write(struct.pack("<f", math.inf))
            f.seek(4 * 1)
            f.write(struct.pack("<f", -math.inf))
        self.assertEqual([v for _, v in self.rows(NOW, NOW + 20, 10)], [0.0, None, 2.0])
        self.assertEqual(self.rows(NOW, NOW + 20, 30, average=True), [[NOW, 1.0]])  # (0 + 2) / 2
        self.assertEqual(self.fina.lastvalue(1), (NOW + 90, None))
        self.assertIsNone(self.fina.value_at(1, NOW + 10))

    def test_large_sparse_read_uses_the_map(self) -> None:
        fina = self.engine()
        fina.create(2, 10)
        n = 400_000
        fina.write(2, np.arange(NOW - n * 10, NOW, 10), np.arange(n, dtype=np.float64))
        series = fina.query(2, DataQuery(start=NOW - n * 10, end=NOW, interval=n * 10 // 2000))
        self.assertEqual(series.times.shape[0], 2001)
        self.assertEqual((int(series.times[1]), float(series.values[1])), (NOW - n * 10 + 2000, 200.0))
        self.assertEqual((int(series.times[-2]), float(series.values[-2])), (NOW - 2000, n - 200.0))
        self.assertTrue(math.isnan(series.values[-1]))  # NOW is past the last slot

    def test_lastvalue(self) -> None:
        self.assertEqual(self.fina.lastvalue(1), (NOW + 90, 9.0))
        self.fina.create(2, 10)
        self.assertIsNone(self.fina.lastvalue(2))

    def test_export(self) -> None:
        with open(os.path.join(self.fina.directory, "1.dat"), "rb") as f:
            whole = f.read()
        self.assertEqual(self.fina.export(1, 0), whole)
        # starts one slot early, aligned down to 4 bytes
        self.assertEqual(self.fina.export(1, 10), whole[4:])
        self.assertEqual(self.fina.export(1, 1000), b"")
