"""Averages add each bucket's values in order in doubles, as emoncms's PHP loop does.

``engine.ordered_row_sums`` (the vectorised fast path of ``segment_means`` for a
fixed interval) and ``segment_means`` itself are compared with the loop of
emoncms's ``get_data_combined``, written here as a plain Python loop over
Python floats (doubles): ``$sum = 0; foreach value: if (!is_nan($value)) { $sum +=
$value; $n++; }``, mean ``$sum / $n``. The data mixes magnitudes so that any
other order of addition (numpy's pairwise ``sum``) gives other bits.
"""

from __future__ import annotations

import math

import numpy as np
from twisted.trial import unittest

from emond.engine import TILE_COLUMNS, TILE_ROWS, ordered_row_sums, segment_means


def php_sum(values: "list[float]") -> float:
    total = 0.0
    for v in values:
        total += v
    return total


def php_mean(values: "list[float]") -> float:
    """emoncms: non-finite values are skipped (a missing value); NaN if none is left."""
    kept = [v for v in values if math.isfinite(v)]
    return php_sum(kept) / len(kept) if kept else math.nan


def hostile(rng: np.random.Generator, n: int, dtype: type = np.float32) -> np.ndarray:
    """Values whose sum depends on the order: big and small, both signs, float32 on disk."""
    kind = rng.integers(0, 4, n)
    values = np.where(kind == 0, rng.random(n) * 3000, 0.0)
    values = np.where(kind == 1, rng.choice([1e12, -1e12, 3e7, -3e7], n), values)
    values = np.where(kind == 2, rng.random(n) * 1e-3, values)
    values = np.where(kind == 3, rng.standard_normal(n) * 1e6, values)
    return values.astype(dtype)


class OrderedRowSumsTests(unittest.TestCase):
    def check(self, grid: np.ndarray) -> None:
        got = ordered_row_sums(grid)
        self.assertEqual(got.dtype, np.float64)
        expected = np.array([php_sum([float(v) for v in row]) for row in grid], dtype=np.float64)
        self.assertTrue(np.array_equal(got, expected, equal_nan=True), (grid.shape, got[:4], expected[:4]))

    def test_shapes_around_the_tiles(self) -> None:
        rng = np.random.default_rng(14)
        for rows in (1, 2, 3, TILE_ROWS - 1, TILE_ROWS, TILE_ROWS + 1, 2 * TILE_ROWS + 1):
            for width in (1, 2, 7, TILE_COLUMNS - 1, TILE_COLUMNS, TILE_COLUMNS + 1, 3 * TILE_COLUMNS + 5):
                self.check(hostile(rng, rows * width).reshape(rows, width))

    def test_float64_rows_and_views(self) -> None:
        rng = np.random.default_rng(15)
        data = hostile(rng, 40 * 300, np.float64).reshape(40, 300)
        self.check(data)
        self.check(data[::3, 5:250])  # not contiguous

    def test_the_order_matters_here(self) -> None:
        """The data above tells in-order addition from numpy's pairwise sum."""
        row = np.array([1e16] + [1.0] * 200)
        self.assertEqual(ordered_row_sums(row[None, :])[0], php_sum(row.tolist()))
        self.assertNotEqual(float(np.sum(row)), php_sum(row.tolist()))
        self.check(np.tile(row, (5, 1)))

    def test_empty(self) -> None:
        self.assertEqual(ordered_row_sums(np.empty((0, 5))).shape, (0,))
        self.assertTrue(np.array_equal(ordered_row_sums(np.empty((3, 0))), np.zeros(3)))


class SegmentMeansTests(unittest.TestCase):
    def means(self, data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[float]:
        return [php_mean([float(v) for v in data[s : s + n]]) for s, n in zip(starts.tolist(), lengths.tolist())]

    def check(self, data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        expected = np.array(self.means(data, starts, lengths))
        before = data.copy()
        got = segment_means(lambda lo, hi: data[lo:hi], starts, lengths)
        self.assertTrue(np.array_equal(data, before, equal_nan=True), "the caller's array was changed")
        self.assertTrue(np.array_equal(got, expected, equal_nan=True))
        fresh = segment_means(lambda lo, hi: data[lo:hi].copy(), starts, lengths, fresh=True)
        self.assertTrue(np.array_equal(fresh, expected, equal_nan=True))

    def test_fixed_interval_with_missing_values(self) -> None:
        rng = np.random.default_rng(16)
        data = hostile(rng, 60_000)
        data[rng.random(data.shape[0]) < 0.02] = np.nan
        data[rng.random(data.shape[0]) < 0.002] = np.inf
        data[rng.random(data.shape[0]) < 0.002] = -np.inf
        data[3000:3300] = np.nan  # whole buckets missing
        for length in (2, 17, 100, 1051):
            count = (data.shape[0] - 5) // length
            starts = 5 + np.arange(count) * length
            self.check(data, starts, np.full(count, length))

    def test_uneven_and_clamped_segments(self) -> None:
        rng = np.random.default_rng(17)
        data = hostile(rng, 20_000)
        data[rng.random(data.shape[0]) < 0.05] = np.nan
        bounds = np.sort(rng.choice(np.arange(1, 20_000), 300, replace=False))
        starts, ends = bounds[:-1], bounds[1:]
        self.check(data, starts, ends - starts)
        self.check(data, np.array([0, 10, 10]), np.array([10, 0, 0]))  # empty segments

    def test_an_interval_not_a_multiple_of_the_feeds(self) -> None:
        """Buckets of 1048 and 1049 slots (average.json over a year, 3000 points)."""
        rng = np.random.default_rng(18)
        data = hostile(rng, 400_000)
        data[rng.random(data.shape[0]) < 0.01] = np.nan
        bounds = (np.arange(300) * 10487) // 10
        self.check(data, bounds[:-1], np.diff(bounds))
        bounds = np.cumsum(rng.integers(20, 60, 500))  # dense, many lengths
        self.check(data, bounds[:-1], np.diff(bounds))
        ends = data.shape[0] - np.arange(40, 0, -1) * 7  # the last segments cut by the end of the data
        self.check(data, ends - 30, np.minimum(np.full(40, 30), data.shape[0] - (ends - 30)))
