"""Process functions (emond.process.functions): worked examples over sequences of packets, no Redis.

The loading of state and the rebuild rules (emond.process.state) are in test_process_state.

Each test builds a ProcessState, the user's feeds and a timezone, runs
process lists packet by packet as the consumer does (the input's last value
is set first, then its list runs), and checks the storage records emitted and
the state kept. The expected numbers are worked out by hand in the comments.
"""

from __future__ import annotations

import copy
import zoneinfo

from twisted.trial import unittest

from emond.meta.feeds import Feed
from emond.processlist import FEEDID, PROCESSES, Step, parse_processlist
from emond.process.state import to_commit
from emond.queue import Commit
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES, PADDING_JOIN, PADDING_NAN
from emond.process.functions import FLOAT32_MAX, FUNCTIONS, READS_FEED, REASON_OUT_OF_RANGE, ProcessState, StepRun, run_steps

LONDON = zoneinfo.ZoneInfo("Europe/London")
UTC = zoneinfo.ZoneInfo("UTC")

T0 = 1705276800  # 2024-01-15 00:00:00 UTC, local midnight in London (GMT in winter)
DAY = 86400
# Europe/London, spring forward: 2024-03-31 01:00 GMT -> 02:00 BST, a 23-hour local day
MAR31 = 1711843200  # 2024-03-31 00:00 GMT
APR01 = 1711926000  # 2024-04-01 00:00 BST = 2024-03-31 23:00 UTC
# Europe/London, fall back: 2024-10-27 02:00 BST -> 01:00 GMT, a 25-hour local day
OCT27 = 1729983600  # 2024-10-27 00:00 BST = 2024-10-26 23:00 UTC
OCT28 = 1730073600  # 2024-10-28 00:00 GMT

INPUT = 1  # the input whose list runs
OTHER = 2  # another input of the user, read by the input steps


def make_feed(feedid: int, engine: int = ENGINE_PHPFINA, server: int = 0, datatype: int = 1) -> Feed:
    return Feed(feedid, 7, f"feed{feedid}", "", datatype, 0, engine, server, 10, "")


class Harness:
    """One user's feeds and a consumer's state; runs lists like the consumer does."""

    def __init__(self, feeds: list[Feed], tz: zoneinfo.ZoneInfo = LONDON) -> None:
        self.state = ProcessState()
        self.feeds = {f.id: f for f in feeds}
        self.tz = tz

    def run(self, steps: str | list[Step], when: int, value: float, inputid: int = INPUT) -> None:
        if isinstance(steps, str):
            steps = parse_processlist(steps)
        self.state.set_input(inputid, when, value)
        run_steps(steps, StepRun(self.state, self.feeds, self.tz, inputid, when), value)

    def records(self, feedid: int | None = None) -> list[tuple[int, float, int]]:
        """(time, value, padding) emitted since the last call, for one feed or all; clears them."""
        out = [
            (t, v, padding)
            for records in self.state.records.values()
            for f, t, v, _engine, padding in records
            if feedid is None or f == feedid
        ]
        if feedid is None:
            self.state.records = {}
        else:
            for server, records in self.state.records.items():
                self.state.records[server] = [r for r in records if r[0] != feedid]
        return out

    def values(self, feedid: int) -> list[tuple[int, float]]:
        """(time, value) of the records of one feed, values rounded to 9 decimals; clears them."""
        return [(t, round(v, 9)) for t, v, _p in self.records(feedid)]

    def last(self, feedid: int) -> tuple[int, float]:
        t, v = self.state.feeds[feedid]
        return t, round(v, 9)

    def snapshot(self) -> tuple[object, ...]:
        s = self.state
        return copy.deepcopy((s.inputs, s.feeds, s.steps, s.extra, s.dirty_feeds, s.dirty_steps, s.dirty_extra))


