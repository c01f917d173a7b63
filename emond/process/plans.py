"""Process lists planned once per user version, and whole passes run as array operations.

The consumer's general path (``emond.process.consumer``) runs every value of
every packet through ``functions.run_steps``: about a dozen Python objects and
calls per value. Most lists are not stateful, though: they log the value
(perhaps scaled or offset) to feeds. For a pass whose every value belongs to
such a list (``Plan.ops``) and arrives in positional frames (what devices
send, queued as decoded by ``inputparse``), ``run_columns`` does the same work
per input column with numpy: the input's last value, the feeds' last values
and the storage records, in exactly the order the general path emits them (a
sequence key per value and step, sorted once). Anything it cannot do exactly
the same way — a new input, a stateful or input-reading step, a value a step
would refuse, a frame with named values — makes it decline (``None``) before
it changes any state, and the general path runs the pass instead.

The rule the general path applies value by value — an input's (or feed's)
last value is replaced by a value whose time is not older — gives, over a
pass, the value with the latest time, the last one in order among equal
times; ``_last`` picks that one.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Protocol

import numpy as np

from emond.inputparse import MAX_POSITION, POSITIONS
from emond.meta.feeds import Feed
from emond.meta.inputs import Input
from emond.processlist import FEEDID, INPUTID, PROCESSES, Step
from emond.records import PADDING_NAN, RECORD
from emond.process.functions import FLOAT32_MAX, FUNCTIONS, ProcessState, References, references

# Operations of a planned list (process ids of emoncms.org).
LOG, SCALE, OFFSET, ALLOWPOSITIVE, ALLOWNEGATIVE, SIGNED2UNSIGNED, RESET2ZERO = 1, 2, 3, 24, 25, 26, 33
PASSTHROUGH = frozenset({9, 10, 13, 16, 17, 18, 19})  # no-ops emoncms.org kept: the value passes on
ARRAY_OPS = frozenset({LOG, SCALE, OFFSET, ALLOWPOSITIVE, ALLOWNEGATIVE, SIGNED2UNSIGNED, RESET2ZERO}) | PASSTHROUGH
MAX_OPS = 16  # steps of a planned list (the sequence key keeps room for this many per value)
_COLUMNS = 256  # values a positional frame can carry, at most (the sequence key's room per frame)
_INT = frozenset((int,))
_OFFSET, _NODE, _VALUES = itemgetter(0), itemgetter(1), itemgetter(slice(2, None))


def _feed_arg(process: int) -> bool:
    p = PROCESSES.get(process)
    return p is not None and p.argtype == FEEDID


def _input_arg(process: int) -> bool:
    p = PROCESSES.get(process)
    return p is not None and p.argtype == INPUTID


@dataclass(frozen=True)
class Plan:
    """An input's process list, worked out once per user version."""

    steps: list[Step]
    refs: References  # what the list reads (loaded before a pass)
    # The list as array operations, (process, argument) — for LOG the Feed, None when it is
    # not the user's (nothing written) —, cut at an unknown process (the list stops there);
    # None when a step needs the general path (state, other inputs' or feeds' values).
    ops: tuple[tuple[int, Any], ...] | None


EMPTY_PLAN = Plan([], References(set(), set(), set(), set()), ())


def make_plan(steps: list[Step], feeds: Mapping[int, Feed]) -> Plan:
    """The plan of one input's list; ``feeds``: the user's, by id."""
    refs = references(steps, _feed_arg, _input_arg)
    ops: list[tuple[int, Any]] = []
    for step in steps:
        process = step.process
        if process not in FUNCTIONS:
            break  # unknown: run_steps stops the list here
        if process not in ARRAY_OPS or len(ops) >= MAX_OPS:
            return Plan(steps, refs, None)
        ops.append((process, feeds.get(int(step.arg)) if process == LOG else step.arg))
    return Plan(steps, refs, tuple(ops))


class PlannedUser(Protocol):
    """What a pass needs of a user (``consumer.UserCache``)."""

    inputs: dict[tuple[str, str], Input]
    plans: dict[int, Plan]


class Column(NamedTuple):
    """One input's values in a pass: their sequence keys (the order of the general path),
    packet times and values."""

    seq: np.ndarray  # int64
    when: np.ndarray  # int64
    value: np.ndarray  # float64


