"""Running process lists: emoncms.org's process functions over a consumer's state.

A consumer keeps, for its tenure of a queue, the values the steps read and
write (``ProcessState``): input and feed last values, each stateful step's
last applied packet time, and the extra per-feed state some processes keep.
Steps change it in memory; the changes and the storage records they emit are
committed with the queue acknowledgement, in one Lua script.

A stateful step (kWh, accumulators, daily max/min, ...) applies a packet
only if its time is later than the last it applied for that input and step:
a crash replay or a device's retry never counts twice. A step that yields no
value (``None``) stops the list for that packet.
"""

from __future__ import annotations

import datetime
import zoneinfo
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from emond.feeds import Feed
from emond.process import Step
from emond.queue import Commit
from emond.records import ENGINE_PHPTIMESERIES, PADDING_JOIN, PADDING_NAN

Record = tuple[int, int, float, int, int]  # feed, time, value, engine, padding


def _input_key(inputid: int) -> str:
    return f"input:lastvalue:{inputid}"


def _feed_key(feedid: int) -> str:
    return f"feed:lastvalue:{feedid}"


def _step_key(inputid: int) -> str:
    return f"emond:step:{inputid}"


@dataclass
class ProcessState:
    """Values steps read and write; ``dirty`` keys go into the next commit."""

    inputs: dict[int, tuple[int, float | None]] = field(default_factory=dict)
    feeds: dict[int, tuple[int, float]] = field(default_factory=dict)
    steps: dict[int, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, dict[str, str]] = field(default_factory=dict)
    dirty_inputs: set[int] = field(default_factory=set)
    dirty_feeds: set[int] = field(default_factory=set)
    dirty_steps: set[int] = field(default_factory=set)
    dirty_extra: set[str] = field(default_factory=set)
    records: dict[int, list[Record]] = field(default_factory=dict)  # by storage server

    def missing(self, inputids: Iterable[int], feedids: Iterable[int], extra: Iterable[str]) -> list[tuple[str, Any]]:
        """What must be loaded from Redis before running (keys not cached yet)."""
        wanted: list[tuple[str, Any]] = []
        for i in inputids:
            if i not in self.inputs:
                wanted.append(("input", i))
            if i not in self.steps:
                wanted.append(("step", i))
        wanted += [("feed", f) for f in feedids if f not in self.feeds]
        wanted += [("extra", k) for k in extra if k not in self.extra]
        return wanted

    @staticmethod
    def load_commands(wanted: list[tuple[str, Any]]) -> list[tuple[Any, ...]]:
        commands: list[tuple[Any, ...]] = []
        for kind, key in wanted:
            if kind == "input":
                commands.append(("HMGET", _input_key(key), "time", "value"))
            elif kind == "feed":
                commands.append(("HMGET", _feed_key(key), "time", "value"))
            elif kind == "step":
                commands.append(("HGETALL", _step_key(key)))
            else:
                commands.append(("HGETALL", key))
        return commands

    def loaded(self, wanted: list[tuple[str, Any]], replies: list[Any]) -> None:
        for (kind, key), reply in zip(wanted, replies):
            if kind in ("input", "feed"):
                t, v = reply
                if kind == "input":
                    self.inputs[key] = (int(t), float(v) if v not in (None, b"") else None) if t is not None else (0, None)
                elif t is not None and v is not None:
                    self.feeds[key] = (int(t), float(v))
                else:
                    self.feeds[key] = (0, 0.0)
            else:
                pairs = _pairs(reply)
                if kind == "step":
                    self.steps[key] = {k.decode(): int(v) for k, v in pairs}
                else:
                    self.extra[key] = {k.decode(): v.decode() for k, v in pairs}

    def set_input(self, inputid: int, when: int, value: float) -> None:
        last = self.inputs.get(inputid)
        if last is None or when >= last[0]:
            self.inputs[inputid] = (when, value)
            self.dirty_inputs.add(inputid)

    def write(self, feed: Feed, when: int, value: float, join: bool = False, lastvalue: bool = True) -> None:
        padding = PADDING_JOIN if join else PADDING_NAN
        self.records.setdefault(feed.server, []).append((feed.id, when, value, feed.engine, padding))
        last = self.feeds.get(feed.id)
        if lastvalue and (last is None or when >= last[0]):
            self.feeds[feed.id] = (when, value)
            self.dirty_feeds.add(feed.id)

    def to_commit(self, commit: Commit) -> None:
        for i in self.dirty_inputs:
            t, v = self.inputs[i]
            commit.command("HSET", _input_key(i), "time", t, "value", "" if v is None else repr(v))
        for f in self.dirty_feeds:
            t, v = self.feeds[f]
            commit.command("HSET", _feed_key(f), "time", t, "value", repr(v))
        for i in self.dirty_steps:
            flat = [x for k, v in self.steps[i].items() for x in (k, v)]
            if flat:
                commit.command("HSET", _step_key(i), *flat)
        for key in self.dirty_extra:
            flat = [x for k, v in self.extra[key].items() for x in (k, v)]
            if flat:
                commit.command("HSET", key, *flat)

    def clear_changes(self) -> None:
        self.dirty_inputs.clear()
        self.dirty_feeds.clear()
        self.dirty_steps.clear()
        self.dirty_extra.clear()
        self.records = {}


