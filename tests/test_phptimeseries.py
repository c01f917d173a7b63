"""Tests for emond.phptimeseries: file format, batches, repair and feed/data.json reads."""

from __future__ import annotations

import os
import struct
import threading

import numpy as np
from twisted.trial import unittest

from emond import phptimeseries
from emond.engine import DataQuery, FeedError, NoSuchFeed, RowLimit
from emond.phptimeseries import PHPTimeSeries, SeriesMeta
from emond.records import (
    ENGINE_PHPFINA,
    ENGINE_PHPTIMESERIES,
    REASON_NO_FEED,
    REASON_TOO_NEW,
    REASON_TOO_OLD,
    REASON_WRONG_ENGINE,
    Refusal,
    make_records,
)

NOW = 1_700_000_000
T0 = NOW - 100_000  # well inside the default window


# emoncms's record (compat spec 3.2), spelled here from the format, not taken from emond.
RECORD = np.dtype([("marker", "u1"), ("time", "<u4"), ("value", "<f4")])  # packed: 9 bytes


def packed(*points: tuple[int, float]) -> bytes:
    """What emoncms writes for these points."""
    return b"".join(struct.pack("<BIf", 249, t, v) for t, v in points)


class PHPTimeSeriesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.engine = self.make_engine()
        self.addCleanup(self.engine.close)

    def make_engine(self, **kwargs) -> PHPTimeSeries:
        kwargs.setdefault("clock", lambda: NOW)
        return PHPTimeSeries(self.dir, **kwargs)

    def path(self, feedid: int) -> str:
        return os.path.join(self.dir, f"feed_{feedid}.MYD")

    def content(self, feedid: int) -> bytes:
        with open(self.path(feedid), "rb") as f:
            return f.read()

    def assertRecords(self, feedid: int, points: list[tuple[int, float]]) -> None:
        """The feed's file is exactly these points as emoncms writes them: 9-byte ``<BIf``
        records, marker 249, in time order (built here from the format, not by the engine)."""
        self.assertEqual(self.content(feedid), packed(*points))

    # -- files and feeds ---------------------------------------------------

    def test_dtype(self) -> None:
        self.assertEqual(RECORD.itemsize, 9)
        self.assertEqual(phptimeseries.MYD, RECORD)
        self.assertEqual(np.array([(249, T0, 1.5)], dtype=phptimeseries.MYD).tobytes(), packed((T0, 1.5)))

    def test_create_exists_delete(self) -> None:
        self.assertFalse(self.engine.exists(1))
        self.engine.create(1)
        self.assertTrue(self.engine.exists(1))
        self.assertEqual(self.content(1), b"")
        self.engine.delete(1)
        self.assertFalse(self.engine.exists(1))
        self.assertFalse(os.path.exists(self.path(1)))
        self.assertRaises(NoSuchFeed, self.engine.meta, 1)
        self.assertRaises(NoSuchFeed, self.engine.lastvalue, 1)

    def test_create_keeps_existing(self) -> None:
        self.engine.create(1)
        self.engine.write(1, [T0], [1.5])
        self.engine.create(1, interval=10)
        self.assertEqual(self.content(1), packed((T0, 1.5)))

    def test_delete_then_write_refused(self) -> None:
        self.engine.create(1)
        self.engine.write(1, [T0], [1.0])  # the handle is now pooled
        self.engine.delete(1)
        self.assertEqual(self.engine.write(1, [T0 + 1], [2.0]), [Refusal(1, T0 + 1, REASON_NO_FEED)])
        self.assertFalse(os.path.exists(self.path(1)))

    def test_bytes(self) -> None:
        self.engine.create(3)
        self.assertEqual(self.engine.write(3, [T0, T0 + 7], [1.25, -2.5]), [])
        self.assertEqual(self.content(3), packed((T0, 1.25), (T0 + 7, -2.5)))

    def test_unsorted_batch_stored_sorted(self) -> None:
        self.engine.create(3)
        self.engine.write(3, [T0 + 20, T0, T0 + 10], [3.0, 1.0, 2.0])
        self.assertEqual(self.content(3), packed((T0, 1.0), (T0 + 10, 2.0), (T0 + 20, 3.0)))

    def test_append(self) -> None:
        self.engine.create(1)
        self.engine.write(1, [T0, T0 + 10], [1.0, 2.0])
        self.engine.write(1, [T0 + 30, T0 + 20], [4.0, 3.0])
        self.assertRecords(1, [(T0, 1.0), (T0 + 10, 2.0), (T0 + 20, 3.0), (T0 + 30, 4.0)])

    def test_overwrite(self) -> None:
        self.engine.create(1)
        self.engine.write(1, [T0, T0 + 10, T0 + 20], [1.0, 2.0, 3.0])
        before = os.stat(self.path(1)).st_ino
        self.engine.write(1, [T0 + 10, T0 + 30], [20.0, 4.0])
        self.assertRecords(1, [(T0, 1.0), (T0 + 10, 20.0), (T0 + 20, 3.0), (T0 + 30, 4.0)])
        # In place: the file was not rewritten.
        self.assertEqual(os.stat(self.path(1)).st_ino, before)

    def test_overwrite_far_apart(self) -> None:
        """Overwrites further apart than RUN_GAP are separate writes; all land."""
        self.patch(phptimeseries, "RUN_GAP", 2)
        self.engine.create(1)
        times = T0 + np.arange(20) * 10
        self.engine.write(1, times, np.arange(20, dtype=float))
        self.engine.write(1, times[[0, 1, 9, 19]], [100.0, 101.0, 109.0, 119.0])
        expected = [(int(t), float(i)) for i, t in enumerate(times)]
        for i in (0, 1, 9, 19):
            expected[i] = (int(times[i]), 100.0 + i)
        self.assertRecords(1, expected)

    def test_insert_older(self) -> None:
        self.engine.create(1)
        self.engine.write(1, [T0, T0 + 10, T0 + 30], [1.0, 2.0, 4.0])
        self.engine.write(1, [T0 + 20, T0 - 10, T0 + 10, T0 + 40], [3.0, 0.5, 22.0, 5.0])
        before = [(T0 - 10, 0.5), (T0, 1.0), (T0 + 10, 22.0), (T0 + 20, 3.0), (T0 + 30, 4.0), (T0 + 40, 5.0)]
        self.assertRecords(1, before)
        self.assertFalse(os.path.exists(self.path(1) + ".tmp"))
        # The engine writes to the new file afterwards, not the replaced one.
        self.engine.write(1, [T0 + 50], [6.0])
        self.assertRecords(1, before + [(T0 + 50, 6.0)])

    def test_last_in_batch_wins(self) -> None:
        self.engine.create(1)
        self.engine.write(1, [T0], [1.0])
        batch = make_records(1, [T0 + 10, T0, T0 + 10, T0], [2.0, 3.0, 4.0, 5.0], ENGINE_PHPTIMESERIES)
        self.assertEqual(self.engine.apply_batch(batch), [])
        self.assertRecords(1, [(T0, 5.0), (T0 + 10, 4.0)])

    def test_many_feeds(self) -> None:
        for feedid in (1, 2, 3):
            self.engine.create(feedid)
        self.engine.write(2, [T0 + 5], [9.0])
        feeds = np.array([3, 1, 2, 3, 1, 2], dtype=np.uint32)
        times = [T0, T0, T0, T0 + 1, T0 + 1, T0 + 1]
        batch = make_records(feeds, times, [30.0, 10.0, 20.0, 31.0, 11.0, 21.0], ENGINE_PHPTIMESERIES)
        self.assertEqual(self.engine.apply_batch(batch), [])
        self.assertRecords(1, [(T0, 10.0), (T0 + 1, 11.0)])
        self.assertRecords(2, [(T0, 20.0), (T0 + 1, 21.0), (T0 + 5, 9.0)])
        self.assertRecords(3, [(T0, 30.0), (T0 + 1, 31.0)])

    def test_handle_pool_eviction(self) -> None:
        """More feeds than pooled handles in one batch: every feed is written."""
        engine = self.make_engine(open_files=2)
        self.addCleanup(engine.close)
        feeds = np.arange(1, 6, dtype=np.uint32)
        for feedid in feeds.tolist():
            engine.create(feedid)
        for round_ in range(3):
            batch = make_records(feeds, np.full(5, T0 + round_), feeds * 10.0 + round_, ENGINE_PHPTIMESERIES)
            self.assertEqual(engine.apply_batch(batch), [])
        for feedid in feeds.tolist():
            self.assertRecords(feedid, [(T0 + r, feedid * 10.0 + r) for r in range(3)])
        self.assertLessEqual(len(engine._files.handles), 2)

    def record_fsyncs(self) -> list[str]:
        """Patch os.fsync to record the path of every file or directory synced."""
        self.assertTrue(os.path.isdir("/proc/self/fd"), "this test needs Linux's /proc/self/fd")  # never a skip
        synced: list[str] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        self.patch(os, "fsync", fsync)
        return synced

    def test_sync_each_touched_file_once(self) -> None:
        """One fsync per touched file per batch, evicted handles included."""
        engine = self.make_engine(open_files=2)
        self.addCleanup(engine.close)
        for feedid in (1, 2, 3, 4):
            engine.create(feedid)
        engine.write(4, [T0], [1.0])
        synced = self.record_fsyncs()
        feeds = np.array([1, 2, 3, 1], dtype=np.uint32)
        batch = make_records(feeds, [T0, T0, T0, T0 + 1], [1.0, 2.0, 3.0, 4.0], ENGINE_PHPTIMESERIES)
        self.assertEqual(engine.apply_batch(batch), [])
        self.assertEqual(sorted(synced), sorted(os.path.abspath(self.path(f)) for f in (1, 2, 3)))

    def test_insert_syncs_copy_and_directory(self) -> None:
        self.engine.create(1)
        self.engine.write(1, [T0, T0 + 10], [1.0, 2.0])
        synced = self.record_fsyncs()
        self.engine.write(1, [T0 + 5], [1.5])
        self.assertEqual(synced, [os.path.abspath(self.path(1)) + ".tmp", os.path.abspath(self.dir)])

    def test_refusals(self) -> None:
        self.engine.create(1)
        past, future = 3600 * 24 * 365 * 5, 3600 * 48
        batch = np.concatenate(
            [
                make_records(1, [NOW], [1.0], ENGINE_PHPFINA),
                make_records(2, [NOW], [2.0], ENGINE_PHPTIMESERIES),
                make_records(
                    1,
                    [NOW - past - 1, NOW - past, NOW + future, NOW + future + 1],
                    [3.0, 4.0, 5.0, 6.0],
                    ENGINE_PHPTIMESERIES,
                ),
            ]
        )
        refusals = self.engine.apply_batch(batch)
        self.assertEqual(
            sorted(refusals),
            sorted(
                [
                    Refusal(1, NOW, REASON_WRONG_ENGINE),
                    Refusal(2, NOW, REASON_NO_FEED),
                    Refusal(1, NOW - past - 1, REASON_TOO_OLD),
                    Refusal(1, NOW + future + 1, REASON_TOO_NEW),
                ]
            ),
        )
        self.assertRecords(1, [(NOW - past, 4.0), (NOW + future, 5.0)])
        self.assertFalse(os.path.exists(self.path(2)))

    def test_window_follows_clock(self) -> None:
        now = [NOW]
        engine = self.make_engine(clock=lambda: now[0], window_past=100, window_future=10)
        self.addCleanup(engine.close)
        engine.create(1)
        self.assertEqual(engine.write(1, [NOW - 101], [1.0]), [Refusal(1, NOW - 101, REASON_TOO_OLD)])
        now[0] = NOW - 50
        self.assertEqual(engine.write(1, [NOW - 101], [1.0]), [])

    # -- repair ------------------------------------------------------------

    def write_torn(self, feedid: int) -> list[tuple[int, float]]:
        """A file with 5 whole records and a partial sixth."""
        points = [(T0 + 10 * i, float(i)) for i in range(5)]
        with open(self.path(feedid), "wb") as f:
            f.write(packed(*points) + b"\xf9\x01\x02\x03")
        return points

    def test_repair_append(self) -> None:
        points = self.write_torn(1)
        self.assertEqual(self.engine.write(1, [T0 + 100], [7.0]), [])
        self.assertRecords(1, points + [(T0 + 100, 7.0)])

    def test_repair_overwrite(self) -> None:
        points = self.write_torn(1)
        self.engine.write(1, [T0 + 20], [70.0])
        points[2] = (T0 + 20, 70.0)
        self.assertRecords(1, points)

    def test_reads_ignore_partial_tail(self) -> None:
        self.write_torn(1)
        self.assertEqual(self.engine.meta(1), SeriesMeta(5, T0, T0 + 40))
        self.assertEqual(self.engine.lastvalue(1), (T0 + 40, 4.0))
        self.assertEqual(self.engine.export(1), packed(*[(T0 + 10 * i, float(i)) for i in range(5)]))
        self.assertEqual(self.rows(T0 + 30, T0 + 60, 10, skipmissing=True), [[T0 + 30, 3.0], [T0 + 40, 4.0]])

    # -- meta, lastvalue, export ----------------------------------------------

    def test_meta(self) -> None:
        self.engine.create(1)
        self.assertEqual(self.engine.meta(1), SeriesMeta(0, 0, 0))
        self.engine.write(1, [T0 + 5, T0, T0 + 9], [1.0, 2.0, 3.0])
        self.assertEqual(self.engine.meta(1), SeriesMeta(3, T0, T0 + 9))

    def test_lastvalue(self) -> None:
        self.engine.create(1)
        self.assertIsNone(self.engine.lastvalue(1))
        self.engine.write(1, [T0, T0 + 10], [1.0, 2.5])
        self.assertEqual(self.engine.lastvalue(1), (T0 + 10, 2.5))
        self.engine.write(1, [T0 + 20], [np.nan])
        self.assertEqual(self.engine.lastvalue(1), (T0 + 20, None))

    def test_export(self) -> None:
        self.engine.create(1)
        points = [(T0 + i, float(i)) for i in range(4)]
        self.engine.write(1, [t for t, _ in points], [v for _, v in points])
        whole = packed(*points)
        self.assertEqual(self.engine.export(1), whole)
        self.assertEqual(self.engine.export(1, 18), whole[18:])
        self.assertEqual(self.engine.export(1, 20), whole[18:])  # aligned down
        self.assertEqual(self.engine.export(1, -5), whole)
        self.assertEqual(self.engine.export(1, 1000), b"")
        self.assertEqual(self.engine.export(1, 9, length=9), whole[9:18])
        self.assertRaises(NoSuchFeed, self.engine.export, 2, 0)

    # -- reads -------------------------------------------------------------

    def feed(self, times: list[int], values: list[float]) -> int:
        self.engine.create(1)
        self.engine.write(1, times, values)
        return 1

    def rows(self, start: int, end: int, interval: object, **kw) -> list:
        """A read as current emoncms's PHPTimeSeries ``get_data_combined`` computes it."""
        series = self.engine.query(1, DataQuery(start=start, end=end, interval=interval, **kw))
        return [[t, None if np.isnan(v) else v] for t, v in zip(series.times.tolist(), series.values.tolist())]

    def test_read_empty(self) -> None:
        self.engine.create(1)
        self.assertEqual(self.rows(T0, T0 + 20, 10), [[T0, None], [T0 + 10, None], [T0 + 20, None]])
        self.assertEqual(self.rows(T0, T0 + 100, 10, skipmissing=True), [])

    def test_read_missing_feed(self) -> None:
        self.assertRaises(NoSuchFeed, self.engine.query, 1, DataQuery(start=T0, end=T0 + 100, interval=10))
        self.assertRaises(NoSuchFeed, self.engine.value_at, 1, T0)

    def test_read_first_record_in_each_division(self) -> None:
        """emoncms: the first record at or after each row's time, if it is before the next row's."""
        self.feed([T0, T0 + 4, T0 + 10, T0 + 21], [0.0, 4.0, 10.0, 21.0])
        # [T0, +6) -> T0; [+6, +12) -> +10; [+12, +18) -> none (+21 is later); [+18, +24) -> +21
        self.assertEqual(
            self.rows(T0, T0 + 18, 6), [[T0, 0.0], [T0 + 6, 10.0], [T0 + 12, None], [T0 + 18, 21.0]]
        )
        # limitinterval=2: each row at its record's own time
        self.assertEqual(
            self.rows(T0, T0 + 18, 6, limitinterval=2),
            [[T0, 0.0], [T0 + 10, 10.0], [T0 + 12, None], [T0 + 21, 21.0]],
        )
        # limitinterval=1 changes nothing for PHPTimeSeries
        self.assertEqual(self.rows(T0, T0 + 18, 6, limitinterval=1), self.rows(T0, T0 + 18, 6))

    def test_read_no_point_past_end(self) -> None:
        self.feed([T0 + 10 * i for i in range(10)], [float(i) for i in range(10)])
        self.assertEqual([t for t, _ in self.rows(T0, T0 + 30, 10)], [T0, T0 + 10, T0 + 20, T0 + 30])
        self.assertEqual([t for t, _ in self.rows(T0, T0 + 35, 10)], [T0, T0 + 10, T0 + 20, T0 + 30])

    def test_read_gap(self) -> None:
        self.feed([T0, T0 + 10, T0 + 100], [1.0, 2.0, 3.0])
        # [+30, +60) and [+60, +90) hold no record; [+90, +120) holds +100
        self.assertEqual(self.rows(T0, T0 + 90, 30), [[T0, 1.0], [T0 + 30, None], [T0 + 60, None], [T0 + 90, 3.0]])
        self.assertEqual(self.rows(T0, T0 + 90, 30, skipmissing=True), [[T0, 1.0], [T0 + 90, 3.0]])

    def test_read_skipmissing_nan(self) -> None:
        self.feed([T0, T0 + 10, T0 + 20], [1.0, np.nan, 3.0])
        self.assertEqual(self.rows(T0, T0 + 20, 10), [[T0, 1.0], [T0 + 10, None], [T0 + 20, 3.0]])
        self.assertEqual(self.rows(T0, T0 + 20, 10, skipmissing=True), [[T0, 1.0], [T0 + 20, 3.0]])

    def test_read_before_first_and_after_last(self) -> None:
        self.feed([T0 + 100, T0 + 110], [1.0, 2.0])
        self.assertEqual(self.rows(T0, T0 + 50, 25), [[T0, None], [T0 + 25, None], [T0 + 50, None]])
        self.assertEqual(self.rows(T0 + 200, T0 + 210, 10), [[T0 + 200, None], [T0 + 210, None]])
        self.assertEqual(self.engine.value_at(1, T0), 1.0)  # the next record, however far
        self.assertEqual(self.engine.value_at(1, T0 + 101), 2.0)
        self.assertIsNone(self.engine.value_at(1, T0 + 111))

    def test_read_end_before_start(self) -> None:
        self.feed([T0], [1.0])
        for end in (T0, T0 - 1):
            error = self.assertRaises(FeedError, self.engine.query, 1, DataQuery(start=T0, end=end, interval=10))
            self.assertEqual(str(error), "request end time before start time")

    def test_read_row_limit(self) -> None:
        self.feed([T0], [1.0])
        error = self.assertRaises(RowLimit, self.engine.query, 1, DataQuery(start=T0, end=T0 + 3000, interval=1, max_rows=3000))
        self.assertEqual(error.requested, 3001)
        self.assertEqual(len(self.rows(T0, T0 + 2999, 1, max_rows=3000)), 3000)

    def test_average_follows_emoncms(self) -> None:
        """emoncms's PHPTimeSeries average: a division takes the records from where
        the previous stopped up to one before the first record past its end,
        unless a record lands exactly on the end (so a record usually counts in
        the next division)."""
        self.feed([T0 + 5, T0 + 25, T0 + 30, T0 + 47], [10.0, 20.0, np.nan, 40.0])
        # start: first record >= T0 is #0. [T0, +20): first >= +20 is #1 (+25 > +20) -> #0, nothing;
        # [+20, +40): first >= +40 is #3 (+47) -> #2: #0, #1 -> 15; [+40, +60): past the end -> #2, #3 -> 40 (NaN skipped)
        self.assertEqual(self.rows(T0, T0 + 50, 20, average=True), [[T0, None], [T0 + 20, 15.0], [T0 + 40, 40.0]])
        # a record exactly on a division's end stops it there: [+5, +25) takes #0 (+25 is #1) -> 10;
        # [+25, +45): first >= +45 is #3 (+47) -> #2: #1 alone -> 20
        self.assertEqual(self.rows(T0 + 5, T0 + 25, 20, average=True), [[T0 + 5, 10.0], [T0 + 25, 20.0]])

    def test_values_that_are_not_finite_are_missing(self) -> None:
        self.feed([T0, T0 + 10, T0 + 20], [1.0, 2.0, 3.0])
        with open(self.path(1), "r+b") as f:  # an older version wrote inf
            f.seek(9 + 5)
            f.write(struct.pack("<f", np.inf))
            f.seek(18 + 5)
            f.write(struct.pack("<f", -np.inf))
        self.assertEqual(self.rows(T0, T0 + 20, 10), [[T0, 1.0], [T0 + 10, None], [T0 + 20, None]])
        self.assertEqual(self.rows(T0, T0 + 10, 30, average=True), [[T0, 1.0]])
        self.assertEqual(self.engine.lastvalue(1), (T0 + 20, None))
        self.assertIsNone(self.engine.value_at(1, T0 + 5))

    def test_read_matches_brute_force(self) -> None:
        """A random feed read against a per-row search of emoncms's rule."""
        rng = np.random.default_rng(7)
        times = np.unique(T0 + rng.integers(0, 5000, 400))
        values = rng.normal(size=times.shape[0]).astype(np.float32)
        self.feed(times.tolist(), values.tolist())
        for interval, limit in ((7, 0), (7, 2), (50, 0), (50, 2)):
            start, end = T0 - 100, T0 + 5100
            expected = []
            for t in range(start, end + 1, interval):
                later = np.flatnonzero(times >= t)
                if later.shape[0] and times[later[0]] < t + interval:
                    i = int(later[0])
                    expected.append([int(times[i]) if limit == 2 else t, float(values[i])])
                else:
                    expected.append([t, None])
            self.assertEqual(self.rows(start, end, interval, limitinterval=limit), expected)

    def test_rewrite_keeps_open_reads(self) -> None:
        """A read that snapshotted the file before an insert keeps reading the
        old file whole: the rewrite replaces it by rename, never in place."""
        self.feed([T0, T0 + 10, T0 + 20], [1.0, 2.0, 3.0])
        fd, n = self.engine._snapshot(1)
        self.addCleanup(os.close, fd)
        self.engine.write(1, [T0 + 5], [1.5])
        self.assertEqual(os.pread(fd, 9 * n, 0), packed((T0, 1.0), (T0 + 10, 2.0), (T0 + 20, 3.0)))
        self.assertEqual(self.engine.meta(1), SeriesMeta(4, T0, T0 + 20))

    def test_reads_during_writes(self) -> None:
        """Reads from another thread see whole, sorted records, and never fewer
        than before, while batches append, overwrite and rewrite the file."""
        self.engine = self.make_engine(sync=False)  # the disk's fsync speed is not under test
        self.addCleanup(self.engine.close)
        # Every record's value is its time - T0; a large file makes each rewrite slow.
        initial = np.concatenate(([T0 + 1000], T0 + 10_000 + np.arange(30_000)))
        self.feed(initial.tolist(), (initial - T0).tolist())
        done = threading.Event()
        problems: list[object] = []

        def reader() -> None:
            seen = 0
            while not done.is_set():
                try:
                    series = self.engine.query(
                        1, DataQuery(start=T0, end=T0 + 2000, interval=1, limitinterval=2, skipmissing=True)
                    )
                    out = list(zip(series.times.tolist(), series.values.tolist()))
                    data = np.frombuffer(self.engine.export(1), dtype=phptimeseries.MYD)
                except Exception as e:
                    problems.append(e)
                    return
                times = [t for t, _ in out]
                if times != sorted(set(times)) or any(v != t - T0 for t, v in out):
                    problems.append(out)
                if T0 + 1000 not in times:
                    problems.append(out)
                if data.shape[0] < seen or not (np.diff(data["time"].astype(np.int64)) > 0).all():
                    problems.append(data)
                seen = data.shape[0]

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for i in range(1, 100):
                # One older point (a rewrite), one overwrite, one append.
                times = [T0 + 1000 - i, T0 + 1000, T0 + 40_000 + i]
                self.engine.write(1, times, [t - T0 for t in times])
        finally:
            done.set()
            thread.join()
        self.assertEqual(problems, [])
        self.assertEqual(self.engine.meta(1), SeriesMeta(30_199, T0 + 901, T0 + 40_099))