class Columns(NamedTuple):
    """A pass gathered by input: ``columns`` by input id, the plans and what they read."""

    columns: dict[int, Column]
    plans: dict[int, Plan]
    packets: int


def gather(groups: Iterable[list[Any]], users: Mapping[int, PlannedUser]) -> Columns | None:
    """The values of a pass by input, or None if any of it needs the general path (a named
    value, a new input, a list that is not array operations)."""
    blocks: dict[tuple[int, str, int], list[tuple[np.ndarray, np.ndarray, list[Any]]]] = {}
    frame_no = 0
    packets = 0
    for userid, _received, time_ref, frames in groups:
        n = len(frames)
        if not n:
            continue
        packets += n
        lens = set(map(len, frames))
        if min(lens) < 3 or max(lens) > MAX_POSITION + 1:
            return None
        if dict in set(map(type, map(itemgetter(2), frames))):
            return None  # named values (the careful path's frames)
        offsets = list(map(_OFFSET, frames))
        if set(map(type, offsets)) != _INT or type(time_ref) is not int:
            return None  # times as the general path computes them: int + int
        nodes = list(map(_NODE, frames))
        user = int(userid)
        if len(lens) == 1 and len(set(nodes)) == 1:
            parts: Iterable[tuple[Any, int, list[int] | None]] = [(nodes[0], lens.pop(), None)]
        else:  # several nodes or widths in one request: a block for each
            by: dict[tuple[Any, int], list[int]] = {}
            for i, frame in enumerate(frames):
                by.setdefault((frame[1], len(frame)), []).append(i)
            parts = [(node, width, rows) for (node, width), rows in by.items()]
        whens = np.array(offsets, dtype=np.int64) + time_ref
        numbers = np.arange(frame_no, frame_no + n, dtype=np.int64)
        for node, width, rows in parts:
            key = (user, node if type(node) is str else str(node), width - 2)
            if rows is None:
                blocks.setdefault(key, []).append((numbers, whens, frames))
            else:
                blocks.setdefault(key, []).append((numbers[rows], whens[rows], [frames[i] for i in rows]))
        frame_no += n
    pieces: dict[int, list[Column]] = {}
    plans: dict[int, Plan] = {}
    for (userid, node, width), found in blocks.items():
        user = users[userid]
        numbers = np.concatenate([f[0] for f in found]) * _COLUMNS if len(found) > 1 else found[0][0] * _COLUMNS
        whens = np.concatenate([f[1] for f in found]) if len(found) > 1 else found[0][1]
        frames = list(chain.from_iterable(f[2] for f in found))
        try:  # float() of each value, as frame_values does, without a Python float per value kept
            matrix = np.fromiter(chain.from_iterable(map(_VALUES, frames)), np.float64, len(frames) * width).reshape(-1, width)
        except (TypeError, ValueError):  # not numbers (queued frames' values are): the general path decides
            return None
        if not np.isfinite(matrix).all():  # None gives NaN here, where float() raises
            return None
        names = POSITIONS[1 : width + 1]
        for c, name in enumerate(names):
            inp = user.inputs.get((node, name))
            if inp is None:
                return None  # a new input: created on the general path
            plan = user.plans.get(inp.id, EMPTY_PLAN)
            if plan.ops is None:
                return None
            plans[inp.id] = plan
            pieces.setdefault(inp.id, []).append(Column((numbers + c) * MAX_OPS, whens, matrix[:, c]))
    columns = {
        inputid: found[0] if len(found) == 1 else Column(*(np.concatenate(parts) for parts in zip(*found)))
        for inputid, found in pieces.items()
    }
    return Columns(columns, plans, packets)