class TableTests(unittest.TestCase):
    def test_every_id_of_the_table_runs(self):
        # every process of emoncms.org's table, kept or "Deleted", has a function
        self.assertEqual(sorted(FUNCTIONS), sorted(PROCESSES))

    def test_reads_feed_names_the_processes_that_compute_with_a_feeds_last_value(self):
        # the feeds rebuilt from disk when Redis lost them: exactly those some step reads
        readers = set()
        for process, proc in PROCESSES.items():
            if proc.argtype != FEEDID:
                continue
            for when in (T0, T0 - 10):  # a new packet, and one the step may have applied already
                run = StepRun(ProcessState(), {1: make_feed(1)}, UTC, INPUT, when)
                read = []
                run.feed_last = lambda feedid, read=read: read.append(feedid) or (T0 - 10, 1.0)
                for name in ("kwhtokwhd", "whaccumulator", "kwhtopower", "ratechange"):
                    run.state.extra[(name, 1)] = {"time": str(T0 - 10), "value": "1.0"}
                FUNCTIONS[process](run, 1, 2.0)
                if read:
                    readers.add(process)
        self.assertEqual(readers, set(READS_FEED))


class StatelessTests(unittest.TestCase):
    def test_log_to_feed(self):
        h = Harness([make_feed(1), make_feed(2, ENGINE_PHPTIMESERIES, server=3)])
        h.run("1:1,1:2", T0, 230.5)
        h.run("1:1,1:2", T0 + 10, -4.0)
        # records go to the feed's storage server, with its engine, NaN padding
        self.assertEqual(h.state.records[0], [(1, T0, 230.5, ENGINE_PHPFINA, PADDING_NAN),
                                              (1, T0 + 10, -4.0, ENGINE_PHPFINA, PADDING_NAN)])
        self.assertEqual(h.state.records[3], [(2, T0, 230.5, ENGINE_PHPTIMESERIES, PADDING_NAN),
                                              (2, T0 + 10, -4.0, ENGINE_PHPTIMESERIES, PADDING_NAN)])
        self.assertEqual(h.state.feeds[1], (T0 + 10, -4.0))
        self.assertEqual(h.state.dirty_feeds, {1, 2})
        # log_to_feed is not stateful: the same packet again is written again (same slot, same value)
        h.records()
        h.run("1:1", T0 + 10, -4.0)
        self.assertEqual(h.values(1), [(T0 + 10, -4.0)])

    def test_scale_and_offset_chain(self):
        h = Harness([make_feed(1), make_feed(2)])
        lst = "2:0.1,3:-5,1:1,3:10,2:2,1:2"
        h.run(lst, T0, 230)
        # 230 * 0.1 = 23; 23 - 5 = 18 -> feed 1; (18 + 10) * 2 = 56 -> feed 2
        self.assertEqual(h.values(1), [(T0, 18.0)])
        self.assertEqual(h.values(2), [(T0, 56.0)])
        h.run(lst, T0 + 10, -30)
        # -30 * 0.1 = -3; -3 - 5 = -8; (-8 + 10) * 2 = 4
        self.assertEqual(h.values(1), [(T0 + 10, -8.0)])
        self.assertEqual(h.values(2), [(T0 + 10, 4.0)])

    def test_input_arithmetic(self):
        h = Harness([make_feed(f) for f in (1, 2, 3)])
        h.state.set_input(OTHER, T0 - 5, 3.0)
        h.run(f"6:{OTHER},1:1,11:{OTHER},1:2,22:{OTHER},1:3", T0, 5.0)
        # 5 * 3 = 15 -> feed 1; 15 + 3 = 18 -> feed 2; 18 - 3 = 15 -> feed 3
        self.assertEqual(h.values(1), [(T0, 15.0)])
        self.assertEqual(h.values(2), [(T0, 18.0)])
        self.assertEqual(h.values(3), [(T0, 15.0)])
        # an input with no value counts as 0 (emoncms): 5 * 0 = 0; 0 + 0; 0 - 0
        h.run("6:99,1:1,11:99,3:1,1:2", T0 + 10, 5.0)
        self.assertEqual(h.values(1), [(T0 + 10, 0.0)])
        self.assertEqual(h.values(2), [(T0 + 10, 1.0)])

    def test_divide_input(self):
        h = Harness([make_feed(1), make_feed(2)])
        lst = f"1:1,12:{OTHER},1:2"
        h.state.set_input(OTHER, T0, 4.0)
        h.run(lst, T0, 10.0)
        self.assertEqual(h.values(2), [(T0, 2.5)])  # 10 / 4
        h.records()
        # by zero: no value, the list stops: the step after it writes nothing (the one before did)
        h.state.set_input(OTHER, T0 + 10, 0.0)
        h.run(lst, T0 + 10, 10.0)
        self.assertEqual(h.values(1), [(T0 + 10, 10.0)])
        self.assertEqual(h.values(2), [])
        # a negative divisor: no value either (emoncms.org divides only by a value above zero)
        h.state.set_input(OTHER, T0 + 20, -2.0)
        h.run(lst, T0 + 20, 10.0)
        self.assertEqual(h.values(2), [])
        # an input never seen: no value
        h.run("12:99,1:2", T0 + 30, 10.0)
        self.assertEqual(h.values(2), [])

    def test_feed_arithmetic(self):
        h = Harness([make_feed(f) for f in (1, 2, 3, 4, 5, 6)])
        h.run("1:6", T0, 4.0)  # feed 6's last value: 4
        h.run("29:6,1:1,30:6,1:2,31:6,1:3,32:6,1:4", T0 + 10, 6.0)
        # 6 + 4 = 10 -> 1; 10 - 4 = 6 -> 2; 6 * 4 = 24 -> 3; 24 / 4 = 6 -> 4
        self.assertEqual([h.values(f) for f in (1, 2, 3, 4)],
                         [[(T0 + 10, 10.0)], [(T0 + 10, 6.0)], [(T0 + 10, 24.0)], [(T0 + 10, 6.0)]])
        # dividing by a feed whose last value is 0 gives 0 (emoncms.org), and the list goes on
        h.run("1:6", T0 + 20, 0.0)
        h.run("32:6,3:1.5,1:5", T0 + 30, 6.0)
        self.assertEqual(h.values(5), [(T0 + 30, 1.5)])  # 0 + 1.5

    def test_limits_and_conversions(self):
        h = Harness([make_feed(f) for f in (1, 2, 3, 4)])
        lst = "24,1:1,25,1:2"  # NONE steps may omit their argument
        h.run(lst, T0, -5.0)
        h.run(lst, T0 + 10, 5.0)
        self.assertEqual(h.values(1), [(T0, 0.0), (T0 + 10, 5.0)])  # allowpositive: max(v, 0)
        # allownegative after allowpositive: min(0, 0) = 0; min(5, 0) = 0
        self.assertEqual(h.values(2), [(T0, 0.0), (T0 + 10, 0.0)])
        h.run("25:0,1:2", T0 + 20, -7.0)
        self.assertEqual(h.values(2), [(T0 + 20, -7.0)])
        lst = "26:0,1:3,33:0,1:4"
        h.run(lst, T0, -1.0)
        h.run(lst, T0 + 10, 7.0)
        # signed2unsigned: -1 + 65536 = 65535; 7 stays; reset2zero: 0
        self.assertEqual(h.values(3), [(T0, 65535.0), (T0 + 10, 7.0)])
        self.assertEqual(h.values(4), [(T0, 0.0), (T0 + 10, 0.0)])

    def test_unknown_id_stops_the_list(self):
        h = Harness([make_feed(1), make_feed(2)])
        h.run([Step(1, 1), Step(99, 0), Step(1, 2)], T0, 3.0)
        self.assertEqual(h.values(1), [(T0, 3.0)])
        self.assertEqual(h.values(2), [])


