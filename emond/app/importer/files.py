"""An emoncms feed's data files: checked, then copied (verified by SHA-256) or adopted in place.

Blocking work, run in threads by the importer. emoncms's layout is emond's (the compat
spec §3): ``<phpfina>/<id>.meta`` (16 bytes: 0, 0 or a legacy point count, interval,
start_time, uint32 LE) and ``<id>.dat`` (float32 LE per slot); ``<phptimeseries>/feed_<id>.MYD``
(9-byte records: marker 249, uint32 time, float32 value, by time). A storage location
of emond keeps them in ``<dir>/phpfina`` and ``<dir>/phptimeseries``.

Adopting links each file into the storage location (a hard link: no byte is copied, the
file is the same inode under emond's name). emond's engines find a feed's files only by
that name in their location's directory (``storage.location``), so a link is how files
elsewhere are used where they are; a symlink would be replaced by the first file an engine
rewrites by rename (PHPTimeSeries inserts, PHPFina front extension) while its other file
stayed behind the link. A link needs the same filesystem; when the emoncms directory *is*
the location's, nothing is linked at all.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from dataclasses import dataclass

import numpy as np

from emond.engine import sync_directory
from emond.phptimeseries import MARKER, MYD, RECORD_SIZE
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES

META = struct.Struct("<IIII")
CHUNK = 1 << 20
SCAN_RECORDS = 1 << 16  # PHPTimeSeries records checked at a time
STALE = (".intent", ".dat.extend")  # what an engine may have left for a feed id, to go before a copy lands
ALREADY = "already imported"


class AdoptImpossible(Exception):
    """Files cannot be linked where emond's storage is (another filesystem)."""


@dataclass(frozen=True)
class FeedFiles:
    """A feed's files at the source, as checked: ``problem`` says why they cannot be imported."""

    feedid: int
    engine: int
    names: tuple[str, ...]  # relative to the engine's directory, the data file first
    problem: str | None = None
    interval: int = 0  # PHPFina
    start_time: int = 0
    points: int = 0


@dataclass(frozen=True)
class FileResult:
    name: str  # e.g. "phpfina/5.dat"
    source: str
    target: str
    bytes: int
    sha256_source: str
    sha256_target: str | None  # None: not written (a dry run)
    status: str  # copied, linked, in place, already imported, would copy, would adopt, ...
    fields_match: bool | None = None  # a file rewritten from its fields (a meta sent over the stream): they match

    @property
    def verified(self) -> bool | None:
        """Whether what this run put in place is the source (None: it put nothing)."""
        if self.sha256_target is None or self.status == ALREADY:
            return None
        if self.fields_match is not None:
            return self.fields_match
        return self.sha256_target == self.sha256_source

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "file": self.name, "source": self.source, "target": self.target, "bytes": self.bytes,
            "sha256_source": self.sha256_source, "sha256_target": self.sha256_target,
            "verified": self.verified, "status": self.status,
        }
        if self.status == ALREADY:  # false once emond has written to the feed: its file is kept
            out["unchanged"] = None if self.sha256_target is None else self.sha256_target == self.sha256_source
        return out


def engine_dir(engine: int) -> str:
    return "phpfina" if engine == ENGINE_PHPFINA else "phptimeseries"


def file_names(engine: int, feedid: int) -> tuple[str, ...]:
    if engine == ENGINE_PHPFINA:
        return (f"{feedid}.dat", f"{feedid}.meta")
    return (f"feed_{feedid}.MYD",)


def inspect(engine: int, directory: str, feedid: int) -> FeedFiles:
    """Check a feed's files in ``directory`` (the emoncms engine's datadir)."""
    names = file_names(engine, feedid)
    absent = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
    if absent:
        return FeedFiles(feedid, engine, names, f"missing files: {', '.join(os.path.join(directory, n) for n in absent)}")
    if engine == ENGINE_PHPFINA:
        return _inspect_phpfina(directory, feedid, names)
    return _inspect_phptimeseries(directory, feedid, names)


def _inspect_phpfina(directory: str, feedid: int, names: tuple[str, ...]) -> FeedFiles:
    dat, meta = (os.path.join(directory, n) for n in names)
    with open(meta, "rb") as f:
        raw = f.read(META.size + 1)
    size = os.path.getsize(dat)

    def corrupt(why: str) -> FeedFiles:
        return FeedFiles(feedid, ENGINE_PHPFINA, names, f"corrupt: {why}")

    if len(raw) != META.size:
        return corrupt(f"{meta} is {os.path.getsize(meta)} bytes, a PHPFina meta is {META.size}")
    _, legacy_points, interval, start = META.unpack(raw)
    if size % 4:
        return corrupt(f"{dat} is {size} bytes, not a whole number of 4-byte points")
    points = size // 4
    if interval == 0:
        return corrupt(f"{meta} holds interval 0")
    if start % interval:
        return corrupt(f"{meta}: start_time {start} is not a multiple of the interval {interval}")
    if start == 0 and points:
        return corrupt(f"{meta} holds no start_time for the {points} points of {dat}")
    if legacy_points > points:  # older emoncms kept a point count here: the data file lost points
        return corrupt(f"{meta} counts {legacy_points} points, {dat} holds {points}")
    return FeedFiles(feedid, ENGINE_PHPFINA, names, None, interval, start, points)


