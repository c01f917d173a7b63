"""PHPTimeSeries: emoncms's variable-interval feed engine, byte-compatible, batched with numpy.

Files (compat spec §3.2): ``feed_<id>.MYD`` holds 9-byte records ``<BIf`` =
marker 249, uint32 time, float32 value, sorted by time. Files written here
are read by emoncms's own engine, and emoncms's files are served as they are.

Writes come as RECORD batches (``apply_batch``). Per feed the last accepted
record of a time wins, then:

- times after the file's last record are appended in one write;
- a time already in the file overwrites that record in place (nearby
  overwrites share one write);
- an older time that is not in the file is inserted in order (emoncms drops
  it). The file is then rewritten: a copy ``feed_<id>.MYD.tmp`` is written
  and synced, renamed over the file and the directory synced, so a crash
  leaves either the old or the new file, never a mix.

A batch ends with one sync pass over the files it touched. A file whose
size is not a multiple of 9 (a torn append) loses only its partial tail
record when the engine next writes to it, never the whole file (emoncms's
repair path empties it); reads ignore a partial tail.

Concurrency: one engine instance owns its directory (one writer; large
files are memory-mapped, so no other process may truncate them). Calls may
come from any thread: ``apply_batch``, ``create`` and ``delete`` are
serialised by a ``threading.Lock``; reads (``query``, ``meta``,
``lastvalue``, ``export``) take the lock only to open the file and snapshot
its size, then read without it. A read sees the whole records present at
that moment, sorted: appends made later are not seen, a rewrite replaces
the file by rename so the read keeps the old one, and a value overwritten
in place meanwhile may be seen old or new.
"""

from __future__ import annotations

import math
import mmap
import os
import time
from typing import Callable, NamedTuple

import numpy as np
from twisted.logger import Logger

from emond.engine import (
    FeedDirectory,
    DMY_INTERVALS,
    FIVE_YEARS,
    TWO_DAYS,
    DataQuery,
    FeedError,
    NoSuchFeed,
    Series,
    admit,
    dmy_bounds,
    finish,
    finite,
    pwrite_all,
    fixed_starts,
    last_per_slot,
    segment_means,
)
from emond.records import (
    ENGINE_PHPTIMESERIES,
    REASON_NO_FEED,
    Refusal,
    make_records,
    refusals_from,
)

# One record of a .MYD file: packed, 9 bytes.
MYD = np.dtype([("marker", "u1"), ("time", "<u4"), ("value", "<f4")])
RECORD_SIZE = MYD.itemsize
MARKER = 249
# Files of at most this many records are read whole and searched with
# np.searchsorted; larger ones are mapped and binary-searched in place, so a
# read or a back-fill never copies a large file.
MAP_RECORDS = 1 << 16
# Overwritten records closer than this many records apart share one write.
RUN_GAP = 512
# Records copied per write when a file is rewritten.
COPY_RECORDS = 1 << 16


class SeriesMeta(NamedTuple):
    npoints: int
    start_time: int
    end_time: int