class EnergyTests(unittest.TestCase):
    def test_power_to_kwh(self):
        h = Harness([make_feed(1), make_feed(2)])
        lst = "4:1,1:2"
        h.run(lst, T0, 1000.0)  # no last value: starts at 0
        h.run(lst, T0 + 10, 3600.0)  # 10 s * 3600 W / 3.6e6 = 0.01 kWh
        h.run(lst, T0 + 70, 1800.0)  # 60 s * 1800 W / 3.6e6 = 0.03 -> 0.04
        h.run(lst, T0 + 70 + 7200, 5000.0)  # a gap of 7200 s: nothing added, the total is written again
        h.run(lst, T0 + 7280, 360.0)  # 10 s * 360 W / 3.6e6 = 0.001 -> 0.041
        h.run(lst, T0 + 7280 + 7199, 1.0)  # 7199 s still counts: 7199 / 3.6e6 = 0.0019997222 -> 0.0429997222
        self.assertEqual(h.records(1), [
            (T0, 0.0, PADDING_JOIN),
            (T0 + 10, 0.01, PADDING_JOIN),
            (T0 + 70, 0.04, PADDING_JOIN),
            (T0 + 7270, 0.04, PADDING_JOIN),
            (T0 + 7280, 0.041, PADDING_JOIN),
            (T0 + 14479, 0.041 + 7199 / 3600000.0, PADDING_JOIN),
        ])
        # the power is passed on unchanged
        self.assertEqual([v for _t, v in h.values(2)], [1000.0, 3600.0, 1800.0, 5000.0, 360.0, 1.0])
        self.assertEqual(h.last(1), (T0 + 14479, round(0.041 + 7199 / 3600000.0, 9)))

    def test_power_to_kwhd_across_local_midnight_on_a_dst_day(self):
        self.assertEqual(APR01 - MAR31, 23 * 3600)  # the day the clocks go forward
        h = Harness([make_feed(1, ENGINE_PHPTIMESERIES, datatype=2), make_feed(2)])
        lst = "5:1,1:2"
        h.run(lst, MAR31 + 1800, 3600.0)  # 00:30 GMT; no last value: 0 for the day
        h.run(lst, MAR31 + 5400, 2000.0)  # 02:30 BST, 3600 s later: 3600 * 2000 / 3.6e6 = 2.0
        h.run(lst, APR01 - 600, 9999.0)  # 23:50 BST, a gap of 76800 s: nothing added, 2.0
        h.run(lst, APR01 - 300, 1200.0)  # 23:55 BST: 300 * 1200 / 3.6e6 = 0.1 -> 2.1
        # 00:05 BST on 1 April (still 31 March in UTC): a new local day; the increment since the
        # last packet starts it: 600 * 1200 / 3.6e6 = 0.2
        h.run(lst, APR01 + 300, 1200.0)
        h.run(lst, APR01 + 900, 2400.0)  # 600 * 2400 / 3.6e6 = 0.4 -> 0.6
        # one point per day, at the local day's start, updated in place
        self.assertEqual(h.values(1), [
            (MAR31, 0.0), (MAR31, 2.0), (MAR31, 2.0), (MAR31, 2.1),
            (APR01, 0.2), (APR01, 0.6),
        ])
        # the last value is the packet's time with the day's total (emoncms.org's update_data)
        self.assertEqual(h.last(1), (APR01 + 900, 0.6))
        self.assertEqual(h.values(2), [(t, v) for t, v in [
            (MAR31 + 1800, 3600.0), (MAR31 + 5400, 2000.0), (APR01 - 600, 9999.0),
            (APR01 - 300, 1200.0), (APR01 + 300, 1200.0), (APR01 + 900, 2400.0)]])

    def test_power_to_kwhd_days_follow_the_users_timezone(self):
        # the same packets for a UTC user: 23:05 UTC is still 31 March, the total goes on
        h = Harness([make_feed(1, ENGINE_PHPTIMESERIES, datatype=2)], tz=UTC)
        h.run("5:1", APR01 - 300, 1200.0)
        h.run("5:1", APR01 + 300, 1200.0)  # 600 * 1200 / 3.6e6 = 0.2
        self.assertEqual(h.values(1), [(MAR31, 0.0), (MAR31, 0.2)])

    def test_accumulator(self):
        h = Harness([make_feed(1), make_feed(2)])
        lst = "14:1,1:2"
        for i, v in enumerate([2.0, 3.0, -1.0]):
            h.run(lst, T0 + 10 * i, v)
        # totals 2, 2 + 3 = 5, 5 - 1 = 4, written with join padding and passed on
        self.assertEqual(h.records(1), [(T0, 2.0, PADDING_JOIN), (T0 + 10, 5.0, PADDING_JOIN),
                                        (T0 + 20, 4.0, PADDING_JOIN)])
        self.assertEqual(h.values(2), [(T0, 2.0), (T0 + 10, 5.0), (T0 + 20, 4.0)])
        self.assertEqual(h.last(1), (T0 + 20, 4.0))

    def test_wh_accumulator(self):
        h = Harness([make_feed(1), make_feed(2)])
        lst = "34:1,1:2"
        h.run(lst, T0, 1000.0)  # the first reading only sets the reference; passes on the total, 0
        h.run(lst, T0 + 60, 1010.0)  # +10 Wh in 60 s = 600 W: counted -> 10
        h.run(lst, T0 + 120, 1510.0)  # +500 Wh in 60 s = 30000 W >= 25000: dropped -> 10
        h.run(lst, T0 + 180, 1520.0)  # +10 Wh from 1510 (the reference moved on) -> 20
        h.run(lst, T0 + 190, 5.0)  # the meter was reset: nothing added -> 20
        h.run(lst, T0 + 250, 15.0)  # +10 Wh from 5 -> 30
        # +20000 Wh over the real 3600 s since the last reading = 20000 W: counted -> 20030
        h.run(lst, T0 + 3850, 20015.0)
        # +5000 Wh in 600 s = 30000 W: dropped
        h.run(lst, T0 + 4450, 25015.0)
        self.assertEqual(h.records(1), [
            (T0 + 60, 10.0, PADDING_JOIN), (T0 + 120, 10.0, PADDING_JOIN), (T0 + 180, 20.0, PADDING_JOIN),
            (T0 + 190, 20.0, PADDING_JOIN), (T0 + 250, 30.0, PADDING_JOIN), (T0 + 3850, 20030.0, PADDING_JOIN),
            (T0 + 4450, 20030.0, PADDING_JOIN),
        ])
        self.assertEqual([v for _t, v in h.values(2)], [0.0, 10.0, 10.0, 20.0, 20.0, 30.0, 20030.0, 20030.0])
        self.assertEqual(h.state.extra[("whaccumulator", 1)], {"time": str(T0 + 4450), "value": "25015.0"})
        commit = Commit()  # committed under emoncms.org's key
        to_commit(h.state, commit)
        self.assertIn(["HSET", 5, "process:whaccumulator:1", "time", str(T0 + 4450), "value", "25015.0"],
                      [commit.ops[i:i + 7] for i in range(len(commit.ops))])

    def test_kwh_to_power(self):
        # process 21 is "Deleted" on emoncms.org: it still runs in the lists that hold it
        self.assertTrue(PROCESSES[21].deleted)
        h = Harness([make_feed(1), make_feed(2)])
        lst = "21:1,1:2"
        h.run(lst, T0, 100.0)  # first reading: no power, the list stops
        h.run(lst, T0 + 1800, 100.5)  # 0.5 kWh * 3.6e6 J/kWh / 1800 s = 1000 W
        h.run(lst, T0 + 3600, 100.5)  # no energy: 0 W
        h.run(lst, T0 + 3660, 100.75)  # 0.25 * 3.6e6 / 60 = 15000 W
        self.assertEqual(h.values(1), [(T0 + 1800, 1000.0), (T0 + 3600, 0.0), (T0 + 3660, 15000.0)])
        self.assertEqual(h.values(2), [(T0 + 1800, 1000.0), (T0 + 3600, 0.0), (T0 + 3660, 15000.0)])

    def test_kwh_to_kwhd(self):
        h = Harness([make_feed(1, ENGINE_PHPTIMESERIES, datatype=2), make_feed(2)])
        lst = "23:1,1:2"
        h.run(lst, T0 + 3600, 50.0)  # first reading: only the reference
        h.run(lst, T0 + 7200, 50.5)  # +0.5 kWh, the feed's first day -> 0.5
        h.run(lst, T0 + 9000, 50.25)  # lower: an error, nothing added, 50.5 kept and passed on
        h.run(lst, T0 + 9600, 50.75)  # +0.25 from 50.5 -> 0.75
        h.run(lst, T0 + DAY + 60, 51.0)  # next day: +0.25 starts it
        self.assertEqual(h.values(1), [(T0, 0.5), (T0, 0.5), (T0, 0.75), (T0 + DAY, 0.25)])
        self.assertEqual([v for _t, v in h.values(2)], [50.0, 50.5, 50.5, 50.75, 51.0])
        self.assertEqual(h.last(1), (T0 + DAY + 60, 0.25))

    def test_kwhinc_to_kwhd(self):
        h = Harness([make_feed(1, ENGINE_PHPTIMESERIES, datatype=2)])
        h.run("8:1", T0 + 10, 250.0)  # 250 Wh = 0.25 kWh
        h.run("8:1", T0 + 20, 500.0)  # + 0.5 -> 0.75
        h.run("8:1", T0 + DAY + 5, 100.0)  # next day: 0.1
        self.assertEqual(h.values(1), [(T0, 0.25), (T0, 0.75), (T0 + DAY, 0.1)])

    def test_input_ontime(self):
        h = Harness([make_feed(1, ENGINE_PHPTIMESERIES, datatype=2)])
        for when, v in [
            (T0 + 100, 1.0),  # no last value: 0 for the day
            (T0 + 160, 1.0),  # on: +60 -> 60
            (T0 + 220, 0.0),  # off now: +0 -> 60
            (T0 + 280, 5.0),  # on: +60 -> 120
            (T0 + 7480, 1.0),  # a gap of 7200 s: +0 -> 120
            (T0 + DAY - 30, 1.0),  # a gap again: 120
            (T0 + DAY + 30, 1.0),  # next day: the 60 s since the last packet start it -> 60
        ]:
            h.run("7:1", when, v)
        self.assertEqual(h.values(1), [(T0, 0.0), (T0, 60.0), (T0, 60.0), (T0, 120.0), (T0, 120.0), (T0, 120.0),
                                       (T0 + DAY, 60.0)])


