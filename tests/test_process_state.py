"""Process state (emond.process.state): what a consumer loads from Redis and rebuilds after
Redis lost it, and what it commits; worked examples, no Redis (replies are given as Redis
gives them). The process functions themselves are in test_runner.
"""

from __future__ import annotations

from twisted.trial import unittest

from emond.processlist import parse_processlist
from emond.process.state import load_commands, loaded, rebuild_feed, rebuild_inputs, to_commit
from emond.queue import Commit
from emond.records import ENGINE_PHPTIMESERIES
from emond.process.functions import ProcessState, StepRun, run_steps
from tests.test_runner import APR01, DAY, INPUT, LONDON, MAR31, OTHER, T0, UTC, Harness, make_feed


class LoadTests(unittest.TestCase):
    def test_load_tolerates_emoncms_org_values(self):
        state = ProcessState()
        wanted = [("feed", 1), ("feed", 2), ("input", 3), ("extra", ("whaccumulator", 1))]
        # emoncms.org kept feed times as date strings: no time, but the total survives
        absent = loaded(state, wanted, [[b"2018-2-6 14:03:05", b"12.5"], [None, None], [b"1517925785", b""],
                                       [b"time", b"1517925785", b"value", b"400"]])
        # a feed Redis has nothing for is not made up as 0: it is reported, to be rebuilt from disk
        self.assertEqual(absent, ([], [2]))
        self.assertEqual(state.feeds, {1: (0, 12.5)})
        self.assertEqual(state.inputs, {3: (1517925785, None)})
        run = StepRun(state, {1: make_feed(1)}, UTC, INPUT, 1517925800)
        self.assertEqual(run.extra_timevalue("whaccumulator", 1), (1517925785, 400.0))
        # a kWh total read that way goes on from where it was
        run_steps(parse_processlist("4:1"), run, 1000.0)
        self.assertEqual(state.feeds[1], (1517925800, 12.5))


    def test_load_reads_emoncms_org_keys(self):
        wanted = [("input", 3), ("step", 3), ("feed", 1), ("extra", ("whaccumulator", 1))]
        self.assertEqual(load_commands(wanted), [
            ("HMGET", "input:lastvalue:3", "time", "value"),
            ("HGETALL", "emond:step:3"),
            ("HMGET", "feed:lastvalue:1", "time", "value"),
            ("HGETALL", "process:whaccumulator:1"),
        ])


