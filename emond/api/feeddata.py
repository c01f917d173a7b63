"""``feed/data.json`` as current emoncms answers it: the request rules and the answer's form.

This is emoncms's ``feed_controller.php`` (parameters, ``ids=``) and
``feed_model.php`` (``get_data``, ``convert_time``, delta, dp, time formats,
CSV) on the node; what an engine computes for one feed is a ``DataQuery``
(``emond.engine``), answered in one call by the feed's storage server.

Rules, in emoncms's order (compat spec §A):

- ``start``/``end``: unix seconds, milliseconds (a number above 1e11 is
  divided by 1000) or a PHP date string (``2021-12-01 10:00``, ``-1 week``,
  ``yesterday``) read in ``timezone`` (default: the caller's timezone,
  UTC without a session); ``end <= start`` is refused;
- ``interval`` (or ``mode``): seconds; absent, 0 or below 1 means
  ``round((end - start) / 800)``; ``daily``, ``weekly``, ``monthly``,
  ``annual`` (local midnights, Mondays, 1sts of the month, 1sts of
  January); ``original`` (the feed's own interval);
- at most ``[feeds] max_datapoints`` rows per feed for a numeric interval
  (``round((end - start) / interval)``), with emoncms's message;
- ``average``, ``delta`` (comma separated per feed with ``ids=``),
  ``skipmissing``, ``limitinterval`` (0 by default), ``dp``,
  ``timeformat`` = ``unixms`` (default) | ``unix`` | ``excel`` |
  ``iso8601`` | ``notime``, ``csv``, ``split`` (PHPFina time of day);
- rows at ``start``, ``start + interval``, ... while ``<= end``: nothing past
  ``end``;
- ``id=1`` answers the rows; ``ids=1,2`` (or ``id=1,2``) answers
  ``[{"feedid": "1", "data": rows}, ...]``; CSV with several feeds has one
  column per feed.

Where emond differs, on purpose: errors are HTTP 400 (a private feed of
another user 403) instead of 200; an interval that is neither a number nor
a known word, a date string emond cannot read, a timezone that does not
exist, or more than ``MAX_IDS`` feeds are refused instead of guessed;
daily/weekly/monthly/annual and ``original`` reads are held to the same
row cap (emoncms has none there); a CSV is held to 25 MiB; a value that is
not finite on disk is null; delta with ``notime`` uses each row's own time
(emoncms computes one, and fails for daily intervals).
"""

from __future__ import annotations

import json
import math
import re
import time
import zoneinfo
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone as dt_timezone, tzinfo
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from emond.errors import Invalid
from emond.engine import (
    DMY_INTERVALS,
    MAX_QUERY_ROWS,
    MAX_TIME,
    MIN_TIME,
    MAX_SPLIT,
    DataQuery,
    Series,
    next_dmy_end,
    php_round,
    valid_zone,
)
from emond.meta.feeds import Feed
from emond.numbers import php_int, php_numeric, php_truthy
from emond.records import ENGINE_PHPFINA

TIMEFORMATS = ("unix", "unixms", "excel", "iso8601", "notime")
MAX_IDS = 100  # feeds per data request (each is a read)
CSV_LIMIT = 25 * 1048576  # bytes of a CSV answer (emoncms.org's limit)
CSV_BYTES_PER_ROW = 17  # emoncms.org's estimate
CSV_DECIMALS = 2  # emoncms's csv_decimal_places default
CSV_SEPARATOR = ","
DEFAULT_POINTS = 800  # interval 0: (end - start) / 800

def php_round_places(values: np.ndarray, places: int) -> np.ndarray:
    """PHP's ``round(value, places)``: halves away from zero (Python rounds them to even)."""
    places = max(min(places, 308), -308)
    with np.errstate(over="ignore", invalid="ignore"):
        if places >= 0:
            factor = 10.0**places
            scaled = values * factor
            rounded = php_round(scaled) / factor
        else:
            factor = 10.0 ** (-places)
            scaled = values / factor
            rounded = php_round(scaled) * factor
        # Far beyond the decimals asked for, a value is already round.
        usable = np.isfinite(scaled) & (np.abs(scaled) < 2.0**52) & np.isfinite(rounded)
    return np.where(usable, rounded, values)