class MappedPHPTimeSeriesTests(PHPTimeSeriesTests):
    """The same tests with every file mapped and binary-searched in place."""

    def setUp(self) -> None:
        self.patch(phptimeseries, "MAP_RECORDS", 0)
        super().setUp()

    def test_large_file_insert_and_read(self) -> None:
        self.engine.create(1)
        times = T0 + np.arange(0, 200_000, 2)
        self.engine.write(1, times, (times - T0).astype(np.float64))
        self.engine.write(1, [T0 + 99_999, T0 + 100_000], [-1.0, -2.0])
        data = np.fromfile(self.path(1), dtype=RECORD)
        self.assertEqual(data.shape[0], 100_001)
        self.assertTrue((np.diff(data["time"].astype(np.int64)) > 0).all())
        self.assertTrue((data["marker"] == 249).all())
        # the two new records sit between T0+99_998 and T0+100_002, in order, as emoncms writes them
        at = 9 * (99_998 // 2)
        self.assertEqual(
            self.content(1)[at : at + 36],
            packed((T0 + 99_998, 99_998.0), (T0 + 99_999, -1.0), (T0 + 100_000, -2.0), (T0 + 100_002, 100_002.0)),
        )
        self.assertEqual(
            self.rows(T0 + 99_998, T0 + 100_000, 1),
            [[T0 + 99_998, 99_998.0], [T0 + 99_999, -1.0], [T0 + 100_000, -2.0]],
        )