def _inspect_phptimeseries(directory: str, feedid: int, names: tuple[str, ...]) -> FeedFiles:
    path = os.path.join(directory, names[0])
    size = os.path.getsize(path)
    if size % RECORD_SIZE:
        return FeedFiles(feedid, ENGINE_PHPTIMESERIES, names, f"corrupt: {path} is {size} bytes, not a whole number of {RECORD_SIZE}-byte records")
    previous = -1
    with open(path, "rb") as f:
        index = 0
        while True:
            block = f.read(SCAN_RECORDS * RECORD_SIZE)
            if not block:
                break
            records = np.frombuffer(block, dtype=MYD)
            bad = np.flatnonzero(records["marker"] != MARKER)
            if bad.size:
                return FeedFiles(feedid, ENGINE_PHPTIMESERIES, names, f"corrupt: {path} record {index + int(bad[0])} has no record marker")
            times = records["time"].astype(np.int64)
            back = np.flatnonzero(np.diff(np.concatenate(([previous], times))) < 0)
            if back.size:
                return FeedFiles(feedid, ENGINE_PHPTIMESERIES, names, f"corrupt: {path} record {index + int(back[0])} goes back in time")
            previous = int(times[-1])
            index += records.shape[0]
    return FeedFiles(feedid, ENGINE_PHPTIMESERIES, names, None, 0, 0, size // RECORD_SIZE)


def digest(path: str) -> tuple[int, str]:
    """Size and SHA-256 of a file."""
    with open(path, "rb") as f:
        found = hashlib.file_digest(f, "sha256")
        return f.tell(), found.hexdigest()


def _clear_stale(target_dir: str, feedid: int, engine: int) -> None:
    if engine != ENGINE_PHPFINA:
        return
    for suffix in STALE:
        try:
            os.unlink(os.path.join(target_dir, f"{feedid}{suffix}"))
        except FileNotFoundError:
            pass


def copy_feed(files: FeedFiles, source_dir: str, target_dir: str, sync: bool = True) -> list[FileResult]:
    """Copy a feed's files into ``target_dir``: each written beside its final name, read back
    and compared with the SHA-256 of the bytes read from the source, then renamed into
    place (the data file before the meta: an engine takes a feed for existing by its
    meta). A copy that does not match is removed and raises ``OSError``."""
    os.makedirs(target_dir, exist_ok=True)
    _clear_stale(target_dir, files.feedid, files.engine)
    out = []
    for name in files.names:
        source, target = os.path.join(source_dir, name), os.path.join(target_dir, name)
        partial = target + ".import"
        read = hashlib.sha256()
        size = 0
        with open(source, "rb") as src, open(partial, "wb") as dst:
            while chunk := src.read(CHUNK):
                read.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            dst.flush()
            if sync:
                os.fsync(dst.fileno())
        written = digest(partial)
        if written != (size, read.hexdigest()):
            os.unlink(partial)
            raise OSError(errno.EIO, f"the copy of {source} reads back as {written[0]} bytes, sha256 {written[1]}, not {size} bytes, sha256 {read.hexdigest()}")
        os.replace(partial, target)
        out.append(FileResult(f"{engine_dir(files.engine)}/{name}", source, target, size, read.hexdigest(), written[1], "copied"))
    if sync:
        sync_directory(target_dir)
    return out


def adopt_feed(files: FeedFiles, source_dir: str, target_dir: str, sync: bool = True) -> list[FileResult]:
    """Use the feed's files where they are: hard-linked under emond's names (nothing to do
    where they already are emond's). ``AdoptImpossible`` across filesystems."""
    os.makedirs(target_dir, exist_ok=True)
    _clear_stale(target_dir, files.feedid, files.engine)
    out = []
    for name in files.names:
        source, target = os.path.join(source_dir, name), os.path.join(target_dir, name)
        status = "in place"
        if not (os.path.exists(target) and os.path.samefile(source, target)):
            status = "linked"
            partial = target + ".import"
            try:
                os.unlink(partial)
            except FileNotFoundError:
                pass
            try:
                os.link(source, partial)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise AdoptImpossible(
                        f"--adopt cannot link {source} into {target_dir} ({e.strerror}): the emoncms directories must be on "
                        "the filesystem of emond's storage; use --copy"
                    ) from e
                raise
            os.replace(partial, target)
        size, sha256 = digest(target)
        same = os.path.samefile(source, target)
        out.append(FileResult(f"{engine_dir(files.engine)}/{name}", source, target, size, sha256, sha256 if same else "", status))
    if sync:
        sync_directory(target_dir)
    return out


def check_existing(files: FeedFiles, source_dir: str, target_dir: str | None) -> list[FileResult]:
    """An imported feed's files: the source's checksum against emond's copy now (emond may
    have written to it since: then they differ, and emond's is kept). ``target_dir`` None:
    the feed is on a storage server not hosted here, its files are not compared."""
    out = []
    for name in files.names:
        source = os.path.join(source_dir, name)
        size, sha256 = digest(source)
        target, there = "", None
        if target_dir is not None:
            target = os.path.join(target_dir, name)
            try:
                _, there = digest(target)
            except FileNotFoundError:
                there = ""
        out.append(FileResult(f"{engine_dir(files.engine)}/{name}", source, target, size, sha256, there, ALREADY))
    return out


def plan_feed(files: FeedFiles, source_dir: str, target_dir: str, adopt: bool) -> list[FileResult]:
    """A dry run: what would be copied or adopted, with the source's checksums."""
    out = []
    for name in files.names:
        source, target = os.path.join(source_dir, name), os.path.join(target_dir, name)
        size, sha256 = digest(source)
        status = "would adopt" if adopt else "would copy"
        out.append(FileResult(f"{engine_dir(files.engine)}/{name}", source, target, size, sha256, None, status))
    return out
