"""PHPFina: emoncms's fixed-interval feed engine, byte-compatible, batched with numpy.

Files (compat spec §3.1): ``<id>.meta`` is 16 bytes ``<IIII`` = 0, 0, interval,
start_time; ``<id>.dat`` is a bare float32 LE array, slot i at
``start_time + i*interval``, NaN for a missing slot.

Writes come as RECORD batches (``apply_batch``). Per feed the records are
floored to the interval, the last accepted record of a slot wins, and each
contiguous run of slots is one ``pwrite`` through a pool of open handles;
appends carry their NaN or "join" padding in the same write. One sync pass
(fsync of the touched files, or one ``syncfs`` for many) ends each batch.

Beyond emoncms: a write older than start_time extends the file at the
front. That changes start_time, so it is crash-safe: ``<id>.intent`` records
the old and new start and the old size before anything moves, and is
completed (or rolled back) when the engine next opens the directory. The
same intent covers a feed's first write, so a meta never holds a start_time
while its data file is empty.

Concurrency: one engine instance owns its directory (one writer). Calls may
come from any thread: ``apply_batch``, ``create`` and ``delete`` are
serialised by a lock; reads take the lock only to snapshot a feed's meta and
open its data file, then read without it, so a read sees each slot either
before or after a concurrent batch, never a feed shifted in time.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
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
    fixed_starts,
    last_per_slot,
    php_round,
    pwrite_all,
    segment_means,
)
from emond.records import (
    ENGINE_PHPFINA,
    PADDING_JOIN,
    REASON_NO_FEED,
    REASON_PADDING,
    Refusal,
    make_records,
    refusals_from,
)

META = struct.Struct("<IIII")
INTENT = struct.Struct("<4sIIQ")
INTENT_MAGIC = b"EMDI"
MAX_PADDING = 15_768_000  # 5 years of 10 s slots (current emoncms)
MIN_INTERVAL = 5  # emoncms.org
# Above this many touched files one syncfs beats a fsync per file.
SYNCFS_THRESHOLD = 64
# Threads for open+write+close when a batch touches more feeds than handles.
WRITER_THREADS = 3
# Reads spanning more slots than this map the file instead of reading the span.
PREAD_SPAN = 1 << 18


class FeedMeta(NamedTuple):
    interval: int
    start_time: int
    npoints: int
    end_time: int


class _Feed:
    """What the engine knows of one feed; valid because it is the only writer."""

    __slots__ = ("id", "interval", "start", "npoints")

    def __init__(self, feedid: int, interval: int, start: int, npoints: int) -> None:
        self.id = feedid
        self.interval = interval
        self.start = start
        self.npoints = npoints


class PHPFina(FeedDirectory):
    log = Logger()

    def __init__(
        self,
        directory: str,
        clock: Callable[[], float] = time.time,
        window_past: int = FIVE_YEARS,
        window_future: int = TWO_DAYS,
        max_padding: int = MAX_PADDING,
        min_interval: int = MIN_INTERVAL,
        open_files: int = 1024,
        sync: bool = True,
    ) -> None:
        super().__init__(directory, clock, window_past, window_future, open_files, sync)
        self._prefix = os.path.join(directory, "")
        self.max_padding = max_padding
        self.min_interval = min_interval
        self._feeds: dict[int, _Feed] = {}
        self._evicted_dirty = False
        self._pending: set[int] = set()  # feeds written since the last sync pass
        self._writers: ThreadPoolExecutor | None = None
        self._libc = ctypes.CDLL(None, use_errno=True) if sync else None
        self._recover()

    # -- paths and files -------------------------------------------------

    def _path(self, feedid: int, suffix: str) -> str:
        return f"{self._prefix}{feedid}{suffix}"  # cheaper than os.path.join on the hot path

    def _fd(self, feedid: int) -> int:
        """The pooled read-write handle of a feed's data file."""
        return self._files.get(feedid, self._path(feedid, ".dat"), os.O_RDWR | os.O_CREAT)

    def _evicting(self, feedid: int, fd: int) -> None:
        self._evicted_dirty = True  # a handle closed before the sync pass must still be synced

    def data_path(self, feedid: int) -> str:
        return self._path(feedid, ".dat")

    def _install(self, feedid: int, incoming: str, meta: list[int]) -> None:
        """``meta``: the copied feed's [interval, start_time]."""
        interval, start = (int(x) for x in meta)
        self._feeds.pop(feedid, None)
        for suffix in (".intent", ".dat.extend"):  # a front extension half done here is moot
            try:
                os.unlink(self._path(feedid, suffix))
            except FileNotFoundError:
                pass
        size = os.path.getsize(incoming)
        self._write_meta(_Feed(feedid, interval, start, size // 4))
        os.replace(incoming, self.data_path(feedid))

    def close(self) -> None:
        with self._lock:
            self._files.close_all()
            if self._writers is not None:
                self._writers.shutdown()
                self._writers = None

    def _load(self, feedid: int) -> _Feed | None:
        feed = self._feeds.get(feedid)
        if feed is not None:
            return feed
        try:
            with open(self._path(feedid, ".meta"), "rb") as f:
                raw = f.read(16)
        except FileNotFoundError:
            return None
        raw = raw.ljust(16, b"\0")  # emoncms reads a short meta as zeros
        _, _, interval, start = META.unpack(raw)
        try:
            size = os.stat(self._path(feedid, ".dat")).st_size
        except FileNotFoundError:
            size = 0
        feed = _Feed(feedid, interval, start, size // 4)
        self._feeds[feedid] = feed
        return feed

    def _write_meta(self, feed: _Feed) -> None:
        fd = os.open(self._path(feed.id, ".meta"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            pwrite_all(fd, META.pack(0, 0, feed.interval, feed.start), 0)
            if self.sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    # -- crash-safe start_time changes -----------------------------------

    def _write_intent(self, feed: _Feed, new_start: int) -> None:
        fd = os.open(self._path(feed.id, ".intent"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pwrite_all(fd, INTENT.pack(INTENT_MAGIC, feed.start, new_start, feed.npoints * 4), 0)
            if self.sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._sync_dir()

    def _recover(self) -> None:
        """Complete or roll back start_time changes a crash interrupted."""
        for name in os.listdir(self.directory):
            if not name.endswith(".intent"):
                continue
            feedid = int(name[: -len(".intent")])
            path = self._path(feedid, ".intent")
            with open(path, "rb") as f:
                raw = f.read()
            try:
                magic, old_start, new_start, old_size = INTENT.unpack(raw)
            except struct.error:
                magic = b""
            if magic != INTENT_MAGIC:
                # Torn intent: written before anything else moved, so nothing did.
                os.unlink(path)
                continue
            tmp = self._path(feedid, ".dat.extend")
            if os.path.exists(tmp):
                os.unlink(tmp)  # the rewrite never replaced the data file
            try:
                size = os.stat(self._path(feedid, ".dat")).st_size
            except FileNotFoundError:
                size = 0
            feed = self._load(feedid)
            if feed is not None:
                # Data beyond the old size exists only once the new layout is in place.
                feed.start = new_start if size > old_size else old_start
                self._write_meta(feed)
                self.log.info(
                    "phpfina feed {feedid}: completed start_time change, start_time={start}",
                    feedid=feedid,
                    start=feed.start,
                )
            os.unlink(path)
            self._feeds.pop(feedid, None)
        self._sync_dir()

    def _extend_front(self, feed: _Feed, new_start: int) -> None:
        """Rewrite the data file with NaN slots before the old start."""
        shift = (feed.start - new_start) // feed.interval
        self._files.forget(feed.id)
        path = self._path(feed.id, ".dat")
        tmp = self._path(feed.id, ".dat.extend")
        old = np.fromfile(path, dtype="<f4", count=feed.npoints) if feed.npoints else None
        with open(tmp, "wb") as f:
            np.full(shift, np.nan, dtype="<f4").tofile(f)
            if old is not None:
                old.tofile(f)
            f.flush()
            if self.sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        self._sync_dir()
        feed.npoints += shift

    # -- public API --------------------------------------------------------

    def create(self, feedid: int, interval: int) -> None:
        """Create an empty feed; an existing feed is left as it is (as emoncms)."""
        interval = max(int(interval), self.min_interval)
        with self._lock:
            if os.path.exists(self._path(feedid, ".meta")):
                return
            feed = _Feed(feedid, interval, 0, 0)
            os.close(os.open(self._path(feedid, ".dat"), os.O_WRONLY | os.O_CREAT, 0o644))
            self._write_meta(feed)
            self._sync_dir()
            self._feeds[feedid] = feed

    def exists(self, feedid: int) -> bool:
        with self._lock:
            return self._load(feedid) is not None

    def delete(self, feedid: int) -> None:
        with self._lock:
            self._files.forget(feedid)
            self._feeds.pop(feedid, None)
            for suffix in (".meta", ".dat", ".intent", ".dat.extend"):
                try:
                    os.unlink(self._path(feedid, suffix))
                except FileNotFoundError:
                    pass

    def write(
        self, feedid: int, times: "np.typing.ArrayLike", values: "np.typing.ArrayLike", padding: str = "nan"
    ) -> list[Refusal]:
        """Write points to one feed (a convenience over ``apply_batch``)."""
        mode = PADDING_JOIN if padding == "join" else 0
        return self.apply_batch(make_records(feedid, times, values, ENGINE_PHPFINA, mode))

    def apply_batch(self, records: np.ndarray, sync: bool = True) -> list[Refusal]:
        """Apply a RECORD batch for any number of feeds; return what was refused.

        ``sync=False`` leaves the sync pass to a later ``sync_written()``, so that
        several batches share one (a group commit: the storage location acknowledges
        them once it has run). A batch that changes a feed's start_time is synced at
        once all the same: its meta may only be written after its data is on disk."""
        with self._lock:
            records, refusals = admit(records, ENGINE_PHPFINA, self.window)
            if records.shape[0]:
                refusals += self._apply(records, sync)
            elif sync:
                self._sync()
            return refusals

    def sync_written(self) -> None:
        """Make every batch applied so far durable (the sync pass they were applied without)."""
        with self._lock:
            self._sync()

    def _apply(self, batch: np.ndarray, sync: bool = True) -> list[Refusal]:
        feed_ids, inverse = np.unique(batch["feed"], return_inverse=True)
        feeds = [self._load(f) for f in feed_ids.tolist()]
        intervals = np.array([f.interval if f else 0 for f in feeds], dtype=np.int64)
        known = intervals[inverse] > 0
        refusals: list[Refusal] = []
        if not known.all():
            refusals += refusals_from(batch, ~known, REASON_NO_FEED)
            batch, inverse = batch[known], inverse[known]
            if not batch.shape[0]:
                if sync:
                    self._sync()
                return refusals
        interval = intervals[inverse]
        slots = batch["time"].astype(np.int64) // interval * interval
        keep = last_per_slot(inverse, slots)
        which = inverse[keep]
        slots = slots[keep]
        values = batch["value"][keep]
        join = batch["padding"][keep] == PADDING_JOIN
        bounds = np.flatnonzero(which[1:] != which[:-1]) + 1
        firsts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [which.shape[0]]))

        # Fast path: a feed with one record that lands inside the file or on
        # the next slot needs a single 4-byte write (the scattered case).
        starts = np.array([f.start if f else 0 for f in feeds], dtype=np.int64)
        npoints = np.array([f.npoints if f else 0 for f in feeds], dtype=np.int64)
        first_which = which[firsts]
        first_pos = (slots[firsts] - starts[first_which]) // intervals[first_which]
        single = (
            (ends - firsts == 1)
            & (npoints[first_which] > 0)
            & (slots[firsts] >= starts[first_which])
            & (first_pos <= npoints[first_which])
        )
        touched = self._pending
        if single.any():
            self._write_singles(
                [feeds[i] for i in first_which[single].tolist()],
                first_pos[single].tolist(),
                values[firsts[single]].astype("<f4").tobytes(),
                touched,
            )
        changed: list[_Feed] = []
        for a, b in zip(firsts[~single].tolist(), ends[~single].tolist()):
            feed = feeds[int(which[a])]
            refusals += self._apply_feed(feed, slots[a:b], values[a:b], bool(join[b - 1]), changed, touched)
        if sync or changed:
            self._sync()
        for feed in changed:
            self._write_meta(feed)
            os.unlink(self._path(feed.id, ".intent"))
        return refusals

    def _write_singles(self, feeds: list[_Feed], positions: list[int], data: bytes, touched: set[int]) -> None:
        view = memoryview(data)
        pwrite, pooled, limit = os.pwrite, self._files.handles, self._files.limit
        transient: list[tuple[str, memoryview, int]] = []
        for i, (feed, pos) in enumerate(zip(feeds, positions)):
            fd = pooled.get(feed.id)
            if fd is None and len(pooled) < limit:
                fd = self._fd(feed.id)
            if fd is None:
                # More feeds than handles: churning the pool would only add closes.
                transient.append((self._path(feed.id, ".dat"), view[4 * i : 4 * i + 4], 4 * pos))
            else:
                # In this thread: spread over threads these writes went slower here (the
                # kernel's share of each, the inode's mtime journalled, does not overlap).
                if pwrite(fd, view[4 * i : 4 * i + 4], 4 * pos) != 4:
                    pwrite_all(fd, view[4 * i : 4 * i + 4], 4 * pos)  # short: finish, or raise the error
                touched.add(feed.id)
            if pos == feed.npoints:
                feed.npoints += 1
        if transient:
            self._evicted_dirty = True  # written through handles now closed: syncfs
            self._in_writers(_open_write_close, transient)

    def _in_writers(self, work: Callable[[list], None], items: list) -> None:
        """``work`` over ``items`` in a few threads: open+write+close per file releases
        the GIL and dominates when feeds outnumber open handles."""
        if self._writers is None:
            self._writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="phpfina-write")
        chunks = [items[i::WRITER_THREADS] for i in range(WRITER_THREADS)]
        for _ in self._writers.map(work, chunks):
            pass

    def _apply_feed(
        self,
        feed: _Feed,
        slots: np.ndarray,
        values: np.ndarray,
        join: bool,
        changed: list[_Feed],
        touched: set[int],
    ) -> list[Refusal]:
        """Write one feed's sorted, unique slots: at most one write per contiguous run."""
        refusals: list[Refusal] = []
        interval = feed.interval
        limit = self.max_padding
        if feed.npoints == 0 or slots[0] < feed.start:
            if feed.npoints == 0:
                new_start = int(slots[0])
            else:
                # Back-fill: the front gap obeys the same padding limit as appends.
                too_far = slots < feed.start - (limit + 1) * interval
                if too_far.any():
                    refusals += _refuse(feed.id, slots[too_far], REASON_PADDING)
                    slots, values = slots[~too_far], values[~too_far]
                new_start = int(slots[0]) if slots.shape[0] and slots[0] < feed.start else feed.start
            if new_start != feed.start or feed.npoints == 0:
                self._write_intent(feed, new_start)
                if feed.npoints:
                    self._extend_front(feed, new_start)
                feed.start = new_start
                changed.append(feed)
        if not slots.shape[0]:
            return refusals
        pos = (slots - feed.start) // interval
        fd = self._fd(feed.id)
        touched.add(feed.id)

        # In-file slots: overwrite in place, one write per contiguous run.
        inside = pos < feed.npoints
        n_in = int(np.count_nonzero(inside))  # pos is sorted: the inside ones come first
        if n_in:
            in_pos = pos[:n_in]
            breaks = np.flatnonzero(np.diff(in_pos) != 1) + 1
            for a, b in zip(np.concatenate(([0], breaks)).tolist(), np.concatenate((breaks, [n_in])).tolist()):
                pwrite_all(fd, values[a:b].astype("<f4").tobytes(), 4 * int(in_pos[a]))
        if n_in == pos.shape[0]:
            return refusals

        # Appends: one write from the end of the file, padding included.
        app_pos = pos[n_in:]
        app_val = values[n_in:].astype(np.float64)
        gaps = np.diff(np.concatenate(([feed.npoints - 1], app_pos))) - 1
        over = np.flatnonzero(gaps > limit)
        if over.shape[0]:
            cut = int(over[0])  # later slots are further still: all refused
            refusals += _refuse(feed.id, slots[n_in + cut :], REASON_PADDING)
            app_pos, app_val, gaps = app_pos[:cut], app_val[:cut], gaps[:cut]
            if not app_pos.shape[0]:
                return refusals
        base = feed.npoints
        buf = np.full(int(app_pos[-1]) - base + 1, np.nan, dtype="<f4")
        buf[app_pos - base] = app_val
        if join and (gaps > 0).any():
            self._join(fd, feed, buf, app_pos, app_val, gaps, pos[:n_in], values[:n_in])
        pwrite_all(fd, buf.tobytes(), 4 * base)
        feed.npoints = int(app_pos[-1]) + 1
        return refusals

    def _join(
        self,
        fd: int,
        feed: _Feed,
        buf: np.ndarray,
        app_pos: np.ndarray,
        app_val: np.ndarray,
        gaps: np.ndarray,
        in_pos: np.ndarray,
        in_val: np.ndarray,
    ) -> None:
        """Fill append gaps with emoncms's linear ramp (same float steps as its PHP)."""
        base = feed.npoints
        last = np.nan
        if base:
            if in_pos.shape[0] and in_pos[-1] == base - 1:
                last = float(in_val[-1])  # the last slot is rewritten in this batch
            else:
                last = float(np.frombuffer(os.pread(fd, 4, 4 * (base - 1)), dtype="<f4")[0])
        previous = np.concatenate(([last], app_val[:-1]))
        for i in np.flatnonzero(gaps > 0).tolist():
            gap = int(gaps[i])
            start = previous[i]
            step = (app_val[i] - start) / (gap + 1)
            # PHP adds the step repeatedly in doubles; cumsum does the same additions.
            ramp = np.cumsum(np.concatenate(([start], np.full(gap, step))))[1:]
            at = int(app_pos[i]) - base - gap
            buf[at : at + gap] = ramp

    def _sync(self) -> None:
        """Sync what was written since the last pass: an fsync per file, or one syncfs
        when there are many, or when some were written through handles closed since."""
        touched, self._pending = self._pending, set()
        if not self.sync or not touched:
            self._evicted_dirty = False
            return
        pooled = self._files.handles
        if self._evicted_dirty or len(touched) > SYNCFS_THRESHOLD or not all(f in pooled for f in touched):
            dirfd = os.open(self.directory, os.O_RDONLY)
            try:
                if self._libc.syncfs(dirfd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(dirfd)
        else:
            for feedid in touched:
                os.fsync(pooled[feedid])
        self._evicted_dirty = False

    # -- reads -------------------------------------------------------------

    def _snapshot(self, feedid: int) -> tuple[_Feed, int | None]:
        """A copy of the feed's state and a read handle opened under the lock."""
        with self._lock:
            feed = self._load(feedid)
            if feed is None:
                raise NoSuchFeed(feedid)
            copy = _Feed(feed.id, feed.interval, feed.start, feed.npoints)
            fd = os.open(self._path(feedid, ".dat"), os.O_RDONLY) if feed.npoints else None
            return copy, fd

    def meta(self, feedid: int) -> FeedMeta:
        with self._lock:
            feed = self._load(feedid)
            if feed is None:
                raise NoSuchFeed(feedid)
            end = feed.start + feed.interval * (feed.npoints - 1) if feed.npoints else 0
            return FeedMeta(feed.interval, feed.start, feed.npoints, max(end, 0))

    def raw(self, feedid: int) -> tuple[int, int, np.ndarray]:
        """start_time, interval and every stored slot (float32, NaN for missing)."""
        feed, fd = self._snapshot(feedid)
        if fd is None:
            return feed.start, feed.interval, np.empty(0, dtype="<f4")
        try:
            return feed.start, feed.interval, _read_slots(fd, 0, feed.npoints)
        finally:
            os.close(fd)

    def lastvalue(self, feedid: int) -> tuple[int, float | None] | None:
        """(time of the last slot, its value or None if missing or not finite); None for an empty feed."""
        feed, fd = self._snapshot(feedid)
        if fd is None:
            return None
        try:
            value = float(_read_slots(fd, feed.npoints - 1, feed.npoints)[0])
        finally:
            os.close(fd)
        last_time = feed.start + feed.interval * (feed.npoints - 1)
        return last_time, (value if math.isfinite(value) else None)

    def value_at(self, feedid: int, when: int) -> float | None:
        """``feed/value.json?time=``: the nearest slot (halves away from zero), None if missing."""
        feed, fd = self._snapshot(feedid)
        if fd is None or feed.interval <= 0:
            if fd is not None:
                os.close(fd)
            return None
        try:
            pos = int(php_round((int(when) - feed.start) / feed.interval))
            if not 0 <= pos < feed.npoints:
                return None
            value = float(_read_slots(fd, pos, pos + 1)[0])
        finally:
            os.close(fd)
        return value if math.isfinite(value) else None

    def query(self, feedid: int, query: DataQuery) -> Series:
        """``feed/data.json`` for one feed, as emoncms's PHPFina ``get_data_combined``
        (or ``get_data_DMY_time_of_day`` with a split)."""
        feed, fd = self._snapshot(feedid)
        try:
            slots = _SlotReader(fd, feed.npoints)
            last = None
            if query.with_last and feed.npoints:
                value = float(slots.read(feed.npoints - 1, feed.npoints)[0])
                last = (feed.start + feed.interval * (feed.npoints - 1), value if math.isfinite(value) else None)
            if query.split is not None:
                return _time_of_day(feed, slots, query, last)
            return _data(feed, slots, query, last)
        finally:
            if fd is not None:
                os.close(fd)

    def export(self, feedid: int, start: int = 0, length: int | None = None) -> bytes:
        """``feed/export.json``: the data file from byte ``start``, one slot early
        so that a backup can refresh its last point (as emoncms)."""
        feed, fd = self._snapshot(feedid)
        if fd is None:
            return b""
        offset = max(int(start) // 4 * 4, 0)
        if offset >= 4:
            offset -= 4
        size = feed.npoints * 4
        count = size - offset if length is None else min(length, size - offset)
        try:
            return os.pread(fd, max(count, 0), offset) if count > 0 else b""
        finally:
            os.close(fd)


class _SlotReader:
    """Reads a data file's slots: ranges, or scattered positions (nothing for an empty feed)."""

    def __init__(self, fd: int | None, npoints: int) -> None:
        self.fd = fd
        self.npoints = npoints if fd is not None else 0

    def read(self, lo: int, hi: int) -> np.ndarray:
        lo, hi = max(lo, 0), min(hi, self.npoints)
        if hi <= lo or self.fd is None:
            return np.empty(0, dtype="<f4")
        return _read_slots(self.fd, lo, hi)

    def at(self, positions: np.ndarray) -> np.ndarray:
        """float64 values at ``positions`` (any order; each must be a stored slot)."""
        if positions.size == 0 or self.fd is None:
            return np.empty(positions.shape)
        wanted, inverse = np.unique(positions, return_inverse=True)
        return finite(_gather(self.fd, wanted, self.npoints))[inverse].reshape(positions.shape)


def _data(feed: _Feed, slots: _SlotReader, query: DataQuery, last: object) -> Series:
    """emoncms: a row at each division start; the slot at that time (floor), or
    the mean of the slots inside the division with ``average``."""
    if query.end <= query.start:
        raise FeedError("request end time before start time")
    interval = feed.interval
    average = query.average
    if query.interval in DMY_INTERVALS:
        bounds = dmy_bounds(query.start, query.end, str(query.interval), query.zone(), query.max_rows)
        starts, ends = bounds[:-1], bounds[1:]
    else:
        step = interval if query.interval == "original" else int(query.interval)
        step = max(step, 1)
        if query.limitinterval and interval > 0:
            step = max(step, interval)  # not below the feed's interval
            step = int(php_round(step / interval)) * interval  # whole feed intervals
        if step <= interval:
            average = False  # emoncms: every division holds one slot at most
        starts = fixed_starts(query.start, query.end, step, query.max_rows)
        ends = starts + step
    values = np.full(starts.shape[0], np.nan)
    if interval > 0 and slots.npoints:
        if average:
            first = np.clip((starts - feed.start) // interval, 0, slots.npoints)
            past = np.clip((ends - feed.start) // interval, 0, slots.npoints)
            values = segment_means(slots.read, first, past - first, fresh=True)
        else:
            end_time = feed.start + interval * (slots.npoints - 1)
            inside = (starts >= feed.start) & (starts <= end_time)
            values[inside] = slots.at((starts[inside] - feed.start) // interval)
    return finish(starts, values, query, last)


def _time_of_day(feed: _Feed, slots: _SlotReader, query: DataQuery, last: object) -> Series:
    """emoncms's ``get_data_DMY_time_of_day``: per day, week or month, the value
    at each split hour after its local midnight (the nearest slot)."""
    if query.interval not in ("daily", "weekly", "monthly"):
        raise FeedError("split needs interval daily, weekly or monthly")
    assert query.split is not None
    bounds = dmy_bounds(query.start, query.end, str(query.interval), query.zone(), query.max_rows)
    starts = bounds[:-1]
    # emoncms: (int)(hours * 3600.0), truncated toward zero
    offsets = np.array([math.trunc(h * 3600.0) for h in query.split], dtype=np.int64)
    values = np.full((starts.shape[0], offsets.shape[0]), np.nan)
    if feed.interval > 0 and slots.npoints and values.size:
        pos = php_round((starts[:, None] + offsets[None, :] - feed.start) / feed.interval).astype(np.int64)
        stored = (pos >= 0) & (pos < slots.npoints)
        values[stored] = slots.at(pos[stored])
    return Series(starts, values, last if query.with_last else None)


def _open_write_close(writes: list[tuple[str, memoryview, int]]) -> None:
    for path, data, offset in writes:
        fd = os.open(path, os.O_WRONLY)
        try:
            pwrite_all(fd, data, offset)
        finally:
            os.close(fd)


def _refuse(feedid: int, slots: np.ndarray, reason: str) -> list[Refusal]:
    return [Refusal(feedid, t, reason) for t in slots.tolist()]


def _read_slots(fd: int, lo: int, hi: int) -> np.ndarray:
    """Slots [lo, hi) in a new, writable array (fewer at the end of the file)."""
    out = np.empty(hi - lo, dtype="<f4")
    got = os.preadv(fd, [out], 4 * lo)
    return out[: got // 4]


def _gather(fd: int, positions: np.ndarray, npoints: int) -> np.ndarray:
    """The slots at sorted ``positions``: one read of the span, or a map if it is large."""
    lo, hi = int(positions[0]), int(positions[-1]) + 1
    if hi - lo <= PREAD_SPAN:
        return _read_slots(fd, lo, hi)[positions - lo]
    with mmap.mmap(fd, npoints * 4, prot=mmap.PROT_READ) as mapped:
        slots = np.frombuffer(mapped, dtype="<f4", count=npoints)
        out = slots[positions].copy()
        del slots  # release the buffer before the map closes
        return out


__all__ = ["PHPFina", "FeedMeta", "FeedError", "NoSuchFeed", "MAX_PADDING", "MIN_INTERVAL"]
