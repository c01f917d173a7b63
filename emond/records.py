"""The storage record: one format for queues, the stream and the engines.

A batch is a packed numpy array of ``RECORD``. Within a batch the order of
acceptance is kept; engines let the last accepted record of a slot win.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

RECORD = np.dtype(
    [
        ("feed", "<u4"),
        ("time", "<u4"),
        ("value", "<f4"),
        ("engine", "u1"),
        ("padding", "u1"),
    ]
)

ENGINE_PHPTIMESERIES = 2
ENGINE_PHPFINA = 5

PADDING_NAN = 0
PADDING_JOIN = 1


class Refusal(NamedTuple):
    """A record an engine would not store, and why (a short reason code)."""

    feed: int
    time: int
    reason: str


# Reason codes shared by the engines (also the label values in /metrics).
REASON_NO_FEED = "no_feed"
REASON_WRONG_ENGINE = "wrong_engine"
REASON_TOO_OLD = "time_too_old"
REASON_TOO_NEW = "time_too_new"
REASON_PADDING = "padding_limit"


def make_records(
    feed: int | np.ndarray,
    times: "np.typing.ArrayLike",
    values: "np.typing.ArrayLike",
    engine: int = ENGINE_PHPFINA,
    padding: int = PADDING_NAN,
) -> np.ndarray:
    """Build a RECORD batch from parallel arrays (a convenience for callers and tests)."""
    times = np.asarray(times)
    batch = np.empty(times.shape[0], dtype=RECORD)
    batch["feed"] = feed
    batch["time"] = times
    batch["value"] = values
    batch["engine"] = engine
    batch["padding"] = padding
    return batch


def refusals_from(batch: np.ndarray, mask: np.ndarray, reason: str) -> list[Refusal]:
    """The refusals for the records of ``batch`` selected by ``mask``."""
    picked = batch[mask]
    return [
        Refusal(int(f), int(t), reason)
        for f, t in zip(picked["feed"].tolist(), picked["time"].tolist())
    ]
