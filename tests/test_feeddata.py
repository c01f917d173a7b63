"""The data.json request rules as pure functions: PHP's number forms, DateTime::modify
strings (convert_time), number_format and round, the query's wire form.

Expected values are PHP's, worked by hand (times checked against the calendar)."""

from __future__ import annotations

import math
import zoneinfo

import numpy as np
from twisted.trial import unittest

from emond.errors import Invalid
from emond.engine import DataQuery, Series
from emond.api.feeddata import convert_time, number_format, php_modify, php_round_places
from emond.numbers import php_int, php_numeric

UTC = zoneinfo.ZoneInfo("UTC")
NOW = 1_600_000_000  # Sunday 2020-09-13 12:26:40 UTC


class PhpNumberTests(unittest.TestCase):
    def test_is_numeric(self) -> None:
        for text, number in (("12", 12.0), (" 12", 12.0), ("12 ", 12.0), ("1e3", 1000.0), (".5", 0.5), ("5.", 5.0), ("-1.5e-3", -0.0015), ("+7", 7.0)):
            self.assertEqual(php_numeric(text), number, text)
        for text in ("0x1A", "١٢", "１２", "1_000", "12abc", "", " ", "inf", "nan", "1e", "--1", None):
            self.assertIsNone(php_numeric(text), text)

    def test_int_cast(self) -> None:
        for text, number in (("12abc", 12), ("1.9", 1), ("-1.9", -1), ("1e3", 1000), ("abc", 0), (" -3", -3), ("", 0), ("1e400", 0)):
            self.assertEqual(php_int(text), number, text)

    def test_number_format_two_decimals(self) -> None:
        # number_format rounds halves away from zero; a float32 1.005 is 1.00499999523...
        for value, text in ((2.5, "2.50"), (0.125, "0.13"), (-0.125, "-0.13"), (float(np.float32(1.005)), "1.00"), (-0.001, "0.00"), (1234567.891, "1234567.89"), (None, "null")):
            self.assertEqual(number_format(value), text, value)

    def test_round_places(self) -> None:
        values = np.array([1.25, 2.5, -2.5, 1234.0, math.nan, 0.285])
        self.assertEqual(php_round_places(values, 1)[:2].tolist(), [1.3, 2.5])
        self.assertEqual(php_round_places(values, 0)[:3].tolist(), [1.0, 3.0, -3.0])
        self.assertEqual(php_round_places(values, -2)[3], 1200.0)
        self.assertTrue(math.isnan(php_round_places(values, 2)[4]))
        self.assertEqual(php_round_places(values, 2)[5], 0.28)  # the double 0.285 is 0.28499999...
        self.assertEqual(php_round_places(values, 400).tolist()[:4], [1.25, 2.5, -2.5, 1234.0])


