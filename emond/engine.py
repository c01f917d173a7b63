"""What the feed engines share: the read request rules, the time window and errors.

Both engines (``phpfina``, ``phptimeseries``) take a whole RECORD batch in
``apply_batch`` and answer ``feed/data.json`` reads with the emoncms.org
semantics (compat spec §3.3): start and end in milliseconds, at most 3000
requested points, and one extra point past ``end``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from emond.records import REASON_TOO_NEW, REASON_TOO_OLD, REASON_WRONG_ENGINE, Refusal, refusals_from

MAX_DATAPOINTS = 3000
FIVE_YEARS = 3600 * 24 * 365 * 5
TWO_DAYS = 3600 * 48


class FeedError(Exception):
    """A request an engine refuses; ``str(error)`` is the emoncms message."""


class NoSuchFeed(FeedError):
    def __init__(self, feedid: int) -> None:
        super().__init__("Feed does not exist")
        self.feedid = feedid


def php_round(x: "np.ndarray | float") -> "np.ndarray | float":
    """PHP's round(): halves away from zero (Python's round() is to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


@dataclass(frozen=True)
class DataRequest:
    """A validated ``feed/data.json`` request, in seconds."""

    start: int
    end: int
    interval: int

    @classmethod
    def from_ms(cls, start_ms: float, end_ms: float, interval: float) -> "DataRequest":
        start = int(start_ms / 1000)
        end = int(end_ms / 1000)
        interval = max(int(interval), 1)
        if end <= start:
            raise FeedError("request end time before start time")
        requested = int(php_round((end - start) / interval))
        if requested > MAX_DATAPOINTS:
            raise FeedError(
                "request datapoint limit reached (3000), increase request interval "
                f"or time range, requested datapoints = {requested}"
            )
        return cls(start, end, interval)

    def times(self, interval: int | None = None) -> np.ndarray:
        """The sample times: start, start+interval, ... up to the first one past end.

        emoncms checks ``t <= end`` before advancing, so the point after ``end``
        is included: floor((end-start)/interval) + 2 points.
        """
        step = interval or self.interval
        count = (self.end - self.start) // step + 2
        return self.start + np.arange(count, dtype=np.int64) * step


def format_points(
    times: np.ndarray, values: np.ndarray, skipmissing: bool
) -> list[list]:
    """``[[t_ms, value|None], ...]``; NaN is ``None``, dropped with skipmissing."""
    missing = np.isnan(values)
    if skipmissing:
        keep = ~missing
        times, values, missing = times[keep], values[keep], missing[keep]
    out_values = values.astype(np.float64).tolist()
    out_times = (times.astype(np.int64) * 1000).tolist()
    if missing.any():
        for i in np.flatnonzero(missing).tolist():
            out_values[i] = None
    return [list(pair) for pair in zip(out_times, out_values)]


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
