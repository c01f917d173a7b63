"""What the feed engines share: the time window, errors, and the read model.

Both engines (``phpfina``, ``phptimeseries``) take a whole RECORD batch in
``apply_batch``. Reads follow current emoncms (compat spec §A): a
``DataQuery`` is what emoncms's engine ``get_data_combined`` (or, with
``split``, ``get_data_DMY_time_of_day``) computes, in seconds, and the
engine's ``query`` answers it with a ``Series`` in one call, so a storage
server reached over the stream runs the whole read and answers once. The
request rules around it (start/end forms, the default interval, the point
cap, delta, dp, time formats) are the node's, in ``emond.api.feeddata``.

A value on disk that is not finite (NaN, or an inf written by an older
version) is a missing value in every read: null, never an error.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import math
import os
import struct
import threading
import time
import zoneinfo
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from types import MappingProxyType
from typing import Any, Callable

import numpy as np

from emond.errors import Invalid
from emond.records import ENGINE_PHPFINA, REASON_TOO_NEW, REASON_TOO_OLD, REASON_WRONG_ENGINE, Refusal, refusals_from

FIVE_YEARS = 3600 * 24 * 365 * 5
TWO_DAYS = 3600 * 48


def pwrite_all(fd: int, data: "bytes | memoryview", offset: int) -> None:
    """``os.pwrite`` until every byte is written. A short write (a file size limit, a full
    disk) is continued; the next call then raises the error (EFBIG, ENOSPC) instead of
    leaving the rest of a batch silently unwritten."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view, offset = view[written:], offset + written


