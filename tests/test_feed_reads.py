"""feed/data.json, average.json, csvexport, ids=, value/timevalue over real HTTP: worked examples.

Every expected row below is derived by hand from current emoncms's code
(``Modules/feed/feed_model.php`` ``get_data``, ``convert_time``,
``delta_mode_*``, ``format_output_time``, ``get_data_DMY_time_of_day``; the
engines' ``get_data_combined``; ``feed_controller.php`` for the parameters)
over small feeds whose content the tests write themselves. The comment of
each example names the emoncms rule that gives it.

Feeds (S = 1600000000 = 2020-09-13 12:26:40 UTC):

- FINA, PHPFina, interval 10: S 1.25, S+10 2.5, S+20 3.5, S+30 missing, S+40 5.5, S+50 8.0
- SERIES, PHPTimeSeries: S+5 10, S+25 20, S+30 NaN, S+47 40
- LONDON, PHPFina, interval 3600 in Europe/London across the 2021 spring DST
  change: the slot k hours after 2021-03-27 00:00 GMT (1616803200) holds k,
  k = 0..71 (the last is 2021-03-30 00:00 BST = 1617058800).
"""

from __future__ import annotations

import math
import os
import struct

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.node import NodeHarness

S = 1_600_000_000
FINA = [[S, 1.25], [S + 10, 2.5], [S + 20, 3.5], [S + 30, None], [S + 40, 5.5], [S + 50, 8.0]]
SERIES = [(S + 5, 10.0), (S + 25, 20.0), (S + 30, math.nan), (S + 47, 40.0)]
L0 = 1616803200  # 2021-03-27 00:00 GMT
D28 = 1616889600  # 2021-03-28 00:00 GMT (the day of 23 hours)
D29 = 1616972400  # 2021-03-29 00:00 BST
D30 = 1617058800  # 2021-03-30 00:00 BST
D31 = 1617145200  # 2021-03-31 00:00 BST
# Time old data can be written at (the feeds here are from 2020 and 2021).
OLD_DATA = "[engines]\nwindow_past = 2000000000\n"


def ms(rows):
    """Rows with times in milliseconds (emoncms's default timeformat, unixms)."""
    return [[t * 1000, v] for t, v in rows]


class ReadsCase(unittest.TestCase):
    extra_config = ""

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, "sqlite", extra_config=OLD_DATA + self.extra_config)
        answer = yield self.node.post(
            "user/register.json",
            data={"username": "reader", "password": "secret1", "email": "r@example.org", "timezone": "UTC"},
        )
        self.key = answer.json()["apikey_write"]
        (location,) = list(self.node.service.getServiceNamed("storage"))
        self.engines = location.engines

    @defer.inlineCallbacks
    def create(self, engine, interval=10, name="feed"):
        params = {"apikey": self.key, "name": name, "engine": str(engine)}
        if engine == 5:
            params["options"] = f'{{"interval":{interval}}}'
        answer = yield self.node.get("feed/create.json", **params)
        self.assertEqual(answer.code, 200, answer)
        return answer.json()["feedid"]

    @defer.inlineCallbacks
    def fina(self):
        feed = yield self.create(5, 10, "fina")
        written = [(t, v) for t, v in FINA if v is not None]  # S+30 is left missing
        self.assertEqual(self.engines.phpfina.write(feed, [t for t, _ in written], [v for _, v in written]), [])
        return feed

    @defer.inlineCallbacks
    def series(self):
        feed = yield self.create(2, name="series")
        self.assertEqual(self.engines.phptimeseries.write(feed, [t for t, _ in SERIES], [v for _, v in SERIES]), [])
        return feed

    @defer.inlineCallbacks
    def london(self):
        feed = yield self.create(5, 3600, "london")
        self.assertEqual(self.engines.phpfina.write(feed, [L0 + 3600 * k for k in range(72)], list(range(72))), [])
        return feed

    @defer.inlineCallbacks
    def get(self, route="feed/data.json", code=200, **params):
        answer = yield self.node.get(route, apikey=self.key, **params)
        self.assertEqual(answer.code, code, (route, params, answer))
        return answer

    @defer.inlineCallbacks
    def check_table(self, feed, table, route="feed/data.json"):
        for params, expected in table:
            answer = yield self.get(route, id=feed, **params)
            self.assertEqual(answer.content_type, "application/json")
            self.assertEqual(answer.json(), expected, params)