def number_format(value: float | None, decimals: int = CSV_DECIMALS) -> str:
    """PHP's ``number_format(value, decimals, ".", "")``, or ``null``."""
    return number_texts(np.array([math.nan if value is None else value]), decimals)[0]


def number_texts(values: np.ndarray, decimals: int = CSV_DECIMALS) -> list[str]:
    """``number_format`` of many values at once (``null`` where missing)."""
    rounded = php_round_places(values, decimals)
    rounded[rounded == 0] = 0.0  # PHP 8 never writes "-0.00"
    texts = [f"{v:.{decimals}f}" for v in rounded.tolist()]
    for i in np.flatnonzero(np.isnan(values)).tolist():
        texts[i] = "null"
    return texts


# -- PHP date strings (DateTime::modify) ---------------------------------------------------

_UNITS: Mapping[str, str] = MappingProxyType({
    "sec": "s", "secs": "s", "second": "s", "seconds": "s",
    "min": "i", "mins": "i", "minute": "i", "minutes": "i",
    "hour": "h", "hours": "h",
    "day": "d", "days": "d",
    "week": "w", "weeks": "w",
    "fortnight": "f", "fortnights": "f",
    "month": "m", "months": "m",
    "year": "y", "years": "y",
})
_WEEKDAYS: Mapping[str, int] = MappingProxyType({
    "sunday": 0, "sun": 0, "monday": 1, "mon": 1, "tuesday": 2, "tue": 2, "tues": 2, "wednesday": 3, "wed": 3,
    "thursday": 4, "thu": 4, "thur": 4, "thurs": 4, "friday": 5, "fri": 5, "saturday": 6, "sat": 6,
})
_UNIT = "|".join(sorted(_UNITS, key=len, reverse=True))
_WEEKDAY = "|".join(sorted(_WEEKDAYS, key=len, reverse=True))
_ZONE = r"(?:\s*(?:z|utc|gmt|[+-][0-9]{2}:?[0-9]{2}))?"
_TIME = r"([0-9]{1,2}):([0-9]{2})(?::([0-9]{2})(?:\.[0-9]+)?)?"
_TOKENS = (
    ("epoch", re.compile(r"@(-?[0-9]{1,12})")),
    ("ymd", re.compile(r"([0-9]{4})[-/]([0-9]{1,2})[-/]([0-9]{1,2})(?:(?:t|\s+)" + _TIME + r")?" + _ZONE)),
    ("mdy", re.compile(r"([0-9]{1,2})/([0-9]{1,2})/([0-9]{4})(?:\s+" + _TIME + r")?")),
    ("dmy", re.compile(r"([0-9]{1,2})[-.]([0-9]{1,2})[-.]([0-9]{4})(?:\s+" + _TIME + r")?")),
    ("time", re.compile(_TIME + r"(?:\s*(am|pm))?" + _ZONE)),
    ("hour12", re.compile(r"([0-9]{1,2})\s*(am|pm)")),
    ("firstlast", re.compile(r"(first|last)\s+day\s+of")),
    ("weekweek", re.compile(r"(" + _WEEKDAY + r")\s+(this|next|last|previous)\s+week")),
    ("relword", re.compile(r"(this|next|last|previous)\s+(" + _UNIT + "|" + _WEEKDAY + r")\b")),
    ("relnum", re.compile(r"([+-]?)\s*([0-9]{1,9})\s*(" + _UNIT + r")\b")),
    ("weekday", re.compile(r"(" + _WEEKDAY + r")\b")),
    ("word", re.compile(r"(now|today|midnight|noon|tomorrow|yesterday|ago)\b")),
)