class DailyExtremesTests(unittest.TestCase):
    def test_max_and_min_reset_at_local_midnight(self):
        self.assertEqual(OCT28 - OCT27, 25 * 3600)  # the day the clocks go back
        h = Harness([make_feed(1, ENGINE_PHPTIMESERIES, datatype=2), make_feed(2, ENGINE_PHPTIMESERIES, datatype=2)])
        lst = "27:1,28:2"
        h.run(lst, OCT27 + 3600, 10.0)  # 01:00 BST (00:00 UTC): the day's first value starts both
        h.run(lst, OCT27 + 7200, 15.0)  # 01:00 GMT (the second 01:00): a new max
        h.run(lst, OCT27 + 10800, 5.0)  # a new min
        h.run(lst, OCT27 + 14400, 12.0)  # neither: nothing written
        h.run(lst, OCT28 - 60, 20.0)  # 23:59 GMT: a new max, still 27 October
        h.run(lst, OCT28 + 60, 7.0)  # 00:01 on the 28th: a new day starts both
        h.run(lst, OCT28 + 120, 8.0)  # max 8
        self.assertEqual(h.values(1), [(OCT27, 10.0), (OCT27, 15.0), (OCT27, 20.0), (OCT28, 7.0), (OCT28, 8.0)])
        self.assertEqual(h.values(2), [(OCT27, 10.0), (OCT27, 5.0), (OCT28, 7.0)])
        # for a UTC user 01:00 BST on the 27th is the 27th's first hour: a different day start
        u = Harness([make_feed(1, ENGINE_PHPTIMESERIES, datatype=2)], tz=UTC)
        u.run("27:1", OCT27 + 3600, 10.0)
        self.assertEqual(u.values(1), [(OCT27 + 3600, 10.0)])