class OpenFiles:
    """A bounded pool of open read-write handles to feed files, the least recently used
    closed first: a storage location holds many more feeds than it may keep open.
    ``before_close(feedid, fd)`` runs before an evicted handle is closed (closing does
    not sync). Hot paths read ``handles`` directly."""

    def __init__(self, limit: int, before_close: Callable[[int, int], None]) -> None:
        self.limit = max(limit, 1)
        self.handles: OrderedDict[int, int] = OrderedDict()
        self._before_close = before_close

    def get(self, feedid: int, path: str, flags: int) -> int:
        """The feed's pooled handle, opened (``os.open(path, flags)``) if it has none."""
        fd = self.handles.get(feedid)
        if fd is not None:
            self.handles.move_to_end(feedid)
            return fd
        if len(self.handles) >= self.limit:
            old_id, old = self.handles.popitem(last=False)
            self._before_close(old_id, old)
            os.close(old)
        fd = os.open(path, flags, 0o644)
        self.handles[feedid] = fd
        return fd

    def forget(self, feedid: int) -> None:
        """Close the feed's handle, if pooled (the file is going away or being replaced)."""
        fd = self.handles.pop(feedid, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        for fd in self.handles.values():
            os.close(fd)
        self.handles.clear()


def sync_directory(directory: str) -> None:
    """fsync a directory, so that files created, renamed or removed in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeedDirectory:
    """What both engines keep: their directory of feed files, the time window points must
    fall in, the sync policy, the lock that serialises changes, and the open handles."""

    def __init__(self, directory: str, clock: Callable[[], float], window_past: int, window_future: int, open_files: int, sync: bool) -> None:
        self.directory = directory
        self.window = TimeWindow(window_past, window_future, clock)
        self.sync = sync
        self._lock = threading.Lock()
        self._files = OpenFiles(open_files, self._evicting)
        os.makedirs(directory, exist_ok=True)

    def _evicting(self, feedid: int, fd: int) -> None:
        """Called before a pooled handle is closed to make room."""

    def _sync_dir(self) -> None:
        if self.sync:
            sync_directory(self.directory)

    # -- copying a feed to another storage location (a user moving to another shard) ------
    # The source answers ``checksum`` and ``read_data``; the target takes ``receive`` chunks
    # into an incoming file and ``adopt`` installs it once its size and SHA-256 are those the
    # source had: a copy cut short, or garbled, is never installed.

    def data_path(self, feedid: int) -> str:
        raise NotImplementedError

    def _install(self, feedid: int, incoming: str, meta: list[int]) -> None:
        """Put the verified incoming file in place of the feed's (under the lock)."""
        raise NotImplementedError

    def _incoming(self, feedid: int) -> str:
        return self.data_path(feedid) + ".incoming"

    def checksum(self, feedid: int) -> tuple[int, str]:
        """Size and SHA-256 (hex) of the feed's data file."""
        with self._lock:
            return file_digest(self.data_path(feedid), feedid)

    def read_data(self, feedid: int, offset: int, length: int) -> bytes:
        """``length`` bytes of the feed's data file from ``offset`` (fewer at its end)."""
        try:
            fd = os.open(self.data_path(feedid), os.O_RDONLY)
        except FileNotFoundError:
            raise NoSuchFeed(feedid) from None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def receive(self, feedid: int, offset: int, data: bytes) -> None:
        """One chunk of a feed being copied here; the chunk at offset 0 starts the copy
        afresh (what an interrupted earlier attempt left is dropped)."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if offset == 0 else 0)
        fd = os.open(self._incoming(feedid), flags, 0o644)
        try:
            pwrite_all(fd, data, offset)
        finally:
            os.close(fd)

    def adopt(self, feedid: int, size: int, sha256: str, meta: list[int]) -> None:
        """Install the copy received, if it is whole: its size and SHA-256 as sent."""
        incoming = self._incoming(feedid)
        try:
            got = file_digest(incoming, feedid)
        except NoSuchFeed:
            raise FeedError(f"feed {feedid}: no copy was received") from None
        if got != (size, sha256):
            os.unlink(incoming)
            raise FeedError(f"feed {feedid}: the copy received ({got[0]} bytes, sha256 {got[1]}) is not the one sent ({size} bytes, sha256 {sha256}); send it again")
        if self.sync:
            fd = os.open(incoming, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        with self._lock:
            self._files.forget(feedid)
            self._install(feedid, incoming, meta)
            self._sync_dir()


def file_digest(path: str, feedid: int) -> tuple[int, str]:
    """Size and SHA-256 (hex) of a feed's file; NoSuchFeed if there is none."""
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
            return f.tell(), digest.hexdigest()
    except FileNotFoundError:
        raise NoSuchFeed(feedid) from None


COPY_CHUNK = 45_000  # raw bytes of one ``receive`` (base64 in a JSON request, under the stream's control-frame limit)
MAX_COPY_OFFSET = 1 << 40


def decode_chunk(offset: Any, text: Any) -> tuple[int, bytes]:
    """A ``receive`` request's arguments, checked: an offset and a base64 chunk."""
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < MAX_COPY_OFFSET:
        raise FeedError(f"receive: offset must be a whole number from 0 to {MAX_COPY_OFFSET}")
    if not isinstance(text, str):
        raise FeedError("receive: the chunk must be base64 text")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FeedError("receive: the chunk is not valid base64") from None
    if len(data) > COPY_CHUNK:
        raise FeedError(f"receive: a chunk holds at most {COPY_CHUNK} bytes")
    return offset, data


def encode_chunk(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class FeedError(Invalid):
    """A request an engine refuses; ``str(error)`` is the emoncms message."""


class NoSuchFeed(FeedError):
    def __init__(self, feedid: int) -> None:
        super().__init__("Feed does not exist")
        self.feedid = feedid


def php_round(x: "np.ndarray | float") -> "np.ndarray | float":
    """PHP's round(): halves away from zero (Python's round() is to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


@dataclass(frozen=True)
class TimeWindow:
    """Accepted record times, relative to a clock: [now - past, now + future]."""

    past: int = FIVE_YEARS
    future: int = TWO_DAYS
    clock: Callable[[], float] = time.time

    def split(self, batch: np.ndarray) -> tuple[np.ndarray, list[Refusal]]:
        """The records inside the window, and refusals for the others."""
        now = int(self.clock())
        times = batch["time"].astype(np.int64)
        too_old = times < now - self.past
        too_new = times > now + self.future
        if not (too_old.any() or too_new.any()):
            return batch, []
        refusals = refusals_from(batch, too_old, REASON_TOO_OLD)
        refusals += refusals_from(batch, too_new, REASON_TOO_NEW)
        return batch[~(too_old | too_new)], refusals


def admit(records: np.ndarray, engine_id: int, window: TimeWindow) -> tuple[np.ndarray, list[Refusal]]:
    """The records an engine may apply (its engine id, inside the window), and refusals for the rest."""
    refusals: list[Refusal] = []
    wrong = records["engine"] != engine_id
    if wrong.any():
        refusals += refusals_from(records, wrong, REASON_WRONG_ENGINE)
        records = records[~wrong]
    records, refused = window.split(records)
    return records, refusals + refused


def last_per_slot(feeds: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Indices that order records by (feed, slot), keeping the last accepted of each slot.

    The sort is stable, so among records of one slot the last in the batch
    (the last accepted) is the one kept.
    """
    key = (feeds.astype(np.uint64) << np.uint64(32)) | slots.astype(np.uint64)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    last = np.ones(order.shape[0], dtype=bool)
    last[:-1] = sorted_key[1:] != sorted_key[:-1]
    return order[last]


# -- reads -------------------------------------------------------------------------

DMY_INTERVALS = ("daily", "weekly", "monthly", "annual")
# A rough length of each, only to tell how many rows a refused request asked for.
NOMINAL_SECONDS = MappingProxyType({"daily": 86400, "weekly": 7 * 86400, "monthly": 30 * 86400, "annual": 365 * 86400})
MAX_DATAPOINTS = 20000  # default of [feeds] max_datapoints
MAX_SPLIT = 48  # hours of a time-of-day split (emoncms)
MAX_QUERY_ROWS = 10_000_000  # the most rows a query may ever ask an engine for (CSV included)
SUM_SPAN = 1 << 20  # values read at once when averaging
# Times a query may name: years 1 to 9999 are what the calendar functions handle.
MIN_TIME, MAX_TIME = -62135596800, 253402300799


class RowLimit(FeedError):
    """A query would give more rows than allowed; ``requested`` is how many."""

    def __init__(self, requested: int) -> None:
        super().__init__(f"requested datapoints = {requested}")
        self.requested = requested


@dataclass(frozen=True)
class DataQuery:
    """One feed read, as an engine computes it (times in unix seconds).

    ``interval`` is a whole number of seconds (at least 1), one of
    ``DMY_INTERVALS`` (aligned to local midnights in ``timezone``) or
    ``"original"`` (the feed's own interval). ``limitinterval`` is emoncms's
    integer: non-zero raises a PHPFina step to whole feed intervals, 2 makes
    PHPTimeSeries give each record's own time. With ``split`` (hours of the
    day) each row holds the values at those offsets from its local midnight
    (PHPFina only). ``max_rows`` bounds the work; ``with_last`` asks for the
    feed's last point on disk too (delta needs it).
    """

    start: int
    end: int
    interval: int | str
    average: bool = False
    skipmissing: bool = False
    limitinterval: int = 0
    timezone: str = "UTC"
    split: tuple[float, ...] | None = None
    max_rows: int = MAX_DATAPOINTS
    with_last: bool = False

    def zone(self) -> tzinfo:
        return zoneinfo.ZoneInfo(self.timezone)

    def to_wire(self) -> dict[str, Any]:
        """The query as JSON (a read request over the stream)."""
        return {
            "start": self.start,
            "end": self.end,
            "interval": self.interval,
            "average": self.average,
            "skipmissing": self.skipmissing,
            "limitinterval": self.limitinterval,
            "timezone": self.timezone,
            "split": list(self.split) if self.split is not None else None,
            "max_rows": self.max_rows,
            "with_last": self.with_last,
        }

    @classmethod
    def from_wire(cls, fields: Any) -> "DataQuery":
        """A query from its JSON form; ValueError if any field is not what it must be."""
        if not isinstance(fields, dict):
            raise ValueError("a query must be an object")

        def whole(name: str, low: int, high: int) -> int:
            value = fields.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"query {name} must be a whole number in [{low}, {high}]")
            return value

        def flag(name: str) -> bool:
            value = fields.get(name)
            if not isinstance(value, bool):
                raise ValueError(f"query {name} must be true or false")
            return value

        interval = fields.get("interval")
        if isinstance(interval, str):
            if interval not in DMY_INTERVALS + ("original",):
                raise ValueError("query interval is not known")
        else:
            interval = whole("interval", 1, MAX_TIME)
        timezone = fields.get("timezone")
        if not isinstance(timezone, str) or not valid_zone(timezone):
            raise ValueError("query timezone is not known")
        split = fields.get("split")
        if split is not None:
            if not isinstance(split, list) or len(split) > MAX_SPLIT:
                raise ValueError(f"query split must be a list of at most {MAX_SPLIT} hours")
            if not all(isinstance(h, (int, float)) and not isinstance(h, bool) and math.isfinite(h) for h in split):
                raise ValueError("query split must hold numbers")
            split = tuple(float(h) for h in split)
        return cls(
            start=whole("start", MIN_TIME, MAX_TIME),
            end=whole("end", MIN_TIME, MAX_TIME),
            interval=interval,
            average=flag("average"),
            skipmissing=flag("skipmissing"),
            limitinterval=whole("limitinterval", -(2**31), 2**31),
            timezone=timezone,
            split=split,
            max_rows=whole("max_rows", 1, MAX_QUERY_ROWS),
            with_last=flag("with_last"),
        )


def valid_zone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


SERIES_HEAD = struct.Struct("<IIBqd")


@dataclass
class Series:
    """A query's answer: row times (int64 unix seconds) and values (float64,
    NaN where missing; one column per split hour with ``split``), and the
    feed's last point on disk when the query asked for it."""

    times: np.ndarray
    values: np.ndarray
    last: tuple[int, float | None] | None = None

    def to_bytes(self) -> bytes:
        """Packed for the stream: a header, then the times and the values."""
        columns = self.values.shape[1] if self.values.ndim == 2 else 0
        last_time, last_value = self.last if self.last is not None else (0, None)
        head = SERIES_HEAD.pack(
            self.times.shape[0],
            columns,
            self.last is not None,
            last_time,
            math.nan if last_value is None else last_value,
        )
        return head + self.times.astype("<i8").tobytes() + self.values.astype("<f8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Series":
        rows, columns, has_last, last_time, last_value = SERIES_HEAD.unpack_from(data, 0)
        width = max(columns, 1)
        if len(data) != SERIES_HEAD.size + 8 * rows + 8 * rows * width:
            raise ValueError("a series of the wrong size")
        times = np.frombuffer(data, dtype="<i8", count=rows, offset=SERIES_HEAD.size).astype(np.int64)
        values = np.frombuffer(data, dtype="<f8", count=rows * width, offset=SERIES_HEAD.size + 8 * rows).astype(np.float64)
        if columns:
            values = values.reshape(rows, columns)
        last = (last_time, None if math.isnan(last_value) else last_value) if has_last else None
        return cls(times, values, last)


def finite(values: np.ndarray) -> np.ndarray:
    """float64 values with every non-finite one (NaN, inf on disk) made NaN: missing."""
    out = np.asarray(values, dtype=np.float64).copy()
    out[~np.isfinite(out)] = np.nan
    return out


def finish(times: np.ndarray, values: np.ndarray, query: DataQuery, last: Any = None) -> Series:
    """The rows of a query; with skipmissing, those without a value are left out."""
    if query.skipmissing and values.ndim == 1:
        keep = ~np.isnan(values)
        times, values = times[keep], values[keep]
    return Series(times.astype(np.int64), values, last if query.with_last else None)


def fixed_starts(start: int, end: int, step: int, limit: int) -> np.ndarray:
    """start, start+step, ... up to end (inclusive, as emoncms's ``while ($time <= $end)``)."""
    count = (end - start) // step + 1 if end >= start else 0
    if count > limit:
        raise RowLimit(count)
    return start + np.arange(count, dtype=np.int64) * step


# -- local calendars (emoncms's DateTime "midnight", "+1 day", ...) ---------------------


def resolve(wall: datetime, zone: tzinfo) -> int:
    """The instant a local wall time names: in a DST gap the first instant after
    it, when ambiguous the first of the two (PHP's DateTime does the same)."""
    return int(wall.replace(tzinfo=zone, fold=0).timestamp())


def wall_clock(when: int, zone: tzinfo) -> datetime:
    return datetime.fromtimestamp(when, zone).replace(tzinfo=None)


def add_months(wall: datetime, months: int) -> datetime:
    """Wall-clock months later, for a day that every month has (a 1st)."""
    index = wall.month - 1 + months
    return wall.replace(year=wall.year + index // 12, month=index % 12 + 1)


def dmy_step(wall: datetime, interval: str) -> datetime:
    """emoncms's "+1 day", "+1 week", "+1 month", "+1 year": wall clock, so a
    day across a DST change lasts 23 or 25 hours."""
    if interval == "daily":
        return wall + timedelta(days=1)
    if interval == "weekly":
        return wall + timedelta(days=7)
    if interval == "monthly":
        return add_months(wall, 1)
    return add_months(wall, 12)


def dmy_first(start: int, interval: str, zone: tzinfo, annual_from_month: bool = False) -> datetime:
    """The wall time of the first division: the local midnight of ``start``,
    then the Monday on or after it ("this monday"), the 1st of its month, or
    the 1st of January (PHPTimeSeries asks PHP for "first day of this year",
    which is the 1st of the current month: ``annual_from_month``)."""
    local = wall_clock(start, zone)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    # "midnight" is resolved first; after a DST gap at midnight the clock shows 01:00.
    wall = wall_clock(resolve(midnight, zone), zone)
    if interval == "weekly":
        day = wall.date() + timedelta(days=-wall.weekday() % 7)
        return datetime(day.year, day.month, day.day)  # a weekday name resets the time to 00:00
    if interval == "monthly" or (interval == "annual" and annual_from_month):
        return wall.replace(day=1)
    if interval == "annual":
        return wall.replace(month=1, day=1)
    return wall


def dmy_bounds(start: int, end: int, interval: str, zone: tzinfo, limit: int, annual_from_month: bool = False) -> np.ndarray:
    """Division bounds b0 < b1 < ...: each b_i <= end starts a division [b_i, b_i+1);
    the last bound only ends the last division. At most ``limit`` divisions."""
    wall = dmy_first(start, interval, zone, annual_from_month)
    bounds = [resolve(wall, zone)]
    while bounds[-1] <= end:
        if len(bounds) > limit:
            raise RowLimit((end - bounds[0]) // NOMINAL_SECONDS[interval] + 1)
        wall = dmy_step(wall, interval)
        bounds.append(resolve(wall, zone))
    return np.array(bounds, dtype=np.int64)


def next_dmy_end(end: int, interval: str, zone: tzinfo) -> int:
    """emoncms's delta mode end: "tomorrow midnight", then "next monday" (strictly
    after), "first day of next month" or "first day of january next year"."""
    tomorrow = wall_clock(end, zone).date() + timedelta(days=1)
    day: date = tomorrow
    if interval == "weekly":
        day = tomorrow + timedelta(days=(-tomorrow.weekday() % 7) or 7)
    elif interval == "monthly":
        day = date(tomorrow.year + tomorrow.month // 12, tomorrow.month % 12 + 1, 1)
    elif interval == "annual":
        day = date(tomorrow.year + 1, 1, 1)
    return resolve(datetime(day.year, day.month, day.day), zone)


# -- averages ------------------------------------------------------------------------


def segment_means(
    read: Callable[[int, int], np.ndarray], starts: np.ndarray, lengths: np.ndarray, fresh: bool = False
) -> np.ndarray:
    """The mean of the finite values in each segment [start, start + length) of
    what ``read(lo, hi)`` returns (NaN if none). Each sum adds the values in
    order in doubles, as emoncms's PHP loop does, so the means are the same
    to the last bit; nearby segments share one read. ``fresh``: ``read``
    returns a new array on each call, which may then be changed here (saves
    a copy)."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 0)
    ends = starts + lengths
    means = np.full(starts.shape[0], np.nan)
    n = starts.shape[0]
    if n and (lengths <= SUM_SPAN).all() and (np.diff(starts) >= 0).all() and (np.diff(ends) >= 0).all():
        # Segments in order (a fixed interval, days, months): the same groups as the loop
        # below, found by a search per group instead of a step per segment.
        i = 0
        while i < n:
            j = max(int(np.searchsorted(ends, starts[i] + SUM_SPAN, side="right")), i + 1)
            lo, hi = int(starts[i]), int(ends[j - 1])
            block = read(lo, hi) if hi > lo else np.empty(0)
            means[i:j] = _block_means(block, starts[i:j] - lo, lengths[i:j], fresh)
            i = j
        return means
    # Python ints: this loop visits every segment, and numpy scalars are slow to compare.
    first, past, length = starts.tolist(), ends.tolist(), lengths.tolist()
    i = 0
    while i < n:
        if length[i] > SUM_SPAN:
            means[i] = _long_mean(read, first[i], past[i])
            i += 1
            continue
        lo, hi, j = first[i], past[i], i + 1
        while j < n and length[j] <= SUM_SPAN:
            wider_lo, wider_hi = min(lo, first[j]), max(hi, past[j])
            if wider_hi - wider_lo > SUM_SPAN:
                break
            lo, hi = wider_lo, wider_hi
            j += 1
        block = read(lo, hi) if hi > lo else np.empty(0)
        means[i:j] = _block_means(block, starts[i:j] - lo, lengths[i:j], fresh)
        i = j
    return means


def _block_means(block: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, fresh: bool = False) -> np.ndarray:
    missing = np.flatnonzero(~np.isfinite(block))
    counts = lengths - (np.searchsorted(missing, offsets + lengths) - np.searchsorted(missing, offsets))
    clean = block
    if missing.shape[0]:
        if not (fresh and block.flags.writeable):
            clean = block.copy()
        clean[missing] = 0  # adding 0.0 leaves a sum unchanged: a missing value is skipped
    rows = offsets.shape[0]
    longest = int(lengths.max()) if rows else 0
    if not longest:
        sums = np.zeros(rows)
    elif (lengths == longest).all() and (np.diff(offsets) == longest).all():
        # Back-to-back segments of one length (an interval a multiple of the feed's): a row each.
        first = int(offsets[0])
        sums = ordered_row_sums(clean[first : first + rows * longest].reshape(rows, longest))
    elif rows > 1 and 2 * int(lengths.sum()) >= rows * longest:
        sums = ordered_row_sums(_ragged_grid(clean, offsets, lengths, longest))
    elif longest <= 16:
        sums = np.zeros(rows)
        wide = clean.astype(np.float64)
        for k in range(longest):  # one column at a time: each row's sum still in order
            at = lengths > k
            sums[at] += wide[offsets[at] + k]
    else:
        sums = np.zeros(rows)
        wide = clean.astype(np.float64)
        for r in np.flatnonzero(lengths).tolist():
            a = int(offsets[r])
            sums[r] = np.add.accumulate(np.concatenate(([0.0], wide[a : a + int(lengths[r])])))[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _ragged_grid(clean: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, longest: int) -> np.ndarray:
    """Segments of several lengths as the rows of one grid, each padded at its end with
    zeros (adding 0.0 last leaves a sum as it was)."""
    rows = offsets.shape[0]
    grid = np.zeros((rows, longest), dtype=clean.dtype)
    whole = offsets + longest <= clean.shape[0]
    if clean.shape[0] >= longest:
        windows = np.lib.stride_tricks.sliding_window_view(clean, longest)  # a view: row j is clean[j : j + longest]
        grid[whole] = windows[offsets[whole]]
    for r in np.flatnonzero(~whole).tolist():  # near the end of the block
        a = int(offsets[r])
        grid[r, : clean.shape[0] - a] = clean[a:]
    shortest = int(lengths.min())
    if longest - shortest <= 16:  # e.g. an interval that is not a multiple of the feed's: two lengths
        for k in range(shortest, longest):
            grid[lengths <= k, k] = 0
    else:
        grid[np.arange(longest)[None, :] >= lengths[:, None]] = 0
    return grid


# Tiles of ordered_row_sums: TILE_COLUMNS values of TILE_ROWS rows, as float64 (with the
# carried sums, ~270 kB), stay in a core's L2 cache while they are added.
TILE_ROWS = 512
TILE_COLUMNS = 64


def ordered_row_sums(grid: np.ndarray) -> np.ndarray:
    """Each row's sum, adding its values from left to right in doubles, starting at 0.0:
    ``((0.0 + g[r, 0]) + g[r, 1]) + ...``, exactly as a scalar loop does (emoncms's PHP).

    numpy's ``sum`` along a row is pairwise (another rounding), and ``cumsum`` along it is
    one dependent addition after another. Here a tile of rows is turned on its side (a
    column per row), under a first line holding the sums carried so far, and reduced
    over axis 0: numpy then adds line after line, in order, each line a vector over the
    rows (pairwise summation only ever applies along the inner, contiguous axis, and a
    tile is kept at least two columns wide so that the inner axis is never the reduced
    one). ``tests/test_ordered_sums.py`` checks this against a Python loop."""
    rows, width = grid.shape
    sums = np.zeros(rows)
    if not rows or not width:
        return sums
    tile_rows = min(TILE_ROWS, max(rows, 2))
    tile = np.zeros((TILE_COLUMNS + 1, tile_rows))
    total = np.empty(tile_rows)
    for r0 in range(0, rows, tile_rows):
        r1 = min(r0 + tile_rows, rows)
        n = r1 - r0
        cols = max(n, 2)  # a single row gets a spare column of zeros (see above)
        for k0 in range(0, width, TILE_COLUMNS):
            k1 = min(k0 + TILE_COLUMNS, width)
            lines = tile[: k1 - k0 + 1, :cols]
            lines[0, :n] = sums[r0:r1]
            lines[1:, :n] = grid[r0:r1, k0:k1].T
            np.add.reduce(lines, axis=0, out=total[:cols])
            sums[r0:r1] = total[:n]
    return sums


def _long_mean(read: Callable[[int, int], np.ndarray], lo: int, hi: int) -> float:
    total, count = 0.0, 0
    for a in range(lo, hi, SUM_SPAN):
        part = finite(read(a, min(a + SUM_SPAN, hi)))
        present = ~np.isnan(part)
        count += int(present.sum())
        if part.shape[0]:
            total = float(np.add.accumulate(np.concatenate(([total], np.where(present, part, 0.0))))[-1])
    return total / count if count else math.nan


def disk_summary(engine: Any, engine_id: int, feedid: int) -> tuple[int, tuple[int, float | None] | None]:
    """A feed's files' size and its last point on disk (``feed/list.json``)."""
    npoints = engine.meta(feedid).npoints
    size = 16 + 4 * npoints if engine_id == ENGINE_PHPFINA else 9 * npoints
    return size, engine.lastvalue(feedid)