@dataclass
class _Parsed:
    """timelib's two vectors: absolute fields (None: keep the base's) and a relative one."""

    y: int | None = None
    m: int | None = None
    d: int | None = None
    h: int | None = None
    i: int | None = None
    s: int | None = None
    rel: dict[str, int] = field(default_factory=lambda: dict.fromkeys("yminhds", 0))
    weekday: int | None = None
    behavior: int = 1  # 0: next/last (skip today), 1: a bare name (today counts), 2: "... this week"
    first_last: int = 0
    epoch: int | None = None

    def date(self, y: int, m: int, d: int) -> None:
        if self.y is not None:
            raise ValueError("two dates")
        self.y, self.m, self.d = y, m, d

    def clock(self, h: int, i: int, s: int) -> None:
        if not (0 <= h <= 24 and 0 <= i <= 59 and 0 <= s <= 60):
            raise ValueError("not a time of day")
        self.h, self.i, self.s = h, i, s


def php_modify(text: str, zone: tzinfo, now: float) -> int:
    """The unix time of ``DateTime::modify(text)`` on ``now`` in ``zone``.

    A subset of PHP's formats: ``now``, ``today``/``midnight``, ``noon``,
    ``tomorrow``, ``yesterday``, ``@<unix>``, dates ``Y-m-d``, ``Y/m/d``,
    ``m/d/Y``, ``d-m-Y``, ``d.m.Y`` with an optional time, a time alone,
    relative ``[+-]N unit`` (``ago`` negates), ``next|last|this unit``,
    weekday names, ``first|last day of``. As PHP's modify: what the string
    does not name keeps ``now``'s (a bare date keeps the time of day), a
    zone in the string is ignored. ValueError for anything else.
    """
    parsed = _parse(text.strip().lower())
    if parsed.epoch is not None:
        zone = dt_timezone.utc  # PHP: "@..." is an instant in UTC
        base = datetime.fromtimestamp(parsed.epoch, zone).replace(tzinfo=None)
    else:
        base = datetime.fromtimestamp(now, zone).replace(tzinfo=None, microsecond=0)
    y = base.year if parsed.y is None else parsed.y
    m = base.month if parsed.m is None else parsed.m
    d = base.day if parsed.d is None else parsed.d
    h = base.hour if parsed.h is None else parsed.h
    i = base.minute if parsed.i is None else parsed.i
    s = base.second if parsed.s is None else parsed.s
    if parsed.first_last:  # PHP applies it before and after the relative part
        d, m = (1, m) if parsed.first_last == 1 else (0, m + 1)
    wall = _normalize(y, m, d, h, i, s)
    if parsed.weekday is not None:
        wall = _adjust_weekday(wall, parsed.weekday, parsed.behavior, parsed.rel["d"])
    rel = parsed.rel
    y, m, d = wall.year + rel["y"], wall.month + rel["m"], wall.day + rel["d"]
    h, i, s = wall.hour + rel["h"], wall.minute + rel["i"], wall.second + rel["s"]
    if parsed.first_last:
        d, m = (1, m) if parsed.first_last == 1 else (0, m + 1)
    wall = _normalize(y, m, d, h, i, s)
    return int(wall.replace(tzinfo=zone, fold=0).timestamp())


def _normalize(y: int, m: int, d: int, h: int, i: int, s: int) -> datetime:
    """timelib's carry: an out-of-range field flows into the next (Jan 31 + 1 month = Mar 3)."""
    total = ((h * 60) + i) * 60 + s
    days, seconds = divmod(total, 86400)
    y += (m - 1) // 12
    m = (m - 1) % 12 + 1
    day = date(y, m, 1) + timedelta(days=d - 1 + days)
    return datetime(day.year, day.month, day.day) + timedelta(seconds=seconds)


def _adjust_weekday(wall: datetime, weekday: int, behavior: int, rel_days: int) -> datetime:
    dow = (wall.weekday() + 1) % 7  # PHP: 0 = Sunday
    if behavior == 2:
        if dow == 0 and weekday != 0:
            weekday -= 7
        if weekday == 0 and dow != 0:
            weekday = 7
        return wall + timedelta(days=weekday - dow)
    diff = weekday - dow
    if (rel_days < 0 and diff < 0) or (rel_days >= 0 and diff <= -behavior):
        diff += 7
    return wall + timedelta(days=diff)