class DeletedAndStopTests(unittest.TestCase):
    def test_ratechange_writes_the_change_and_stops_the_list(self):
        h = Harness([make_feed(1), make_feed(2)])
        lst = "15:1,1:2"
        h.run(lst, T0, 10.0)  # first value: nothing to compare with
        h.run(lst, T0 + 10, 13.0)  # 13 - 10 = 3
        h.run(lst, T0 + 20, 11.0)  # 11 - 13 = -2
        self.assertEqual(h.values(1), [(T0 + 10, 3.0), (T0 + 20, -2.0)])
        self.assertEqual(h.values(2), [])  # it passes nothing on
        self.assertEqual(h.state.extra[("ratechange", 1)], {"time": str(T0 + 20), "value": "11.0"})

    def test_deleted_ids_still_run(self):
        self.assertTrue(PROCESSES[20].deleted and PROCESSES[13].deleted)
        h = Harness([make_feed(1), make_feed(2)])
        lst = "13:5,20:1,1:2"  # phaseshift (a no-op), then pulse_diff
        h.run(lst, T0, 100.0)  # the feed has no count yet: increment 0; the count is written
        h.run(lst, T0 + 10, 150.0)  # 150 - 100 = 50
        h.run(lst, T0 + 20, -32768.0)  # a 16-bit counter read as signed: -32768 + 65536 = 32768; - 150 = 32618
        h.run(lst, T0 + 30, 10.0)  # below the last count: a reset, the count is the increment: 10
        h.run(lst, T0 + 40, 0.0)  # 0: nothing is passed on (emoncms.org), nothing written
        self.assertEqual(h.values(1), [(T0, 100.0), (T0 + 10, 150.0), (T0 + 20, 32768.0), (T0 + 30, 10.0)])
        self.assertEqual(h.values(2), [(T0, 0.0), (T0 + 10, 50.0), (T0 + 20, 32618.0), (T0 + 30, 10.0)])

    def test_a_missing_feed_is_not_written(self):
        h = Harness([make_feed(2)])
        h.run("1:1,4:1,1:2", T0, 5.0)  # feed 1 was deleted: no records, no state, the value goes on
        self.assertEqual(h.records(), [(T0, 5.0, PADDING_NAN)])
        self.assertNotIn(1, h.state.feeds)
        self.assertEqual(h.state.steps, {})


