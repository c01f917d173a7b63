"""What is on disk for one feed, read only (``emond-admin feed show|verify``): each file's size
(and SHA-256), the meta the engine would read, the last point, and what does not fit the
engine's format.

It runs where the files are: in ``emond-admin`` on a data directory its node hosts, or on a
storage server as the stream's ``inspect`` read. It opens the files read only and never
repairs anything (the engines do that when they open a directory: a PHPFina ``.intent`` is
completed, a PHPTimeSeries torn tail dropped at the next write). A feed being written while it
is read may show its last point past the bytes hashed: each file's size is what was hashed.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import numpy as np

from emond.phpfina import META
from emond.phptimeseries import MARKER, MYD, RECORD_SIZE
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES

VALUE = np.dtype("<f4")  # a PHPFina slot


def inspect_feed(datadir: str, engine: int, feedid: int, verify: bool = False) -> dict[str, Any]:
    """``{"files": {NAME: {"size"[, "sha256"]}}, "meta": {...} | None, "last": [time, value] |
    None, "problems": [...]}`` of feed ``feedid`` of ``engine`` under ``datadir`` (a storage
    location: ``phpfina/``, ``phptimeseries/``). ``verify``: hash every file and read every
    record (PHPTimeSeries markers and time order)."""
    if engine == ENGINE_PHPFINA:
        return _phpfina(os.path.join(datadir, "phpfina"), feedid, verify)
    if engine == ENGINE_PHPTIMESERIES:
        return _phptimeseries(os.path.join(datadir, "phptimeseries"), feedid, verify)
    return {"files": {}, "meta": None, "last": None, "problems": [f"engine {engine} is not one emond stores (5 PHPFina, 2 PHPTimeSeries)"]}


def _file(path: str, verify: bool) -> dict[str, Any]:
    """A file's entry: its size, and its SHA-256 with ``verify`` (the size is what was hashed)."""
    with open(path, "rb") as f:
        if not verify:
            return {"size": os.fstat(f.fileno()).st_size}
        digest = hashlib.file_digest(f, "sha256")
        return {"size": f.tell(), "sha256": digest.hexdigest()}


def _value(raw: float) -> float | None:
    return raw if math.isfinite(raw) else None


def _phpfina(directory: str, feedid: int, verify: bool) -> dict[str, Any]:
    files: dict[str, Any] = {}
    problems: list[str] = []
    meta_name, dat_name = f"{feedid}.meta", f"{feedid}.dat"
    raw = None
    try:
        files[meta_name] = _file(os.path.join(directory, meta_name), verify)
        with open(os.path.join(directory, meta_name), "rb") as f:
            raw = f.read(META.size)
    except FileNotFoundError:
        problems.append(f"{meta_name}: missing")
    try:
        files[dat_name] = _file(os.path.join(directory, dat_name), verify)
    except FileNotFoundError:
        problems.append(f"{dat_name}: missing")
    for suffix, what in ((".intent", "a start_time change was interrupted (completed when the storage location next opens)"),
                         (".dat.extend", "a front extension was interrupted (dropped when the storage location next opens)")):
        name = f"{feedid}{suffix}"
        if os.path.exists(os.path.join(directory, name)):
            files[name] = _file(os.path.join(directory, name), verify)
            problems.append(f"{name}: {what}")
    if raw is None:
        return {"files": files, "meta": None, "last": None, "problems": problems}
    if files[meta_name]["size"] != META.size:
        problems.append(f"{meta_name}: {files[meta_name]['size']} bytes, a PHPFina meta has {META.size}")
    _, _, interval, start = META.unpack(raw.ljust(META.size, b"\0"))  # as the engines read it
    dat_size = files.get(dat_name, {}).get("size", 0)
    npoints = dat_size // VALUE.itemsize
    if dat_size % VALUE.itemsize:
        problems.append(f"{dat_name}: {dat_size} bytes, not a whole number of 4-byte values ({dat_size % VALUE.itemsize} bytes over)")
    if interval == 0:
        problems.append(f"{meta_name}: interval 0")
    elif start % interval:
        problems.append(f"{meta_name}: start_time {start} is not a multiple of the interval {interval}")
    if npoints and start == 0:
        problems.append(f"{meta_name}: no start_time, yet {dat_name} holds {npoints} values")
    if not npoints and start:
        problems.append(f"{meta_name}: start_time {start}, yet {dat_name} holds no value")
    end = start + interval * (npoints - 1) if npoints else 0
    last = None
    if npoints:
        with open(os.path.join(directory, dat_name), "rb") as f:
            f.seek((npoints - 1) * VALUE.itemsize)
            value = float(np.frombuffer(f.read(VALUE.itemsize), dtype=VALUE)[0])
        last = [end, _value(value)]
    meta = {"interval": interval, "start_time": start, "npoints": npoints, "end_time": max(end, 0)}
    return {"files": files, "meta": meta, "last": last, "problems": problems}


def _phptimeseries(directory: str, feedid: int, verify: bool) -> dict[str, Any]:
    name = f"feed_{feedid}.MYD"
    path = os.path.join(directory, name)
    problems: list[str] = []
    try:
        entry = _file(path, verify)
    except FileNotFoundError:
        return {"files": {}, "meta": None, "last": None, "problems": [f"{name}: missing"]}
    size = entry["size"]
    npoints = size // RECORD_SIZE
    if size % RECORD_SIZE:
        problems.append(f"{name}: {size} bytes, not a whole number of {RECORD_SIZE}-byte records ({size % RECORD_SIZE} bytes over: a torn append)")
    meta: dict[str, Any] = {"npoints": npoints, "start_time": 0, "end_time": 0}
    last = None
    if npoints:
        with open(path, "rb") as f:
            if verify:
                records = np.frombuffer(f.read(npoints * RECORD_SIZE), dtype=MYD)
                problems += _record_problems(name, records)
                first, final = records[0], records[-1]
            else:
                first = np.frombuffer(f.read(RECORD_SIZE), dtype=MYD)[0]
                f.seek((npoints - 1) * RECORD_SIZE)
                final = np.frombuffer(f.read(RECORD_SIZE), dtype=MYD)[0]
        meta.update(start_time=int(first["time"]), end_time=int(final["time"]))
        last = [int(final["time"]), _value(float(final["value"]))]
    return {"files": {name: entry}, "meta": meta, "last": last, "problems": problems}


def _record_problems(name: str, records: np.ndarray) -> list[str]:
    """Records whose marker is not emoncms's, and times out of order (each time once, rising)."""
    problems = []
    markers = np.flatnonzero(records["marker"] != MARKER)
    if markers.shape[0]:
        problems.append(f"{name}: {markers.shape[0]} records without the marker byte {MARKER} (the first: record {int(markers[0])})")
    times = records["time"].astype(np.int64)
    disorder = np.flatnonzero(np.diff(times) <= 0)
    if disorder.shape[0]:
        i = int(disorder[0]) + 1
        problems.append(
            f"{name}: {disorder.shape[0]} records not after the one before (the first: record {i}, time {int(times[i])} after {int(times[i - 1])})"
        )
    return problems