def _parse(text: str) -> _Parsed:
    parsed = _Parsed()
    pos, n = 0, len(text)
    while True:
        while pos < n and (text[pos].isspace() or text[pos] == ","):
            pos += 1
        if pos >= n:
            return parsed
        for kind, pattern in _TOKENS:
            match = pattern.match(text, pos)
            if match:
                _apply(parsed, kind, match.groups())
                pos = match.end()
                break
        else:
            raise ValueError(f"unknown date text at {text[pos:pos + 20]!r}")


def _apply(parsed: _Parsed, kind: str, g: tuple[Any, ...]) -> None:
    rel = parsed.rel
    if kind == "epoch":
        parsed.epoch = int(g[0])
    elif kind in ("ymd", "mdy", "dmy"):
        if kind == "ymd":
            y, m, d = int(g[0]), int(g[1]), int(g[2])
        elif kind == "mdy":
            m, d, y = int(g[0]), int(g[1]), int(g[2])
        else:
            d, m, y = int(g[0]), int(g[1]), int(g[2])
        if not (1 <= m <= 12 and 1 <= d <= 31):
            raise ValueError("not a date")
        parsed.date(y, m, d)
        if g[3] is not None:
            parsed.clock(int(g[3]), int(g[4]), int(g[5] or 0))
    elif kind == "time":
        h = int(g[0])
        if g[3]:
            h = _twelve(h, g[3])
        parsed.clock(h, int(g[1]), int(g[2] or 0))
    elif kind == "hour12":
        parsed.clock(_twelve(int(g[0]), g[1]), 0, 0)
    elif kind == "firstlast":
        parsed.first_last = 1 if g[0] == "first" else 2  # the time of day is kept (PHP)
    elif kind == "weekweek":
        parsed.weekday, parsed.behavior = _WEEKDAYS[g[0]], 2
        rel["d"] += {"this": 0, "next": 7, "last": -7, "previous": -7}[g[1]]
        parsed.clock(0, 0, 0)
    elif kind == "relword":
        amount = {"this": 0, "next": 1, "last": -1, "previous": -1}[g[0]]
        if g[1] in _WEEKDAYS:
            parsed.weekday, parsed.behavior = _WEEKDAYS[g[1]], (1 if g[0] == "this" else 0)
            rel["d"] += (amount - 1 if amount > 0 else amount) * 7 if amount else 0
            parsed.clock(0, 0, 0)
        else:
            _add(rel, _UNITS[g[1]], amount)
    elif kind == "relnum":
        _add(rel, _UNITS[g[2]], -int(g[1]) if g[0] == "-" else int(g[1]))
    elif kind == "weekday":
        parsed.weekday, parsed.behavior = _WEEKDAYS[g[0]], 1
        parsed.clock(0, 0, 0)
    else:
        word = g[0]
        if word in ("today", "midnight"):
            parsed.clock(0, 0, 0)
        elif word == "noon":
            parsed.clock(12, 0, 0)
        elif word == "tomorrow":
            parsed.clock(0, 0, 0)
            rel["d"] += 1
        elif word == "yesterday":
            parsed.clock(0, 0, 0)
            rel["d"] -= 1
        elif word == "ago":
            for key in rel:
                rel[key] = -rel[key]


def _twelve(hour: int, half: str) -> int:
    if not 1 <= hour <= 12:
        raise ValueError("not a 12-hour time")
    return hour % 12 + (12 if half == "pm" else 0)


def _add(rel: dict[str, int], unit: str, amount: int) -> None:
    if unit == "w":
        rel["d"] += 7 * amount
    elif unit == "f":
        rel["d"] += 14 * amount
    elif unit == "i":
        rel["i"] += amount
    else:
        rel[unit] += amount


# -- the request --------------------------------------------------------------------------


def zone_or_utc(name: str | None) -> str:
    """A stored timezone if it exists, else UTC (as emoncms treats a bad one)."""
    return name if name and valid_zone(name) else "UTC"


@dataclass(frozen=True)
class FeedPlan:
    """One feed's part of a data request: the engine's query and what is done to its rows."""

    query: DataQuery
    delta: bool
    csv: bool