def chunks(groups: list[list[Any]], limit: int) -> Iterator[list[list[Any]]]:
    """``groups`` in order, in chunks of about ``limit`` values (a group cut between its frames
    when it alone is larger), so that a pass gives the reactor a turn between chunks."""
    chunk: list[list[Any]] = []
    size = 0
    for group in groups:
        frames = group[3]
        values = sum(map(len, frames)) - 2 * len(frames)  # positional frames: their values
        if values > limit and len(frames) > 1:
            step = max(1, len(frames) * limit // values)
            parts = [[*group[:3], frames[i : i + step]] for i in range(0, len(frames), step)]
        else:
            parts = [group]
        for part in parts:
            if chunk and size >= limit:
                yield chunk
                chunk, size = [], 0
            chunk.append(part)
            size += values * len(part[3]) // max(1, len(frames))
    if chunk:
        yield chunk


def reads(columns: Columns) -> tuple[set[int], set[int]]:
    """(inputs, feeds) a gathered pass needs loaded: its inputs and what their lists name."""
    inputids = set(columns.columns)
    feedids: set[int] = set()
    for plan in columns.plans.values():
        feedids |= plan.refs.feeds
        inputids |= plan.refs.inputs
    return inputids, feedids


def _last(seq: np.ndarray, when: np.ndarray) -> int:
    """The index of the value that ends up last: the latest time, the last in order among equals."""
    latest = when.max()
    at = np.flatnonzero(when == latest)
    return int(at[seq[at].argmax()]) if len(at) > 1 else int(at[0])


def run_columns(state: ProcessState, columns: Columns) -> bool:
    """Run a gathered pass into ``state`` (records in ``state.arrays``); False, with the state
    unchanged, if some value would be refused (the general path counts it)."""
    written: list[tuple[Feed, Column]] = []
    for inputid, column in columns.columns.items():
        value = column.value
        for k, (process, arg) in enumerate(columns.plans[inputid].ops):  # type: ignore[union-attr]
            if process == LOG:
                if arg is not None:
                    if not (np.abs(value) <= FLOAT32_MAX).all():  # also NaN
                        return False
                    written.append((arg, Column(column.seq + k, column.when, value)))
            elif process == SCALE:
                value = value * arg
            elif process == OFFSET:
                value = value + arg
            elif process == ALLOWPOSITIVE:  # max(value, 0.0), as Python: -0.0 stays
                value = np.where(0.0 > value, 0.0, value)
            elif process == ALLOWNEGATIVE:
                value = np.where(0.0 < value, 0.0, value)
            elif process == SIGNED2UNSIGNED:
                value = np.where(value < 0, value + 65536, value)
            elif process == RESET2ZERO:
                value = np.zeros_like(value)
            if not np.isfinite(value).all():
                return False
    # Nothing refused: apply. Inputs' last values ...
    for inputid, column in columns.columns.items():
        i = _last(column.seq, column.when)
        last = state.inputs.get(inputid)
        when = int(column.when[i])
        if last is None or when >= last[0]:
            state.inputs[inputid] = (when, float(column.value[i]))
            state.dirty_inputs.add(inputid)
    # ... the feeds' last values (several inputs may write one feed) ...
    by_feed: dict[int, list[Column]] = {}
    feeds: dict[int, Feed] = {}
    for feed, column in written:
        by_feed.setdefault(feed.id, []).append(column)
        feeds[feed.id] = feed
    for feedid, found in by_feed.items():
        seq = np.concatenate([c.seq for c in found]) if len(found) > 1 else found[0].seq
        whens = np.concatenate([c.when for c in found]) if len(found) > 1 else found[0].when
        i = _last(seq, whens)
        source = found[0] if len(found) == 1 else None
        value = source.value[i] if source is not None else np.concatenate([c.value for c in found])[i]
        last = state.feeds.get(feedid)
        when = int(whens[i])
        if last is None or when >= last[0]:
            state.feeds[feedid] = (when, float(value))
            state.dirty_feeds.add(feedid)
            state.day_only.discard(feedid)
    # ... and the records, per storage server, in the general path's order.
    by_server: dict[int, list[tuple[Feed, Column]]] = {}
    for feed, column in written:
        by_server.setdefault(feed.server, []).append((feed, column))
    for server, found in by_server.items():
        seq = np.concatenate([c.seq for _f, c in found])
        order = np.argsort(seq)  # the keys are unique: any sort gives the one order
        lengths = [len(c.seq) for _f, c in found]
        records = np.empty(len(seq), dtype=RECORD)
        records["feed"] = np.repeat(np.array([f.id for f, _c in found], dtype=np.uint32), lengths)[order]
        records["time"] = np.concatenate([c.when for _f, c in found])[order]
        records["value"] = np.concatenate([c.value for _f, c in found])[order]
        records["engine"] = np.repeat(np.array([f.engine for f, _c in found], dtype=np.uint8), lengths)[order]
        records["padding"] = PADDING_NAN
        state.arrays.setdefault(server, []).append(records)
    return True