# For every stateful process: a list, two packets that set up its state, and the value of a third.
STATEFUL = {
    4: ("4:1", [(T0, 1000.0), (T0 + 10, 2000.0)]),
    5: ("5:1", [(T0, 1000.0), (T0 + 10, 2000.0)]),
    7: ("7:1", [(T0, 1.0), (T0 + 10, 1.0)]),
    8: ("8:1", [(T0, 100.0), (T0 + 10, 100.0)]),
    14: ("14:1", [(T0, 2.0), (T0 + 10, 3.0)]),
    15: ("15:1", [(T0, 2.0), (T0 + 10, 3.0)]),
    20: ("20:1", [(T0, 100.0), (T0 + 10, 110.0)]),
    21: ("21:1", [(T0, 10.0), (T0 + 10, 10.5)]),
    23: ("23:1", [(T0, 10.0), (T0 + 10, 10.5)]),
    # the second packet sets no new max/min: the feed's last value stays at T0, only the step's
    # record of packets tells that T0 + 5 comes after what it applied
    27: ("27:1", [(T0, 3.0), (T0 + 10, 1.0)]),
    28: ("28:1", [(T0, 1.0), (T0 + 10, 3.0)]),
    34: ("34:1", [(T0, 10.0), (T0 + 10, 11.0)]),
}