@dataclass(frozen=True)
class DataRequest:
    """A ``feed/data.json`` request, parsed once for all its feeds."""

    ids: list[str]  # the id texts, as given
    singular: bool  # id= (not ids=)
    start: float
    end: float
    interval: float | str  # a number of seconds, or a word
    timezone: str
    timeformat: str
    csv: bool
    skipmissing: bool
    limitinterval: int
    dp: int | None
    averages: list[str]
    deltas: list[str]
    base_average: bool
    split: tuple[float, ...] | None
    max_datapoints: int

    @classmethod
    def parse(cls, params: dict[str, str], action: str, user_timezone: str, max_datapoints: int, now: float | None = None) -> "DataRequest":
        ids, singular = request_ids(params)
        timezone = params.get("timezone", user_timezone)
        if not valid_zone(timezone):
            raise Invalid("Invalid timezone")
        zone = zoneinfo.ZoneInfo(timezone)
        now = time.time() if now is None else now
        raw_interval = params["mode"] if "mode" in params else params.get("interval", "0")
        split = parse_split(params["split"]) if "split" in params else None
        return cls(
            ids=ids,
            singular=singular,
            start=convert_time(params.get("start"), "start", zone, now),
            end=convert_time(params.get("end"), "end", zone, now),
            interval=parse_interval(raw_interval),
            timezone=timezone,
            timeformat=params.get("timeformat", "unixms"),
            csv=action == "csvexport" or php_truthy(params.get("csv", "0")),
            skipmissing=php_int(params.get("skipmissing", "0")) != 0,
            limitinterval=max(min(php_int(params.get("limitinterval", "0")), 2**31), -(2**31)),
            dp=parse_dp(params.get("dp")),
            averages=params["average"].split(",") if "average" in params else [],
            deltas=params["delta"].split(",") if "delta" in params else [],
            base_average=action == "average",
            split=split,
            max_datapoints=max_datapoints,
        )

    @property
    def multi_csv(self) -> bool:
        """emoncms writes one CSV with a column per feed when several are asked for."""
        return self.csv and len(self.ids) > 1

    @property
    def zone(self) -> tzinfo:
        return zoneinfo.ZoneInfo(self.timezone)

    def flags(self) -> list[tuple[bool, bool]]:
        """(average, delta) of each feed, as emoncms's controller reads them: an
        average entry can only turn averaging on (and it stays on for the feeds
        after it); a missing delta entry takes the first one."""
        average = self.base_average
        out = []
        for index in range(len(self.ids)):
            if index < len(self.averages) and php_truthy(self.averages[index]):
                average = True
            if index < len(self.deltas):
                delta = php_truthy(self.deltas[index])
            else:
                delta = php_truthy(self.deltas[0]) if self.deltas else False
            out.append((average, delta))
        return out

    def plan(self, feed: Feed, average: bool, delta: bool) -> FeedPlan:
        """emoncms's ``get_data`` (or ``get_data_DMY_time_of_day`` with a split) up to the engine call."""
        start, end = self.start, self.end
        if end <= start:
            raise Invalid("Request end time before start time")
        if self.split is not None:
            if self.timeformat not in TIMEFORMATS:
                raise Invalid("Invalid time format")
            if feed.engine != ENGINE_PHPFINA:
                raise Invalid("This request is only supported by PHPFina AND MySQLTimeseries")
            if self.interval not in ("daily", "weekly", "monthly"):
                raise Invalid("split needs interval daily, weekly or monthly")
            query = DataQuery(
                start=math.trunc(start), end=math.trunc(end), interval=str(self.interval), timezone=self.timezone,
                split=self.split, max_rows=self.max_datapoints,
            )
            return FeedPlan(query, delta=False, csv=False)
        csv = self.csv and not self.multi_csv
        interval = self.interval
        if isinstance(interval, float) and interval < 1:
            interval = float(php_round((end - start) / DEFAULT_POINTS))
        delta = delta and not csv
        if delta:
            end = self._delta_end(end, interval, feed)
        max_rows = self.max_datapoints
        if isinstance(interval, float):
            if not csv:
                if interval < 1:
                    raise Invalid("Invalid interval")
                requested = int(php_round((end - start) / interval))
                if requested > self.max_datapoints:
                    raise Invalid(self.limit_message(requested))
                # Checked as emoncms does; the engine's step is the whole seconds of it, so
                # it may give up to twice as many rows (an interval of 1.9 is stepped by 1).
                max_rows = 2 * self.max_datapoints + 2
            engine_interval: int | str = int(min(max(math.trunc(interval), 1), MAX_TIME))
        else:
            engine_interval = interval
        if self.timeformat not in TIMEFORMATS:
            raise Invalid("Invalid time format")
        if csv:
            max_rows = CSV_LIMIT // CSV_BYTES_PER_ROW
        query = DataQuery(
            start=math.trunc(start),
            end=math.trunc(end),
            interval=engine_interval,
            average=average,
            skipmissing=self.skipmissing,
            limitinterval=self.limitinterval,
            timezone=self.timezone,
            max_rows=min(max_rows, MAX_QUERY_ROWS),
            with_last=delta,
        )
        return FeedPlan(query, delta=delta, csv=csv)

    def _delta_end(self, end: float, interval: float | str, feed: Feed) -> float:
        """emoncms's ``delta_mode_next_interval``: the end moves to the start of the
        next interval, so the last one's difference can be taken."""
        if isinstance(interval, str) and interval in DMY_INTERVALS:
            return float(next_dmy_end(math.trunc(end), interval, self.zone))
        step = float(feed.interval or 1) if interval == "original" else float(interval)
        if step <= 0:
            return end
        return math.floor(end / step) * step + step

    def limit_message(self, requested: int) -> str:
        return (
            f"request datapoint limit reached ({self.max_datapoints}), increase request interval "
            f"or reduce time range, requested datapoints = {requested}"
        )

    def csv_limit_message(self, requested: int) -> str:
        return f"CSV download limit exceeded downloadsize={requested * CSV_BYTES_PER_ROW}"