class DataTableTests(ReadsCase):
    @defer.inlineCallbacks
    def test_phpfina_parameters(self):
        feed = yield self.fina()
        base = {"start": S, "end": S + 50, "interval": 10}
        table = [
            # convert_time: seconds as they are; rows start, start+interval, ... while t <= end
            # (nothing past end); PHPFina: the slot floor((t - start_time) / interval); NaN -> null;
            # skipmissing is 0 by default; timeformat unixms by default
            (base, ms(FINA)),
            # emon-tools' own request: seconds, and parameter names emoncms does not know (ignored)
            ({**base, "average": 0, "time_format": "unix", "skip_missing": 0, "limit_interval": 0, "delta": 0}, ms(FINA)),
            # convert_time: a number above 1e11 is milliseconds
            ({**base, "start": S * 1000, "end": (S + 50) * 1000}, ms(FINA)),
            # convert_time: date strings, read in the user's timezone (UTC) or in timezone=
            ({**base, "start": "2020-09-13 12:26:40", "end": "2020-09-13 12:27:30"}, ms(FINA)),
            ({**base, "start": "2020-09-13 13:26:40", "end": "2020-09-13 13:27:30", "timezone": "Europe/London"}, ms(FINA)),
            ({**base, "start": "@1600000000", "end": "@1600000050"}, ms(FINA)),
            # interval 20: S, S+20, S+40
            ({**base, "interval": 20}, ms([[S, 1.25], [S + 20, 3.5], [S + 40, 5.5]])),
            # interval 15, limitinterval 0: floor(1.5) = slot 1, floor(3) = slot 3 (missing), floor(4.5) = 4
            ({**base, "interval": 15}, ms([[S, 1.25], [S + 15, 2.5], [S + 30, None], [S + 45, 5.5]])),
            # limitinterval 1: round(15 / 10) * 10 = 20
            ({**base, "interval": 15, "limitinterval": 1}, ms([[S, 1.25], [S + 20, 3.5], [S + 40, 5.5]])),
            # limitinterval 1: an interval below the feed's becomes the feed's
            ({**base, "interval": 5, "limitinterval": 1}, ms(FINA)),
            # interval 5, limitinterval 0: two rows per slot
            (
                {**base, "interval": 5},
                ms([[S + 5 * k, v] for k, v in enumerate([1.25, 1.25, 2.5, 2.5, 3.5, 3.5, None, None, 5.5, 5.5, 8.0])]),
            ),
            # interval "original": the feed's own interval
            ({**base, "interval": "original"}, ms(FINA)),
            # skipmissing: rows without a value are left out
            ({**base, "skipmissing": 1}, ms([r for r in FINA if r[1] is not None])),
            # average: the mean of the slots in [t, t + 20), NaN skipped: (1.25 + 2.5) / 2, 3.5, (5.5 + 8) / 2
            ({**base, "interval": 20, "average": 1}, ms([[S, 1.875], [S + 20, 3.5], [S + 40, 6.75]])),
            # average with the feed's interval: one slot per division, averaging is turned off
            ({**base, "average": 1}, ms(FINA)),
            # average before the feed: the slot range is clamped to the file, so nothing (null)
            ({"start": S - 20, "end": S + 20, "interval": 20, "average": 1}, ms([[S - 20, None], [S, 1.875], [S + 20, 3.5]])),
            # dp: PHP's round(), halves away from zero (2.5 -> 3, 1.25 -> 1.3)
            ({**base, "dp": 0}, ms([[S, 1.0], [S + 10, 3.0], [S + 20, 4.0], [S + 30, None], [S + 40, 6.0], [S + 50, 8.0]])),
            ({**base, "dp": 1}, ms([[S, 1.3], [S + 10, 2.5], [S + 20, 3.5], [S + 30, None], [S + 40, 5.5], [S + 50, 8.0]])),
            ({**base, "dp": -1}, ms(FINA)),
            # timeformats
            ({**base, "timeformat": "unix"}, FINA),
            ({**base, "timeformat": "unixms"}, ms(FINA)),
            ({**base, "timeformat": "notime"}, [1.25, 2.5, 3.5, None, 5.5, 8.0]),
            (
                {**base, "interval": 20, "timeformat": "excel"},
                [["13/09/2020 12:26:40", 1.25], ["13/09/2020 12:27:00", 3.5], ["13/09/2020 12:27:20", 5.5]],
            ),
            (
                {**base, "interval": 20, "timeformat": "excel", "timezone": "Europe/London"},
                [["13/09/2020 13:26:40", 1.25], ["13/09/2020 13:27:00", 3.5], ["13/09/2020 13:27:20", 5.5]],
            ),
            (
                {**base, "interval": 20, "timeformat": "iso8601"},
                [["2020-09-13T12:26:40+00:00", 1.25], ["2020-09-13T12:27:00+00:00", 3.5], ["2020-09-13T12:27:20+00:00", 5.5]],
            ),
            (
                {**base, "interval": 20, "timeformat": "iso8601", "timezone": "Europe/London"},
                [["2020-09-13T13:26:40+01:00", 1.25], ["2020-09-13T13:27:00+01:00", 3.5], ["2020-09-13T13:27:20+01:00", 5.5]],
            ),
        ]
        yield self.check_table(feed, table)
        # average.json is data.json with average=1 (feed_controller: "Backwards compatibility")
        yield self.check_table(feed, [({**base, "interval": 20}, ms([[S, 1.875], [S + 20, 3.5], [S + 40, 6.75]]))], "feed/average.json")
        # datanew is an alias emond keeps (emoncms.org's name)
        yield self.check_table(feed, [(base, ms(FINA))], "feed/datanew.json")

    @defer.inlineCallbacks
    def test_default_interval_and_refusals(self):
        feed = yield self.fina()
        # interval absent (0): round((end - start) / 800) = round(16000 / 800) = 20 -> 801 rows
        answer = yield self.get(id=feed, start=S, end=S + 16000)
        rows = answer.json()
        self.assertEqual(len(rows), 801)
        self.assertEqual(rows[:4], ms([[S, 1.25], [S + 20, 3.5], [S + 40, 5.5], [S + 60, None]]))
        refused = [
            # round(300 / 800) = 0: "Invalid interval"
            ({"start": S, "end": S + 300}, "Invalid interval"),
            # round(200010 / 10) = 20001 > max_datapoints (20000)
            (
                {"start": S, "end": S + 200010, "interval": 10},
                "request datapoint limit reached (20000), increase request interval or reduce time range, requested datapoints = 20001",
            ),
            ({"start": S + 50, "end": S, "interval": 10}, "Request end time before start time"),
            ({"start": S, "end": S + 50, "interval": 10, "timeformat": "excel2"}, "Invalid time format"),
            ({"start": S, "end": S + 50, "interval": "hourly"}, "Invalid interval"),
        ]
        for params, message in refused:
            answer = yield self.get(id=feed, code=400, **params)
            self.assertEqual(answer.json(), {"success": False, "message": message}, params)
        # daily rows are held to the same cap (emoncms has none there): 2^35 s is ~400,000 days
        answer = yield self.get(id=feed, code=400, start=0, end=2**35, interval="daily")
        self.assertTrue(answer.json()["message"].startswith("request datapoint limit reached (20000)"), answer)

    @defer.inlineCallbacks
    def test_delta(self):
        feed = yield self.fina()
        # delta: the end moves to floor(end / 10) * 10 + 10 = S+50; rows S..S+50; each row becomes
        # the next one's value minus its own (null if either is missing); the last row goes.
        # No accepted last value in Redis: the feed's last point on disk (S+50, 8) is used.
        yield self.check_table(
            feed,
            [({"start": S, "end": S + 40, "interval": 10, "delta": 1}, ms([[S, 1.25], [S + 10, 1.0], [S + 20, None], [S + 30, None], [S + 40, 2.5]]))],
        )
        # The last value (S+55, 9) fills the missing next row it falls in: end -> S+60, the row S+60 is
        # null, S+50 < S+55 <= S+60, so it takes 9: 9 - 8 = 1
        yield defer.ensureDeferred(self.node.ctx.feeds.set_lastvalue(feed, S + 55, 9.0))
        yield self.check_table(
            feed,
            [
                (
                    {"start": S, "end": S + 50, "interval": 10, "delta": 1},
                    ms([[S, 1.25], [S + 10, 1.0], [S + 20, None], [S + 30, None], [S + 40, 2.5], [S + 50, 1.0]]),
                ),
                # dp after delta
                ({"start": S, "end": S + 20, "interval": 10, "delta": 1, "dp": 0}, ms([[S, 1.0], [S + 10, 1.0], [S + 20, None]])),
            ],
        )

    @defer.inlineCallbacks
    def test_csv(self):
        feed = yield self.fina()
        base = {"id": feed, "start": S, "end": S + 50, "interval": 10}
        # csv: time,value lines; unix seconds (format_time) unless excel/iso8601; number_format(v, 2); null
        expected = "1600000000,1.25\n1600000010,2.50\n1600000020,3.50\n1600000030,null\n1600000040,5.50\n1600000050,8.00\n"
        answer = yield self.get(csv=1, **base)
        self.assertEqual(answer.body.decode(), expected)
        self.assertTrue(answer.content_type.startswith("text/csv"), answer.content_type)
        self.assertIn(f"filename={feed}.csv".encode(), answer.headers.getRawHeaders(b"content-disposition")[0])
        answer = yield self.get("feed/csvexport.json", **base)
        self.assertEqual(answer.body.decode(), expected)
        answer = yield self.get(csv=1, timeformat="excel", skipmissing=1, **{**base, "interval": 20})
        self.assertEqual(answer.body.decode(), "13/09/2020 12:26:40,1.25\n13/09/2020 12:27:00,3.50\n13/09/2020 12:27:20,5.50\n")


