"""Engine benchmark: batched and scattered PHPFina writes, data.json and average reads.

Run: ``python bench/engines.py [--dir DIR] [--no-sync] [--only PART] [--feeds N]``.
Prints figures; it is not a test. Writes go through ``apply_batch`` as the
storage service calls it, with the sync passes on unless ``--no-sync``: one
per batch, or one per 4 batches as the location's group commit runs them when
4 batches wait in its write queue (each way run twice, early and late). Reads run with the page cache warm (the
file was just written and read once).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from emond.engine import DataQuery  # noqa: E402
from emond.phpfina import PHPFina  # noqa: E402
from emond.records import make_records  # noqa: E402
from emond.storage.location import raise_open_files_limit  # noqa: E402

from _harness import report  # noqa: E402

NOW = 1_750_000_000
YEAR = 365 * 86400


def batched(directory: str, sync: bool, feeds: int = 1000, per_feed: int = 1000, batches: int = 5) -> float:
    """1,000 feeds x 1,000 points per batch, interleaved as devices post them."""
    engine = PHPFina(directory, clock=lambda: NOW, sync=sync)
    ids = np.arange(1, feeds + 1)
    for feedid in ids.tolist():
        engine.create(feedid, 10)
    start = NOW - (batches + 1) * per_feed * 10
    # The first batch starts every feed (meta writes); measure the steady state after it.
    engine.apply_batch(make_records(ids, np.full(feeds, start), np.zeros(feeds)))
    elapsed = 0.0
    for b in range(batches):
        times = start + (1 + b * per_feed + np.arange(per_feed)) * 10
        batch = make_records(np.tile(ids, per_feed), np.repeat(times, feeds), np.random.rand(feeds * per_feed))
        t0 = time.perf_counter()
        refused = engine.apply_batch(batch)
        elapsed += time.perf_counter() - t0
        assert not refused, refused[:3]
    engine.close()
    return feeds * per_feed * batches / elapsed


def scattered_setup(directory: str, feeds: int) -> None:
    """Create the feeds and start each (its first point: meta and intent writes), unsynced:
    setting up is not what is measured."""
    setup = PHPFina(directory, clock=lambda: NOW, sync=False)
    ids = np.arange(1, feeds + 1)
    for feedid in ids.tolist():
        setup.create(feedid, 10)
    setup.apply_batch(make_records(ids, np.full(feeds, NOW - 3600), np.zeros(feeds)))
    setup.close()


def scattered(directory: str, sync: bool, open_files: int, feeds: int, first: int, group: int, batches: int = 8) -> tuple[float, float]:
    """One point for each of ``feeds`` feeds per batch, the next slot of each feed.

    ``group``: batches written (``apply_batch(sync=False)``) before one ``sync_written``
    covers them all, as the storage location's group commit does when that many
    batches are in its write queue (a stream link keeps 4 in flight); 1 is a sync pass
    per batch. Returns (points/s including the syncs, seconds spent in the syncs)."""
    engine = PHPFina(directory, clock=lambda: NOW, sync=sync, open_files=open_files)
    ids = np.arange(1, feeds + 1)
    elapsed = in_sync = 0.0
    for b in range(batches):
        batch = make_records(ids, np.full(feeds, NOW - 3600 + (first + b) * 10), np.random.rand(feeds))
        t0 = time.perf_counter()
        refused = engine.apply_batch(batch, sync=group == 1)
        t1 = time.perf_counter()
        if group > 1 and (b + 1) % group == 0:
            engine.sync_written()
        t2 = time.perf_counter()
        elapsed += t2 - t0
        in_sync += t2 - t1
        assert not refused, refused[:3]
    engine.close()
    return feeds * batches / elapsed, in_sync


def percentiles(samples: list[float]) -> str:
    ms = np.array(samples) * 1000
    return f"p50 {np.percentile(ms, 50):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms"


def reads(directory: str, rounds: int = 300) -> dict[str, str]:
    engine = PHPFina(directory, clock=lambda: NOW, sync=False)
    engine.create(1, 10)
    n = YEAR // 10
    first = NOW - YEAR
    values = np.random.rand(n) * 3000
    values[np.random.rand(n) < 0.01] = np.nan
    engine.write(1, first + np.arange(n) * 10, values)
    rng = np.random.default_rng(1)
    results = {}
    cases = {
        "data.json 800 points (one week)": (7 * 86400, 7 * 86400 // 800, False),
        "data.json 3000 points (one month)": (30 * 86400, 30 * 86400 // 3000, False),
        "average.json 3000 points (whole year)": (YEAR - 86400, (YEAR - 86400) // 2999, True),
    }
    for name, (span, interval, average) in cases.items():
        def call(start: int) -> int:
            query = DataQuery(start=start, end=start + span, interval=interval, average=average)
            return engine.query(1, query).times.shape[0]

        call(first)  # warm
        samples, cpu = [], []
        for _ in range(rounds):
            start = first + int(rng.integers(0, YEAR - span))
            t0, c0 = time.perf_counter(), time.thread_time()
            points = call(start)
            samples.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        assert points > 700, (name, points)
        # The CPU time of the reading thread is less disturbed by others sharing the cores.
        results[name] = f"{percentiles(samples)}; CPU p50 {np.percentile(np.array(cpu) * 1000, 50):.3f} ms"
        if average:
            report("feed/average.json over one year at 10 s, p50 (engine query)", float(np.percentile(samples, 50)) * 1000, "ms",
                   5.0, "goal", better="lower", note=f"CPU p50 {np.percentile(np.array(cpu) * 1000, 50):.2f} ms")
    engine.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", help="where to write (default: a temp dir under /tmp)")
    parser.add_argument("--no-sync", action="store_true", help="skip the fsync/syncfs passes")
    parser.add_argument("--only", choices=("batched", "scattered", "reads"), action="append", help="run only these parts")
    parser.add_argument("--feeds", type=int, action="append", help="scattered: feeds per batch (default 100,000 and 10,000)")
    args = parser.parse_args()
    parts = args.only or ["batched", "scattered", "reads"]
    base = tempfile.mkdtemp(prefix="emond-bench-", dir=args.dir)
    sync = not args.no_sync
    try:
        print(f"PHPFina engine benchmark (sync={'on' if sync else 'off'}, dir {base})")
        if "batched" in parts:
            rate = batched(os.path.join(base, "batched"), sync)
            print(f"batched writes, 1,000 feeds x 1,000 points per batch: {rate:,.0f} points/s (target >= 2,000,000)")
        if "scattered" in parts:
            open_files = raise_open_files_limit() - 1000
            for feeds in args.feeds or [100_000, 10_000]:
                directory = os.path.join(base, f"scattered{feeds}")
                scattered_setup(directory, feeds)
                handles = min(open_files, feeds)
                print(f"scattered writes, 1 point x {feeds:,} feeds per batch, {handles:,} open handles (target >= 300,000 points/s):")
                # A B C C B A: later rounds run faster (the same pages, warmer caches), so
                # each way runs early and late and its figure is the mean of the two.
                ways = [("sync pass per batch", 1, sync), ("group commit, 4 batches per sync pass", 4, sync), ("no sync", 1, False)]
                if not sync:
                    ways = ways[2:]
                rates: dict[str, list[float]] = {label: [] for label, _, _ in ways}
                spent: dict[str, float] = {label: 0.0 for label, _, _ in ways}
                for n, (label, group, synced) in enumerate(ways + ways[::-1]):
                    rate, in_sync = scattered(directory, synced, open_files, feeds, 1 + 8 * n, group)
                    rates[label].append(rate)
                    spent[label] += in_sync
                for label, group, synced in ways:
                    rate = sum(rates[label]) / len(rates[label])
                    passes = f", {spent[label]:.2f} s in its 4 sync passes" if group > 1 else ""
                    print(f"  {label}: {rate:,.0f} points/s (runs {' and '.join(f'{r:,.0f}' for r in rates[label])}{passes})")
                    if group > 1 or not sync:
                        report(f"storage apply, scattered single points, {feeds:,} feeds ({label})", rate, "points/s",
                               300_000, "goal", note=f"{handles:,} open handles")
        if "reads" in parts:
            print("reads over one year of 10 s data (page cache warm):")
            for name, figure in reads(os.path.join(base, "reads")).items():
                print(f"  {name}: {figure}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