def request_ids(params: dict[str, str]) -> tuple[list[str], bool]:
    """The id texts of a data request, and whether it was ``id=`` (emoncms: ``id`` wins over ``ids``)."""
    if "id" in params:
        ids, singular = params["id"].split(","), True
    elif "ids" in params:
        ids, singular = params["ids"].split(","), False
    else:
        raise Invalid("no ids given")
    if len(ids) > MAX_IDS:
        raise Invalid(f"at most {MAX_IDS} ids per request")
    return ids, singular


def convert_time(text: str | None, name: str, zone: tzinfo, now: float) -> float:
    """emoncms's ``convert_time``: seconds, milliseconds (above 1e11) or a date string."""
    if text is None or text.strip() == "":
        raise Invalid(f"missing {name} parameter")
    number = php_numeric(text)
    if number is None:
        try:
            number = float(php_modify(text, zone, now))
        except (ValueError, OverflowError, OSError):
            raise Invalid(f"{name} must be a unix time (seconds or milliseconds) or a date such as 2021-12-01 10:00 or -1 week")
    if number / 1e9 > 100:
        number *= 0.001  # milliseconds
    if not MIN_TIME <= number <= MAX_TIME:
        raise Invalid(f"{name} is out of range")
    return number


def parse_interval(text: str) -> float | str:
    """A number of seconds (float, as PHP compares it), or one of the interval words."""
    if text in DMY_INTERVALS or text == "original":
        return text
    number = php_numeric(text)
    if number is None or not math.isfinite(number):
        raise Invalid("Invalid interval")
    return number


def parse_dp(text: str | None) -> int | None:
    """``dp``: decimal places, -1 (the default) for none."""
    if text is None:
        return None
    number = php_numeric(text)
    if number is not None and number == -1:
        return None
    return php_int(text)