class ReplayTests(unittest.TestCase):
    def test_a_replayed_packet_changes_nothing(self):
        self.assertEqual(sorted(STATEFUL), sorted(p for p in FUNCTIONS if FUNCTIONS[p].__name__ not in (
            "_passthrough", "log_to_feed", "scale", "offset", "times_input", "add_input", "subtract_input",
            "divide_input", "allowpositive", "allownegative", "signed2unsigned", "add_feed", "sub_feed",
            "multiply_by_feed", "divide_by_feed", "reset2zero")))
        for process, (lst, packets) in sorted(STATEFUL.items()):
            h = Harness([make_feed(1, ENGINE_PHPTIMESERIES)])
            for when, v in packets:
                h.run(lst, when, v)
            h.records()
            before = h.snapshot()
            # the last packet again (a device's retry), with another value too, then an older one
            last_time = packets[-1][0]
            for when, v in [(last_time, packets[-1][1]), (last_time, 5000.0), (T0 + 5, 5000.0), (T0 - 100, 1.0)]:
                run = StepRun(h.state, h.feeds, h.tz, INPUT, when)
                run_steps(parse_processlist(lst), run, v)
            self.assertEqual(h.records(), [], f"process {process} wrote for a replay")
            self.assertEqual(h.snapshot(), before, f"process {process} changed its state for a replay")
            # and the next packet is counted from the state as it was
            h.run(lst, last_time + 10, packets[-1][1])
            self.assertNotEqual(h.snapshot(), before, f"process {process} ignored a new packet")

    def test_what_a_replay_passes_on(self):
        h = Harness([make_feed(1), make_feed(2), make_feed(3), make_feed(4)])
        lst = "4:1,1:2,14:3,1:4"
        h.run(lst, T0, 3600.0)
        h.run(lst, T0 + 10, 3600.0)  # kWh 0.01; accumulator 3600 + 3600 = 7200
        h.records()
        # the last packet again: the power goes on unchanged, the accumulator passes its total as then
        h.run(lst, T0 + 10, 3600.0)
        self.assertEqual(h.values(1), [])
        self.assertEqual(h.values(2), [(T0 + 10, 3600.0)])
        self.assertEqual(h.values(3), [])
        self.assertEqual(h.values(4), [(T0 + 10, 7200.0)])
        # an older packet: the power still goes on; what the total was then is unknown: nothing after it
        h.run(lst, T0 + 5, 1800.0)
        self.assertEqual(h.values(2), [(T0 + 5, 1800.0)])
        self.assertEqual(h.values(4), [])
        self.assertEqual(h.last(1), (T0 + 10, 0.01))
        self.assertEqual(h.last(3), (T0 + 10, 7200.0))

    def test_an_edited_list_does_not_count_again(self):
        h = Harness([make_feed(1), make_feed(2)])
        h.run("14:1", T0, 2.0)
        h.run("14:1", T0 + 10, 3.0)  # total 5
        h.records()
        # a step inserted before it moves it to another index (its own record of packets is gone):
        # the feed's last value still tells that T0 + 10 was counted
        h.run("1:2,14:1", T0 + 10, 3.0)
        self.assertEqual(h.values(1), [])
        self.assertEqual(h.last(1), (T0 + 10, 5.0))
        h.run("1:2,14:1", T0 + 20, 1.0)
        self.assertEqual(h.values(1), [(T0 + 20, 6.0)])