def _pairs(reply: Any) -> list[tuple[bytes, bytes]]:
    if isinstance(reply, dict):
        return list(reply.items())
    reply = reply or []
    return list(zip(reply[::2], reply[1::2]))


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
        local = datetime.datetime.fromtimestamp(when, self.tz)
        return int(local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())

    # -- idempotency of stateful steps ----------------------------------------

    @property
    def _step_field(self) -> str:
        return f"{self.index}:{self.process}"

    def fresh(self) -> bool:
        """Is this packet later than the last one this step applied for this input?"""
        return self.time > self.state.steps.get(self.inputid, {}).get(self._step_field, 0)

    def applied(self) -> None:
        self.state.steps.setdefault(self.inputid, {})[self._step_field] = self.time
        self.state.dirty_steps.add(self.inputid)

    # -- writes ----------------------------------------------------------------

    def write(self, feedid: int, when: int, value: float, join: bool = False) -> bool:
        feed = self.feed(feedid)
        if feed is None:
            return False  # deleted or not the user's: nothing to write to
        self.state.write(feed, when, value, join)
        return True

    def extra(self, name: str, feedid: int) -> dict[str, str]:
        key = f"process:{name}:{int(feedid)}"
        return self.state.extra.setdefault(key, {})

    def set_extra(self, name: str, feedid: int, values: dict[str, str]) -> None:
        key = f"process:{name}:{int(feedid)}"
        self.state.extra[key] = values
        self.state.dirty_extra.add(key)


ProcessFunction = Callable[[StepRun, Any, float], "float | None"]

# Extra per-feed state keys processes read (loaded before running).
EXTRA_STATE = {15: "ratechange", 21: "kwhtopower", 23: "kwhtokwhd", 34: "whaccumulator"}


def _passthrough(run: StepRun, arg: Any, value: float) -> float | None:
    return value


def log_to_feed(run: StepRun, feedid: Any, value: float) -> float | None:
    run.write(feedid, run.time, value)
    return value


def scale(run: StepRun, arg: Any, value: float) -> float | None:
    return value * float(arg)


def offset(run: StepRun, arg: Any, value: float) -> float | None:
    return value + float(arg)


def power_to_kwh(run: StepRun, feedid: Any, value: float) -> float | None:
    if not run.fresh():
        return value  # a replay or a retry: counted already
    last_time, last_kwh = run.feed_last(feedid)
    kwh = last_kwh
    if last_time and 0 < run.time - last_time < 7200:
        kwh = last_kwh + (run.time - last_time) * value / 3600000.0
    run.write(feedid, run.time, kwh, join=True)
    run.applied()
    return value


def times_input(run: StepRun, inputid: Any, value: float) -> float | None:
    return value * run.input_value(inputid)


def add_input(run: StepRun, inputid: Any, value: float) -> float | None:
    return value + run.input_value(inputid)


def subtract_input(run: StepRun, inputid: Any, value: float) -> float | None:
    return value - run.input_value(inputid)


def divide_input(run: StepRun, inputid: Any, value: float) -> float | None:
    divisor = run.input_value(inputid)
    return value / divisor if divisor > 0 else None


def accumulator(run: StepRun, feedid: Any, value: float) -> float | None:
    last_time, total = run.feed_last(feedid)
    if not run.fresh():
        return total
    total += value
    run.write(feedid, run.time, total, join=True)
    run.applied()
    return total


def allowpositive(run: StepRun, arg: Any, value: float) -> float | None:
    return max(value, 0.0)


def allownegative(run: StepRun, arg: Any, value: float) -> float | None:
    return min(value, 0.0)


def signed2unsigned(run: StepRun, arg: Any, value: float) -> float | None:
    return value + 65536 if value < 0 else value


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


# id -> function; processes emoncms.org kept as no-ops pass the value through.
FUNCTIONS: dict[int, ProcessFunction] = {
    1: log_to_feed,
    2: scale,
    3: offset,
    4: power_to_kwh,
    6: times_input,
    9: _passthrough,
    10: _passthrough,
    11: add_input,
    12: divide_input,
    13: _passthrough,
    14: accumulator,
    16: _passthrough,
    17: _passthrough,
    18: _passthrough,
    19: _passthrough,
    22: subtract_input,
    24: allowpositive,
    25: allownegative,
    26: signed2unsigned,
    29: add_feed,
    30: sub_feed,
    31: multiply_by_feed,
    32: divide_by_feed,
    33: reset2zero,
}


def run_steps(steps: list[Step], run: StepRun, value: float) -> None:
    """Run one input's process list for one packet value."""
    for index, step in enumerate(steps):
        function = FUNCTIONS.get(step.process)
        if function is None:
            return  # unknown: emoncms stops the list
        run.index, run.process = index, step.process
        result = function(run, step.arg, value)
        if result is None:
            return  # no value: nothing after this step is written
        value = result


def references(steps: list[Step], feed_args: Callable[[int], bool], input_args: Callable[[int], bool]) -> tuple[set[int], set[int], set[str]]:
    """Feeds, inputs and extra state keys a list reads, to load them in one round trip."""
    feeds, inputs, extra = set(), set(), set()
    for step in steps:
        if feed_args(step.process):
            feeds.add(int(step.arg))
        elif input_args(step.process):
            inputs.add(int(step.arg))
        if step.process in EXTRA_STATE:
            extra.add(f"process:{EXTRA_STATE[step.process]}:{int(step.arg)}")
    return feeds, inputs, extra


ENGINES_WITH_UPDATE = (ENGINE_PHPTIMESERIES,)