class RebuildTests(unittest.TestCase):
    """State rebuilt after Redis lost it (rules in emond.process.state's docstring), worked by hand."""

    def test_a_phpfina_point_stands_for_its_whole_slot(self):
        h = Harness([make_feed(1)])
        # the slot T0+20 of a 10 s feed holds 0.03 kWh: the last packet counted came at T0+20..T0+29
        rebuild_feed(h.state, 1, (T0 + 20, 0.03), slot=10)
        self.assertEqual(h.last(1), (T0 + 29, 0.03))
        self.assertEqual(h.state.dirty_feeds, {1})  # written back to Redis
        commit = Commit()
        to_commit(h.state, commit)
        self.assertEqual(commit.ops, ["HSETMAX", 3, "feed:lastvalue:1", T0 + 29, "0.03"])
        h.state.clear_changes()
        # a packet of that slot, counted before the loss and sent again: nothing
        h.run("4:1", T0 + 25, 3600.0)
        self.assertEqual(h.values(1), [])
        # the next one counts from T0+29: 4 s * 3600 W / 3.6e6 = 0.004 -> 0.034
        h.run("4:1", T0 + 33, 3600.0)
        self.assertEqual(h.values(1), [(T0 + 33, 0.034)])

    def test_a_phptimeseries_point_carries_its_packets_time(self):
        h = Harness([make_feed(1, ENGINE_PHPTIMESERIES)])
        rebuild_feed(h.state, 1, (T0 + 23, 9000.0), slot=1)
        h.run("14:1", T0 + 23, 1800.0)  # the same packet again: not added
        self.assertEqual(h.values(1), [])
        h.run("14:1", T0 + 24, 1800.0)
        self.assertEqual(h.values(1), [(T0 + 24, 10800.0)])

    def test_an_empty_feed_or_a_nan_point(self):
        h = Harness([make_feed(1), make_feed(2)])
        rebuild_feed(h.state, 1, None, slot=10)  # nothing on disk: a new feed, nothing to go on from
        rebuild_feed(h.state, 2, (T0, None), slot=10)  # a NaN last slot: 0, its time kept
        self.assertEqual((h.last(1), h.last(2)), ((0, 0.0), (T0 + 9, 0.0)))
        self.assertEqual(h.state.dirty_feeds, {2})

    def test_a_daily_point_tells_the_day_only(self):
        # a daily PHPFina feed (86400 s slots, UTC-aligned) of a London user: the point for the
        # local day 1 April (starting 31 March 23:00 UTC, BST) sits in the slot of 31 March UTC
        h = Harness([make_feed(1, datatype=2), make_feed(2, ENGINE_PHPTIMESERIES, datatype=2)])
        rebuild_feed(h.state, 1, (MAR31, 5.0), slot=86400, daily=LONDON)
        # the slot's last second, 1 April 00:59:59 BST, is in the local day starting at APR01
        self.assertEqual(h.last(1), (APR01, 5.0))
        self.assertEqual(h.state.day_only, {1})
        self.assertEqual(h.state.dirty_feeds, set())  # not written back: (APR01, 5) would read as a packet at midnight
        # 01:00 BST: when the last packet came that day is unknown: no increment, the total kept
        h.run("5:1", APR01 + 3600, 1000.0)
        self.assertEqual(h.values(1), [(APR01, 5.0)])
        self.assertEqual(h.state.day_only, set())
        self.assertEqual(h.last(1), (APR01 + 3600, 5.0))
        # then 60 s * 1000 W / 3.6e6 = 0.016666667 -> 5.016666667
        h.run("5:1", APR01 + 3660, 1000.0)
        self.assertEqual(h.values(1), [(APR01, 5.016666667)])
        # a PHPTimeSeries daily point is at the day's start itself
        rebuild_feed(h.state, 2, (APR01, 20.0), slot=1, daily=LONDON)
        self.assertEqual(h.last(2), (APR01, 20.0))

    def test_daily_extremes_and_on_time_after_a_rebuild(self):
        h = Harness([make_feed(f, ENGINE_PHPTIMESERIES, datatype=2) for f in (1, 2, 3)], tz=UTC)
        for feedid, value in ((1, 20.0), (2, 10.0), (3, 600.0)):
            rebuild_feed(h.state, feedid, (T0, value), slot=1, daily=UTC)
        h.run("27:1,28:2,7:3", T0 + 600, 15.0)  # within [10, 20]: max and min unchanged
        self.assertEqual(h.values(1) + h.values(2), [])
        # on-time: on, but since when is unknown: 0 added (not the 600 s since midnight)
        self.assertEqual(h.values(3), [(T0, 600.0)])
        h.run("27:1,28:2,7:3", T0 + 660, 25.0)  # a new max; on for 60 s more
        self.assertEqual((h.values(1), h.values(2), h.values(3)), ([(T0, 25.0)], [], [(T0, 660.0)]))
        h.run("27:1,28:2,7:3", T0 + DAY + 60, 5.0)  # the next day starts all three again
        self.assertEqual((h.values(1), h.values(2), h.values(3)), ([(T0 + DAY, 5.0)], [(T0 + DAY, 5.0)], [(T0 + DAY, 0.0)]))

    def test_kwh_to_kwhd_whose_reading_was_lost(self):
        h = Harness([make_feed(1, ENGINE_PHPTIMESERIES, datatype=2)], tz=UTC)
        rebuild_feed(h.state, 1, (T0, 3.0), slot=1, daily=UTC)  # no process:kwhtokwhd:1 either
        h.run("23:1", T0 + 600, 100.0)  # the first reading is the reference: nothing written
        self.assertEqual(h.values(1), [])
        h.run("23:1", T0 + 660, 100.5)  # 100.5 - 100 = 0.5 -> 3.0 + 0.5
        self.assertEqual(h.values(1), [(T0, 3.5)])

    def test_input_values_from_the_database(self):
        h = Harness([make_feed(1)])
        rebuild_inputs(h.state, [OTHER, 3], {OTHER: (T0 - 10, 5.0), 3: (None, None)})
        self.assertEqual(h.state.inputs, {OTHER: (T0 - 10, 5.0), 3: (0, None)})
        self.assertEqual(h.state.dirty_inputs, {OTHER})  # written back to Redis
        h.run(f"6:{OTHER},1:1", T0, 3.0)  # 3 * 5
        self.assertEqual(h.values(1), [(T0, 15.0)])