class ModifyTests(unittest.TestCase):
    """DateTime::modify on NOW: what the string does not name keeps NOW's."""

    def test_words_and_relative(self) -> None:
        for text, expected in (
            ("now", NOW),
            ("today", 1599955200),
            ("midnight", 1599955200),
            ("yesterday", 1599868800),
            ("tomorrow", 1600041600),
            ("noon", 1599998400),
            ("-1 week", NOW - 7 * 86400),
            ("+2 days 3 hours", NOW + 2 * 86400 + 3 * 3600),
            ("1 day ago", NOW - 86400),
            ("-1 month", 1597321600),
            ("yesterday 10:00", 1599904800),
            ("@1600000000", NOW),
        ):
            self.assertEqual(php_modify(text, UTC, NOW), expected, text)

    def test_dates_keep_the_time_of_day(self) -> None:
        # a bare date sets only the date (modify keeps the time, 12:26:40); a zone in the string is ignored
        for text, expected in (
            ("2021-12-01", 1638361600),
            ("01-12-2021", 1638361600),  # d-m-Y
            ("01.12.2021", 1638361600),
            ("12/01/2021", 1638361600),  # m/d/Y
            ("2021/12/01", 1638361600),
            ("2021-12-01 10:00", 1638352800),
            ("2021-12-01T10:00:00Z", 1638352800),
        ):
            self.assertEqual(php_modify(text, UTC, NOW), expected, text)
        self.assertEqual(php_modify("2021-12-01T10:00:00Z", zoneinfo.ZoneInfo("Europe/Paris"), NOW), 1638349200)
        self.assertEqual(php_modify("today", zoneinfo.ZoneInfo("Europe/London"), NOW), 1599951600)

    def test_weekdays_and_month_edges(self) -> None:
        # NOW is a Sunday: "monday" is the next day, "last monday" the one before
        for text, expected in (
            ("monday", 1600041600),
            ("this monday", 1600041600),
            ("next monday", 1600041600),
            ("last monday", 1599436800),
            ("first day of next month", 1601555200),
            ("last day of this month", 1601468800),
        ):
            self.assertEqual(php_modify(text, UTC, NOW), expected, text)
        # Jan 31 + 1 month is March 3 (PHP lets the day overflow)
        self.assertEqual(php_modify("+1 month", UTC, 1612094400), 1614772800)

    def test_unknown_text_is_refused(self) -> None:
        for text in ("abc", "2021-13-01", "next fortnightly", "25:00", "1 parsec"):
            self.assertRaises(ValueError, php_modify, text, UTC, NOW)

    def test_convert_time(self) -> None:
        self.assertEqual(convert_time("1600000000", "start", UTC, NOW), 1600000000)
        self.assertEqual(convert_time("1600000000500", "start", UTC, NOW), 1600000000.5)  # ms
        self.assertEqual(convert_time("-1 week", "start", UTC, NOW), NOW - 7 * 86400)
        for text, message in (
            (None, "missing start parameter"),
            ("", "missing start parameter"),
            ("1e400", "start is out of range"),
            ("someday", "start must be a unix time (seconds or milliseconds) or a date such as 2021-12-01 10:00 or -1 week"),
        ):
            error = self.assertRaises(Invalid, convert_time, text, "start", UTC, NOW)
            self.assertEqual(error.message, message)


class WireTests(unittest.TestCase):
    def test_query_round_trip(self) -> None:
        query = DataQuery(start=1, end=100, interval="daily", average=True, limitinterval=2, timezone="Europe/London", split=(0.0, 6.5), max_rows=7, with_last=True)
        self.assertEqual(DataQuery.from_wire(query.to_wire()), query)

    def test_bad_queries_are_refused(self) -> None:
        good = DataQuery(start=1, end=100, interval=10).to_wire()
        for change in (
            {"start": True},
            {"start": "1"},
            {"end": 10**20},
            {"interval": 0},
            {"interval": "hourly"},
            {"average": 1},
            {"timezone": "Mars/Olympus"},
            {"split": [0] * 49},
            {"split": ["x"]},
            {"max_rows": 0},
        ):
            self.assertRaises(ValueError, DataQuery.from_wire, {**good, **change})
        self.assertRaises(ValueError, DataQuery.from_wire, [1, 2])
        self.assertRaises(ValueError, DataQuery.from_wire, {})

    def test_series_round_trip(self) -> None:
        flat = Series(np.array([1, 2], dtype=np.int64), np.array([1.5, math.nan]), (2, None))
        back = Series.from_bytes(flat.to_bytes())
        self.assertEqual((back.times.tolist(), back.values[:1].tolist(), back.last), ([1, 2], [1.5], (2, None)))
        self.assertTrue(math.isnan(back.values[1]))
        split = Series(np.array([5], dtype=np.int64), np.array([[1.0, 2.0, 3.0]]))
        back = Series.from_bytes(split.to_bytes())
        self.assertEqual((back.values.tolist(), back.last), ([[1.0, 2.0, 3.0]], None))
        self.assertRaises(ValueError, Series.from_bytes, split.to_bytes()[:-1])
