"""Running process lists: emoncms.org's process functions over a consumer's state.

A consumer keeps, for its tenure of a queue, the values the steps read and
write (``ProcessState``): input and feed last values, each stateful step's
last applied packet time, and the extra per-feed state some processes keep.
Steps change it in memory; the changes and the storage records they emit are
committed with the queue acknowledgement, in one Lua script.

A stateful step (kWh, accumulators, daily max/min, ...) applies a packet
only if its time is later than the last it applied for that input and step
(and than the state it builds on, see ``_applies``): a crash replay or a
device's retry never counts twice. A step that yields no value (``None``)
stops the list for that packet.

Daily steps (kWh/d, max, min, on-time) write, as emoncms.org's
``update_data``, one point per day at the start of the packet's day in the
user's timezone, and keep the feed's last value at the packet's time with
the day's running value.

No record leaves a list with a value a feed cannot hold: a step whose result
is not finite, or a write beyond float32, is refused (counted with
``REASON_OUT_OF_RANGE``) and the steps after it get no value.

State is loaded, rebuilt and committed by ``emond.process.state``; nothing
here does I/O: a process function reads and changes a ``ProcessState`` and
emits records.
"""

from __future__ import annotations

import datetime
import math
import zoneinfo
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import numpy as np

from emond.meta.feeds import Feed
from emond.processlist import DAILY, PROCESSES, Step
from emond.records import PADDING_JOIN, PADDING_NAN

Record = tuple[int, int, float, int, int]  # feed, time, value, engine, padding
ExtraKey = tuple[str, int]  # the extra state a process keeps per feed: (its name, the feed)

FLOAT32_MAX = float(np.finfo(np.float32).max)
REASON_OUT_OF_RANGE = "value_out_of_range"  # NaN, infinite, or beyond what float32 holds


@dataclass
class ProcessState:
    """Values steps read and write (a consumer's, for its tenure of a queue); what is
    ``dirty`` and the records go into the next commit."""

    inputs: dict[int, tuple[int, float | None]] = field(default_factory=dict)
    feeds: dict[int, tuple[int, float]] = field(default_factory=dict)
    steps: dict[int, dict[str, int]] = field(default_factory=dict)
    extra: dict[ExtraKey, dict[str, str]] = field(default_factory=dict)  # (process name, feed) -> its stored fields
    dirty_inputs: set[int] = field(default_factory=set)
    dirty_feeds: set[int] = field(default_factory=set)
    dirty_steps: set[int] = field(default_factory=set)
    dirty_extra: set[ExtraKey] = field(default_factory=set)
    records: dict[int, list[Record]] = field(default_factory=dict)  # by storage server
    day_only: set[int] = field(default_factory=set)  # rebuilt daily feeds: the day of their last packet is known, not its time
    refused: list[tuple[int, int, str]] = field(default_factory=list)  # (input, packet time, reason) since the last commit
    # RECORD arrays by storage server, from passes run as array operations (emond.process.plans)
    arrays: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def set_input(self, inputid: int, when: int, value: float) -> None:
        last = self.inputs.get(inputid)
        if last is None or when >= last[0]:
            self.inputs[inputid] = (when, value)
            self.dirty_inputs.add(inputid)

    def write(
        self, feed: Feed, when: int, value: float, join: bool = False, lastvalue: bool = True, stamp: int | None = None
    ) -> None:
        """Emit a record at ``when``; the feed's last value becomes (``stamp`` or ``when``, value) unless older."""
        padding = PADDING_JOIN if join else PADDING_NAN
        self.records.setdefault(feed.server, []).append((feed.id, when, value, feed.engine, padding))
        stamp = when if stamp is None else stamp
        last = self.feeds.get(feed.id)
        if lastvalue and (last is None or stamp >= last[0]):
            self.feeds[feed.id] = (stamp, value)
            self.dirty_feeds.add(feed.id)
            self.day_only.discard(feed.id)  # a packet's own time from now on

    def clear_changes(self) -> None:
        self.dirty_inputs.clear()
        self.dirty_feeds.clear()
        self.dirty_steps.clear()
        self.dirty_extra.clear()
        self.records = {}
        self.arrays = {}
        self.refused = []