class PHPTimeSeries(FeedDirectory):
    log = Logger()

    def __init__(
        self,
        directory: str,
        clock: Callable[[], float] = time.time,
        window_past: int = FIVE_YEARS,
        window_future: int = TWO_DAYS,
        open_files: int = 1024,
        sync: bool = True,
    ) -> None:
        super().__init__(directory, clock, window_past, window_future, open_files, sync)
        self._dirty: set[int] = set()  # feeds written since the last sync pass

    # -- paths and files -------------------------------------------------

    def _path(self, feedid: int) -> str:
        return os.path.join(self.directory, f"feed_{feedid}.MYD")

    def _fd(self, feedid: int) -> int:
        """The pooled read-write handle of a feed's file (which must exist).
        No O_APPEND: on Linux it makes pwrite ignore its offset."""
        return self._files.get(feedid, self._path(feedid), os.O_RDWR)

    def data_path(self, feedid: int) -> str:
        return self._path(feedid)

    def _install(self, feedid: int, incoming: str, meta: list[int]) -> None:
        self._dirty.discard(feedid)
        os.replace(incoming, self.data_path(feedid))

    def _evicting(self, feedid: int, fd: int) -> None:
        # Closing does not sync: a handle written in this batch is synced now.
        if self.sync and feedid in self._dirty:
            os.fsync(fd)
        self._dirty.discard(feedid)

    def _sync(self) -> None:
        dirty, self._dirty = self._dirty, set()
        if not self.sync:
            return
        for feedid in dirty:
            fd = self._files.handles.get(feedid)
            if fd is not None:  # else rewritten (synced) or evicted (synced)
                os.fsync(fd)

    def close(self) -> None:
        """Close the pooled handles (the engine reopens them when needed)."""
        with self._lock:
            self._sync()
            self._files.close_all()

    # -- feeds -------------------------------------------------------------

    def create(self, feedid: int, interval: int | None = None) -> None:
        """Create an empty feed; an existing file is left as it is (as emoncms).

        ``interval`` is accepted for symmetry with PHPFina and ignored.
        """
        with self._lock:
            try:
                fd = os.open(self._path(feedid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return
            os.close(fd)
            self._sync_dir()

    def exists(self, feedid: int) -> bool:
        return os.path.exists(self._path(feedid))

    def delete(self, feedid: int) -> None:
        """Remove a feed's file (and a leftover rewrite copy); a missing feed is a no-op."""
        with self._lock:
            self._files.forget(feedid)
            self._dirty.discard(feedid)
            for path in (self._path(feedid), self._path(feedid) + ".tmp"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            self._sync_dir()

    # -- writes ------------------------------------------------------------

    def write(self, feedid: int, times: "np.typing.ArrayLike", values: "np.typing.ArrayLike") -> list[Refusal]:
        """Write points to one feed (a convenience over ``apply_batch``)."""
        return self.apply_batch(make_records(feedid, times, values, ENGINE_PHPTIMESERIES))

    def apply_batch(self, records: np.ndarray, sync: bool = True) -> list[Refusal]:
        """Apply a RECORD batch for any number of feeds; return what was refused.
        ``sync=False`` leaves the sync pass to a later ``sync()`` (a group commit)."""
        with self._lock:
            records, refusals = admit(records, ENGINE_PHPTIMESERIES, self.window)
            if records.shape[0]:
                refusals += self._apply(records)
            if sync:
                self._sync()
            return refusals

    def sync_written(self) -> None:
        """Make every batch applied so far durable (the sync pass they were applied without)."""
        with self._lock:
            self._sync()

    def _apply(self, batch: np.ndarray) -> list[Refusal]:
        feed_ids, inverse = np.unique(batch["feed"], return_inverse=True)
        known = np.array(
            [f in self._files.handles or os.path.exists(self._path(f)) for f in feed_ids.tolist()], dtype=bool
        )[inverse]
        refusals: list[Refusal] = []
        if not known.all():
            refusals += refusals_from(batch, ~known, REASON_NO_FEED)
            batch = batch[known]
            if not batch.shape[0]:
                return refusals
        # Sorted by (feed, time), the last accepted record of each time kept.
        batch = batch[last_per_slot(batch["feed"], batch["time"])]
        feeds = batch["feed"]
        bounds = np.flatnonzero(feeds[1:] != feeds[:-1]) + 1
        firsts = np.concatenate(([0], bounds)).tolist()
        ends = np.concatenate((bounds, [feeds.shape[0]])).tolist()
        for a, b in zip(firsts, ends):
            new = np.empty(b - a, dtype=MYD)
            new["marker"] = MARKER
            new["time"] = batch["time"][a:b]
            new["value"] = batch["value"][a:b]
            self._apply_feed(int(feeds[a]), new)
        return refusals

    def _apply_feed(self, feedid: int, new: np.ndarray) -> None:
        """Store one feed's records (sorted by time, unique times)."""
        fd = self._fd(feedid)
        self._dirty.add(feedid)
        size = os.fstat(fd).st_size
        n = size // RECORD_SIZE
        if size != n * RECORD_SIZE:
            # A torn append: drop only the partial record (emoncms empties the file).
            self.log.warn(
                "phptimeseries feed {feedid}: size {size} is not a multiple of 9, "
                "truncating the partial last record",
                feedid=feedid,
                size=size,
            )
            os.ftruncate(fd, n * RECORD_SIZE)

        times = new["time"]
        if n == 0 or int(times[0]) > _last_time(fd, n):
            pwrite_all(fd, new.tobytes(), n * RECORD_SIZE)
            return

        recs = _records(fd, n)
        n = recs.shape[0]
        idx = _lower_bound(recs, times)
        inside = idx < n
        match = np.zeros(times.shape[0], dtype=bool)
        match[inside] = recs["time"][idx[inside]] == times[inside]
        if (inside & ~match).any():
            self._insert(feedid, recs, idx, match, new)
            return

        # Overwrites in place, nearby ones grouped into one write each.
        pos, values = idx[match], new[match]
        breaks = np.flatnonzero(np.diff(pos) > RUN_GAP) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        stops = np.concatenate((breaks, [pos.shape[0]])).tolist()
        for a, b in zip(starts, stops):
            lo, hi = int(pos[a]), int(pos[b - 1]) + 1
            chunk = np.array(recs[lo:hi])
            chunk[pos[a:b] - lo] = values[a:b]
            pwrite_all(fd, chunk.tobytes(), lo * RECORD_SIZE)
        appended = new[~inside]
        if appended.shape[0]:
            pwrite_all(fd, appended.tobytes(), n * RECORD_SIZE)

    def _insert(self, feedid: int, recs: np.ndarray, idx: np.ndarray, match: np.ndarray, new: np.ndarray) -> None:
        """Merge records older than the file's end into it: a crash-safe rewrite."""
        first = int(idx[0])  # everything before the first new record is copied as is
        tail = np.array(recs[first:])
        tail[idx[match] - first] = new[match]
        merged = np.insert(tail, idx[~match] - first, new[~match])
        path = self._path(feedid)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            for i in range(0, first, COPY_RECORDS):
                f.write(recs[i : min(i + COPY_RECORDS, first)].tobytes())
            f.write(merged.tobytes())
            f.flush()
            if self.sync:
                os.fsync(f.fileno())
        # The pooled handle belongs to the old file; the new one is synced already.
        self._files.forget(feedid)
        self._dirty.discard(feedid)
        os.replace(tmp, path)
        self._sync_dir()

    # -- reads -------------------------------------------------------------

    def _snapshot(self, feedid: int) -> tuple[int, int]:
        """A read handle and the number of whole records, taken under the lock."""
        with self._lock:
            try:
                fd = os.open(self._path(feedid), os.O_RDONLY)
            except FileNotFoundError:
                raise NoSuchFeed(feedid) from None
            try:
                return fd, os.fstat(fd).st_size // RECORD_SIZE
            except BaseException:
                os.close(fd)
                raise

    def _ends(self, feedid: int) -> tuple[int, np.ndarray | None, np.ndarray | None]:
        """The number of records and the first and last record (None if empty)."""
        fd, n = self._snapshot(feedid)
        try:
            if n == 0:
                return 0, None, None
            first = np.frombuffer(os.pread(fd, RECORD_SIZE, 0), dtype=MYD)[0]
            last = np.frombuffer(os.pread(fd, RECORD_SIZE, (n - 1) * RECORD_SIZE), dtype=MYD)[0]
            return n, first, last
        finally:
            os.close(fd)

    def meta(self, feedid: int) -> SeriesMeta:
        """Number of records, first and last time (0 for an empty feed)."""
        n, first, last = self._ends(feedid)
        if n == 0:
            return SeriesMeta(0, 0, 0)
        return SeriesMeta(n, int(first["time"]), int(last["time"]))

    def lastvalue(self, feedid: int) -> tuple[int, float | None] | None:
        """(time, value or None if missing or not finite) of the last record; None for an empty feed."""
        n, _, last = self._ends(feedid)
        if n == 0:
            return None
        value = float(last["value"])
        return int(last["time"]), (value if math.isfinite(value) else None)

    def value_at(self, feedid: int, when: int) -> float | None:
        """``feed/value.json?time=``: the first record at or after ``when`` (emoncms), None if none."""
        fd, n = self._snapshot(feedid)
        try:
            recs = _records(fd, n) if n else None
        finally:
            os.close(fd)
        if recs is None or recs.shape[0] == 0:
            return None
        i = int(_lower_bound(recs, np.array([int(when)]))[0])
        if i >= recs.shape[0]:
            return None
        value = float(recs["value"][i])
        return value if math.isfinite(value) else None

    def query(self, feedid: int, query: DataQuery) -> Series:
        """``feed/data.json`` for one feed, as emoncms's PHPTimeSeries ``get_data_combined``."""
        if query.split is not None:
            raise FeedError("This request is only supported by PHPFina AND MySQLTimeseries")
        if query.end <= query.start:
            raise FeedError("request end time before start time")
        fd, n = self._snapshot(feedid)
        try:
            recs = _records(fd, n) if n else np.empty(0, dtype=MYD)
        finally:
            os.close(fd)  # a map keeps its own reference to the file
        if query.interval in DMY_INTERVALS:
            # PHP's "first day of this year" is the 1st of the current month: emoncms's annual rows start there.
            bounds = dmy_bounds(query.start, query.end, str(query.interval), query.zone(), query.max_rows, annual_from_month=True)
            starts, ends = bounds[:-1], bounds[1:]
        else:
            step = int(query.interval) if query.interval != "original" else 1  # (int)"original" is 0, then 1
            starts = fixed_starts(query.start, query.end, max(step, 1), query.max_rows)
            ends = starts + max(step, 1)
        count = recs.shape[0]
        last = None
        if query.with_last and count:
            value = float(recs["value"][-1])
            last = (int(recs["time"][-1]), value if math.isfinite(value) else None)
        if query.average:
            values = _averages(recs, starts, ends)
            return finish(starts, values, query, last)
        # The first record at or after each division start, if it is inside the division.
        values = np.full(starts.shape[0], np.nan)
        times = starts.copy()
        if count and starts.shape[0]:
            found = _lower_bound(recs, starts)
            inside = found < count
            rec_times = np.zeros(starts.shape[0], dtype=np.int64)
            rec_times[inside] = recs["time"][found[inside]]
            inside &= rec_times < ends
            values[inside] = finite(recs["value"][found[inside]])
            if query.limitinterval == 2:
                times[inside] = rec_times[inside]  # the record's own time
        return finish(times, values, query, last)

    def export(self, feedid: int, start: int = 0, length: int | None = None) -> bytes:
        """``feed/export.json``: the file from byte ``start`` (aligned down to a record)."""
        fd, n = self._snapshot(feedid)
        try:
            size = n * RECORD_SIZE
            offset = min(max(int(start), 0), size) // RECORD_SIZE * RECORD_SIZE
            count = size - offset if length is None else max(min(int(length), size - offset), 0)
            return os.pread(fd, count, offset) if count else b""
        finally:
            os.close(fd)


def _averages(recs: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """emoncms's PHPTimeSeries average, rule for rule: each division takes the
    records from where the previous one stopped up to the first record at or
    after its end, one fewer when that record is later than the end (so a
    record is counted in the next division unless one lands exactly on the
    division's end). Answers must match emoncms's, so its rule is kept."""
    count = recs.shape[0]
    if not starts.shape[0]:
        return np.empty(0)
    first = int(_lower_bound(recs, starts[:1])[0]) if count else 0  # past the end: count
    stops = _lower_bound(recs, ends) if count else np.zeros(ends.shape[0], dtype=np.int64)
    later = stops < count
    later[later] = recs["time"][stops[later]].astype(np.int64) > ends[later]
    stops = np.where(later, np.maximum(stops - 1, 0), stops)
    begins = np.concatenate(([first], stops[:-1]))
    values = recs["value"]
    return segment_means(lambda lo, hi: values[lo:hi], begins, stops - begins)


def _last_time(fd: int, npoints: int) -> int:
    raw = os.pread(fd, RECORD_SIZE, (npoints - 1) * RECORD_SIZE)
    return int(np.frombuffer(raw, dtype=MYD)[0]["time"])


def _records(fd: int, npoints: int) -> np.ndarray:
    """The first ``npoints`` records, read whole if small, else mapped (read-only)."""
    if npoints <= MAP_RECORDS:
        data = os.pread(fd, npoints * RECORD_SIZE, 0)
        return np.frombuffer(data, dtype=MYD, count=len(data) // RECORD_SIZE)
    # The array holds the map; it is unmapped when the array is released.
    mapped = mmap.mmap(fd, npoints * RECORD_SIZE, prot=mmap.PROT_READ)
    return np.frombuffer(mapped, dtype=MYD, count=npoints)


def _lower_bound(recs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target, the index of the first record whose time is >= target.

    A small file's times are copied for np.searchsorted; a large one is
    binary-searched for all targets at once (about log2(n) vectorised
    steps), touching only the pages it probes.
    """
    times = recs["time"]
    n = times.shape[0]
    targets = np.asarray(targets, dtype=np.int64)
    if n <= MAP_RECORDS:
        return np.searchsorted(times.astype(np.int64), targets)
    lo = np.zeros(targets.shape[0], dtype=np.int64)
    hi = np.full(targets.shape[0], n, dtype=np.int64)
    active = lo < hi
    while active.any():
        mid = (lo + hi) >> 1
        probe = times[np.minimum(mid, n - 1)].astype(np.int64)
        after = active & (probe < targets)
        lo = np.where(after, mid + 1, lo)
        hi = np.where(active & ~after, mid, hi)
        active = lo < hi
    return lo


__all__ = ["PHPTimeSeries", "SeriesMeta", "FeedError", "NoSuchFeed", "MYD", "MARKER"]