class MultiFeedTests(ReadsCase):
    @defer.inlineCallbacks
    def test_ids(self):
        fina = yield self.fina()
        series = yield self.series()
        base = {"start": S, "end": S + 50, "interval": 10}
        fina_rows = ms(FINA)
        # PHPTimeSeries: the first record at or after each row's time, if before the next row's
        series_rows = ms([[S, 10.0], [S + 10, None], [S + 20, 20.0], [S + 30, None], [S + 40, 40.0], [S + 50, None]])
        both = [{"feedid": str(fina), "data": fina_rows}, {"feedid": str(series), "data": series_rows}]
        answer = yield self.get(ids=f"{fina},{series}", **base)
        self.assertEqual(answer.json(), both)
        answer = yield self.get(id=f"{fina},{series}", **base)  # id= with several: the same shape
        self.assertEqual(answer.json(), both)
        answer = yield self.get(ids=str(fina), **base)  # ids= with one: still the list shape
        self.assertEqual(answer.json(), [{"feedid": str(fina), "data": fina_rows}])
        # average per feed: a "1" turns it on for that feed and the ones after (emoncms's loop)
        fina_avg = ms([[S, 1.875], [S + 20, 3.5], [S + 40, 6.75]])
        fina_raw = ms([[S, 1.25], [S + 20, 3.5], [S + 40, 5.5]])
        # PHPTimeSeries average: [S, S+20) stops one before #1 (S+25 > S+20): nothing; [S+20, S+40): #0, #1;
        # [S+40, S+60): #2 (NaN, skipped), #3
        series_avg = ms([[S, None], [S + 20, 15.0], [S + 40, 40.0]])
        for average, expected in (("1,0", (fina_avg, series_avg)), ("0,1", (fina_raw, series_avg))):
            answer = yield self.get(ids=f"{fina},{series}", **{**base, "interval": 20, "average": average})
            self.assertEqual([item["data"] for item in answer.json()], list(expected), average)
        # missing feeds: the whole request is refused, naming them
        answer = yield self.get(ids=f"{fina},999", code=400, **base)
        self.assertEqual(answer.json(), {"success": False, "message": "feed 999 does not exist", "feeds": [999]})
        answer = yield self.get(ids="998,999", code=400, **base)
        self.assertEqual(answer.json(), {"success": False, "message": "2 feeds do not exist", "feeds": [998, 999]})
        # csv with several feeds: one column per feed, the first feed's times in the timeformat (unixms)
        answer = yield self.get(ids=f"{fina},{series}", csv=1, **base)
        self.assertEqual(
            answer.body.decode(),
            "1600000000000,1.25,10.00\n1600000010000,2.50,null\n1600000020000,3.50,20.00\n"
            "1600000030000,null,null\n1600000040000,5.50,40.00\n1600000050000,8.00,null\n",
        )
        self.assertIn(f"filename={fina}-{series}.csv".encode(), answer.headers.getRawHeaders(b"content-disposition")[0])

    @defer.inlineCallbacks
    def test_phptimeseries_parameters(self):
        feed = yield self.series()
        base = {"start": S, "end": S + 50, "interval": 10}
        yield self.check_table(
            feed,
            [
                # limitinterval 2: each row at its record's own time
                (
                    {**base, "limitinterval": 2},
                    ms([[S + 5, 10.0], [S + 10, None], [S + 25, 20.0], [S + 30, None], [S + 47, 40.0], [S + 50, None]]),
                ),
                ({**base, "skipmissing": 1}, ms([[S, 10.0], [S + 20, 20.0], [S + 40, 40.0]])),
                # annual: PHP's "first day of this year" is the 1st of the current month (2020-09-01)
                ({**base, "interval": "annual"}, ms([[1598918400, 10.0]])),
            ],
        )
        # a split (time of day) is PHPFina only
        answer = yield self.get(id=feed, code=400, split="[0,12]", **{**base, "interval": "daily"})
        self.assertEqual(answer.json()["message"], "This request is only supported by PHPFina AND MySQLTimeseries")