def stored_time(raw: Any) -> int | None:
    """A stored time (unix seconds); None when unset or unreadable (e.g. emoncms.org's date strings)."""
    number = stored_number(raw)
    return None if number is None else int(number)


def stored_number(raw: Any) -> float | None:
    """A stored value; None when unset, empty or not a finite number."""
    if raw is None or raw in (b"", ""):
        return None
    try:
        number = float(raw)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def day_start(when: int, tz: zoneinfo.ZoneInfo) -> int:
    """Local midnight (in ``tz``) of the day holding ``when``."""
    local = datetime.datetime.fromtimestamp(when, tz)
    return int(local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())


_NO_EXTRA: Mapping[str, str] = MappingProxyType({})
# The field names of step times (``emond:step``), "<index>:<process>", for the usual list lengths.
_FIELD_INDEXES, _FIELD_PROCESSES = 32, 64
_STEP_FIELDS = tuple(tuple(f"{i}:{p}" for p in range(_FIELD_PROCESSES)) for i in range(_FIELD_INDEXES))


@dataclass
class StepRun:
    """What a process function sees for one step of one packet."""

    state: ProcessState
    feeds: dict[int, Feed]  # the user's feeds, by id
    tz: zoneinfo.ZoneInfo
    inputid: int
    time: int
    index: int = 0
    process: int = 0
    stopped: bool = False  # a value was refused: the steps after get none
    _today: int | None = field(default=None, init=False, repr=False)

    # -- reads ---------------------------------------------------------------

    def input_value(self, inputid: int) -> float:
        """An input's last value (0 when it has none, as emoncms)."""
        value = self.state.inputs.get(int(inputid), (0, None))[1]
        return 0.0 if value is None else value

    def feed(self, feedid: int) -> Feed | None:
        return self.feeds.get(int(feedid))

    def feed_last(self, feedid: int) -> tuple[int, float]:
        """(time, value) of a feed's last accepted value; (0, 0.0) when it has none."""
        return self.state.feeds.get(int(feedid), (0, 0.0))

    def day_start(self, when: int) -> int:
        """Local midnight (the user's timezone) of the day holding ``when``."""
        return day_start(when, self.tz)

    def day_only(self, feedid: int) -> bool:
        """Was the feed's state rebuilt from a daily point (its last packet's time unknown within the day)?"""
        return int(feedid) in self.state.day_only

    def today(self) -> int:
        """``day_start`` of the packet's time (computed once per packet and input)."""
        if self._today is None:
            self._today = self.day_start(self.time)
        return self._today

    # -- idempotency of stateful steps ----------------------------------------

    @property
    def _step_field(self) -> str:
        if self.index < _FIELD_INDEXES and 0 <= self.process < _FIELD_PROCESSES:
            return _STEP_FIELDS[self.index][self.process]  # made once: read twice per stateful step and value
        return f"{self.index}:{self.process}"

    def last_applied(self) -> int:
        """The time of the last packet this step applied for this input (0: none)."""
        return self.state.steps.get(self.inputid, _NO_STEPS).get(self._step_field, 0)

    def fresh(self) -> bool:
        """Is this packet later than the last one this step applied for this input?"""
        return self.time > self.last_applied()

    def applied(self) -> None:
        self.state.steps.setdefault(self.inputid, {})[self._step_field] = self.time
        self.state.dirty_steps.add(self.inputid)

    # -- writes ----------------------------------------------------------------

    def refuse(self, reason: str = REASON_OUT_OF_RANGE) -> None:
        """Refuse this packet's value here (counted); the steps after this one get no value."""
        self.state.refused.append((self.inputid, self.time, reason))
        self.stopped = True

    def write(self, feedid: int, when: int, value: float, join: bool = False) -> bool:
        feed = self.feed(feedid)
        if feed is None:
            return False  # deleted or not the user's: nothing to write to
        if not abs(value) <= FLOAT32_MAX:  # also NaN
            self.refuse()
            return False
        self.state.write(feed, when, value, join)
        return True

    def write_day(self, feedid: int, day: int, value: float) -> bool:
        """A daily feed's point, emoncms.org's ``update_data``: the record at ``day`` (a day start),
        the feed's last value (packet time, value), so that the next packet finds when it was last
        counted (increments) and which day it belongs to (resets)."""
        feed = self.feed(feedid)
        if feed is None:
            return False
        if not abs(value) <= FLOAT32_MAX:
            self.refuse()
            return False
        self.state.write(feed, day, value, stamp=self.time)
        return True

    def extra(self, name: str, feedid: int) -> Mapping[str, str]:
        return self.state.extra.get((name, int(feedid)), _NO_EXTRA)

    def set_extra(self, name: str, feedid: int, values: dict[str, str]) -> None:
        key = (name, int(feedid))
        self.state.extra[key] = values
        self.state.dirty_extra.add(key)

    def extra_timevalue(self, name: str, feedid: int) -> tuple[int, float] | None:
        """The {time, value} a process keeps per feed (emoncms.org's ``process:<name>:<feed>``); None if unset."""
        stored = self.extra(name, feedid)
        when, value = stored_time(stored.get("time")), stored_number(stored.get("value"))
        return None if when is None or value is None else (when, value)

    def set_extra_timevalue(self, name: str, feedid: int, when: int, value: float) -> None:
        self.set_extra(name, feedid, {"time": str(when), "value": repr(float(value))})