class RefusedValueTests(unittest.TestCase):
    """No record leaves a list with a value a float32 feed cannot hold."""

    def test_a_write_beyond_float32_is_refused_and_the_list_stops(self):
        h = Harness([make_feed(1), make_feed(2)])
        lst = "2:1e30,1:1,1:2"
        h.run(lst, T0, 2.0)  # 2e30 < 3.4e38
        h.records()
        h.run(lst, T0 + 10, 1e10)  # 1e40: refused
        self.assertEqual(h.records(), [])
        self.assertEqual(h.state.refused, [(INPUT, T0 + 10, REASON_OUT_OF_RANGE)])
        self.assertEqual(h.state.feeds[1], (T0, 2e30))  # the last value stays what was stored
        h.state.clear_changes()
        self.assertEqual(h.state.refused, [])
        h.run(f"1:1,2:{-FLOAT32_MAX},1:2", T0 + 20, 1.0)  # exactly -FLOAT32_MAX fits
        self.assertEqual(h.values(2), [(T0 + 20, round(-FLOAT32_MAX, 9))])

    def test_a_value_that_is_not_finite_stops_the_list(self):
        h = Harness([make_feed(1)])
        h.run("2:1e300,2:1e300,33,1:1", T0, 1.0)  # inf: refused before reset2zero could hide it
        h.run("2:1e300,2:1e300,2:0,1:1", T0 + 10, 1.0)  # inf * 0 would be NaN
        self.assertEqual(h.records(), [])
        self.assertEqual(h.state.refused, [(INPUT, T0, REASON_OUT_OF_RANGE), (INPUT, T0 + 10, REASON_OUT_OF_RANGE)])

    def test_a_total_beyond_float32_is_refused_and_kept(self):
        h = Harness([make_feed(1), make_feed(2)])
        h.run("14:1,1:2", T0, 3e38)
        h.run("14:1,1:2", T0 + 10, 3e38)  # 6e38: refused, the total stays 3e38, nothing passed on
        self.assertEqual(h.values(1), [(T0, 3e38)])
        self.assertEqual(h.values(2), [(T0, 3e38)])
        self.assertEqual(h.state.refused, [(INPUT, T0 + 10, REASON_OUT_OF_RANGE)])
        h.run("14:1,1:2", T0 + 20, -1e38)  # 3e38 - 1e38
        self.assertEqual(h.values(1), [(T0 + 20, 3e38 + -1e38)])