class CalendarTests(ReadsCase):
    @defer.inlineCallbacks
    def test_daily_weekly_monthly_annual_across_dst(self):
        feed = yield self.london()
        base = {"start": L0, "end": D30, "timezone": "Europe/London"}
        table = [
            # daily: local midnights ("midnight", then "+1 day" on the wall clock: the 28th lasts 23 h)
            ({**base, "interval": "daily"}, ms([[L0, 0.0], [D28, 24.0], [D29, 47.0], [D30, 71.0]])),
            # mode= is the legacy name of interval=
            ({**base, "mode": "daily"}, ms([[L0, 0.0], [D28, 24.0], [D29, 47.0], [D30, 71.0]])),
            # average per day: slots 0..23, 24..46 (23 of them), 47..70, then 71 alone (the file ends)
            ({**base, "interval": "daily", "average": 1}, ms([[L0, 11.5], [D28, 35.0], [D29, 58.5], [D30, 71.0]])),
            # weekly: "this monday" from the 27th's midnight is the 29th
            ({**base, "interval": "weekly"}, ms([[D29, 47.0]])),
            ({**base, "interval": "weekly", "average": 1}, ms([[D29, 59.0]])),  # slots 47..71
            # monthly: "first day of this month" (1 March, before the feed: null)
            ({**base, "interval": "monthly"}, ms([[1614556800, None]])),
            ({**base, "interval": "monthly", "average": 1}, ms([[1614556800, 35.5]])),  # every slot
            # annual: "first day of january this year"
            ({**base, "interval": "annual"}, ms([[1609459200, None]])),
            ({**base, "interval": "annual", "average": 1}, ms([[1609459200, 35.5]])),
            # in UTC the days are 24 h long: 29 March 00:00 UTC is slot 48
            ({**base, "interval": "daily", "timezone": "UTC"}, ms([[L0, 0.0], [D28, 24.0], [1616976000, 48.0]])),
            # delta daily: the end moves to "tomorrow midnight" (the 31st); the 31st is null, no last value
            # falls in (the last point on disk is D30 itself): 24, 23 (the short day), 24, null
            ({**base, "interval": "daily", "delta": 1}, ms([[L0, 24.0], [D28, 23.0], [D29, 24.0], [D30, None]])),
            # split: the slot nearest each hour offset after the day's midnight (round), null past the file
            (
                {**base, "interval": "daily", "split": "[0,12]"},
                ms([[L0, [0.0, 12.0]], [D28, [24.0, 36.0]], [D29, [47.0, 59.0]], [D30, [71.0, None]]]),
            ),
            ({**base, "interval": "daily", "split": "[6]", "timeformat": "notime"}, [[6.0], [30.0], [53.0], [None]]),
        ]
        yield self.check_table(feed, table)
        # the user's own timezone is the default (no timezone= parameter)
        yield self.node.post("user/set.json", data={"apikey": self.key, "data": '{"timezone":"Europe/London"}'})
        answer = yield self.get(id=feed, start=L0, end=D30, interval="daily")
        self.assertEqual(answer.json(), ms([[L0, 0.0], [D28, 24.0], [D29, 47.0], [D30, 71.0]]))
        # delta with the accepted last value inside the last day: 72.5 - 71
        yield defer.ensureDeferred(self.node.ctx.feeds.set_lastvalue(feed, D30 + 1200, 72.5))
        answer = yield self.get(id=feed, start=L0, end=D30, interval="daily", delta=1)
        self.assertEqual(answer.json(), ms([[L0, 24.0], [D28, 23.0], [D29, 24.0], [D30, 1.5]]))