_NO_STEPS: Mapping[str, int] = MappingProxyType({})

ProcessFunction = Callable[[StepRun, Any, float], "float | None"]

# Extra per-feed state keys processes read (loaded before running).
EXTRA_STATE: Mapping[int, str] = MappingProxyType({15: "ratechange", 21: "kwhtopower", 23: "kwhtokwhd", 34: "whaccumulator"})

KWH_MAX_GAP = 7200  # s: a longer gap between packets adds no energy (emoncms.org)
WH_MAX_POWER = 25000.0  # W: a Wh increment implying this much or more is an error (emoncms.org)


def _passthrough(run: StepRun, arg: Any, value: float) -> float | None:
    return value


# -- stateful steps: the rules they share ---------------------------------------
#
# A stateful step applies a packet only if it is later than the last packet the
# step applied (``run.fresh()``) and than ``since``, the time of the state the
# step builds on (its feed's last value, or the {time, value} it keeps). The
# second test keeps the promise when the step's own record is gone (a list edit
# moves the step to another index) and rules out negative elapsed times. A step
# whose feed is not the user's (deleted) applies nothing.
#
# A packet not applied changes nothing and writes nothing. What it passes on:
# - a step that passes its input value on (kWh, kWh/d, on-time, max, min) passes
#   it on unchanged: its output never depended on its state;
# - a step whose output comes from its state (accumulators, kWh to power) passes
#   on, for a repeat of the packet it applied last (a device's retry, a second
#   packet in the same second), what it passed on then, which is still in its
#   state; for an older packet (back-fill) it cannot know what it would have
#   passed on, so it passes nothing: the steps after it write nothing rather than
#   a wrong value at an old time. pulse_diff and ratechange pass nothing either;
# - kwh_to_kwhd passes its reading on, or for a repeat of its last packet the
#   reading it kept then (a reading going down was replaced by the last good one).


def _applies(run: StepRun, feedid: Any, since: int) -> bool:
    return int(feedid) in run.feeds and run.fresh() and run.time > since


def _repeat(run: StepRun, feedid: Any, applied_at: int, output: float) -> float | None:
    return output if applied_at == run.time and int(feedid) in run.feeds else None


def _kwh_increment(last_time: int, now: int, power: float) -> float:
    """kWh of ``power`` W since ``last_time``; nothing without a last time or after a gap of KWH_MAX_GAP or more."""
    elapsed = now - last_time
    return elapsed * power / 3600000.0 if last_time and elapsed < KWH_MAX_GAP else 0.0


