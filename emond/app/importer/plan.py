"""What an emoncms item becomes in emond, decided without I/O: process lists, times, names.

Every function here is pure: the importer reads the emoncms database and files, asks these
what to store, and lists whatever they refuse (with its reason) in the report.
"""

from __future__ import annotations

import datetime
import math
import re
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

from emond.errors import Invalid
from emond.meta.feeds import MAX_NAME, MAX_UNIT
from emond.meta.inputs import MAX_DESCRIPTION, check_input_name, check_node
from emond.meta.users import APIKEY, valid_timezone
from emond.processlist import FEEDID, INPUTID, PROCESSES, ProcessListError, make_step, process_id
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES

# emoncms's engine ids (Lib/enum.php): what a feed of an engine emond lacks is reported as.
ENGINE_NAMES: Mapping[int, str] = MappingProxyType({
    0: "MYSQL", 1: "TIMESTORE", 2: "PHPTIMESERIES", 3: "GRAPHITE", 4: "PHPTIMESTORE", 5: "PHPFINA",
    6: "PHPFIWA", 7: "VIRTUALFEED", 8: "MYSQLMEMORY", 9: "REDISBUFFER", 10: "CASSANDRA",
})
ENGINES = (ENGINE_PHPFINA, ENGINE_PHPTIMESERIES)
_DATE = re.compile(r"^\s*(\d{4})-(\d{1,2})-(\d{1,2})[ T](\d{1,2}):(\d{1,2}):(\d{1,2})\s*$")


def engine_problem(engine: int) -> str | None:
    """Why a feed of ``engine`` cannot be imported, or None."""
    if engine in ENGINES:
        return None
    name = ENGINE_NAMES.get(engine, "unknown")
    return f"engine {engine} ({name}): emond stores only PHPFina (5) and PHPTimeSeries (2)"


def feed_problem(name: str, tag: str, unit: str) -> str | None:
    """Why a feed's metadata cannot be stored as it is in emond's columns, or None. (emoncms
    checked the characters already; only emond's column widths can refuse.)"""
    for what, text, limit in (("name", name, MAX_NAME), ("tag", tag, MAX_NAME), ("unit", unit, MAX_UNIT)):
        if len(text) > limit:
            return f"feed {what} {text[:80]!r} is longer than emond's {limit} characters: rename it on emoncms and import again"
    return None


def input_problem(nodeid: str, name: str) -> str | None:
    """Why an input cannot be imported (a post could never reach it on emond), or None."""
    try:
        check_node(nodeid)
        check_input_name(name)
    except Invalid as e:
        return f"node {nodeid[:40]!r} name {name[:80]!r}: {e.message}"
    return None


def clip_description(description: str) -> str:
    return description[:MAX_DESCRIPTION]


def apikey_usable(key: str) -> bool:
    """emoncms accepted only 32-character keys, emond 32 lowercase hex ones (as emoncms makes them)."""
    return bool(APIKEY.match(key))


def timezone_or_utc(name: str) -> str:
    return name if name and valid_timezone(name) else "UTC"


def unix_time(value: Any) -> int | None:
    """A time as emoncms stored it (unix seconds, a DATETIME, a ``Y-n-j H:i:s`` string in
    the server's local time) as unix seconds; None if unset or unreadable. Local times are
    read in this machine's time zone, as PHP's strtotime read them on the emoncms server."""
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, datetime.datetime):
        return int(value.timestamp())  # naive: local time
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value) if math.isfinite(value) and value > 0 else None
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        match = _DATE.match(text)
        if match is None:
            return None
        try:
            when = datetime.datetime(*(int(g) for g in match.groups()))
        except ValueError:  # 0000-00-00 00:00:00 and other impossible dates
            return None
        return int(when.timestamp())
    return int(number) if math.isfinite(number) and number > 0 else None


def finite(value: Any) -> float | None:
    """A stored value as a finite float, or None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class Dropped(NamedTuple):
    item: str
    reason: str


class Translated(NamedTuple):
    """An emoncms process list as emond stores it: ``text`` (the items emond runs, as they
    were written: numeric ``1:5`` or named ``process__log_to_feed:5``), the items removed
    (a process emond lacks, a malformed item) and notes on items kept that name a feed or
    input that is not imported (they do nothing, as a step on a deleted feed)."""

    text: str
    dropped: tuple[Dropped, ...]
    notes: tuple[str, ...]


def translate_processlist(text: str, feeds: frozenset[int], inputs: frozenset[int]) -> Translated:
    """``text`` with the items emond cannot run removed. ``feeds``/``inputs``: the user's
    feeds and inputs that are (or will be) in emond. A list with nothing removed is kept
    byte for byte, so ``input/process/get`` answers what emoncms answered."""
    kept: list[str] = []
    dropped: list[Dropped] = []
    notes: list[str] = []
    items = (text or "").split(",")
    for item in items:
        if not item.strip():
            continue
        key, _, arg = item.partition(":")
        try:
            process = process_id(key)
        except ProcessListError:
            dropped.append(Dropped(item, f"process {key.strip()[:60]!r} is not one emond runs"))
            continue
        if ":" in arg:
            dropped.append(Dropped(item, "malformed item (more than one ':')"))
            continue
        try:
            step = make_step(process, arg if ":" in item else None)
        except ProcessListError as e:
            dropped.append(Dropped(item, f"{PROCESSES[process].function}: {e.message}"))
            continue
        kept.append(item)
        argtype = PROCESSES[process].argtype
        if argtype == FEEDID and int(step.arg) not in feeds:
            notes.append(f"{item}: feed {int(step.arg)} is not imported, the step does nothing")
        elif argtype == INPUTID and int(step.arg) not in inputs:
            notes.append(f"{item}: input {int(step.arg)} is not imported, it reads as no value")
    stored = (text or "") if not dropped else ",".join(kept)
    return Translated(stored, tuple(dropped), tuple(notes))