class ValueTests(ReadsCase):
    @defer.inlineCallbacks
    def test_value_and_timevalue_are_numbers(self):
        fina = yield self.fina()
        series = yield self.series()
        # value: the last value (Redis; rebuilt from the disk when Redis has none): a JSON number
        answer = yield self.get("feed/value.json", id=fina)
        self.assertEqual(answer.body, b"8.0")
        answer = yield self.get("feed/timevalue.json", id=fina)
        self.assertEqual(answer.json(), {"time": S + 50, "value": 8.0, "disk_time": S + 50, "disk_value": 8.0})
        # value at a time: PHPFina the slot round((t - start) / interval), PHPTimeSeries the next record
        for feed, when, expected in ((fina, S + 14, b"2.5"), (fina, S + 15, b"3.5"), (fina, S + 30, b"null"), (series, S + 6, b"20.0")):
            answer = yield self.get("feed/value.json", id=feed, time=when)
            self.assertEqual(answer.body, expected, when)
        # an accepted value, as PHP stored it in Redis (14 significant digits), as a number
        yield defer.ensureDeferred(self.node.ctx.feeds.set_lastvalue(fina, S + 60, 1 / 3))
        answer = yield self.get("feed/value.json", id=fina)
        self.assertEqual(answer.body, b"0.33333333333333")
        answer = yield self.get("feed/timevalue.json", id=fina)
        self.assertEqual(answer.json(), {"time": S + 60, "value": 0.33333333333333, "disk_time": S + 50, "disk_value": 8.0})
        answer = yield self.get("feed/fetch.json", ids=f"{fina},{series}")
        self.assertEqual(answer.json(), [0.33333333333333, 40.0])
        # list, get and aget: the feed's fields are strings (Redis hash), time an int, value a number
        listed = yield self.get("feed/list.json")
        item = [f for f in listed.json() if f["id"] == str(fina)][0]
        self.assertEqual((item["id"], item["engine"], item["size"]), (str(fina), "5", "40"))
        self.assertEqual((item["time"], item["value"], item["disk_time"], item["disk_value"]), (S + 60, 0.33333333333333, S + 50, 8.0))
        for field, expected in (("time", b"1600000060"), ("value", b"0.33333333333333"), ("engine", b'"5"'), ("disk_value", b"8.0")):
            answer = yield self.get("feed/get.json", id=fina, field=field)
            self.assertEqual(answer.body, expected, field)
        aget = yield self.get("feed/aget.json", id=fina)
        self.assertEqual(aget.json(), item)

    @defer.inlineCallbacks
    def test_values_that_are_not_finite_are_null(self):
        """inf written by an older version (slot S+20 and the last slot) never makes a read fail."""
        fina = yield self.fina()
        path = os.path.join(self.node.config.node.datadir, "phpfina", f"{fina}.dat")
        with open(path, "r+b") as f:
            f.seek(4 * 2)
            f.write(struct.pack("<f", math.inf))
            f.seek(4 * 5)
            f.write(struct.pack("<f", -math.inf))
        base = {"start": S, "end": S + 50, "interval": 10}
        yield self.check_table(
            fina,
            [
                (base, ms([[S, 1.25], [S + 10, 2.5], [S + 20, None], [S + 30, None], [S + 40, 5.5], [S + 50, None]])),
                # averages skip them as they skip NaN
                ({**base, "interval": 30, "average": 1}, ms([[S, 1.875], [S + 30, 5.5]])),
            ],
        )
        answer = yield self.get(csv=1, id=fina, **base)
        self.assertEqual(answer.body.decode().splitlines()[2], "1600000020,null")
        for route in ("feed/value.json", "feed/timevalue.json", "feed/aget.json", "feed/list.json", "feed/fetch.json"):
            yield self.get(route, id=fina, ids=fina)  # 200, never a 500
        answer = yield self.get("feed/timevalue.json", id=fina)
        self.assertEqual(answer.json(), {"time": S + 50, "value": None, "disk_time": S + 50, "disk_value": None})
        answer = yield self.get("feed/value.json", id=fina)
        self.assertEqual(answer.body, b"null")