def _add_to_day(run: StepRun, feedid: Any, value: float, increment: Callable[[int], float]) -> float | None:
    """The daily totals: ``increment(last_time)`` added to the feed's point for the local
    day, or starting the day's point when the last one is from an earlier day."""
    last_time, total = run.feed_last(feedid)
    if not _applies(run, feedid, last_time):
        return value
    today = run.today()
    # last_time < run.time: the last value is today's exactly when it is not before today's start
    run.write_day(feedid, today, (total if last_time >= today else 0.0) + increment(last_time))
    run.applied()
    return value


# -- the process functions ---------------------------------------------------------


def log_to_feed(run: StepRun, feedid: Any, value: float) -> float | None:
    run.write(feedid, run.time, value)
    return value


def scale(run: StepRun, arg: Any, value: float) -> float | None:
    return value * arg


def offset(run: StepRun, arg: Any, value: float) -> float | None:
    return value + arg


def power_to_kwh(run: StepRun, feedid: Any, value: float) -> float | None:
    """Cumulative kWh: + elapsed * W / 3.6e6 since the feed's last value (none after a 7200 s gap); join padding."""
    last_time, kwh = run.feed_last(feedid)
    if not _applies(run, feedid, last_time):
        return value
    run.write(feedid, run.time, kwh + _kwh_increment(last_time, run.time, value), join=True)
    run.applied()
    return value


def power_to_kwhd(run: StepRun, feedid: Any, value: float) -> float | None:
    """kWh per local day: the increment of power_to_kwh, added to the day's total or starting a new day."""
    # rebuilt from a daily point: when the last packet came is unknown, so no increment (as after a gap)
    return _add_to_day(run, feedid, value, lambda last_time: 0.0 if run.day_only(feedid) else _kwh_increment(last_time, run.time, value))


def times_input(run: StepRun, inputid: Any, value: float) -> float | None:
    return value * run.input_value(inputid)


def input_ontime(run: StepRun, feedid: Any, value: float) -> float | None:
    """Seconds per local day the value was on: the time since the last packet counts when this value is > 0."""

    def on_for(last_time: int) -> float:
        elapsed = run.time - last_time
        return 0.0 if value <= 0 or elapsed >= KWH_MAX_GAP or run.day_only(feedid) else float(elapsed)

    return _add_to_day(run, feedid, value, on_for)


def kwhinc_to_kwhd(run: StepRun, feedid: Any, value: float) -> float | None:
    """Wh increments summed into kWh per local day."""
    return _add_to_day(run, feedid, value, lambda last_time: value / 1000.0)


def add_input(run: StepRun, inputid: Any, value: float) -> float | None:
    return value + run.input_value(inputid)


def divide_input(run: StepRun, inputid: Any, value: float) -> float | None:
    divisor = run.input_value(inputid)
    return value / divisor if divisor > 0 else None


def accumulator(run: StepRun, feedid: Any, value: float) -> float | None:
    """The feed's last value + the value; join padding; passes the total on."""
    last_time, total = run.feed_last(feedid)
    if not _applies(run, feedid, last_time):
        return _repeat(run, feedid, last_time, total)
    total += value
    run.write(feedid, run.time, total, join=True)
    run.applied()
    return total


def ratechange(run: StepRun, feedid: Any, value: float) -> float | None:
    """Writes the change since the previous value (none for the first); passes nothing on, as emoncms.org."""
    last = run.extra_timevalue("ratechange", feedid)
    if not _applies(run, feedid, last[0] if last else 0):
        return None
    if last is not None:
        run.write(feedid, run.time, value - last[1])
    run.set_extra_timevalue("ratechange", feedid, run.time, value)
    run.applied()
    return None  # emoncms.org's function returns nothing: the list stops here