def parse_split(text: str) -> tuple[float, ...]:
    """``split=[0,7,13]``: hours after each local midnight (at most 48)."""
    message = f"split must be a JSON list of at most {MAX_SPLIT} hours, e.g. [0,7,13]"
    try:
        hours = json.loads(text)
    except (ValueError, RecursionError):
        raise Invalid(message)
    if not isinstance(hours, list) or len(hours) > MAX_SPLIT:
        raise Invalid(message)
    out = []
    for hour in hours:
        number = hour if isinstance(hour, (int, float)) and not isinstance(hour, bool) else php_numeric(hour) if isinstance(hour, str) else None
        if number is None or not math.isfinite(number) or abs(number) > 24 * 366:
            raise Invalid(message)
        out.append(float(number))
    return tuple(out)


# -- the answer --------------------------------------------------------------------------


def shape(series: Series, plan: FeedPlan, dp: int | None, lastvalue: tuple[int, float | None] | None) -> tuple[np.ndarray, np.ndarray]:
    """The rows after delta and dp (emoncms's order)."""
    times, values = series.times, series.values
    if plan.delta:
        times, values = delta_rows(times, values, lastvalue)
    if dp is not None:
        values = php_round_places(values, dp)
    return times, values


def delta_rows(times: np.ndarray, values: np.ndarray, lastvalue: tuple[int, float | None] | None) -> tuple[np.ndarray, np.ndarray]:
    """emoncms's delta mode: each row becomes the next row's value minus its own
    (null if either is missing) and the last row goes. A missing next value is
    first taken from the feed's last value when that falls inside the interval
    (t_i < time <= t_i+1): today's total so far."""
    if times.shape[0] == 0:
        return times, values
    following = values[1:].copy()
    if lastvalue is not None and lastvalue[1] is not None:
        when, last = lastvalue
        fill = np.isnan(following) & (when > times[:-1]) & (when <= times[1:])
        following[fill] = last
    return times[:-1], following - np.concatenate((values[:1], following[:-1]))


def time_texts(times: np.ndarray, timeformat: str, zone: tzinfo) -> list[Any]:
    """Row times in a time format (``notime`` aside)."""
    if timeformat == "unixms":
        return (times * 1000).tolist()
    if timeformat == "excel":
        return [datetime.fromtimestamp(t, zone).strftime("%d/%m/%Y %H:%M:%S") for t in times.tolist()]
    if timeformat == "iso8601":
        return [datetime.fromtimestamp(t, zone).isoformat() for t in times.tolist()]
    return times.tolist()


def value_list(values: np.ndarray) -> list[Any]:
    """Values for JSON: numbers, None where missing (rows of them with a split)."""
    out = values.tolist()
    if values.ndim == 1:
        for i in np.flatnonzero(np.isnan(values)).tolist():
            out[i] = None
        return out
    return [[None if v != v else v for v in row] for row in out]


def rows_json(times: np.ndarray, values: np.ndarray, request: DataRequest) -> list[Any]:
    if request.timeformat == "notime":
        return value_list(values)
    return [list(pair) for pair in zip(time_texts(times, request.timeformat, request.zone), value_list(values))]


def csv_body(times: np.ndarray, values: np.ndarray, request: DataRequest) -> bytes:
    """One feed as emoncms's CSV: ``time,value`` lines (unix seconds unless excel or
    iso8601), values with two decimals, ``null`` where missing."""
    if request.timeformat in ("excel", "iso8601"):
        stamps = time_texts(times, request.timeformat, request.zone)
    else:
        stamps = times.tolist()
    texts = number_texts(values)
    return "".join(f"{t}{CSV_SEPARATOR}{v}\n" for t, v in zip(stamps, texts)).encode()


def multi_csv_body(rows: list[list[Any]]) -> bytes:
    """Several feeds as emoncms's ``csv_export_multi``: the first feed's times (in
    the time format), then one column per feed, row by row."""
    if not rows:
        return b""
    lines = []
    for i, first in enumerate(rows[0]):
        stamp = first[0] if isinstance(first, list) else ""
        cells = [stamp]
        for data in rows:
            row = data[i] if i < len(data) else None
            value = row[1] if isinstance(row, list) else row
            cells.append(number_format(value))
        lines.append(CSV_SEPARATOR.join(str(c) for c in cells) + "\n")
    return "".join(lines).encode()