class ConfiguredLimitTests(ReadsCase):
    extra_config = "[feeds]\nmax_datapoints = 5\n"

    @defer.inlineCallbacks
    def test_max_datapoints_is_configurable(self):
        feed = yield self.fina()
        answer = yield self.get(id=feed, start=S, end=S + 40, interval=10)
        self.assertEqual(len(answer.json()), 5)  # round(40 / 10) = 4 requested, 5 rows
        answer = yield self.get(id=feed, code=400, start=S, end=S + 60, interval=10)
        self.assertEqual(
            answer.json(),
            {
                "success": False,
                "message": "request datapoint limit reached (5), increase request interval or reduce time range, requested datapoints = 6",
            },
        )


class FeedsConfigTests(unittest.TestCase):
    """[feeds] max_datapoints and read_timeout: defaults, and bad values refused at start."""

    def load(self, text):
        from emond.config import load_node_config

        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "emond.toml")
        with open(path, "w") as f:
            f.write(text)
        return load_node_config(path)

    def test_defaults_and_refusals(self):
        from emond.config import ConfigError

        feeds = self.load("").feeds
        self.assertEqual((feeds.max_datapoints, feeds.read_timeout), (20000, 30.0))
        feeds = self.load("[feeds]\nmax_datapoints = 8928\nread_timeout = 2\n").feeds
        self.assertEqual((feeds.max_datapoints, feeds.read_timeout), (8928, 2.0))
        for text, message in (
            ("[feeds]\nmax_datapoints = 0\n", "[feeds] max_datapoints: must be between 1 and 1000000, got 0"),
            ("[feeds]\nmax_datapoints = 2000000\n", "[feeds] max_datapoints: must be between 1 and 1000000, got 2000000"),
            ("[feeds]\nmax_datapoints = \"many\"\n", "[feeds] max_datapoints: expected an integer, got 'many'"),
            ("[feeds]\nread_timeout = 0\n", "[feeds] read_timeout: must be more than 0 seconds, got 0.0"),
        ):
            error = self.assertRaises(ConfigError, self.load, text)
            self.assertEqual(str(error), message)