def pulse_diff(run: StepRun, feedid: Any, value: float) -> float | None:
    """Writes the (unsigned 16-bit) pulse count, passes on the increment since the feed's last count.

    A count below the last one is a counter reset: the count is the increment.
    A count of 0 passes nothing on (emoncms.org's function returns nothing then).
    """
    count = value + 65536 if value < 0 else value
    last_time, last = run.feed_last(feedid)
    if count <= 0 or not _applies(run, feedid, last_time):
        return None
    increment = (count - last if count >= last else count) if last_time else 0.0
    run.write(feedid, run.time, count)
    run.applied()
    return increment


def kwh_to_power(run: StepRun, feedid: Any, value: float) -> float | None:
    """Writes and passes on the mean power (W) between two cumulative kWh readings; the first passes nothing."""
    last = run.extra_timevalue("kwhtopower", feedid)
    if not _applies(run, feedid, last[0] if last else 0):
        return _repeat(run, feedid, *run.feed_last(feedid))
    run.set_extra_timevalue("kwhtopower", feedid, run.time, value)
    run.applied()
    if last is None:
        return None  # no earlier reading, no power (emoncms.org passes nothing on either)
    power = (value - last[1]) * 3600000.0 / (run.time - last[0])
    run.write(feedid, run.time, power)
    return power


def subtract_input(run: StepRun, inputid: Any, value: float) -> float | None:
    return value - run.input_value(inputid)


def kwh_to_kwhd(run: StepRun, feedid: Any, value: float) -> float | None:
    """kWh per local day from a cumulative kWh reading; a reading below the last is ignored (kept as the last)."""
    feed_time, kwh = run.feed_last(feedid)
    last = run.extra_timevalue("kwhtokwhd", feedid)
    if not _applies(run, feedid, max(feed_time, last[0] if last else 0)):
        return last[1] if last is not None and last[0] == run.time else value
    if last is not None:
        increment = value - last[1]
        if increment < 0:  # a cumulative reading going down is an error: nothing added, the last one kept
            increment, value = 0.0, last[1]
        today = run.today()
        run.write_day(feedid, today, (kwh if feed_time >= today else 0.0) + increment)
    run.set_extra_timevalue("kwhtokwhd", feedid, run.time, value)
    run.applied()
    return value


def allowpositive(run: StepRun, arg: Any, value: float) -> float | None:
    return max(value, 0.0)


def allownegative(run: StepRun, arg: Any, value: float) -> float | None:
    return min(value, 0.0)


def signed2unsigned(run: StepRun, arg: Any, value: float) -> float | None:
    return value + 65536 if value < 0 else value


def max_value(run: StepRun, feedid: Any, value: float) -> float | None:
    """The local day's largest value, at the day's start: the first packet of a day starts it."""
    last_time, largest = run.feed_last(feedid)
    if not _applies(run, feedid, last_time):
        return value
    today = run.today()
    if last_time < today or value > largest:
        run.write_day(feedid, today, value)
    run.applied()
    return value


def min_value(run: StepRun, feedid: Any, value: float) -> float | None:
    """The local day's smallest value, at the day's start: the first packet of a day starts it."""
    last_time, smallest = run.feed_last(feedid)
    if not _applies(run, feedid, last_time):
        return value
    today = run.today()
    if last_time < today or value < smallest:
        run.write_day(feedid, today, value)
    run.applied()
    return value


def add_feed(run: StepRun, feedid: Any, value: float) -> float | None:
    return value + run.feed_last(feedid)[1]


def sub_feed(run: StepRun, feedid: Any, value: float) -> float | None:
    return value - run.feed_last(feedid)[1]


def multiply_by_feed(run: StepRun, feedid: Any, value: float) -> float | None:
    return value * run.feed_last(feedid)[1]


def divide_by_feed(run: StepRun, feedid: Any, value: float) -> float | None:
    divisor = run.feed_last(feedid)[1]
    return value / divisor if divisor else 0.0


def reset2zero(run: StepRun, arg: Any, value: float) -> float | None:
    return 0.0


def wh_accumulator(run: StepRun, feedid: Any, value: float) -> float | None:
    """A total of the positive increments of a cumulative Wh reading; join padding; passes the total on.

    An increment is counted only if the mean power it implies over the real time
    since the previous reading is under WH_MAX_POWER (emoncms.org subtracted a
    date string there). A reading below the previous one (a counter reset)
    adds nothing, and counting goes on from it. The first reading only sets
    the reference and passes the feed's total on (emoncms.org passed 0).
    """
    feed_time, total = run.feed_last(feedid)
    last = run.extra_timevalue("whaccumulator", feedid)
    if not _applies(run, feedid, max(feed_time, last[0] if last else 0)):
        return _repeat(run, feedid, last[0] if last else 0, total)
    if last is not None:
        increment = value - last[1]
        if increment > 0 and increment * 3600.0 / (run.time - last[0]) < WH_MAX_POWER:
            total += increment
        run.write(feedid, run.time, total, join=True)
    run.set_extra_timevalue("whaccumulator", feedid, run.time, value)
    run.applied()
    return total


# id -> function; processes emoncms.org kept as no-ops pass the value through.
FUNCTIONS: Mapping[int, ProcessFunction] = MappingProxyType({
    1: log_to_feed,
    2: scale,
    3: offset,
    4: power_to_kwh,
    5: power_to_kwhd,
    6: times_input,
    7: input_ontime,
    8: kwhinc_to_kwhd,
    9: _passthrough,
    10: _passthrough,
    11: add_input,
    12: divide_input,
    13: _passthrough,
    14: accumulator,
    15: ratechange,
    16: _passthrough,
    17: _passthrough,
    18: _passthrough,
    19: _passthrough,
    20: pulse_diff,
    21: kwh_to_power,
    22: subtract_input,
    23: kwh_to_kwhd,
    24: allowpositive,
    25: allownegative,
    26: signed2unsigned,
    27: max_value,
    28: min_value,
    29: add_feed,
    30: sub_feed,
    31: multiply_by_feed,
    32: divide_by_feed,
    33: reset2zero,
    34: wh_accumulator,
})


def run_steps(steps: list[Step], run: StepRun, value: float) -> None:
    """Run one input's process list for one packet value."""
    for index, step in enumerate(steps):
        function = FUNCTIONS.get(step.process)
        if function is None:
            return  # unknown: emoncms stops the list
        run.index, run.process = index, step.process
        result = function(run, step.arg, value)
        if result is None or run.stopped:
            return  # no value: nothing after this step is written
        if not math.isfinite(result):
            run.refuse()  # inf or NaN (e.g. a scale overflowing): nothing a feed could hold follows
            return
        value = result


# Processes that compute with their feed's last value (its time or value): a feed one of them
# names is rebuilt from disk when Redis has no last value for it. The others (log_to_feed,
# ratechange, the no-ops) only write it, or keep their own extra state.
READS_FEED = frozenset({4, 5, 7, 8, 14, 20, 21, 23, 27, 28, 29, 30, 31, 32, 34})


def daily_feeds(lists: Iterable[list[Step]]) -> set[int]:
    """The feeds a daily step of these lists writes (one point per day: rebuilt by day, see above)."""
    return {
        int(step.arg) for steps in lists for step in steps
        if step.process in PROCESSES and PROCESSES[step.process].writes and PROCESSES[step.process].datatype == DAILY
    }


class References(NamedTuple):
    feeds: set[int]  # every feed the list names (their last values are loaded)
    read_feeds: set[int]  # those whose last value a step computes with
    inputs: set[int]
    extra: set[ExtraKey]


def references(steps: list[Step], feed_args: Callable[[int], bool], input_args: Callable[[int], bool]) -> References:
    """Feeds, inputs and extra state keys a list reads, to load them in one round trip."""
    refs = References(set(), set(), set(), set())
    for step in steps:
        if feed_args(step.process):
            refs.feeds.add(int(step.arg))
            if step.process in READS_FEED:
                refs.read_feeds.add(int(step.arg))
        elif input_args(step.process):
            refs.inputs.add(int(step.arg))
        if step.process in EXTRA_STATE:
            refs.extra.add((EXTRA_STATE[step.process], int(step.arg)))
    return refs
